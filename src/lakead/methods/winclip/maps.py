"""WinCLIP's arithmetic on the patch grid, as pure tensor functions (no model, no I/O).

Equations of Jeong et al. (CVPR 2023):

- :func:`window_indices`: the windows (``s x s`` patches, stride 1) of a ``gh x gw`` grid and
  exactly which patches each covers (the paper's binary masks, Sec. 4.2).
- :func:`text_probability` (Eq. 1): P(anomalous) of an embedding against the two class
  prototypes, a softmax of the cosine similarities divided by the temperature.
- :func:`harmonic_aggregate` (Eq. 2): a patch's score is the harmonic mean of the scores of
  the windows that cover it; :func:`harmonic_mean` the same across scales (image, small and
  mid windows: the zero-shot map, as the public reference implementation reads Sec. 4.2).
- :func:`association` (Eq. 4): a token's distance to the normal shots, ``min_r (1 - <f, r>) / 2``
  over the memory of the same kind of tokens (cosine), optionally leaving out its own image.
- :func:`fuse`: ``(1 - w) * text + w * visual``; WinCLIP+ uses ``w = 1/2`` for maps and scores.
"""

from __future__ import annotations

from collections.abc import Callable

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ...ops import nearest_neighbor

#: Smallest score a harmonic mean divides by (a score of 0 gives a mean of about 0).
EPS = 1e-12


def window_indices(grid: tuple[int, int], size: int) -> torch.Tensor:
    """Every ``size x size`` window of a ``(gh, gw)`` patch grid, stride 1, row-major:
    ``(nw, size * size)`` int64, each row the patch indices (row-major) it covers.

    >>> window_indices((3, 3), 2).tolist()
    [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    """
    gh, gw = grid
    if size < 1 or size > gh or size > gw:
        raise ValueError(f"a {size}x{size} window does not fit in a {gh}x{gw} patch grid")
    idx = torch.arange(gh * gw).reshape(gh, gw)
    wins = idx.unfold(0, size, 1).unfold(1, size, 1)  # (gh - s + 1, gw - s + 1, s, s)
    return wins.reshape(-1, size * size).contiguous()


def text_probability(embeddings: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 1: ``(..., E)`` embeddings and ``(2, E)`` prototypes (normal, anomalous) ->
    ``(...)`` P(anomalous) = softmax over the two of ``cos / temperature``.

    The cosines are elementwise products summed per row (not one matrix product), so an
    image's numbers do not depend on how many others share its batch.

    >>> round(float(text_probability(torch.tensor([1.0, 0.0]), torch.eye(2), 1.0)), 4)
    0.2689
    """
    z = F.normalize(embeddings.float(), dim=-1).unsqueeze(-2)  # (..., 1, E)
    t = F.normalize(prototypes.float().to(z.device), dim=-1)  # (2, E)
    logits = (z * t).sum(dim=-1) / temperature  # (..., 2)
    return logits.softmax(dim=-1)[..., 1]


def harmonic_aggregate(scores: torch.Tensor, windows: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Eq. 2: window scores ``(B, nw)`` -> patch scores ``(B, N)``: for each patch, the
    harmonic mean of the scores of the windows in ``windows (nw, k)`` that cover it (0 for a
    patch no window covers). The windows are fixed: which cover each patch is a table made
    once (:func:`cover_table`), so this is a gather and a sum (what an exported head traces).

    >>> w = window_indices((3, 3), 2)
    >>> [round(v, 4) for v in harmonic_aggregate(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), w, 9)[0].tolist()]
    [1.0, 0.8571, 0.75, 0.6667, 0.48, 0.375, 0.5, 0.3333, 0.25]
    """
    cover, count = cover_table(windows, n_patches)
    inv = 1.0 / scores.float().clamp_min(EPS)  # (B, nw)
    inv = torch.cat([inv, torch.zeros_like(inv[:, :1])], dim=1)  # (B, nw + 1): the last, 0, pads the table
    total = inv[:, cover.to(scores.device)].sum(dim=2)  # (B, N)
    count = count.to(scores.device)
    return torch.where(count > 0, count / total.clamp_min(EPS), torch.zeros_like(total))


def cover_table(windows: torch.Tensor, n_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of ``n_patches`` patches, the windows of ``windows (nw, k)`` that cover it:
    ``(N, c)`` int64 indices (padded with ``nw``) and their count ``(N,)`` float32. Made with
    numpy, so that a traced head holds it as a constant."""
    return _cover_table(tuple(windows.shape), windows.detach().cpu().numpy().astype(np.int64).tobytes(), int(n_patches))


@functools.lru_cache(maxsize=32)
def _cover_table(shape: tuple[int, int], table: bytes, n_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = np.frombuffer(table, dtype=np.int64).reshape(shape)
    covering: list[list[int]] = [[] for _ in range(n_patches)]
    for j, row in enumerate(w):
        for patch in row:
            covering[int(patch)].append(j)
    width = max(1, max(len(c) for c in covering))
    cover = np.full((n_patches, width), shape[0], np.int64)
    for i, c in enumerate(covering):
        cover[i, : len(c)] = c
    return torch.from_numpy(cover), torch.tensor([len(c) for c in covering], dtype=torch.float32)


def harmonic_mean(maps: torch.Tensor) -> torch.Tensor:
    """Harmonic mean over the first axis: ``(S, ...) -> (...)``.

    >>> round(harmonic_mean(torch.tensor([1.0, 0.25])).item(), 4)
    0.4
    """
    return maps.shape[0] / (1.0 / maps.float().clamp_min(EPS)).sum(dim=0)


def association(
    queries: torch.Tensor,
    memory: torch.Tensor,
    *,
    query_image: torch.Tensor | None = None,
    memory_image: torch.Tensor | None = None,
    search: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = nearest_neighbor,
) -> torch.Tensor:
    """Eq. 4: ``(B, Q, E)`` tokens and a ``(M, E)`` memory of normal tokens -> ``(B, Q)``
    ``min_r (1 - cos(f, r)) / 2``. With ``query_image (B,)`` and ``memory_image (M,)``, a token
    never matches the memory of its own image (leave-one-out at fit).

    For unit vectors ``(1 - cos) / 2 = ||a - b||^2 / 4``, so the exact chunked Euclidean search
    of :func:`lakead.ops.nearest_neighbor` finds it on the normalised vectors (``search``: another
    exact search, ``(queries, memory) -> (distances, indices)``, without the leave-one-out).

    >>> a = association(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    >>> [round(v, 4) for v in a[0].tolist()]
    [0.1464, 0.0]
    """
    b, q, e = queries.shape
    qn = F.normalize(queries.float().reshape(b * q, e), dim=-1)  # (B*Q, E)
    mn = F.normalize(memory.float().to(qn.device), dim=-1)  # (M, E)
    if query_image is not None and memory_image is not None:
        d, _ = nearest_neighbor(qn, mn, query_groups=query_image.to(qn.device).repeat_interleave(q),
                                gallery_groups=memory_image.to(qn.device))  # (B*Q,)
    else:
        d, _ = search(qn, mn)  # (B*Q,): the exact search, or the exported head's matrix product
    return (d.square() / 4.0).clamp(0.0, 1.0).reshape(b, q)


def fuse(text: torch.Tensor, visual: torch.Tensor | None, weight: float) -> torch.Tensor:
    """``(1 - weight) * text + weight * visual`` (``text`` alone without a visual part).

    >>> fuse(torch.tensor([0.2]), torch.tensor([0.6]), 0.5).tolist()
    [0.4000000059604645]
    """
    if visual is None:
        return text
    return (1.0 - weight) * text + weight * visual
