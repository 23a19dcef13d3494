"""Exact nearest neighbours for an update, each distance computed once for both sides.

A refit searches every scored image's tokens against the whole gallery. An update needs less:
the new rows' nearest old row and the old rows' nearest new row are the two minima of the same
distance matrix (old x new), and among the new images each pair of images is one block whose
row and column minima serve both. :func:`cross_nearest` and :func:`self_nearest` compute each
such block once, ``block_elements`` distances at a time, with the squared distances of
:func:`lakead.ops.nearest_neighbor` (one matrix product per block); the caller measures the
chosen neighbour with :func:`lakead.ops.distance_to`, as every search of lakead does, so the
distances are those of the fit's search (up to the choice between neighbours at the same
distance within rounding).
"""

from __future__ import annotations

import math

import torch

#: Distances held at once (16 MiB of float32).
BLOCK_ELEMENTS = 1 << 22
#: Rows of a block: few, so that the column minima reduce over a short axis (torch's minimum with
#: indices over the long axis of a square block took x5 its row minima on the CPU).
BLOCK_ROWS = 192


def _better(best_d2: torch.Tensor, best_idx: torch.Tensor, d2: torch.Tensor, idx: torch.Tensor, sl: slice) -> None:
    take = d2 < best_d2[sl]
    best_d2[sl] = torch.where(take, d2, best_d2[sl])
    best_idx[sl] = torch.where(take, idx, best_idx[sl])


def cross_nearest(x: torch.Tensor, y: torch.Tensor, block_elements: int = BLOCK_ELEMENTS
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row of ``x (P, K)``'s nearest row of ``y (Q, K)`` and each row of ``y``'s nearest
    row of ``x``: ``(x_d2 (P,), x_idx (P,), y_d2 (Q,), y_idx (Q,))``, squared distances as the
    matrix product gives them (measure the chosen pair with :func:`lakead.ops.distance_to`)."""
    p, q = x.shape[0], y.shape[0]
    dev = x.device
    xd2 = torch.full((p,), math.inf, device=dev)
    xi = torch.full((p,), -1, dtype=torch.int64, device=dev)
    yd2 = torch.full((q,), math.inf, device=dev)
    yi = torch.full((q,), -1, dtype=torch.int64, device=dev)
    if p == 0 or q == 0:
        return xd2, xi, yd2, yi
    x, y = x.float(), y.float()
    x_sq, y_sq = x.square().sum(1), y.square().sum(1)
    xb = min(p, BLOCK_ROWS)
    yb = max(1, min(q, block_elements // xb))
    for xs in range(0, p, xb):
        xe = min(p, xs + xb)
        for ys in range(0, q, yb):
            ye = min(q, ys + yb)
            d2 = torch.addmm(y_sq[ys:ye].unsqueeze(0), x[xs:xe], y[ys:ye].T, beta=1.0, alpha=-2.0)
            d2.add_(x_sq[xs:xe].unsqueeze(1))  # (xb, yb): ||x||^2 + ||y||^2 - 2 x.y
            v, a = d2.min(dim=1)
            _better(xd2, xi, v, a + ys, slice(xs, xe))
            v, a = d2.min(dim=0)
            _better(yd2, yi, v, a + xs, slice(ys, ye))
    return xd2, xi, yd2, yi


def self_nearest(y: torch.Tensor, per_group: int, block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``y (G * n, K)`` (``G`` groups of ``per_group`` consecutive rows: the tokens of
    one image) against the rows of the other groups: squared distances ``(G * n,)`` and indices
    into ``y`` (inf and -1 with one group). Every pair of groups is one block whose row minima
    serve the first and column minima the second: half the products of searching each group
    against all."""
    m = y.shape[0]
    dev = y.device
    d2b = torch.full((m,), math.inf, device=dev)
    ib = torch.full((m,), -1, dtype=torch.int64, device=dev)
    if m == 0:
        return d2b, ib
    y = y.float()
    y_sq = y.square().sum(1)
    groups = m // per_group
    rows = max(1, BLOCK_ROWS // per_group) * per_group  # whole groups per block of rows
    cols = max(rows, block_elements // rows)
    own = torch.block_diag(*[torch.ones(per_group, per_group, dtype=torch.bool)] * (rows // per_group)).to(dev)
    for a in range(0, m, rows):
        ae = min(m, a + rows)
        for b in range(a, m, cols):  # the groups from this one on: every pair of groups once
            be = min(m, b + cols)
            d2 = torch.addmm(y_sq[b:be].unsqueeze(0), y[a:ae], y[b:be].T, beta=1.0, alpha=-2.0)
            d2.add_(y_sq[a:ae].unsqueeze(1))  # (rows, cols)
            if b == a:
                w = min(ae - a, be - b)
                d2[:, :w].masked_fill_(own[: ae - a, :w], math.inf)  # a group never matches itself
            v, i = d2.min(dim=1)
            _better(d2b, ib, v, i + b, slice(a, ae))
            lo = ae - b if b == a else 0  # columns of later groups (this block's own rows: done above)
            if lo < be - b:
                v, i = d2[:, lo:].min(dim=0)
                _better(d2b, ib, v, i + a, slice(b + lo, be))
    if groups < 2:
        ib.fill_(-1)
    return d2b, ib
