"""A fitted detector as one traceable ``torch.nn.Module``: pixels in, scores out.

Every method provides its scoring as a *head* (``det.scoring_head()``, :class:`ScoringHead`):
what its fit learned held as constants, turning the backbone's features into the outputs
below with the method's own scoring code, the search written as a matrix product and a min
(:func:`lakead.ops.matmul_nearest`) instead of the index. :class:`TorchGraph` puts the torch
backbone in front of it (the head's :meth:`~ScoringHead.features`: the backbone cut at the
deepest block it reads, or WinCLIP's windows as fixed gathers). An ONNX backbone is not torch:
its graph is cut with :meth:`~lakead.backbones.onnx.ONNXBackbone.subgraph` and joined to the
head exported alone (:class:`OnnxFeatureHead`, which dequantizes and reshapes the feature maps
as the adapter does; heads that read block tokens only).

Outputs, batch of B images: ``token_scores (B, h, w)`` (what the maps show, on the grid that
``lakead-export.json``'s ``map_grid`` gives), ``visual (B,)``, ``semantic (B,)``, ``score (B,)``
and ``scope (B,)`` (0 for methods without a scope check).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..backbones.base import Backbone

OUTPUTS = ("token_scores", "visual", "semantic", "score", "scope")
INPUT = "pixels"


class ScoringHead(Protocol):
    """What a method's ``scoring_head()`` returns (an ``nn.Module``)."""

    #: for lakead-export.json: ``map_grid`` (the grid of ``token_scores``), ``sigma`` (the runtime's
    #: Gaussian blur of the upsampled map, in pixels of the model input; 0: none), ``lam``
    facts: dict[str, Any]

    def features(self, backbone: Backbone, pixels: torch.Tensor) -> tuple:
        """The backbone's features of ``(B, 3, S, S)`` pixels, as :meth:`forward` takes them."""

    def __call__(self, *features: Any) -> tuple[torch.Tensor, ...]:
        """The outputs (:data:`OUTPUTS`)."""


class TorchGraph(nn.Module):
    """A torch backbone, then a method's head: pixels ``(B, 3, S, S)`` -> outputs."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        if isinstance(getattr(backbone, "model", None), nn.Module):
            self.model = backbone.model  # registered, so that its weights are the graph's initializers, named by module
        self.head = head  # its nodes are named /head/... (int8 leaves them in float32)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.head(*self.head.features(self.backbone, pixels))


class OnnxFeatureHead(nn.Module):
    """A head that reads block tokens (``head(tokens, grids, joint, joint_grid)``: LAKE, the
    memory banks) fed by raw feature maps of an ONNX backbone, ``(B, C, H, W)`` each (integers
    dequantized with the graph's own scale and zero point), as
    :meth:`~lakead.backbones.onnx.ONNXBackbone.extract` turns them into tokens."""

    def __init__(self, head: nn.Module, dequantize: Sequence[tuple[np.ndarray, np.ndarray] | None]) -> None:
        super().__init__()
        self.head = head
        self.quantized = [d is not None for d in dequantize]
        for i, d in enumerate(dequantize):
            if d is not None:
                self.register_buffer(f"scale{i}", torch.from_numpy(np.asarray(d[0], np.float32)))
                self.register_buffer(f"zero{i}", torch.from_numpy(np.asarray(d[1], np.float32)))

    def forward(self, *maps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens, grids = [], []
        for i, m in enumerate(maps):
            x = m.float()
            if self.quantized[i]:
                x = (x - getattr(self, f"zero{i}")) * getattr(self, f"scale{i}")
            b, c, h, w = x.shape
            tokens.append(x.reshape(b, c, h * w).transpose(1, 2))  # (B, H*W, C)
            grids.append((int(h), int(w)))
        return self.head(tokens, grids, None, None)
