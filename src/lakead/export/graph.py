"""A fitted LAKE detector as one traceable ``torch.nn.Module``: pixels in, scores out.

:class:`LakeHead` holds what the fit learned as constants (the sensitive neurons, the gallery,
the prompts' embeddings, the scope gallery) and turns block tokens into scores with the same
arithmetic as :mod:`lakead.methods.lake.score`, written so that it exports to a static graph: the
nearest neighbour is one matrix product and an ``argmin`` (then the distance to the chosen
vector recomputed directly, as :func:`lakead.ops.nearest_neighbor` does, so that it carries no
cancellation error), the median a ``topk``; no ``cdist``, no loop that depends on the data.

:class:`TorchGraph` puts a torch backbone's own ``extract`` (cut at the deepest block the
detector reads) in front of the head. An ONNX backbone is not torch: its graph is cut with
:meth:`~lakead.backbones.onnx.ONNXBackbone.subgraph` and joined to the head exported alone
(:class:`OnnxFeatureHead`, which dequantizes and reshapes the feature maps as the adapter does).

Outputs, batch of B images: ``token_scores (B, gh, gw)`` (what the maps show: the visual token
distances, or the text probe's per-token P(anomalous) with ``map_source="semantic"``),
``visual (B,)``, ``semantic (B,)``, ``score (B,)`` (``visual + lam * semantic``, Eq. 14) and
``scope (B,)`` (the scope distance; 0 when the check is off).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..backbones.base import Backbone, as_blocks
from ..methods.lake.config import LakeConfig
from ..methods.lake.state import LakeState
from ..ops import combine_blocks
from ..patchops import top_percent_mean

OUTPUTS = ("token_scores", "visual", "semantic", "score", "scope")
INPUT = "pixels"


def nearest_distance(q: torch.Tensor, gallery: torch.Tensor, gallery_sq: torch.Tensor) -> torch.Tensor:
    """``(B, N, K)`` queries -> ``(B, N)`` Euclidean distance to the nearest of ``gallery (M, K)``
    (``gallery_sq (M,)``: its squared norms): squared distances from one matrix product, the
    argmin, then ``||q - g||`` of the chosen vector (exact, as :func:`lakead.ops.nearest_neighbor`)."""
    d2 = gallery_sq - 2.0 * torch.matmul(q, gallery.T) + q.square().sum(-1, keepdim=True)  # (B, N, M)
    idx = d2.argmin(dim=-1)  # (B, N)
    return (q - gallery[idx]).square().sum(-1).sqrt()  # (B, N)


class LakeHead(nn.Module):
    """Scores of a fitted LAKE state from block tokens (see the module docstring)."""

    def __init__(self, state: LakeState, config: LakeConfig, backbone: Backbone) -> None:
        super().__init__()
        self.blocks = as_blocks(state.layer)
        self.block_grid = config.block_grid
        self.lam = float(config.lam)
        self.semantic_agg = config.semantic_agg
        self.semantic_map = config.map_source == "semantic" and state.text_embeddings is not None
        self.scale = float(state.visual_scale)
        self.top_percent = None if config.visual_top_percent is None else float(config.visual_top_percent)
        self.cosine = config.distance == "cosine"  # the gallery holds unit vectors: queries scaled too, 1 - cos
        self.backbone = backbone  # for its text probe's arithmetic (a torch function of the joint tokens)
        gallery = state.gallery.detach().to("cpu", torch.float32)
        self.register_buffer("neurons", state.neurons.detach().to("cpu", torch.int64))  # (K,)
        self.register_buffer("gallery", gallery)  # (M, K)
        self.register_buffer("gallery_sq", gallery.square().sum(1))  # (M,)
        self.text = state.text_embeddings is not None
        if self.text:
            self.register_buffer("text_embeddings", state.text_embeddings.detach().to("cpu", torch.float32))  # (2, E)
        self.scope = state.scope_gallery is not None and state.scope_threshold is not None
        if self.scope:
            sg = state.scope_gallery.detach().to("cpu", torch.float32)
            self.register_buffer("scope_gallery", sg)  # (G, D)
            self.register_buffer("scope_sq", sg.square().sum(1))  # (G,)

    def forward(self, tokens: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], joint: torch.Tensor | None,
                joint_grid: tuple[int, int] | None) -> tuple[torch.Tensor, ...]:
        x, (gh, gw) = combine_blocks(list(tokens), list(grids), self.block_grid)  # (B, N, D)
        x = x.float()
        b = x.shape[0]
        q = x.index_select(-1, self.neurons)  # (B, N, K)
        if self.cosine:
            q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # as torch.nn.functional.normalize
        dist = nearest_distance(q, self.gallery, self.gallery_sq)  # (B, N)
        dist = (dist.square() / 2.0 if self.cosine else dist) / self.scale
        visual = dist.amax(dim=1) if self.top_percent is None else top_percent_mean(dist, self.top_percent)  # (B,) Eq. 8
        shown = dist.reshape(b, gh, gw)
        if self.text and joint is not None:
            prob = self.backbone.text_probability(joint, self.text_embeddings)  # (B, Nj)
            semantic = prob.amax(dim=1) if self.semantic_agg == "max" else prob.mean(dim=1)
            if self.semantic_map:
                shown = prob.reshape(b, joint_grid[0], joint_grid[1])  # type: ignore[index]
        else:
            semantic = visual * 0.0
        score = visual + self.lam * semantic  # Eq. 14
        if self.scope:
            d = nearest_distance(x, self.scope_gallery, self.scope_sq)  # (B, N), every channel
            n = d.shape[1]
            scope = torch.topk(d, (n - 1) // 2 + 1, dim=1, largest=False).values[:, -1]  # the (lower) median, as torch.median
        else:
            scope = visual * 0.0
        return shown, visual, semantic, score, scope


class TorchGraph(nn.Module):
    """A torch backbone cut at the deepest block read, then :class:`LakeHead`: pixels ``(B, 3, S, S)`` -> outputs."""

    def __init__(self, backbone: Backbone, state: LakeState, config: LakeConfig) -> None:
        super().__init__()
        self.backbone = backbone
        if isinstance(getattr(backbone, "model", None), nn.Module):
            self.model = backbone.model  # registered, so that its weights are the graph's initializers, named by module
        self.head = LakeHead(state, config, backbone)
        self.joint_block = state.semantic_layer if state.text_embeddings is not None else None

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.backbone.extract(pixels, self.head.blocks, self.joint_block)
        return self.head([f.blocks[b] for b in self.head.blocks], [f.grids[b] for b in self.head.blocks], f.joint, f.joint_grid)


class OnnxFeatureHead(nn.Module):
    """:class:`LakeHead` fed by raw feature maps of an ONNX backbone, ``(B, C, H, W)`` each
    (integers dequantized with the graph's own scale and zero point), as
    :meth:`~lakead.backbones.onnx.ONNXBackbone.extract` turns them into tokens."""

    def __init__(self, head: LakeHead, dequantize: Sequence[tuple[np.ndarray, np.ndarray] | None]) -> None:
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
