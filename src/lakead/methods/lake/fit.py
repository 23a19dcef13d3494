"""The steps of LAKE's fit on normal images, as functions of tensors (no I/O, no backbone).

1. :func:`select_neurons`: channel variance over all support tokens, then the sensitive
   neurons by the configured rule (Eq. 3-4).
2. :func:`leave_one_out`: each support image scored against the gallery of the others, to
   learn what a normal score looks like without any defect image.
3. :func:`decision`: the scale of visual scores, the decision levels (:func:`thresholds`: a
   false-alarm budget over those leave-one-out scores, :mod:`lakead.decision`) and the maps'
   colour range;
4. :func:`scope_scores`: how unlike the support images an image is as a whole ("not this
   product"): the median over its tokens of the distance to the nearest support token, every
   channel (:func:`scope_gallery`), known for the support images from leave-one-out.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np
import torch

from ...decision import Thresholds, derive_thresholds
from ...neurons import MIN_IMAGES_FOR_FILTER, flag_outliers, knee_k, support_image_features
from ...index import GalleryIndex
from ...ops import channel_variance, nearest_neighbor, top_k_channels
from ...patchops import cosine_distances, top_percent_mean
from ...fields import default_k
from ...progress import steps
from ...support import MAX_LOO_IMAGES, spread_subset  # noqa: F401 - the fit's (steps.MAX_LOO_IMAGES)
from .config import LakeConfig

log = logging.getLogger("lakead")

#: Distances held at once by the leave-one-out search (4 MiB of float32): the fit's memory
#: stays flat as the gallery grows (the same nearest neighbours as any block size).
LOO_BLOCK_ELEMENTS = 1 << 20


def select_neurons(feats: torch.Tensor, config: LakeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Support tokens ``(n, N, D)`` -> channel variances ``(D,)`` float64 and the chosen
    neurons ``(K,)`` int64; ``k="auto"`` takes ``K`` at the knee of the variance curve."""
    n, n_tok, width = feats.shape
    variance = channel_variance(feats.reshape(n * n_tok, width))  # (D,)
    return variance, choose_neurons(variance, config)


def choose_neurons(variance: torch.Tensor, config: LakeConfig) -> torch.Tensor:
    """The neurons ``(K,)`` int64 for channel variances ``(D,)`` by the configured rule (what
    :func:`select_neurons` does once the variances are known, as the streaming fit knows them)."""
    width = variance.numel()
    if config.selection == "all":
        return torch.arange(width, dtype=torch.int64)
    k = knee_k(variance.numpy()) if config.k == "auto" else default_k(width) if config.k is None else int(config.k)
    if config.selection == "top":
        return top_k_channels(variance, k)
    if config.selection == "bottom":
        return top_k_channels(-variance, k)
    rng = random.Random(config.seed)
    return torch.tensor(sorted(rng.sample(range(width), k)), dtype=torch.int64)


def support_inliers(feats: torch.Tensor, neurons: torch.Tensor, config: LakeConfig) -> np.ndarray:
    """Which support images the outlier filter keeps: ``(n, N, D)`` -> ``(n,)`` bool.

    An Isolation Forest over one vector per image in the sensitive subspace
    (:func:`lakead.neurons.support_image_features`, :func:`lakead.neurons.flag_outliers`);
    all are kept below :data:`~lakead.neurons.MIN_IMAGES_FOR_FILTER` images.
    """
    return inliers_of_selected(feats[:, :, neurons], config)


def inliers_of_selected(selected: torch.Tensor, config: LakeConfig) -> np.ndarray:
    """:func:`support_inliers` for tokens already in the sensitive subspace, ``(n, N, K) -> (n,)`` bool."""
    n = selected.shape[0]
    if n < MIN_IMAGES_FOR_FILTER:
        log.warning("filter_outliers: %d support image(s), the filter needs at least %d; none dropped", n, MIN_IMAGES_FOR_FILTER)
        return np.ones(n, dtype=bool)
    features = support_image_features(selected)  # (n, 4)
    flags, _ = flag_outliers(features, config.outlier_contamination, config.seed)
    return ~flags


