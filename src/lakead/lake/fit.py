"""The steps of LAKE's fit on normal images, as functions of tensors (no I/O, no backbone).

1. :func:`select_neurons`: channel variance over all support tokens, then the sensitive
   neurons by the configured rule (Eq. 3-4).
2. :func:`leave_one_out`: each support image scored against the gallery of the others, to
   learn what a normal score looks like without any defect image.
3. :func:`decision`: the scale of visual scores, the threshold and the maps' colour range
   from those leave-one-out scores.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence

import numpy as np
import torch

from ..neurons import MIN_IMAGES_FOR_FILTER, flag_outliers, knee_k, support_image_features
from ..ops import channel_variance, nearest_neighbor, robust_threshold, top_k_channels
from .config import LakeConfig

log = logging.getLogger("lakead")

#: Support images scored leave-one-out at fit (an evenly spaced subset beyond this many).
MAX_LOO_IMAGES = 128


def spread_subset(n: int, limit: int) -> list[int]:
    """``limit`` indices evenly spaced over ``range(n)`` (all when ``n <= limit``).

    >>> spread_subset(5, 3)
    [0, 2, 4]
    """
    if n <= limit:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, limit)})


def select_neurons(feats: torch.Tensor, config: LakeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Support tokens ``(n, N, D)`` -> channel variances ``(D,)`` float64 and the chosen
    neurons ``(K,)`` int64; ``k="auto"`` takes ``K`` at the knee of the variance curve."""
    n, n_tok, width = feats.shape
    variance = channel_variance(feats.reshape(n * n_tok, width))  # (D,)
    if config.selection == "all":
        return variance, torch.arange(width, dtype=torch.int64)
    k = knee_k(variance.numpy()) if config.k == "auto" else int(config.k)
    if config.selection == "top":
        return variance, top_k_channels(variance, k)
    if config.selection == "bottom":
        return variance, top_k_channels(-variance, k)
    rng = random.Random(config.seed)
    return variance, torch.tensor(sorted(rng.sample(range(width), k)), dtype=torch.int64)


def support_inliers(feats: torch.Tensor, neurons: torch.Tensor, config: LakeConfig) -> np.ndarray:
    """Which support images the outlier filter keeps: ``(n, N, D)`` -> ``(n,)`` bool.

    An Isolation Forest over one vector per image in the sensitive subspace
    (:func:`lakead.neurons.support_image_features`, :func:`lakead.neurons.flag_outliers`);
    all are kept below :data:`~lakead.neurons.MIN_IMAGES_FOR_FILTER` images.
    """
    n = feats.shape[0]
    if n < MIN_IMAGES_FOR_FILTER:
        log.warning("filter_outliers: %d support image(s), the filter needs at least %d; none dropped", n, MIN_IMAGES_FOR_FILTER)
        return np.ones(n, dtype=bool)
    features = support_image_features(feats[:, :, neurons])  # (n, 4)
    flags, _ = flag_outliers(features, config.outlier_contamination, config.seed)
    return ~flags


def leave_one_out(gallery: torch.Tensor, n: int, n_tok: int, device: torch.device) -> tuple[np.ndarray, list[np.ndarray]]:
    """Raw leave-one-out visual scores ``(n,)`` (NaN where not scored) and the token distances
    of each image scored: image ``i``'s tokens against the gallery of the other images.
    ``gallery`` is ``(n * N, K)``, image by image. An evenly spaced subset of
    :data:`MAX_LOO_IMAGES` images is scored beyond that many; none with one image."""
    visual = np.full(n, np.nan, dtype=np.float64)
    tokens: list[np.ndarray] = []
    if n < 2:
        return visual, tokens
    g_dev = gallery.to(device)
    groups = torch.arange(n, dtype=torch.int32).repeat_interleave(n_tok).to(device)  # (n*N,)
    for i in spread_subset(n, MAX_LOO_IMAGES):
        q = g_dev[i * n_tok : (i + 1) * n_tok]  # (N, K)
        d, _ = nearest_neighbor(q, g_dev, query_groups=groups[i * n_tok : (i + 1) * n_tok], gallery_groups=groups)
        visual[i] = float(d.max())
        tokens.append(d.cpu().numpy())
    return visual, tokens


def decision(
    loo_visual_raw: np.ndarray,
    loo_tokens_raw: Sequence[np.ndarray],
    semantic_support: np.ndarray,
    config: LakeConfig,
    use_text: bool,
) -> tuple[float, np.ndarray, float, tuple[float, float]]:
    """From the leave-one-out scores: the visual scale, the fused support scores ``(n,)``, the
    threshold (``inf`` with one support image) and the maps' colour range."""
    finite = loo_visual_raw[np.isfinite(loo_visual_raw)]
    scale = float(np.median(finite)) if (config.score_norm == "loo" and finite.size and np.median(finite) > 0) else 1.0
    loo_scores = loo_visual_raw / scale + (config.lam * semantic_support if use_text else 0.0)
    if config.threshold is not None:
        threshold = float(config.threshold)
    elif finite.size:
        threshold = robust_threshold(loo_scores[np.isfinite(loo_scores)], config.threshold_sigmas)
    else:
        threshold = math.inf
    if loo_tokens_raw:
        tokens = np.concatenate(loo_tokens_raw) / scale
        map_range = (float(np.median(tokens)), float(robust_threshold(finite / scale, config.threshold_sigmas)))
    else:
        map_range = (0.0, 1.0)
    if map_range[1] <= map_range[0]:
        map_range = (map_range[0], map_range[0] + 1.0)
    if config.map_source == "semantic":
        map_range = (0.5, 1.0)  # probabilities: from "as likely normal as anomalous" up
    return scale, loo_scores, threshold, map_range
