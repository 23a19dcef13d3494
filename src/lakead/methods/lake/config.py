"""The options of a LAKE detector: saved with the model, one help text each.

Every field is declared once here. Its type (a ``Literal`` lists the choices) and its help
text make the options of ``lakead fit``, ``eval``, ``ablate``, ``baselines`` and the service's
model creation (:mod:`lakead.options`), so they cannot drift apart. How a run is carried out
(device, batch size, precision) is not an option of the model: see :class:`lakead.api.Runtime`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

from ...fields import DEFAULT_CLIP, IndexKind, Layer, LayerSpec, Options, ThresholdRule, _admits, as_blocks, field_types, literal_choices, option, shared_option  # noqa: F401 - re-exported
from ...errors import ConfigError

NORMAL_PROMPT = "a photo of a normal {}."
ANOMALOUS_PROMPT = "a photo of an anomalous {}."


@dataclass
class LakeConfig(Options):
    """Every option of a :class:`~lakead.methods.lake.detector.LakeDetector`; saved as JSON with the model."""

    backbone: str = shared_option("backbone")
    k: Union[int, Literal["auto"], None] = option(
        None, "Number of sensitive neurons kept, or 'auto': the knee of the support set's sorted variance curve "
        "(docs/INTERPRETABILITY.md); default: the paper's 100 per 1024 channels of the visual tokens, at least 100 "
        "(100 on ViT-L/14; every channel of a block narrower than 100, docs/SELECTION.md); ignored with selection all.")
    layer: Optional[LayerSpec] = option(
        None, "Block read for the visual branch: a 1-based block number, or a tensor name for ONNX; several "
        "(12,18 or a+b) are concatenated on one token grid (block_grid); default: 3/4 of the backbone's depth "
        "(block 18 of 24, 9 of 12).")
    block_grid: Literal["coarsest", "finest"] = option(
        "coarsest", "Common token grid of several visual blocks: coarsest (average-pooled) or finest (bilinear).")
    text_backbone: Optional[str] = option(
        None, "Another model for the text probe (its text tower, and the patch tokens of its own image tower), "
        "e.g. a CLIP or SigLIP beside a DINOv2 visual branch: hub id or local directory (default: the visual backbone).")
    semantic_layer: Optional[Layer] = option(None, "Block read for the text probe (default: the last).")
    distance: Literal["euclidean", "cosine"] = option(
        "euclidean", "Token distance in the sensitive subspace: euclidean (the paper, Eq. 7) or cosine (1 - cos of the "
        "K-channel vectors, as AnomalyDINO; ranks better on the real images of docs/DECISIONS.md). cosine keeps "
        "every support token (no gallery_size).")
    visual_top_percent: Optional[float] = option(
        None, "Visual image score: the mean of the top percent of the token scores (AnomalyDINO's aggregation; at "
        "least one token) instead of their max (Eq. 8); e.g. 5. Default: the max.")
    lam: float = option(0.1, "Weight of the text probe in the fused score (Eq. 14).")
    semantic_agg: Literal["max", "mean"] = option("max", "Pooling of the text probe's per-token P(anomalous).")
    use_text: bool = option(True, "Run the text probe (when the backbone has a text tower).", flag="--text/--no-text")
    image_size: Optional[int] = shared_option("image_size")
    sigma: float = option(0.0, "Gaussian blur of maps, in pixels of the model input (0: off).")
    selection: Literal["top", "random", "bottom", "all"] = option(
        "top", "Neuron selection: top variance (LAKE), random, bottom, or all channels.")
    seed: int = option(0, "Seed of selection random and of the outlier filter.")
    filter_outliers: bool = option(
        False, "Drop support images an Isolation Forest flags in the sensitive subspace (listed; docs/INTERPRETABILITY.md).")
    outlier_contamination: Union[float, Literal["auto"]] = option(
        "auto", "Contamination of the outlier filter: auto (median + 3 MAD of the isolation scores) or the "
        "fraction of images to drop, in (0, 0.5].")
    score_norm: Literal["loo", "none"] = option(
        "loo", "loo: visual scores divided by the median leave-one-out score of the support images; none: raw distances.")
    map_source: Literal["visual", "semantic"] = option(
        "visual", "What the maps show: visual token distances (the paper) or the text probe's per-token P(anomalous).")
    false_alarm_rate: float = shared_option("false_alarm_rate")  # the decision options: lakead.fields.SHARED_OPTIONS
    threshold_rule: ThresholdRule = shared_option("threshold_rule")
    threshold: Optional[float] = shared_option("threshold")
    threshold_sigmas: float = shared_option("threshold_sigmas")
    gallery_size: Optional[int] = option(
        None, "Most gallery vectors kept: beyond it, a greedy coreset of that many support tokens, so memory and "
        "predict time stop growing with the support set (docs/SCALE.md); default: every support token (the paper).")
    index: IndexKind = shared_option("index")
    hnsw_ef_search: int = shared_option("hnsw_ef_search")
    scope_check: bool = option(
        True, "Also flag images that are not the product fitted on (out_of_scope): most of the image unlike the "
        "normal images (the median distance of its tokens to the support tokens, every channel, above what the "
        "support images show).")

    @property
    def blocks(self) -> tuple[Layer | None, ...]:
        """The visual block(s) as a tuple; ``(None,)`` for the backbone's default block."""
        return (None,) if self.layer is None else as_blocks(self.layer)

    def validate(self) -> "LakeConfig":
        """Check every option; returns ``self``. Raises :class:`~lakead.errors.ConfigError`."""
        super().validate()  # the options that are one of a few words (Literal)
        self.check_shared()  # backbone, image_size and the decision options
        if self.k not in ("auto", None) and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ConfigError(f"k must be a positive integer or 'auto', got {self.k!r}")
        self.blocks  # noqa: B018 - raises on an empty or repeated list
        for name in ("use_text", "filter_outliers", "scope_check"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        c = self.outlier_contamination
        if c != "auto" and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 0.5):
            raise ConfigError(f"outlier_contamination must be 'auto' or a fraction in (0, 0.5], got {c!r}")
        for name in ("lam", "sigma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.gallery_size is not None and (isinstance(self.gallery_size, bool) or not isinstance(self.gallery_size, int)
                                              or self.gallery_size < 1):
            raise ConfigError(f"gallery_size must be a positive integer, got {self.gallery_size!r}")
        p = self.visual_top_percent
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100):
            raise ConfigError(f"visual_top_percent must be a number in (0, 100] or None, got {p!r}")
        if self.distance == "cosine" and self.gallery_size is not None:
            raise ConfigError("distance='cosine' cannot be combined with gallery_size: the coreset is chosen by Euclidean "
                              "distance (lakead.methods.lake.stream) and the leave-one-out scores need every support token; "
                              "drop gallery_size or use distance='euclidean'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        return self
