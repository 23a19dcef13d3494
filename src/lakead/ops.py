"""Pure tensor math of LAKE: no I/O, no models.

Equation numbers refer to the LAKE paper (arXiv 2604.07802) as restored in ``LAKE.md``.
Convention, stated once for the whole library: **a higher score means more anomalous.**

Shapes: ``B`` images, ``N`` patch tokens per image, ``D`` channels of a block,
``K`` kept channels (sensitive neurons), ``M`` gallery vectors, ``E`` joint-space width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Default bound on the number of float32 distances held at once by the nearest-neighbour
#: search (1M floats = 4 MiB), whatever the size of the gallery or the batch. Smaller blocks stay
#: in the CPU's cache: against 8M, 1M took x0.43 to x0.66 of the time in every case measured
#: (``python benchmarks/search_blocks.py --bounds-only``, docs/SCALE.md).
DEFAULT_BLOCK_ELEMENTS = 1 << 20


def channel_variance(features: torch.Tensor, chunk_rows: int = 65536) -> torch.Tensor:
    """Variance of every channel over all rows (Eq. 3): ``(M, D) -> (D,)`` float64.

    The population variance (``ddof=0``) over every support token of every support image.
    Computed in float64 in two passes over row chunks, so the result does not depend on
    the order of the rows beyond float64 rounding and memory stays bounded.

    >>> x = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    >>> channel_variance(x).tolist()
    [2.6666666666666665, 0.0]
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"expected a non-empty (M, D) tensor, got shape {tuple(features.shape)}")
    m = features.shape[0]
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
    for start in range(0, m, chunk_rows):
        total += features[start : start + chunk_rows].to(torch.float64).sum(0)
    mean = total / m  # (D,)
    sq = torch.zeros_like(mean)
    for start in range(0, m, chunk_rows):
        sq += (features[start : start + chunk_rows].to(torch.float64) - mean).square().sum(0)
    return sq / m


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations of every channel, float64: what the channel
    variance of a stream of token batches needs, merged batch by batch.

    :meth:`of` computes a batch's moments in two passes (mean, then squared deviations);
    :meth:`merge` joins two sets exactly (Chan, Golub and LeVeque 1979, the pairwise update),
    so no sum of squares is ever subtracted from another and the variance stays accurate
    however many batches there are. ``variance`` equals :func:`channel_variance` over all the
    rows to float64 rounding.

    >>> x = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    >>> Moments.of(x[:1]).merge(Moments.of(x[1:])).variance.tolist()
    [2.6666666666666665, 0.0]
    """

    count: int
    mean: torch.Tensor  # (D,) float64
    m2: torch.Tensor  # (D,) float64: sum over rows of (x - mean)^2

    @classmethod
    def of(cls, rows: torch.Tensor) -> "Moments":
        """The moments of ``(M, D)`` rows (``M >= 1``)."""
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise ValueError(f"expected a non-empty (M, D) tensor, got shape {tuple(rows.shape)}")
        x = rows.detach().to("cpu", torch.float64)
        mean = x.mean(0)
        return cls(int(x.shape[0]), mean, (x - mean).square().sum(0))

    def merge(self, other: "Moments") -> "Moments":
        """The moments of both sets of rows together."""
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta.square() * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @property
    def variance(self) -> torch.Tensor:
        """Population variance of every channel (``ddof=0``), ``(D,)`` float64."""
        return self.m2 / self.count


def top_k_channels(variance: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest variances, largest first (Eq. 4): ``(D,) -> (k,)`` int64.

    Ties are broken by the lower channel index, so the selection is deterministic.

    >>> top_k_channels(torch.tensor([0.5, 3.0, 1.0, 3.0]), 3).tolist()
    [1, 3, 2]
    """
    if not 1 <= k <= variance.numel():
        raise ValueError(f"k must be between 1 and {variance.numel()}, got {k}")
    order = torch.sort(variance, descending=True, stable=True).indices
    return order[:k].to(torch.int64)


