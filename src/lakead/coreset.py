"""Greedy coreset subsampling of a memory bank (PatchCore's k-center greedy), bounded in memory.

One implementation shared by every method that shrinks a gallery: PatchCore's ``--coreset``
and LAKE's gallery reduction for large support sets.

The rule (Roth et al., CVPR 2022, Algorithm 1; Sener & Savarese 2018): start from one
vector, then repeatedly add the vector farthest from everything chosen so far, until
``count`` are chosen. Distances are taken after a random Gaussian projection to
``projection_dim`` dimensions (Johnson-Lindenstrauss: pairwise distances are kept up to a
small factor), as PatchCore does, which makes each step a ``(n, p) @ (p,)`` product.

Memory: the projected bank ``(n, p)`` float32 plus one ``(n,)`` vector of distances, so a
100,000-vector bank at ``p = 128`` needs about 52 MB beside the input, whatever its width.
Time: ``count`` steps of ``O(n p)``.

>>> import torch
>>> x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [0.0, 10.0]])
>>> greedy_coreset(x, 3, start=0).tolist()
[0, 2, 3]
"""

from __future__ import annotations

import math

import torch

__all__ = ["coreset_count", "greedy_coreset", "random_projection"]


def coreset_count(n: int, ratio: float) -> int:
    """How many vectors a coreset of ``ratio`` of ``n`` keeps (at least one; all when ``ratio >= 1``).

    >>> coreset_count(1000, 0.1), coreset_count(5, 0.01), coreset_count(7, 1.0)
    (100, 1, 7)
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return n if ratio >= 1 else max(1, min(n, math.ceil(n * ratio)))


def random_projection(features: torch.Tensor, dim: int, seed: int = 0, chunk_rows: int = 65536) -> torch.Tensor:
    """``(n, d)`` -> ``(n, min(d, dim))`` float32 by a fixed Gaussian matrix (entries N(0, 1/dim)).

    Returns the features themselves (as float32) when ``d <= dim``. Works in row chunks so a
    float16 or memory-mapped bank is never converted whole.
    """
    n, d = features.shape
    if d <= dim:
        return features.float()
    g = torch.Generator().manual_seed(seed)
    matrix = torch.randn(d, dim, generator=g) / math.sqrt(dim)
    matrix = matrix.to(features.device)
    out = torch.empty(n, dim, dtype=torch.float32, device=features.device)
    for i in range(0, n, chunk_rows):
        out[i:i + chunk_rows] = features[i:i + chunk_rows].float() @ matrix
    return out


@torch.no_grad()
def greedy_coreset(
    features: torch.Tensor,
    count: int,
    *,
    projection_dim: int = 128,
    seed: int = 0,
    start: int | None = None,
) -> torch.Tensor:
    """Indices (int64, in the order chosen) of ``count`` rows of ``features`` ``(n, d)`` by k-center greedy.

    ``start`` is the first row (default: a row drawn with ``seed``). Ties go to the lowest
    index. When ``count >= n`` every row is returned, in order. The result depends only on
    the input, ``count``, ``projection_dim`` and ``seed``.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (n, d), got shape {tuple(features.shape)}")
    n = features.shape[0]
    if count < 1:
        raise ValueError(f"coreset count must be at least 1, got {count}")
    if count >= n:
        return torch.arange(n, dtype=torch.long)
    bank = random_projection(features, projection_dim, seed=seed)
    norms = (bank * bank).sum(1)
    if start is None:
        start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = torch.empty(count, dtype=torch.long)
    nearest = torch.full((n,), float("inf"), device=bank.device)
    current = int(start)
    for i in range(count):
        chosen[i] = current
        c = bank[current]
        # squared distance to the newest centre, clamped against rounding below zero
        dist = (norms - 2.0 * (bank @ c) + norms[current]).clamp_(min=0.0)
        torch.minimum(nearest, dist, out=nearest)
        nearest[current] = -1.0  # never chosen twice
        current = int(torch.argmax(nearest))
    return chosen
