"""What a fitted WinCLIP detector has learned, declared once (see :class:`lakead.base.LearnedState`)."""

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
class WinCLIPState(SupportRecord, DecisionRecord):
    """Shapes: n support images (0 for zero-shot without images), N patches, E joint width,
    D block width, K sensitive neurons."""

    text_embeddings: torch.Tensor = tensor("(2, E) float32: the normal and anomalous class prototypes, normalised", device=True)
    window_memory: torch.Tensor | None = tensor("(Mw, E) float32: every support window embedding (WinCLIP+)",
                                                optional=True, device=True)
    window_memory_scale: torch.Tensor | None = tensor("(Mw,) int32: which window size each belongs to", optional=True, device=True)
    window_memory_image: torch.Tensor | None = tensor("(Mw,) int32: which support image each comes from", optional=True)
    patch_memory: torch.Tensor | None = tensor("(Mp, D) float32: every support patch token (WinCLIP+)", optional=True, device=True)
    patch_memory_image: torch.Tensor | None = tensor("(Mp,) int32: which support image each comes from", optional=True)
    neurons: torch.Tensor | None = tensor("(K,) int64: LAKE's sensitive neurons (WinCLIP+LAKE)", optional=True)
    gallery: torch.Tensor | None = tensor("(n*N, K) float32: LAKE's gallery (WinCLIP+LAKE)", optional=True, device=True)
    gallery_image: torch.Tensor | None = tensor("(n*N,) int32: which support image each comes from", optional=True)
    loo_text: np.ndarray = tensor("(n,) float32: support images' text scores", numpy=True)
    loo_visual: np.ndarray = tensor("(n,) float32: support images' leave-one-out map maxima", numpy=True)
    prompts: list[int] = fact("numbers of normal and anomalous prompts averaged")
    image_size: int = fact("square input size in pixels")
    grid: tuple[int, int] = fact("(gh, gw) patch grid")
    window_sizes: list[int] = fact("window sides in patches")
    patch_layer: Layer | None = fact("WinCLIP+: the block of the associated patch tokens")
    lake_layer: LayerSpec | None = fact("WinCLIP+LAKE: the block(s) of LAKE's gallery")
    visual_scale: float = fact("WinCLIP+LAKE: what LAKE's distances are divided by (median leave-one-out score); else 1")

    @classmethod
    def convert(cls, values: dict[str, Any]) -> dict[str, Any]:
        values = super().convert(values)
        values["visual_scale"] = float(values["visual_scale"])
        values["image_size"] = int(values["image_size"])
        return values

    def check(self, where: str) -> None:
        problems = []
        if self.text_embeddings.ndim != 2 or self.text_embeddings.shape[0] != 2:
            problems.append(f"text_embeddings {tuple(self.text_embeddings.shape)}")
        n = len(self.support)
        if self.loo_scores.shape != (n,):
            problems.append(f"{self.loo_scores.shape} leave-one-out scores for {n} support images")
        if len({self.window_memory is None, self.window_memory_scale is None, self.patch_memory is None,
                (self.patch_layer is None)}) > 1:
            problems.append("WinCLIP+'s window memory, its scales, the patch memory and patch_layer come together")
        if self.window_memory_scale is not None and self.window_memory_scale.numel() and (
                int(self.window_memory_scale.max()) >= len(self.window_sizes)):
            problems.append(f"window scales beyond the {len(self.window_sizes)} window sizes")
        if (self.neurons is None) != (self.gallery is None) or (self.gallery is not None and self.gallery.shape[1] != self.neurons.numel()):
            problems.append("LAKE gallery and neurons disagree")
        if not math.isfinite(self.visual_scale) or self.visual_scale <= 0:
            problems.append(f"visual_scale {self.visual_scale}")
        if problems:
            raise ModelFormatError(f"{where}: tensors and facts do not agree with each other ({'; '.join(problems)})")
