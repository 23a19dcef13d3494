"""What a fitted LAKE detector has learned, declared once.

:class:`LakeState` lists every learned tensor and fact. Saving, loading, the fingerprint
that ``predict --resume`` compares, and the detector's ``name_`` attributes all come from
this one list (:class:`lakead.base.LearnedState`): a new piece of state is one new field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...backbones.base import Layer, LayerSpec
from ...state import DecisionRecord, SupportRecord, fact, tensor
from ...errors import ModelFormatError


@dataclass
class LakeState(SupportRecord, DecisionRecord):
    """Everything :meth:`LakeDetector.fit` learns (shapes: n support images, N tokens each,
    D channels of the visual block(s), K sensitive neurons, M = n * N gallery vectors, fewer with
    gallery_size)."""

    # -- arrays (tensors.safetensors) --
    neurons: torch.Tensor = tensor("(K,) int64: the sensitive neurons, channel indices of the visual tokens")
    channel_variance: torch.Tensor = tensor("(D,) float64: variance of each channel over all support tokens (Eq. 3)")
    gallery: torch.Tensor = tensor("(M, K) float32: every support token in the sensitive subspace (Eq. 5-6)", device=True)
    gallery_image: torch.Tensor = tensor("(M,) int32: which support image each gallery vector comes from")
    loo_visual: np.ndarray = tensor("(n,) float32: leave-one-out visual scores of the support images (NaN: not scored)", numpy=True)
    loo_semantic: np.ndarray = tensor("(n,) float32: text-probe scores of the support images", numpy=True)
    text_embeddings: torch.Tensor | None = tensor("(2, E) float32: normalised normal / anomalous prompt embeddings",
                                                  optional=True, device=True)
    scope_gallery: torch.Tensor | None = tensor("(G, D) float32: support tokens, every channel, for the scope check",
                                                optional=True, device=True)
    scope_gallery_image: torch.Tensor | None = tensor("(G,) int32: which support image each comes from", optional=True)
    loo_scope: np.ndarray | None = tensor("(n,) float64: each support image's scope distance, leave-one-out",
                                          optional=True, numpy=True)
    gallery_index: np.ndarray | None = tensor("(B,) uint8: the gallery's HNSW index, serialized (index='hnsw')",
                                              optional=True, numpy=True)
    # -- facts (lakead.json) --
    layer: LayerSpec = fact("the visual block(s) read, in the backbone's canonical form")
    semantic_layer: Layer | None = fact("the text probe's block; None when the probe is off")
    image_size: int = fact("square input size in pixels")
    grid: tuple[int, int] = fact("(gh, gw) token grid of the visual tokens")
    width: int = fact("D, channels of the visual tokens")
    visual_scale: float = fact("what visual distances are divided by (score_norm)")
    scope_threshold: float | None = fact("the scope distance above which an image is out of scope (None: off)", default=None)
    prompts: list[str] | None = fact("the normal and anomalous prompts; None when the probe is off")
    logit_scale: float | None = fact("CLIP's logit scale; None when the probe is off")
    outliers: list[str] = fact("support images dropped by filter_outliers", default=[])  # absent before the filter existed
    gallery_rule: str = fact("how the gallery was made: every support token, or a greedy coreset of them",
                             default="every support token")
    loo_rule: str = fact("which support images the leave-one-out scores (and the threshold) come from",
                         default="every support image, or an evenly spaced 128 of them")

    @classmethod
    def convert(cls, values: dict[str, Any]) -> dict[str, Any]:
        values = super().convert(values)
        values["image_size"] = int(values["image_size"])
        values["width"] = int(values["width"])
        values["visual_scale"] = float(values["visual_scale"])
        for name in ("support", "skipped", "outliers"):
            values[name] = list(values[name])
        values["support_rule"] = str(values["support_rule"])
        return values

    def check(self, where: str) -> None:
        """Raise :class:`ModelFormatError` when the arrays and facts do not agree."""
        k = self.neurons.numel()
        problems = []
        if self.gallery.ndim != 2 or self.gallery.shape[1] != k or self.gallery.shape[0] == 0:
            problems.append(f"gallery {tuple(self.gallery.shape)} for {k} neurons")
        if self.channel_variance.numel() != self.width:
            problems.append(f"{self.channel_variance.numel()} channel variances for width {self.width}")
        if k and (int(self.neurons.min()) < 0 or int(self.neurons.max()) >= self.width):
            problems.append(f"neuron indices outside 0..{self.width - 1}")
        if not math.isfinite(self.visual_scale) or self.visual_scale <= 0:
            problems.append(f"visual_scale {self.visual_scale}")
        if math.isnan(self.threshold):
            problems.append("threshold NaN")
        if problems:
            raise ModelFormatError(f"{where}: tensors and facts do not agree with each other ({'; '.join(problems)})")
