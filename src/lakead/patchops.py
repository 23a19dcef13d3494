"""Pure tensor math of the memory-bank baselines, PatchCore and AnomalyDINO: no I/O, no models.

- PatchCore (Roth et al., CVPR 2022): locally aware patch features (:func:`local_average`,
  :func:`project_width`, :func:`patchcore_features`, Sec. 3.1 of the paper) and the reweighted
  image score (:func:`reweighted_score`, Eq. 7).
- AnomalyDINO (Damm et al., WACV 2025): the image score as the mean of the top 1 % of the patch
  distances (:func:`top_percent_mean`) and the zero-shot background mask from the first principal
  component of the support patches (:func:`principal_direction`, :func:`foreground_mask`).
- Both: maps upsampled to the model's input and smoothed with a Gaussian (:func:`smooth_maps`).

Higher score = more anomalous. Shapes: ``B`` images, ``N`` patches on a ``(gh, gw)`` grid,
``C`` channels of a block, ``D`` channels of the patch features, ``M`` bank vectors.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def local_average(tokens: torch.Tensor, grid: tuple[int, int], size: int = 3) -> torch.Tensor:
    """Each patch replaced by the mean of its ``size x size`` neighbourhood: ``(B, N, C) -> (B, N, C)``.

    The neighbourhood is zero-padded at the border and the mean is over all ``size**2`` cells,
    as PatchCore's reference implementation (an unfold with zero padding, then an average);
    ``size=1`` returns the tokens.

    >>> x = torch.arange(9.0).reshape(1, 9, 1)  # a 3 x 3 grid 0..8
    >>> local_average(x, (3, 3))[0, :, 0].tolist()[4], round(local_average(x, (3, 3))[0, 0, 0].item(), 4)
    (4.0, 0.8889)
    """
    if size == 1:
        return tokens
    b, n, c = tokens.shape
    gh, gw = grid
    x = tokens.transpose(1, 2).reshape(b, c, gh, gw)  # (B, C, gh, gw)
    x = F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=True)
    return x.reshape(b, c, n).transpose(1, 2)  # (B, N, C)


def resize_tokens(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Tokens ``(B, N, C)`` on ``grid`` bilinearly resized to ``target`` (``align_corners=False``)."""
    if tuple(grid) == tuple(target):
        return tokens
    b, _, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, *grid)  # (B, C, gh, gw)
    x = F.interpolate(x, size=tuple(target), mode="bilinear", align_corners=False)
    return x.reshape(b, c, target[0] * target[1]).transpose(1, 2)  # (B, N', C)


