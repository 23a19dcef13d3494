"""Principal subspaces of patch features and the residual energy outside them: the math of the
``subspace`` method (:mod:`lakead.methods.subspace`, after SubspaceAD, Lendering et al., CVPR
2026). Pure torch, no I/O.

Normal patch features vary mostly along a few directions; a patch's squared distance to the
affine subspace spanned by the mean and the top principal directions of the normal patches
(its reconstruction residual) is its anomaly score. The subspace keeps the fewest directions
that explain ``variance_kept`` of the variance (SubspaceAD: 0.99).

The moments are accumulated in float64 (:class:`Moments`), so a fit streams over its images,
and one image's own patches can be taken out again (:meth:`Moments.without`): the leave-one-out
subspace of a support image is exact, not approximated.

Shapes: ``(M, D)`` rows, ``(D,)`` mean, ``(D, K)`` orthonormal basis, ``(B, N, D)`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Moments:
    """Sums over ``count`` rows of width ``D``: ``total`` ``(D,)`` and ``outer`` ``(D, D)``
    (``sum x x^T``), float64."""

    count: int
    total: torch.Tensor
    outer: torch.Tensor

    @staticmethod
    def of(rows: torch.Tensor, chunk_rows: int = 65536) -> "Moments":
        """The moments of ``(M, D)`` rows, in chunks of ``chunk_rows``."""
        m, dim = rows.shape
        total = torch.zeros(dim, dtype=torch.float64)
        outer = torch.zeros(dim, dim, dtype=torch.float64)
        for s in range(0, m, chunk_rows):
            x = rows[s : s + chunk_rows].double().cpu()
            total += x.sum(0)
            outer += x.T @ x
        return Moments(m, total, outer)

    def without(self, rows: torch.Tensor) -> "Moments":
        """The moments with ``(M', D)`` rows (that were counted) taken out."""
        other = Moments.of(rows)
        if other.count >= self.count:
            raise ValueError(f"cannot take {other.count} rows out of {self.count}")
        return Moments(self.count - other.count, self.total - other.total, self.outer - other.outer)

    def covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(D,)`` and the covariance ``(D, D)`` (divided by ``count``), float64."""
        if self.count < 1:
            raise ValueError("no rows")
        mean = self.total / self.count
        cov = self.outer / self.count - torch.outer(mean, mean)
        return mean, (cov + cov.T) / 2


def kept_directions(eigenvalues: torch.Tensor, variance_kept: float) -> int:
    """The fewest leading directions whose eigenvalues (descending) explain at least
    ``variance_kept`` of their sum; at least 1 and at most ``D - 1`` (a residual must remain).

    >>> kept_directions(torch.tensor([6.0, 3.0, 1.0, 0.0]), 0.9), kept_directions(torch.tensor([6.0, 3.0, 1.0, 0.0]), 0.95)
    (2, 3)
    >>> kept_directions(torch.tensor([0.0, 0.0]), 0.99)  # no variance at all: one direction
    1
    """
    dim = eigenvalues.numel()
    if dim < 2:
        raise ValueError(f"a subspace needs features of at least 2 channels, got {dim}")
    values = eigenvalues.double().clamp(min=0)
    total = float(values.sum())
    if total <= 0:
        return 1
    share = values.cumsum(0) / total
    k = int((share < variance_kept - 1e-12).sum()) + 1
    return max(1, min(k, dim - 1))


def principal_subspace(moments: Moments, variance_kept: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean ``(D,)``, the eigenvalues ``(D,)`` (descending) and the orthonormal basis
    ``(D, K)`` of the top principal directions that explain ``variance_kept`` of the variance
    (:func:`kept_directions`); float32. Each direction is signed so that its largest-magnitude
    entry is positive (deterministic).

    >>> x = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.1, 0.0], [4.0, -0.1, 0.0], [6.0, 0.0, 0.0]])
    >>> mean, values, basis = principal_subspace(Moments.of(x), 0.9)
    >>> basis.shape, [round(v, 1) + 0.0 for v in basis[:, 0].tolist()]
    (torch.Size([3, 1]), [1.0, 0.0, 0.0])
    """
    mean, cov = moments.covariance()
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)  # descending
    k = kept_directions(values, variance_kept)
    basis = vectors[:, :k]
    sign = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))  # (1, K)
    basis = basis * torch.where(sign == 0, torch.ones_like(sign), sign)
    return mean.float(), values.clamp(min=0).float(), basis.float().contiguous()


def residual_energy(tokens: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The squared norm of each token's component outside the subspace: ``(..., D) -> (...)``,
    ``||x - mu||^2 - ||B^T (x - mu)||^2`` computed as the norm of ``(x - mu) - B B^T (x - mu)``.

    >>> basis = torch.tensor([[1.0], [0.0]])
    >>> residual_energy(torch.tensor([[3.0, 4.0], [5.0, 0.0]]), torch.zeros(2), basis).tolist()
    [16.0, 0.0]
    """
    dev = tokens.device
    centred = tokens.float() - mean.to(dev)
    b = basis.to(dev)
    rest = centred - (centred @ b) @ b.T
    return rest.square().sum(-1)
