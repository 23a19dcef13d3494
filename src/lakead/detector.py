"""The LAKE detector: fit on a few normal images, predict scores, maps and decisions.

Higher score = more anomalous, everywhere.

The steps (equations of the paper as restored in ``LAKE.md``):

1. ``fit``: run the support images through the frozen backbone to block ``layer``; the
   variance of every channel over all support tokens picks ``k`` sensitive neurons (Eq. 3-4);
   the gallery keeps every support token in that subspace (Eq. 5-6). Text embeddings of a
   normal and an anomalous prompt are computed once. Each support image is scored against
   the gallery of the others (leave-one-out) to learn what a normal score looks like.
2. ``predict``: each test token's distance to its nearest gallery vector (Eq. 7), max-pooled
   into the visual score (Eq. 8); the text probe's anomaly probability pooled over tokens
   (Eq. 9-13); the fused score ``visual + lam * semantic`` (Eq. 14); the visual token scores
   upsampled to each image's own size as its map.

Choices the paper leaves open, all configurable and recorded with the model:

- ``score_norm="loo"`` (default) divides visual distances by the median leave-one-out visual
  score of the support images, so that ``visual`` is about 1 for a typical normal image
  whatever the backbone's feature scale, and ``lam`` weighs the text probe the same way for
  every backbone. ``score_norm="none"`` keeps raw distances, exactly Eq. 14.
- The decision threshold, without any defect example: ``median + threshold_sigmas * 1.4826
  * MAD`` of the support images' leave-one-out scores (see :func:`lakead.ops.robust_threshold`).
  With a single support image there is nothing to leave out: the threshold is infinite
  (every image normal) until one is set, and a warning says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .backbones import DEFAULT_CLIP, Backbone, BackboneInfo, Features, Layer, load_backbone
from .errors import ConfigError, ImageLoadError, ModelFormatError, NotFittedError
from .fileio import atomic_directory
from .images import ImageInput, load_image, source_name
from .neurons import MIN_IMAGES_FOR_FILTER, flag_outliers, knee_k, support_image_features
from .ops import anomaly_probability, channel_variance, nearest_neighbor, pool_scores, robust_threshold, top_k_channels, upsample_map

log = logging.getLogger("lakead")

FORMAT_NAME = "lakead-model"
FORMAT_VERSION = 1
CONFIG_FILE = "lakead.json"
TENSORS_FILE = "tensors.safetensors"

NORMAL_PROMPT = "a photo of a normal {}."
ANOMALOUS_PROMPT = "a photo of an anomalous {}."

SELECTIONS = ("top", "random", "bottom", "all")
SCORE_NORMS = ("loo", "none")
MAP_SOURCES = ("visual", "semantic")
PRECISIONS = ("float32", "bfloat16")
AGGREGATIONS = ("max", "mean")

#: Support images scored leave-one-out at fit (an evenly spaced subset beyond this many).
MAX_LOO_IMAGES = 128


@dataclass
class LakeConfig:
    """Every option of a :class:`LakeDetector`; saved as JSON with the model."""

    backbone: str = DEFAULT_CLIP  # hub id, local save_pretrained directory, or onnx:PATH
    k: int | str = 100  # number of sensitive neurons kept (|Omega|), or "auto": the knee of the support set's sorted
    # variance curve (lakead.neurons.knee_k); ignored with selection="all"
    layer: Layer = 18  # block l read for the visual branch (1-based; a tensor name for ONNX)
    semantic_layer: Layer | None = None  # block l' for the text probe; None: the last block
    lam: float = 0.1  # weight of the text probe in the fused score (Eq. 14)
    semantic_agg: str = "max"  # pooling of per-token anomaly probabilities: "max" or "mean"
    use_text: bool = True  # run the text probe (when the backbone has a text tower)
    image_size: int | None = None  # square input size in pixels; None: the model's own
    sigma: float = 0.0  # Gaussian blur of maps, in pixels of the model input; 0 = off
    selection: str = "top"  # neurons: "top" (LAKE), "random", "bottom" variance, or "all"
    seed: int = 0  # seed of selection="random" and of the outlier filter
    filter_outliers: bool = False  # drop support images an Isolation Forest flags in the sensitive subspace
    outlier_contamination: float | str = "auto"  # "auto": drop images whose isolation score is above median + 3 MAD
    # of the scores; or a fraction in (0, 0.5]: drop that share of the images (lakead.neurons.flag_outliers)
    score_norm: str = "loo"  # "loo": visual scores / median leave-one-out score; "none": raw
    map_source: str = "visual"  # pixel maps: "visual" token distances (the paper) or "semantic": per-token P(anomalous) of the text probe
    threshold: float | None = None  # fixed decision threshold; None: derived at fit
    threshold_sigmas: float = 3.0  # robust standard deviations above the typical normal score
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    batch_size: int = 8  # images per forward pass
    precision: str = "float32"  # backbone arithmetic: "float32" (the reference) or "bfloat16" (torch.autocast; weights
    # stay float32; faster on GPUs and CPUs with AVX512-BF16/AMX, scores move slightly: docs/PERFORMANCE.md)

    def validate(self) -> "LakeConfig":
        if self.k != "auto" and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ConfigError(f"k must be a positive integer or 'auto', got {self.k!r}")
        if not isinstance(self.filter_outliers, bool):
            raise ConfigError(f"filter_outliers must be True or False, got {self.filter_outliers!r}")
        c = self.outlier_contamination
        if c != "auto" and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 0.5):
            raise ConfigError(f"outlier_contamination must be 'auto' or a fraction in (0, 0.5], got {c!r}")
        if self.semantic_agg not in AGGREGATIONS:
            raise ConfigError(f"semantic_agg must be one of {AGGREGATIONS}, got {self.semantic_agg!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.score_norm not in SCORE_NORMS:
            raise ConfigError(f"score_norm must be one of {SCORE_NORMS}, got {self.score_norm!r}")
        if self.map_source not in MAP_SOURCES:
            raise ConfigError(f"map_source must be one of {MAP_SOURCES}, got {self.map_source!r}")
        if not math.isfinite(self.lam) or self.lam < 0:
            raise ConfigError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if not math.isfinite(self.sigma) or self.sigma < 0:
            raise ConfigError(f"sigma must be a finite number >= 0, got {self.sigma!r}")
        if self.image_size is not None and (isinstance(self.image_size, bool) or self.image_size < 1):
            raise ConfigError(f"image_size must be a positive integer, got {self.image_size!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.threshold is not None and math.isnan(self.threshold):
            raise ConfigError("threshold must be a number, not NaN")
        if not math.isfinite(self.threshold_sigmas) or self.threshold_sigmas < 0:
            raise ConfigError(f"threshold_sigmas must be a finite number >= 0, got {self.threshold_sigmas!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        _resolve_device(self.device)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LakeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelFormatError(f"unknown configuration keys {unknown}")
        return cls(**d)


@dataclass(frozen=True)
class Prediction:
    """The result of :meth:`LakeDetector.predict`, the same type on every input path.

    Every array has one entry per input image, in input order. Higher = more anomalous.
    """

    scores: np.ndarray  # (B,) float32: the fused score visual + lam * semantic
    visual: np.ndarray  # (B,) float32: max over tokens of the distance to the gallery
    semantic: np.ndarray  # (B,) float32: pooled P(anomalous) of the text probe; 0 when off
    anomalous: np.ndarray  # (B,) bool: scores > threshold
    maps: tuple[np.ndarray, ...]  # B float32 maps, each at its image's own (H, W)
    threshold: float  # the decision threshold used

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def backbone_precision(precision: str, backbone: Backbone) -> contextlib.AbstractContextManager:
    """The context a backbone call runs in: nothing for ``"float32"``; for ``"bfloat16"``,
    ``torch.autocast`` (matrix products and attention in bfloat16, weights kept in float32,
    so a backbone shared by several detectors is never altered). Torch backbones only."""
    if precision == "float32":
        return contextlib.nullcontext()
    if backbone.info.kind != "clip":
        raise ConfigError(f"precision {precision!r} needs a torch backbone (CLIP); {backbone.info.kind} backbones run as exported")
    return torch.autocast(backbone.device.type, dtype=torch.bfloat16)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return dev


@dataclass
class LoadedImages:
    """Images that were read, with their labels, and the ones that could not be."""

    arrays: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    errors: list[ImageLoadError] = field(default_factory=list)


class LakeDetector:
    """Training-free few-shot anomaly detector (LAKE).

    >>> det = LakeDetector(backbone="path/to/clip", k=100, layer=18)  # doctest: +SKIP
    >>> det.fit(normal_paths, class_name="bottle").predict(test_paths).scores  # doctest: +SKIP

    ``backbone`` is a hub id, a local directory, ``"onnx:PATH"`` or a built
    :class:`~lakead.backbones.Backbone`. See :class:`LakeConfig` for every option.
    Learned state ends in ``_`` and exists after :meth:`fit` or :meth:`load`.
    """

    def __init__(
        self,
        backbone: str | Backbone = DEFAULT_CLIP,
        *,
        k: int | str = 100,
        layer: Layer = 18,
        semantic_layer: Layer | None = None,
        lam: float = 0.1,
        semantic_agg: str = "max",
        use_text: bool = True,
        image_size: int | None = None,
        sigma: float = 0.0,
        selection: str = "top",
        seed: int = 0,
        filter_outliers: bool = False,
        outlier_contamination: float | str = "auto",
        score_norm: str = "loo",
        map_source: str = "visual",
        threshold: float | None = None,
        threshold_sigmas: float = 3.0,
        device: str = "auto",
        batch_size: int = 8,
        precision: str = "float32",
    ) -> None:
        self._backbone_obj = backbone if isinstance(backbone, Backbone) else None
        self.config = LakeConfig(
            backbone=backbone.info.source if isinstance(backbone, Backbone) else backbone,
            k=k,
            layer=layer,
            semantic_layer=semantic_layer,
            lam=lam,
            semantic_agg=semantic_agg,
            use_text=use_text,
            image_size=image_size,
            sigma=sigma,
            selection=selection,
            seed=seed,
            filter_outliers=filter_outliers,
            outlier_contamination=outlier_contamination,
            score_norm=score_norm,
            map_source=map_source,
            threshold=threshold,
            threshold_sigmas=threshold_sigmas,
            device=device,
            batch_size=batch_size,
            precision=precision,
        ).validate()

    @classmethod
    def from_config(cls, config: LakeConfig, backbone: Backbone | None = None) -> "LakeDetector":
        """A detector from a :class:`LakeConfig` (and optionally an already built backbone)."""
        kwargs = config.to_dict()
        kwargs["backbone"] = backbone if backbone is not None else kwargs["backbone"]
        return cls(**kwargs)

    # -- state ----------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "gallery_")

    def check_fitted(self) -> None:
        """Raise :class:`NotFittedError` unless the detector was fitted or loaded."""
        if not self.is_fitted:
            raise NotFittedError("this LakeDetector is not fitted: call fit(...) or LakeDetector.load(...) first")

    @property
    def backbone(self) -> Backbone:
        """The backbone, loaded on first use."""
        if self._backbone_obj is None:
            self._backbone_obj = load_backbone(self.config.backbone, need_text=not self.is_fitted)
        return self._backbone_obj

    # -- images ---------------------------------------------------------------------------

    def read_image(self, image: ImageInput, name: str | None = None) -> np.ndarray:
        """Read one input into a ``(H, W, 3)`` uint8 array, as :meth:`fit` and :meth:`predict` do.

        Raises :class:`~lakead.errors.ImageLoadError` when it cannot be read or is smaller
        than one patch of the backbone.
        """
        label = name or source_name(image)
        arr = load_image(image, label)
        patch = self.backbone.info.patch_size
        h, w = arr.shape[:2]
        if h < patch or w < patch:
            raise ImageLoadError(label, f"image is {w}x{h} pixels, smaller than one {patch}x{patch} patch")
        return arr

    def read_images(
        self, images: Sequence[ImageInput] | ImageInput, names: Sequence[str] | None = None, *, strict: bool = True
    ) -> LoadedImages:
        """Read inputs as :meth:`fit` (``strict=False``: unreadable ones are collected in
        ``errors``) and :meth:`predict` (``strict=True``: the first one raises) read them.

        A single path, PIL image or array counts as one image; labels are ``names`` or the
        inputs' own names.
        """
        if isinstance(images, (str, Path, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]  # type: ignore[list-item]
        if names is not None and len(names) != len(images):
            raise ConfigError(f"got {len(names)} names for {len(images)} images")
        out = LoadedImages()
        for i, img in enumerate(images):
            label = names[i] if names is not None else source_name(img, i)
            try:
                arr = self.read_image(img, label)
            except ImageLoadError as exc:
                if strict:
                    raise
                out.errors.append(exc)
                continue
            out.arrays.append(arr)
            out.names.append(label)
        return out

    def iter_features(self, arrays: Sequence[np.ndarray], layer: Layer, semantic_layer: Layer | None):
        """Yield ``(start, Features)`` for consecutive batches of ``(H, W, 3)`` uint8 images.

        The backbone is run exactly as ``fit`` and ``predict`` run it (the detector's input size,
        batch size and precision), read at ``layer`` and, when given, ``semantic_layer``;
        ``start`` is the index of the batch's first image. Features are float32.
        """
        bs = self.config.batch_size
        for start in range(0, len(arrays), bs):
            pixels = self.backbone.preprocessing(arrays[start : start + bs], self.image_size_)
            with backbone_precision(self.config.precision, self.backbone):
                feats = self.backbone.extract(pixels, layer, semantic_layer)
            yield start, feats  # outside the autocast region: the search and the probe stay float32

    # -- fit ------------------------------------------------------------------------------

    def fit(
        self,
        images: Sequence[ImageInput],
        class_name: str,
        *,
        names: Sequence[str] | None = None,
        support_rule: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> "LakeDetector":
        """Fit on normal images only. Returns ``self``.

        ``images``: paths, PIL images or ``(H, W[, C])`` arrays. Unreadable images are skipped
        with a warning (recorded in ``skipped_``); it is an error when none can be read.
        ``class_name`` fills the text prompts ("a photo of a normal {class_name}.");
        underscores are read as spaces. ``on_progress(n)`` is called after each batch with
        the number of images it held. ``support_rule`` says how the images were chosen
        (for example "first 16 of 64 images sorted by name"); it is saved with the model.
        """
        cfg = self.config
        if not isinstance(class_name, str) or not class_name.strip():
            raise ConfigError("class_name must be a non-empty string (it fills the text prompts)")
        backbone = self.backbone
        device = _resolve_device(cfg.device)
        backbone.to(device)
        layer = backbone.resolve_layer(cfg.layer)
        use_text = cfg.use_text and backbone.has_text
        if cfg.use_text and not backbone.has_text:
            log.warning("backbone %s has no text tower: the text probe is off (semantic scores are 0)", backbone.info.source)
        if cfg.map_source == "semantic" and not use_text:
            raise ConfigError("map_source='semantic' needs the text probe: use_text=True and a backbone with a text tower")
        semantic_layer = backbone.resolve_layer(cfg.semantic_layer, semantic=True) if use_text else None
        image_size = backbone.check_image_size(cfg.image_size or backbone.info.image_size)

        loaded = self.read_images(images, names, strict=False)
        for err in loaded.errors:
            log.warning("skipping support image %s", err)
        if not loaded.arrays:
            raise ConfigError(f"no readable support image among the {len(images)} given" + (
                f" (first problem: {loaded.errors[0]})" if loaded.errors else ""))
        n = len(loaded.arrays)

        name = class_name.strip().replace("_", " ")
        prompts = [NORMAL_PROMPT.format(name), ANOMALOUS_PROMPT.format(name)]
        text = None
        if use_text:
            text = torch.nn.functional.normalize(backbone.text_embeddings(prompts).float(), dim=-1).to(device)  # (2, E)
            logit_scale = backbone.logit_scale

        self.image_size_ = image_size
        feats: torch.Tensor | None = None  # (n, N, D) on the CPU
        sem_tokens: torch.Tensor | None = None  # (n, N)
        for start, f in self.iter_features(loaded.arrays, layer, semantic_layer):
            b, n_tok, width = f.visual.shape
            if feats is None:
                if cfg.selection != "all" and cfg.k != "auto" and cfg.k > width:
                    raise ConfigError(f"k={cfg.k} is larger than the width of block {layer!r} ({width} channels)")
                feats = torch.empty((n, n_tok, width), dtype=torch.float32)
                sem_tokens = torch.zeros((n, n_tok), dtype=torch.float32)
                grid = f.grid
            feats[start : start + b] = f.visual.cpu()
            if text is not None and f.joint is not None:
                sem_tokens[start : start + b] = anomaly_probability(f.joint, text, logit_scale).cpu()  # type: ignore[index]
            if on_progress is not None:
                on_progress(b)
        assert feats is not None and sem_tokens is not None
        n_tok, width = feats.shape[1], feats.shape[2]

        variance, neurons = self._select_neurons(feats)
        outliers: list[str] = []
        if cfg.filter_outliers:
            keep = self._support_inliers(feats, neurons, loaded.names)  # (n,) bool
            if not keep.all():
                outliers = [nm for nm, kept in zip(loaded.names, keep) if not kept]
                loaded.names = [nm for nm, kept in zip(loaded.names, keep) if kept]
                feats, sem_tokens = feats[torch.from_numpy(keep)], sem_tokens[torch.from_numpy(keep)]
                n = len(loaded.names)
                variance, neurons = self._select_neurons(feats)  # chosen again without the outliers
        flat = feats.reshape(n * n_tok, width)  # (n*N, D)
        gallery = flat[:, neurons].contiguous()  # (n*N, K)
        del feats, flat
        gallery_image = torch.arange(n, dtype=torch.int32).repeat_interleave(n_tok)  # (n*N,)

        # -- leave-one-out: each support image against the gallery of the others ---------
        loo_idx = _loo_subset(n)
        loo_visual_raw = np.full(n, np.nan, dtype=np.float64)
        loo_token_raw: list[np.ndarray] = []
        if n >= 2:
            g_dev = gallery.to(device)
            groups = gallery_image.to(device)
            for i in loo_idx:
                q = g_dev[i * n_tok : (i + 1) * n_tok]  # (N, K)
                d, _ = nearest_neighbor(q, g_dev, query_groups=groups[i * n_tok : (i + 1) * n_tok], gallery_groups=groups)
                loo_visual_raw[i] = float(d.max())
                loo_token_raw.append(d.cpu().numpy())
        semantic_support = pool_scores(sem_tokens, cfg.semantic_agg).numpy().astype(np.float64)  # (n,)

        finite = loo_visual_raw[np.isfinite(loo_visual_raw)]
        scale = float(np.median(finite)) if (cfg.score_norm == "loo" and finite.size and np.median(finite) > 0) else 1.0
        loo_scores = loo_visual_raw / scale + (cfg.lam * semantic_support if use_text else 0.0)
        if cfg.threshold is not None:
            threshold = float(cfg.threshold)
        elif finite.size:
            threshold = robust_threshold(loo_scores[np.isfinite(loo_scores)], cfg.threshold_sigmas)
        else:
            threshold = math.inf
            log.warning(
                "only one support image: no leave-one-out threshold can be derived, so every image is "
                "called normal until a threshold is set (threshold=... / --threshold)"
            )
        if loo_token_raw:
            tokens = np.concatenate(loo_token_raw) / scale
            map_range = (float(np.median(tokens)), float(robust_threshold(finite / scale, cfg.threshold_sigmas)))
        else:
            map_range = (0.0, 1.0)
        if map_range[1] <= map_range[0]:
            map_range = (map_range[0], map_range[0] + 1.0)
        if cfg.map_source == "semantic":
            map_range = (0.5, 1.0)  # probabilities: from "as likely normal as anomalous" up

        # -- learned state ------------------------------------------------------------------
        self.layer_ = layer
        self.semantic_layer_ = semantic_layer
        self.grid_ = tuple(grid)
        self.width_ = int(width)
        self.channel_variance_ = variance  # (D,) float64
        self.neurons_ = neurons  # (K,) int64
        self.gallery_ = gallery.to(device)  # (n*N, K) float32
        self.gallery_image_ = gallery_image  # (n*N,) int32
        self.text_embeddings_ = text  # (2, E) or None
        self.logit_scale_ = float(logit_scale) if use_text else None
        self.prompts_ = prompts if use_text else None
        self.class_name_ = class_name.strip()
        self.support_ = list(loaded.names)
        self.support_rule_ = support_rule or f"{len(images)} images as given"
        self.skipped_ = [str(e) for e in loaded.errors]
        self.outliers_ = outliers  # support images dropped by filter_outliers, in input order
        self.loo_visual_ = (loo_visual_raw / scale).astype(np.float32)  # (n,), NaN where not scored
        self.loo_semantic_ = semantic_support.astype(np.float32)  # (n,)
        self.loo_scores_ = loo_scores.astype(np.float32)  # (n,)
        self.visual_scale_ = scale
        self.threshold_ = threshold
        self.map_range_ = map_range
        self.fitted_at_ = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return self

    def _select_neurons(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Support tokens ``(n, N, D)`` -> channel variances ``(D,)`` float64 and the chosen
        neurons ``(K,)``; ``k="auto"`` takes ``K`` at the knee of the variance curve."""
        n, n_tok, width = feats.shape
        variance = channel_variance(feats.reshape(n * n_tok, width))  # (D,)
        k = knee_k(variance.numpy()) if self.config.k == "auto" else int(self.config.k)
        return variance, self._select(variance, k)

    def _select(self, variance: torch.Tensor, k: int) -> torch.Tensor:
        """Channel indices for the gallery by the configured selection rule."""
        cfg, width = self.config, variance.numel()
        if cfg.selection == "all":
            return torch.arange(width, dtype=torch.int64)
        if cfg.selection == "top":
            return top_k_channels(variance, k)
        if cfg.selection == "bottom":
            return top_k_channels(-variance, k)
        rng = random.Random(cfg.seed)
        return torch.tensor(sorted(rng.sample(range(width), k)), dtype=torch.int64)

    def _support_inliers(self, feats: torch.Tensor, neurons: torch.Tensor, names: Sequence[str]) -> np.ndarray:
        """Which support images the outlier filter keeps: ``(n, N, D)`` -> ``(n,)`` bool.

        An Isolation Forest over one vector per image in the sensitive subspace
        (:func:`lakead.neurons.support_image_features`, :func:`lakead.neurons.flag_outliers`).
        """
        n = feats.shape[0]
        if n < MIN_IMAGES_FOR_FILTER:
            log.warning("filter_outliers: %d support image(s), the filter needs at least %d; none dropped", n, MIN_IMAGES_FOR_FILTER)
            return np.ones(n, dtype=bool)
        features = support_image_features(feats[:, :, neurons])  # (n, 4)
        flags, _ = flag_outliers(features, self.config.outlier_contamination, self.config.seed)
        for name in (nm for nm, flagged in zip(names, flags) if flagged):
            log.debug("filter_outliers: dropping support image %s (flagged by the Isolation Forest)", name)
        return ~flags

    # -- predict --------------------------------------------------------------------------

    def predict(
        self,
        images: Sequence[ImageInput],
        *,
        names: Sequence[str] | None = None,
        threshold: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Prediction:
        """Score images. Raises :class:`~lakead.errors.ImageLoadError` on the first bad one.

        ``threshold`` overrides the fitted decision threshold for this call.
        """
        self.check_fitted()
        loaded = self.read_images(images, names, strict=True)
        return self._predict_arrays(loaded.arrays, threshold=threshold, on_progress=on_progress)

    def token_scores(self, visual: torch.Tensor) -> torch.Tensor:
        """Visual token scores: ``(B, N, D)`` block tokens -> ``(B, N)`` distances (Eq. 7),
        divided by the fitted scale."""
        b, n_tok, _ = visual.shape
        q = visual.to(self.gallery_.device)[..., self.neurons_.to(self.gallery_.device)].reshape(b * n_tok, -1)  # (B*N, K)
        d, _ = nearest_neighbor(q, self.gallery_)
        return (d / self.visual_scale_).reshape(b, n_tok)  # (B, N)

    def _predict_arrays(
        self,
        arrays: Sequence[np.ndarray],
        *,
        threshold: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Prediction:
        cfg = self.config
        thr = self.threshold_ if threshold is None else float(threshold)
        visual, semantic, maps = [], [], []
        gh, gw = self.grid_
        for _, f in self.iter_features(arrays, self.layer_, self.semantic_layer_):
            tok = self.token_scores(f.visual)  # (B, N)
            visual.append(tok.amax(dim=1).cpu())
            shown = tok  # what the maps show, (B, N)
            if f.joint is not None and self.text_embeddings_ is not None:
                p = anomaly_probability(f.joint, self.text_embeddings_, self.logit_scale_)  # (B, N)
                semantic.append(pool_scores(p, cfg.semantic_agg).cpu())
                if cfg.map_source == "semantic":
                    shown = p
            else:
                semantic.append(torch.zeros(tok.shape[0]))
            grids = shown.reshape(-1, gh, gw).cpu()  # (B, gh, gw)
            start = len(maps)
            for j in range(grids.shape[0]):
                h, w = arrays[start + j].shape[:2]
                sig = (cfg.sigma * h / self.image_size_, cfg.sigma * w / self.image_size_)
                maps.append(upsample_map(grids[j], (h, w), sig))
            if on_progress is not None:
                on_progress(grids.shape[0])
        vis = torch.cat(visual).numpy().astype(np.float32) if visual else np.zeros(0, np.float32)
        sem = torch.cat(semantic).numpy().astype(np.float32) if semantic else np.zeros(0, np.float32)
        scores = (vis + np.float32(cfg.lam) * sem).astype(np.float32)
        return Prediction(scores=scores, visual=vis, semantic=sem, anomalous=scores > thr, maps=tuple(maps), threshold=thr)

    # -- save / load ----------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the fitted model to a directory: ``lakead.json`` (configuration and
        metadata, with a format version) and ``tensors.safetensors``. Atomic: the directory
        appears complete or not at all. Returns the directory."""
        self.check_fitted()
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "lakead_version": __version__,
            "config": self.config.to_dict(),
            "backbone": self.backbone.info.to_dict(),
            "class_name": self.class_name_,
            "prompts": self.prompts_,
            "logit_scale": self.logit_scale_,
            "layer": self.layer_,
            "semantic_layer": self.semantic_layer_,
            "image_size": self.image_size_,
            "grid": list(self.grid_),
            "width": self.width_,
            "visual_scale": self.visual_scale_,
            "threshold": self.threshold_ if math.isfinite(self.threshold_) else None,
            "map_range": list(self.map_range_),
            "support": self.support_,
            "support_rule": self.support_rule_,
            "skipped": self.skipped_,
            "outliers": self.outliers_,
            "k": int(self.neurons_.numel()),
            "fitted_at": self.fitted_at_,
        }
        tensors = {
            "neurons": self.neurons_.cpu().contiguous(),
            "channel_variance": self.channel_variance_.cpu().contiguous(),
            "gallery": self.gallery_.cpu().contiguous(),
            "gallery_image": self.gallery_image_.cpu().contiguous(),
            "loo_visual": torch.from_numpy(self.loo_visual_.copy()),
            "loo_semantic": torch.from_numpy(self.loo_semantic_.copy()),
            "loo_scores": torch.from_numpy(self.loo_scores_.copy()),
        }
        if self.text_embeddings_ is not None:
            tensors["text_embeddings"] = self.text_embeddings_.cpu().contiguous()
        with atomic_directory(path) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
        return Path(path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        backbone: str | Backbone | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        precision: str | None = None,
    ) -> "LakeDetector":
        """Load a model written by :meth:`save`.

        ``backbone`` replaces where the weights are read from (for a model moved to another
        machine); it must be the same model (checked by architecture and a fingerprint of
        the weights). ``device``, ``batch_size`` and ``precision`` replace the saved settings.
        """
        meta = read_model_meta(path)
        try:
            config = LakeConfig.from_dict(meta["config"])
            saved_info = BackboneInfo(**meta["backbone"])
        except (TypeError, KeyError, ModelFormatError) as exc:
            raise ModelFormatError(f"{path}: {CONFIG_FILE} is damaged ({exc})") from None
        overrides = {"device": device, "batch_size": batch_size, "precision": precision}
        if any(v is not None for v in overrides.values()):
            for name, value in overrides.items():
                if value is not None:
                    setattr(config, name, value)
            config.validate()
        if backbone is None:
            bb = load_backbone(saved_info.source, need_text=False)
        else:
            bb = load_backbone(backbone, need_text=False)
        if not bb.info.same_model(saved_info):
            raise ModelFormatError(
                f"{path}: the model was fitted with backbone {saved_info.source!r} ({saved_info.kind}, "
                f"{saved_info.num_layers} blocks, patch {saved_info.patch_size}, weights {saved_info.fingerprint[:12]}), "
                f"but the backbone given is {bb.info.source!r} ({bb.info.kind}, {bb.info.num_layers} blocks, "
                f"patch {bb.info.patch_size}, weights {bb.info.fingerprint[:12]}): use the same model"
            )
        try:
            tensors = load_file(str(Path(path) / TENSORS_FILE))
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise ModelFormatError(f"{Path(path) / TENSORS_FILE}: cannot be read ({exc})") from None
        det = cls.from_config(config, backbone=bb)
        dev = _resolve_device(config.device)
        bb.to(dev)
        try:
            det.layer_ = meta["layer"]
            det.semantic_layer_ = meta["semantic_layer"]
            det.image_size_ = int(meta["image_size"])
            det.grid_ = tuple(int(v) for v in meta["grid"])
            det.width_ = int(meta["width"])
            det.channel_variance_ = tensors["channel_variance"]
            det.neurons_ = tensors["neurons"]
            det.gallery_ = tensors["gallery"].to(dev)
            det.gallery_image_ = tensors["gallery_image"]
            te = tensors.get("text_embeddings")
            det.text_embeddings_ = te.to(dev) if te is not None else None
            det.logit_scale_ = meta["logit_scale"]
            det.prompts_ = meta["prompts"]
            det.class_name_ = meta["class_name"]
            det.support_ = list(meta["support"])
            det.support_rule_ = str(meta["support_rule"])
            det.skipped_ = list(meta["skipped"])
            det.outliers_ = list(meta.get("outliers", []))  # absent from models saved before the filter existed
            det.loo_visual_ = tensors["loo_visual"].numpy()
            det.loo_semantic_ = tensors["loo_semantic"].numpy()
            det.loo_scores_ = tensors["loo_scores"].numpy()
            det.visual_scale_ = float(meta["visual_scale"])
            det.threshold_ = math.inf if meta["threshold"] is None else float(meta["threshold"])
            det.map_range_ = tuple(float(v) for v in meta["map_range"])
            det.fitted_at_ = meta["fitted_at"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{path}: saved model is incomplete or damaged (missing or bad {exc})") from None
        k = det.neurons_.numel()
        if det.gallery_.ndim != 2 or det.gallery_.shape[1] != k or det.channel_variance_.numel() != det.width_:
            raise ModelFormatError(f"{path}: tensors do not agree with each other (gallery {tuple(det.gallery_.shape)}, {k} neurons)")
        return det

    def summary(self) -> dict[str, Any]:
        """The facts of a fitted model worth printing or reporting."""
        self.check_fitted()
        finite = self.loo_scores_[np.isfinite(self.loo_scores_)]
        return {
            "class_name": self.class_name_,
            "backbone": self.config.backbone,
            "layer": self.layer_,
            "semantic_layer": self.semantic_layer_,
            "image_size": self.image_size_,
            "k": int(self.neurons_.numel()),
            "k_rule": "all channels" if self.config.selection == "all" else (
                "auto: knee of the sorted variance curve" if self.config.k == "auto" else "fixed"),
            "width": self.width_,
            "selection": self.config.selection,
            "support_images": len(self.support_),
            "support_rule": self.support_rule_,
            "skipped_images": len(self.skipped_),
            "outliers_dropped": list(self.outliers_),
            "gallery_vectors": int(self.gallery_.shape[0]),
            "text_probe": self.text_embeddings_ is not None,
            "score_norm": self.config.score_norm,
            "threshold": self.threshold_,
            "threshold_rule": "fixed by the user" if self.config.threshold is not None else (
                f"median + {self.config.threshold_sigmas:g} x 1.4826 x MAD of leave-one-out support scores"
                if finite.size else "none (one support image)"),
            "loo_score_median": float(np.median(finite)) if finite.size else None,
            "loo_score_max": float(finite.max()) if finite.size else None,
        }


def spread_subset(n: int, limit: int) -> list[int]:
    """``limit`` indices evenly spaced over ``range(n)`` (all when ``n <= limit``)."""
    if n <= limit:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, limit)})


def _loo_subset(n: int) -> list[int]:
    """Which support images are scored leave-one-out: all, or an evenly spaced subset."""
    return [] if n < 2 else spread_subset(n, MAX_LOO_IMAGES)


def read_model_meta(path: str | Path) -> dict[str, Any]:
    """Read and check ``lakead.json`` of a saved model (format name and version)."""
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: no such model directory")
    if not p.is_dir():
        raise ModelFormatError(f"{p}: is a file; a saved model is a directory")
    cfg_file = p / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelFormatError(f"{p}: not a lakead model directory (no {CONFIG_FILE})")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{cfg_file}: cannot be parsed ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{cfg_file}: not a lakead model file")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFormatError(
            f"{p}: written in model format version {version} (by lakead {meta.get('lakead_version', '?')}); "
            f"this lakead ({__version__}) reads format version {FORMAT_VERSION}: fit the model again"
        )
    return meta
