"""LAKE's scoring as one traceable ``torch.nn.Module`` (the head ``lakead export`` traces; :mod:`lakead.export`).

:class:`LakeHead` holds what the fit learned as constants (the sensitive neurons, the gallery,
the prompts' embeddings, the scope gallery) and turns block tokens into scores with the same
arithmetic as :mod:`lakead.methods.lake.score`, written so that it exports to a static graph: the
nearest neighbour is one matrix product and an ``argmin`` (:func:`lakead.ops.matmul_nearest`,
the distance to the chosen vector recomputed directly, as the index does), the median a
``topk``; no ``cdist``, no loop that depends on the data.

Outputs, batch of B images: ``token_scores (B, gh, gw)`` (what the maps show: the visual token
distances, or the text probe's per-token P(anomalous) with ``map_source="semantic"``),
``visual (B,)``, ``semantic (B,)``, ``score (B,)`` (``visual + lam * semantic``, Eq. 14) and
``scope (B,)`` (the scope distance; 0 when the check is off).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...backbones.base import Backbone, as_blocks
from ...ops import combine_blocks, matmul_nearest
from ...patchops import top_percent_mean
from .config import LakeConfig
from .state import LakeState


class LakeHead(nn.Module):
    """Scores of a fitted LAKE state from block tokens (see the module docstring)."""

    def __init__(self, state: LakeState, config: LakeConfig, backbone: Backbone) -> None:
        super().__init__()
        self.blocks = as_blocks(state.layer)
        self.joint_block = state.semantic_layer if state.text_embeddings is not None else None
        self.block_grid = config.block_grid
        self.lam = float(config.lam)
        self.semantic_agg = config.semantic_agg
        self.semantic_map = config.map_source == "semantic" and state.text_embeddings is not None
        self.scale = float(state.visual_scale)
        self.top_percent = None if config.visual_top_percent is None else float(config.visual_top_percent)
        self.cosine = config.distance == "cosine"  # the gallery holds unit vectors: queries scaled too, 1 - cos
        self.backbone = backbone  # for its text probe's arithmetic (a torch function of the joint tokens)
        map_grid = list(state.grid)
        if self.semantic_map:
            map_grid = list(backbone.grid_size(state.image_size))
        #: what the runtime needs to turn ``token_scores`` into maps (lakead-export.json)
        self.facts: dict[str, Any] = {"map_grid": map_grid, "sigma": float(config.sigma), "lam": self.lam}
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

    def features(self, backbone: Backbone, pixels: torch.Tensor) -> tuple:
        """What :meth:`forward` takes, from ``(B, 3, S, S)`` pixels: the blocks' tokens and grids, the joint tokens."""
        f = backbone.extract(pixels, self.blocks, self.joint_block)
        return [f.blocks[b] for b in self.blocks], [f.grids[b] for b in self.blocks], f.joint, f.joint_grid

    def forward(self, tokens: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], joint: torch.Tensor | None,
                joint_grid: tuple[int, int] | None) -> tuple[torch.Tensor, ...]:
        x, (gh, gw) = combine_blocks(list(tokens), list(grids), self.block_grid)  # (B, N, D)
        x = x.float()
        b = x.shape[0]
        q = x.index_select(-1, self.neurons)  # (B, N, K)
        if self.cosine:
            q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # as torch.nn.functional.normalize
        dist = matmul_nearest(q, self.gallery, self.gallery_sq)[0]  # (B, N)
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
            d = matmul_nearest(x, self.scope_gallery, self.scope_sq)[0]  # (B, N), every channel
            n = d.shape[1]
            scope = torch.topk(d, (n - 1) // 2 + 1, dim=1, largest=False).values[:, -1]  # the (lower) median, as torch.median
        else:
            scope = visual * 0.0
        return shown, visual, semantic, score, scope
