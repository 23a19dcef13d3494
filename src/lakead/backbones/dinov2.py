"""DINOv2 (Oquab et al., 2023), DINOv2 with registers (Darcet et al., 2024) and DINOv3
(Siméoni et al., 2025) through ``transformers``: visual branch only (no text tower).

Blocks are read by calling the model's own submodules in order, as its forward does:
``embeddings`` (class token, then the register tokens, then the patch tokens; DINOv2's
position embeddings are interpolated by the embeddings themselves for any input size), then
``encoder.layer`` (DINOv3: ``model.layer`` with the rotary tables of ``rope_embeddings``,
which are computed for the input's own grid), stopping after the deepest block asked for.
The class and register tokens are dropped; the tokens are the model's ``hidden_states``
exactly (a test checks it), before the final ``layernorm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .hf import HFViTBackbone


class DINOv2Backbone(HFViTBackbone):
    """A frozen ``Dinov2Model`` or ``Dinov2WithRegistersModel``."""

    kind = "dinov2"
    FAMILY = "DINOv2"
    EXAMPLE = "facebook/dinov2-base"
    CLASSES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}

    def _layers(self) -> Sequence[nn.Module]:
        return self.model.encoder.layer

    def _prefix_tokens(self) -> int:
        return 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    def _embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self.model.embeddings(pixels), None  # (B, 1 + R + N, D), positions interpolated as needed

    def _call_block(self, block: nn.Module, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        out = block(hidden)
        return out[0] if isinstance(out, tuple) else out


class DINOv3Backbone(HFViTBackbone):
    """A frozen ``DINOv3ViTModel`` (rotary position embeddings: any grid, no interpolation)."""

    kind = "dinov3"
    FAMILY = "DINOv3"
    EXAMPLE = "facebook/dinov3-vitb16-pretrain-lvd1689m"
    CLASSES = {"dinov3_vit": "DINOv3ViTModel"}

    def _layers(self) -> Sequence[nn.Module]:
        return self.model.model.layer

    def _prefix_tokens(self) -> int:
        return 1 + int(self.model.config.num_register_tokens or 0)

    def _embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        pixels = pixels.to(self.model.embeddings.patch_embeddings.weight.dtype)
        # (B, 1 + R + N, D) and the (cos, sin) tables of the input's own grid, as the model's forward
        return self.model.embeddings(pixels), self.model.rope_embeddings(pixels)

    def _call_block(self, block: nn.Module, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        out = block(hidden, position_embeddings=ctx)
        return out[0] if isinstance(out, tuple) else out