def search_blocks(n_q: int, n_g: int, block_elements: int) -> tuple[int, int]:
    """Rows of queries and of gallery per block of the nearest-neighbour search: at most
    ``block_elements`` distances, and both sides as large as that allows (at least the square
    root of it each, when there are that many), so each block is one real matrix product.
    Before, a gallery of ``block_elements`` rows or more left one or two query rows per block
    (matrix-vector products that read the whole gallery again for each query).
    ``python benchmarks/search_blocks.py`` times both shapes side by side (docs/SCALE.md: 196
    queries against 500,000 vectors x K=6, at the bound of 1M distances, today's default, the old
    shape took x2.1 as long; at 8M, the default before, where it already had 16 query rows per
    block, x0.68: there the old shape was faster, and 1M with this shape faster than both)."""
    block_elements = max(1, block_elements)
    if n_q * n_g <= block_elements:
        return max(1, n_q), max(1, n_g)
    side = max(1, math.isqrt(block_elements))
    if n_q <= side:
        return n_q, max(1, min(n_g, block_elements // n_q))
    if n_g <= side:
        return max(1, min(n_q, block_elements // n_g)), n_g
    q_block = min(n_q, max(side, block_elements // n_g))
    return q_block, max(1, min(n_g, block_elements // q_block))


def nearest_neighbor(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    *,
    query_groups: torch.Tensor | None = None,
    gallery_groups: torch.Tensor | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean nearest neighbour of every query in the gallery (Eq. 7).

    ``queries (Q, K)``, ``gallery (M, K)`` -> ``(distances (Q,), indices (Q,))``.

    The search walks over blocks of queries and gallery rows, so at most
    ``block_elements`` distances are held at once however large ``Q`` and ``M`` are. Within
    a block, squared distances come from one matrix product; the distance to the chosen
    neighbour is then recomputed directly as ``||q - g||`` so that it carries no cancellation
    error. When groups are given, a query never matches a gallery row of its own group (used
    for leave-one-out scoring); a query whose every candidate is excluded gets ``inf`` and
    index ``-1``.

    >>> d, i = nearest_neighbor(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[3.0, 0.0], [3.0, 3.0]]))
    >>> d.tolist(), i.tolist()
    ([3.0, 1.0], [0, 1])
    """
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"expected queries (Q, K) and gallery (M, K), got {tuple(queries.shape)} and {tuple(gallery.shape)}"
        )
    if (query_groups is None) != (gallery_groups is None):
        raise ValueError("give both query_groups and gallery_groups, or neither")
    n_q, n_g = queries.shape[0], gallery.shape[0]
    device = queries.device
    best_d2 = torch.full((n_q,), math.inf, dtype=torch.float32, device=device)
    best_idx = torch.full((n_q,), -1, dtype=torch.int64, device=device)
    if n_q == 0 or n_g == 0:
        return best_d2, best_idx
    q = queries.to(torch.float32)
    g = gallery.to(torch.float32)
    g_sq = g.square().sum(1)  # (M,)
    q_sq = q.square().sum(1)  # (Q,)
    q_block, g_block = search_blocks(n_q, n_g, block_elements)
    for qs in range(0, n_q, q_block):
        qe = min(n_q, qs + q_block)
        for gs in range(0, n_g, g_block):
            ge = min(n_g, gs + g_block)
            # ||q||^2 + ||g||^2 - 2 q.g, all in one (q_block, g_block) buffer
            d2 = torch.addmm(g_sq[gs:ge].unsqueeze(0), q[qs:qe], g[gs:ge].T, beta=1.0, alpha=-2.0)
            d2.add_(q_sq[qs:qe].unsqueeze(1))  # (qb, gb)
            if query_groups is not None and gallery_groups is not None:
                same = query_groups[qs:qe].unsqueeze(1) == gallery_groups[gs:ge].unsqueeze(0)
                d2.masked_fill_(same, math.inf)
            val, arg = d2.min(dim=1)  # (qb,)
            better = val < best_d2[qs:qe]
            best_d2[qs:qe] = torch.where(better, val, best_d2[qs:qe])
            best_idx[qs:qe] = torch.where(better, arg + gs, best_idx[qs:qe])
    found = best_idx >= 0
    dist = torch.full((n_q,), math.inf, dtype=torch.float32, device=device)
    if bool(found.any()):
        dist[found] = distance_to(q[found], g, best_idx[found])
    return dist, best_idx


def distance_to(queries: torch.Tensor, gallery: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``||q - gallery[index]||`` row by row, ``(Q, K), (M, K), (Q,) -> (Q,)`` float32: how every
    search here measures the neighbour it chose (directly, with no cancellation error), so that
    searches that choose the same neighbour give the same distance, bit for bit."""
    return (queries.float() - gallery[index].float()).square().sum(1).sqrt()


def matmul_nearest(queries: torch.Tensor, gallery: torch.Tensor, gallery_sq: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest neighbour as a static graph (what an exported scoring head traces in place of
    the index): ``queries (..., K)`` and ``gallery (M, K)`` -> distances and indices ``(...)``.
    Squared distances from one matrix product, the argmin, then the distance to the chosen
    vector recomputed directly (:func:`distance_to`'s arithmetic), as :func:`nearest_neighbor`;
    no blocks, no loop that depends on the data. ``gallery_sq (M,)``: its squared norms, if known.

    >>> d, i = matmul_nearest(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[3.0, 0.0], [3.0, 3.0]]))
    >>> d.tolist(), i.tolist()
    ([3.0, 1.0], [0, 1])
    """
    q = queries.float()
    g_sq = gallery.square().sum(1) if gallery_sq is None else gallery_sq
    last = q.ndim - 1  # a dimension counted from the front: torch's ONNX exporter turns argmin(dim=-1) of some ranks into a wrong axis
    d2 = g_sq - 2.0 * torch.matmul(q, gallery.T) + q.square().sum(last, keepdim=True)  # (..., M)
    idx = d2.argmin(dim=last)  # (...)
    return (q - gallery[idx]).square().sum(last).sqrt(), idx


def pool_scores(token_scores: torch.Tensor, how: str = "max") -> torch.Tensor:
    """Image score from token scores: ``(B, N) -> (B,)``; ``how`` is ``"max"`` or ``"mean"``.

    Max pooling (Eq. 8) keeps a small defect from being averaged away.

    >>> pool_scores(torch.tensor([[0.1, 0.9, 0.2]])).tolist()
    [0.8999999761581421]
    """
    if how == "max":
        return token_scores.amax(dim=1)
    if how == "mean":
        return token_scores.mean(dim=1)
    raise ValueError(f"unknown pooling {how!r}: use 'max' or 'mean'")


def anomaly_probability(
    joint_tokens: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Per-token probability of the anomalous prompt (Eq. 11-12): ``(B, N, E) -> (B, N)``.

    ``joint_tokens`` and ``text_embeddings (2, E)`` (row 0 normal, row 1 anomalous) are
    L2-normalised here; the two cosine similarities are scaled by CLIP's logit scale and
    passed through a softmax.

    >>> z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    >>> [round(p, 4) for p in anomaly_probability(z, torch.eye(2), 1.0)[0].tolist()]
    [0.2689, 0.7311]
    """
    z = F.normalize(joint_tokens.to(torch.float32), dim=-1)
    t = F.normalize(text_embeddings.to(torch.float32), dim=-1)
    logits = logit_scale * torch.einsum("bne,pe->bnp", z, t)  # (B, N, 2)
    return logits.softmax(dim=-1)[..., 1]


BLOCK_GRIDS = ("coarsest", "finest")


def combine_blocks(
    tokens: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], rule: str = "coarsest"
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens of several blocks on one common grid, channels concatenated in the given order.

    ``tokens[i]`` is ``(B, N_i, D_i)`` on grid ``grids[i]``. ``rule="coarsest"``: every block is
    average-pooled to the smallest grid (``adaptive_avg_pool2d``: a 28 x 28 map becomes the
    14 x 14 grid by averaging each 2 x 2 cell); ``"finest"``: bilinearly upsampled to the
    largest (``align_corners=False``). One block is returned as it is.
    Returns ``(B, N, sum D_i)`` and the grid.

    >>> a, b = torch.ones(1, 16, 2), torch.zeros(1, 4, 3)
    >>> out, grid = combine_blocks([a, b], [(4, 4), (2, 2)])
    >>> tuple(out.shape), grid
    ((1, 4, 5), (2, 2))
    """
    if rule not in BLOCK_GRIDS:
        raise ValueError(f"rule must be one of {BLOCK_GRIDS}, got {rule!r}")
    if len(tokens) == 1:
        return tokens[0], tuple(grids[0])  # type: ignore[return-value]
    areas = [gh * gw for gh, gw in grids]
    target = tuple(grids[areas.index(min(areas) if rule == "coarsest" else max(areas))])
    out = []
    for t, (gh, gw) in zip(tokens, grids):
        if (gh, gw) != target:
            b, n, d = t.shape
            x = t.transpose(1, 2).reshape(b, d, gh, gw)  # (B, D, gh, gw)
            if rule == "coarsest":
                x = F.adaptive_avg_pool2d(x, target)
            else:
                x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
            t = x.reshape(b, d, target[0] * target[1]).transpose(1, 2)  # (B, N, D)
        out.append(t)
    return torch.cat(out, dim=-1).contiguous(), target  # type: ignore[return-value]


def upsample_map(
    grid: torch.Tensor | np.ndarray,
    size: tuple[int, int],
    sigma: float | tuple[float, float] = 0.0,
) -> np.ndarray:
    """Token scores on their grid to a pixel map: ``(gh, gw) -> (H, W)`` float32.

    Bilinear interpolation (``align_corners=False``: each token covers its own cell), then an
    optional Gaussian blur with standard deviation ``sigma`` pixels (one value, or one per
    axis as ``(sigma_y, sigma_x)``).

    >>> upsample_map(torch.ones(2, 3), (5, 7)).shape
    (5, 7)
    """
    from scipy.ndimage import gaussian_filter

    t = torch.as_tensor(grid, dtype=torch.float32)
    if t.ndim != 2:
        raise ValueError(f"expected a (gh, gw) grid, got shape {tuple(t.shape)}")
    up = F.interpolate(t[None, None], size=tuple(size), mode="bilinear", align_corners=False)
    out = up[0, 0].cpu().numpy()  # (H, W)
    sig = (sigma, sigma) if np.isscalar(sigma) else tuple(sigma)
    if max(sig) > 0:
        out = gaussian_filter(out, sigma=sig, mode="nearest")
    return np.ascontiguousarray(out, dtype=np.float32)


def robust_threshold(normal_scores: Sequence[float] | np.ndarray, sigmas: float = 3.0) -> float:
    """Decision threshold from scores of normal images only.

    ``median + sigmas * 1.4826 * MAD``: ``sigmas`` robust standard deviations above the
    typical normal score (1.4826 * MAD estimates the standard deviation of a normal
    distribution, and is not pulled up by one odd support image). When the MAD is zero the
    plain standard deviation is used. Never below the median.

    >>> round(robust_threshold([1.0, 2.0, 3.0, 4.0, 100.0], sigmas=3.0), 4)
    7.4478
    """
    s = np.asarray(normal_scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("no finite normal scores to derive a threshold from")
    med = float(np.median(s))
    spread = 1.4826 * float(np.median(np.abs(s - med)))
    if spread == 0.0:
        spread = float(s.std())
    return med + sigmas * spread