def leave_one_out(gallery: torch.Tensor, n: int, n_tok: int, device: torch.device, index: str = "exact"
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Raw leave-one-out visual scores ``(n,)`` (NaN where not scored) and the token distances
    of each image scored: image ``i``'s tokens against the gallery of the other images.
    ``gallery`` is ``(n * N, K)``, image by image. An evenly spaced subset of
    :data:`MAX_LOO_IMAGES` images is scored beyond that many; none with one image. ``index``:
    ``"kdtree"`` searches through a k-d tree (the same distances,
    :meth:`lakead.index.GalleryIndex.search_others`), ``"exact"`` without; :func:`.stream.leave_one_out`
    chooses from the model's ``index`` option and the fit memory."""
    visual = np.full(n, np.nan, dtype=np.float64)
    tokens: list[np.ndarray] = []
    if n < 2:
        return visual, tokens
    g_dev = gallery.to(device)
    groups = torch.arange(n, dtype=torch.int32).repeat_interleave(n_tok).to(device)  # (n*N,)
    if index not in ("exact", "kdtree"):
        raise ValueError(f"the leave-one-out searches exactly or through a k-d tree, not {index!r}")
    search = GalleryIndex(g_dev, index)
    for i in steps(spread_subset(n, MAX_LOO_IMAGES), "leave-one-out"):
        q = g_dev[i * n_tok : (i + 1) * n_tok]  # (N, K)
        d = search.search_others(q, groups[i * n_tok : (i + 1) * n_tok], groups, block_elements=LOO_BLOCK_ELEMENTS)
        visual[i] = float(d.max())
        tokens.append(d.cpu().numpy())
    return visual, tokens


def leave_one_out_of(queries: dict[int, torch.Tensor], gallery: torch.Tensor, gallery_image: torch.Tensor, n: int,
                     device: torch.device) -> tuple[np.ndarray, list[np.ndarray]]:
    """:func:`leave_one_out` for any gallery (a coreset): the images ``queries`` (image ->
    its tokens ``(N, K)``) scored against the gallery vectors of the other images, found by
    ``gallery_image`` ``(M,)``. Raw scores ``(n,)`` (NaN where not scored) and token distances."""
    visual = np.full(n, np.nan, dtype=np.float64)
    tokens: list[np.ndarray] = []
    if n < 2:
        return visual, tokens
    g_dev, groups = gallery.to(device), gallery_image.to(device=device, dtype=torch.int32)
    for i in steps(sorted(queries), "leave-one-out"):
        q = queries[i].to(device=device, dtype=torch.float32)  # (N, K)
        own = torch.full((q.shape[0],), i, dtype=torch.int32, device=device)
        d, _ = nearest_neighbor(q, g_dev, query_groups=own, gallery_groups=groups, block_elements=LOO_BLOCK_ELEMENTS)
        visual[i] = float(d.max())
        tokens.append(d.cpu().numpy())
    return visual, tokens


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (a zero row stays zero): what ``distance="cosine"`` compares.

    >>> to_unit(torch.tensor([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    return torch.nn.functional.normalize(x.float(), dim=-1)


def token_distance(d: torch.Tensor, config: LakeConfig) -> torch.Tensor:
    """A token's score from its nearest-neighbour distance: itself (euclidean) or, with
    ``distance="cosine"`` where both sides are unit vectors, the cosine distance ``1 - cos``
    (:func:`lakead.patchops.cosine_distances`: ``d**2 / 2``)."""
    return cosine_distances(d) if config.distance == "cosine" else d


def cosine_gallery(gallery: torch.Tensor, n: int, n_tok: int, device: torch.device, index: str = "exact"
                   ) -> tuple[torch.Tensor, np.ndarray, list[np.ndarray]]:
    """``distance="cosine"``: the gallery ``(n * N, K)`` (every support token, image by image)
    as unit vectors, and the leave-one-out visual scores ``(n,)`` and token scores in cosine
    distance (:func:`leave_one_out` on the unit vectors)."""
    if gallery.shape[0] != n * n_tok:
        raise ValueError(f"distance='cosine' needs every support token in the gallery ({n} x {n_tok}), got {gallery.shape[0]}")
    unit = to_unit(gallery)
    visual, tokens = leave_one_out(unit, n, n_tok, device, index)
    return unit, visual ** 2 / 2.0, [t ** 2 / 2.0 for t in tokens]


def pool_visual(distances: torch.Tensor, config: LakeConfig) -> torch.Tensor:
    """An image's visual score from its token scores ``(B, N) -> (B,)``: the max (Eq. 8), or with
    ``visual_top_percent`` the mean of the top percent of them (AnomalyDINO's aggregation,
    :func:`lakead.patchops.top_percent_mean`: at least one token)."""
    if config.visual_top_percent is None:
        return distances.amax(dim=1)
    return top_percent_mean(distances, float(config.visual_top_percent))


def describe_loo(scored: int, n: int) -> str:
    """Which support images the leave-one-out scores (and so the threshold) come from.

    >>> describe_loo(3, 3), describe_loo(128, 1000)
    ('every support image (3)', '128 of 1,000 support images, evenly spaced (lakead.methods.lake.fit.spread_subset)')
    """
    if scored >= n:
        return f"every support image ({n:,})"
    return f"{scored:,} of {n:,} support images, evenly spaced (lakead.methods.lake.fit.spread_subset)"


def decision(
    loo_visual_raw: np.ndarray,
    loo_tokens_raw: Sequence[np.ndarray],
    semantic_support: np.ndarray,
    loo_scope: np.ndarray | None,
    config: LakeConfig,
    use_text: bool,
) -> tuple[float, np.ndarray, Thresholds, tuple[float, float], np.ndarray | None]:
    """From the leave-one-out scores: the visual scale, the fused support scores ``(n,)``, the
    decision levels (:func:`lakead.decision.derive_thresholds`, in the units of the saved scores:
    visual parts divided by the visual scale), the maps' colour range (the typical normal token up
    to the visual decision level) and the normalised token scores ``(T,)``."""
    finite = loo_visual_raw[np.isfinite(loo_visual_raw)]
    scale = float(np.median(finite)) if (config.score_norm == "loo" and finite.size and np.median(finite) > 0) else 1.0
    loo_scores = loo_visual_raw / scale + (config.lam * semantic_support if use_text else 0.0)
    tokens = np.concatenate(loo_tokens_raw).astype(np.float32) / np.float32(scale) if loo_tokens_raw else None
    levels = derive_thresholds(loo_scores, loo_visual_raw / scale, tokens, loo_scope, config)
    if tokens is not None:
        map_range = (float(np.median(tokens)), float(levels.seed))
    else:
        map_range = (0.0, 1.0)
    if map_range[1] <= map_range[0]:
        map_range = (map_range[0], map_range[0] + 1.0)
    if config.map_source == "semantic":
        map_range = (0.5, 1.0)  # probabilities: from "as likely normal as anomalous" up
    return scale, loo_scores, levels, map_range, tokens


#: Support tokens (every channel) kept for the scope check: a random subset beyond this many.
MAX_SCOPE_TOKENS = 4096


def scope_gallery(feats: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """What the scope check compares with: up to :data:`MAX_SCOPE_TOKENS` support tokens with
    every channel of the visual block(s) (not only the sensitive neurons, which another product
    may share), ``(n, N, D) -> (G, D)``, and which image each came from ``(G,)`` int32."""
    n, n_tok, width = feats.shape
    flat = feats.reshape(n * n_tok, width)  # (n*N, D)
    image = torch.arange(n, dtype=torch.int32).repeat_interleave(n_tok)  # (n*N,)
    keep = scope_rows(n, n_tok, seed)
    if keep is not None:
        flat, image = flat[keep], image[keep]
    return flat.contiguous(), image


def scope_rows(n: int, n_tok: int, seed: int = 0) -> torch.Tensor | None:
    """Which of the ``n * N`` support tokens (flat, image by image) :func:`scope_gallery` keeps,
    sorted; ``None``: all of them."""
    if n * n_tok <= MAX_SCOPE_TOKENS:
        return None
    return torch.randperm(n * n_tok, generator=torch.Generator().manual_seed(seed))[:MAX_SCOPE_TOKENS].sort().values


def scope_scores(tokens: torch.Tensor, gallery: torch.Tensor, gallery_image: torch.Tensor | None = None,
                 image: int | None = None) -> np.ndarray:
    """How unlike the normal images an image is as a whole: the median over its tokens
    ``(B, N, D)`` of the distance to the nearest support token, every channel (``gallery``
    ``(G, D)``) -> ``(B,)``. A defect raises the distances of the tokens it covers and leaves the
    median alone while it covers less than half of the image; another product, an empty fixture
    or a camera fault raises most of them. ``image``: a support image scored leave-one-out (its
    own tokens in the gallery, marked by ``gallery_image``, are left out)."""
    b, n_tok, width = tokens.shape
    q = tokens.reshape(b * n_tok, width).to(gallery.device)  # (B*N, D)
    if image is None:
        d, _ = nearest_neighbor(q, gallery)
    else:
        groups = torch.full((b * n_tok,), image, dtype=torch.int32, device=gallery.device)
        d, _ = nearest_neighbor(q, gallery, query_groups=groups, gallery_groups=gallery_image.to(gallery.device))
    return d.reshape(b, n_tok).median(dim=1).values.cpu().numpy().astype(np.float64)