def project_width(features: torch.Tensor, width: int) -> torch.Tensor:
    """Channels to a fixed width by adaptive average pooling along the channel axis:
    ``(..., C) -> (..., width)`` (PatchCore's projection of every block to one width; a block
    narrower than ``width`` has its channels repeated).

    >>> project_width(torch.tensor([[1.0, 3.0, 5.0, 7.0]]), 2).tolist()
    [[2.0, 6.0]]
    """
    c = features.shape[-1]
    if c % width == 0:  # bins of c // width channels (what the pooling does, written so that it exports with any batch)
        return features.reshape(*features.shape[:-1], width, c // width).mean(dim=-1)
    if width % c == 0:  # each channel repeated (a gather: torch's ONNX export of repeat_interleave broke a constant of the backbone)
        return features.index_select(features.ndim - 1, torch.from_numpy(np.repeat(np.arange(c), width // c)).to(features.device))
    return features @ _pooling_matrix(c, width).to(features.device)  # bins of uneven sizes


@functools.lru_cache(maxsize=16)
def _pooling_matrix(c: int, width: int) -> torch.Tensor:
    """``(c, width)``: adaptive average pooling of ``c`` channels to ``width`` as a matrix
    (bin ``i`` covers channels ``floor(i c / width)`` to ``ceil((i + 1) c / width)``, as torch's)."""
    m = np.zeros((c, width), np.float32)
    for i in range(width):
        lo, hi = (i * c) // width, -((-(i + 1) * c) // width)
        m[lo:hi, i] = 1.0 / (hi - lo)
    return torch.from_numpy(m)


def patchcore_features(
    tokens: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], width: int, neighbourhood: int = 3
) -> tuple[torch.Tensor, tuple[int, int]]:
    """PatchCore's locally aware patch features from the tokens of one or more blocks.

    Each block ``(B, N_i, C_i)``: averaged over each patch's ``neighbourhood`` (:func:`local_average`),
    bilinearly resized to the first block's grid, projected to ``width`` channels
    (:func:`project_width`); the blocks' vectors are concatenated and pooled to ``width`` again,
    so each block keeps an equal share of the channels whatever its own width.
    Returns ``(B, N, width)`` on the first block's grid.

    >>> a, b = torch.ones(1, 16, 2), torch.zeros(1, 4, 6)
    >>> out, grid = patchcore_features([a, b], [(4, 4), (2, 2)], width=4, neighbourhood=1)
    >>> tuple(out.shape), grid, out[0, 0].tolist()
    ((1, 16, 4), (4, 4), [1.0, 1.0, 0.0, 0.0])
    """
    target = tuple(grids[0])
    smallest = min(min(g) for g in grids)
    if neighbourhood > smallest:  # every patch would average (nearly) the whole image, padding included: all scores ~0
        from .errors import ConfigError

        raise ConfigError(f"neighbourhood {neighbourhood} is larger than the {smallest}-patch side of the token grid: "
                          f"choose at most {smallest - (1 - smallest % 2)} (the paper's 3)")
    parts = []
    for t, g in zip(tokens, grids):
        x = local_average(t.float(), tuple(g), neighbourhood)  # (B, N_i, C_i)
        x = resize_tokens(x, tuple(g), target)  # (B, N, C_i)
        parts.append(project_width(x, width))  # (B, N, width)
    if len(parts) == 1:
        return parts[0].contiguous(), target  # type: ignore[return-value]
    stacked = torch.cat(parts, dim=-1)  # (B, N, L * width)
    return project_width(stacked, width).contiguous(), target  # type: ignore[return-value]


def reweighted_score(star: torch.Tensor, neighbour_distances: torch.Tensor) -> torch.Tensor:
    """PatchCore's image score (Eq. 7): ``s = (1 - exp(d_0) / sum_j exp(d_j)) * s*``.

    ``star (B,)``: the largest patch score ``s*`` of each image (the distance of its most anomalous
    patch ``m_test*`` to its nearest bank vector ``m*``); ``neighbour_distances (B, b)``: the
    distances from ``m_test*`` to the ``b`` bank vectors nearest to ``m*``, ``m*`` itself first
    (so ``d_0 = s*``). A patch that is equally far from ``m*`` and its neighbours keeps
    ``1 - 1/b`` of its score; one close to ``m*`` but far from the rest (a rare normal) less.

    >>> round(reweighted_score(torch.tensor([1.0]), torch.tensor([[1.0, 2.0, 3.0]])).item(), 6)
    0.909969
    """
    weight = 1.0 - torch.softmax(neighbour_distances.double(), dim=1)[:, 0]  # (B,)
    return (weight * star.double()).float()


def top_percent_mean(distances: torch.Tensor, percent: float = 1.0) -> torch.Tensor:
    """AnomalyDINO's image score: the mean of the top ``percent`` % of each row's patch
    distances (at least one patch): ``(B, N) -> (B,)``.

    >>> top_percent_mean(torch.arange(200.0).reshape(1, 200), 1.0).tolist()  # the top 2 of 200
    [198.5]
    >>> top_percent_mean(torch.tensor([[0.0, 5.0, 1.0]]), 1.0).tolist()  # 1 % of 3: the max
    [5.0]
    """
    k = max(1, int(distances.shape[1] * percent / 100.0))
    return distances.topk(k, dim=1).values.mean(dim=1)


def cosine_distances(euclidean_of_unit: torch.Tensor) -> torch.Tensor:
    """Cosine distance ``1 - cos`` from the Euclidean distance of unit vectors: ``d**2 / 2``.

    >>> [round(v, 6) for v in cosine_distances(torch.tensor([0.0, 2.0 ** 0.5, 2.0])).tolist()]
    [0.0, 1.0, 2.0]
    """
    return euclidean_of_unit.square() / 2.0


def principal_direction(features: torch.Tensor, chunk_rows: int = 65536) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The first principal component of ``(M, D)`` rows: their mean ``(D,)``, the unit direction
    ``(D,)`` (signed so that its largest-magnitude entry is positive: deterministic) and the
    standard deviation of the rows along it. Float64 covariance, in row chunks.

    >>> x = torch.tensor([[0.0, 0.0], [2.0, 0.1], [4.0, 0.0]])
    >>> mean, d, sd = principal_direction(x)
    >>> [round(v, 3) for v in d.tolist()], round(sd, 3)
    ([1.0, 0.0], 1.633)
    """
    m, dim = features.shape
    total = torch.zeros(dim, dtype=torch.float64)
    for s in range(0, m, chunk_rows):
        total += features[s : s + chunk_rows].double().sum(0)
    mean = total / m  # (D,)
    cov = torch.zeros(dim, dim, dtype=torch.float64)
    for s in range(0, m, chunk_rows):
        x = features[s : s + chunk_rows].double() - mean
        cov += x.T @ x
    cov /= m
    values, vectors = torch.linalg.eigh(cov)  # ascending
    direction = vectors[:, -1]
    if direction[direction.abs().argmax()] < 0:
        direction = -direction
    return mean.float(), direction.float(), float(values[-1].clamp(min=0).sqrt())


def pc_scores(tokens: torch.Tensor, mean: torch.Tensor, direction: torch.Tensor, scale: float) -> torch.Tensor:
    """Projection of ``(B, N, D)`` tokens on the first principal component, in units of its
    standard deviation: ``(B, N)``."""
    return ((tokens.float() - mean.to(tokens.device)) @ direction.to(tokens.device)) / max(scale, 1e-12)


def clean_mask(mask: torch.Tensor) -> torch.Tensor:
    """``(B, gh, gw)`` bool masks dilated by a 3 x 3 square, then closed (dilation, erosion) by
    it, as AnomalyDINO cleans its background masks; the image border is not eroded. Max pooling
    (outside the grid counts as unset for the dilations, as set for the erosion), so that an
    exported head computes it in its graph.

    >>> m = torch.zeros(1, 7, 7, dtype=torch.bool); m[0, 3, 3] = True  # one patch grows to its 3 x 3 neighbourhood
    >>> int(clean_mask(m).sum())
    9
    """
    x = mask[:, None].float()  # (B, 1, gh, gw)
    x = F.max_pool2d(F.max_pool2d(x, 3, stride=1, padding=1), 3, stride=1, padding=1)
    x = 1.0 - F.max_pool2d(1.0 - x, 3, stride=1, padding=1)  # erosion: the padding never counts as unset
    return x[:, 0] > 0.5


def foreground_mask(scores: torch.Tensor, grid: tuple[int, int], threshold: float, sign: float) -> torch.Tensor:
    """Which patches are foreground: ``sign * score > threshold`` for the principal-component
    scores ``(B, N)`` (:func:`pc_scores`), cleaned by :func:`clean_mask`; an image whose mask
    would be empty keeps every patch. Returns ``(B, N)`` bool."""
    raw = (sign * scores > threshold).reshape(-1, *grid)  # (B, gh, gw)
    kept = clean_mask(raw) | ~raw.flatten(1).any(dim=1)[:, None, None]
    return kept.reshape(scores.shape[0], -1)


def centre_share(mask: torch.Tensor, grid: tuple[int, int], border: float = 0.2) -> float:
    """The share of the central patches (``border`` of each side left out) set in a ``(B, N)`` mask.

    >>> m = torch.zeros(1, 25, dtype=torch.bool); m[0, 12] = True  # the centre of 5 x 5
    >>> round(centre_share(m, (5, 5)), 6)  # 1 of the 3 x 3 central patches
    0.111111
    """
    gh, gw = grid
    m = mask.reshape(-1, gh, gw)
    y0, y1 = int(gh * border), max(int(gh * (1 - border)), int(gh * border) + 1)
    x0, x1 = int(gw * border), max(int(gw * (1 - border)), int(gw * border) + 1)
    return float(m[:, y0:y1, x0:x1].float().mean())


def smooth_maps(grids: torch.Tensor, image_size: int, sigma: float) -> torch.Tensor:
    """Patch scores ``(B, gh, gw)`` bilinearly upsampled to the model's ``image_size`` square and
    smoothed with a Gaussian of ``sigma`` pixels (0: none), as PatchCore and AnomalyDINO make
    their maps: ``(B, S, S)`` float32. The kernel is truncated at 4 sigma; borders replicate.
    One image at a time, so that a map never depends on the batch it came in."""
    return torch.stack([_smooth_one(g, image_size, sigma) for g in grids])


def _smooth_one(grid: torch.Tensor, image_size: int, sigma: float) -> torch.Tensor:
    blur = gaussian_matrix(image_size, float(sigma)).to(grid.device) if sigma > 0 else None
    return upsample_blur(grid[None], image_size, blur)[0]  # (S, S)


def upsample_blur(grids: torch.Tensor, image_size: int, blur: torch.Tensor | None) -> torch.Tensor:
    """``(B, gh, gw)`` -> ``(B, S, S)``: bilinearly upsampled, then blurred by ``blur``
    (:func:`gaussian_matrix`, or None) as ``G @ x @ G.T``: the separable blur as two products,
    the same numbers as padding and convolving (what :func:`smooth_maps` does to one map, and
    an exported memory-bank head to a batch)."""
    x = F.interpolate(grids[:, None].float(), size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]
    return x if blur is None else blur @ x @ blur.T


@functools.lru_cache(maxsize=8)
def gaussian_matrix(size: int, sigma: float) -> torch.Tensor:
    """``(size, size)`` matrix ``G`` with ``G @ x`` = ``x`` (a column of ``size`` values) blurred by a
    Gaussian of ``sigma``, truncated at 4 sigma, borders replicated (each weight that falls
    outside goes to the edge value).

    >>> g = gaussian_matrix(5, 1.0)
    >>> [round(v, 4) for v in g.sum(1).tolist()], round(g[2, 2].item(), 4)
    ([1.0, 1.0, 1.0, 1.0, 1.0], 0.3989)
    """
    radius = max(1, int(4 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    g = torch.zeros(size, size, dtype=torch.float64)
    rows = torch.arange(size)
    for off, w in zip(range(-radius, radius + 1), k.tolist()):
        g[rows, (rows + off).clamp(0, size - 1)] += w
    return g.float()


def resize_map(amap: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A ``(S, S)`` map bilinearly resized to an image's own ``(H, W)``: float32 numpy."""
    if tuple(amap.shape) == tuple(size):
        return np.ascontiguousarray(amap.cpu().numpy(), dtype=np.float32)
    up = F.interpolate(amap[None, None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(up[0, 0].cpu().numpy(), dtype=np.float32)
