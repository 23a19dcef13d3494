"""WinCLIP's scoring as one traceable ``torch.nn.Module`` (what ``lakead export`` traces; :mod:`lakead.export`).

:class:`WinCLIPHead` runs the detector's own :func:`~lakead.methods.winclip.score.score_batch` on the
features of :func:`window_features`, with the fitted state as constants and the search as one
matrix product and a min (:func:`lakead.ops.matmul_nearest`). The windows are fixed gathers:
each window size's patch indices are a constant table (the backbone's tokens gathered by it,
and the windows covering each patch, :func:`~lakead.methods.winclip.maps.cover_table`).

Outputs: the fused map on the patch grid, the visual part (max of the visual map), the text
part, the fused score, and 0 for the scope (WinCLIP has none).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...backbones.base import Backbone, Layer
from ...ops import combine_blocks, matmul_nearest
from .maps import window_indices
from .score import score_batch


def window_features(backbone: Backbone, pixels: torch.Tensor, tables: Sequence[torch.Tensor], start_block: int,
                    patch: Layer | None, lake: Sequence[Layer]) -> tuple:
    """What :func:`~lakead.methods.winclip.score.score_batch` reads of a batch: the image embedding
    ``(B, E)``, one ``(B, nw, E)`` per window size, the associated patch tokens (or None) and
    LAKE's tokens on the coarsest grid (or None)."""
    wanted = tuple(dict.fromkeys(([patch] if patch is not None else []) + list(lake)))
    wf = backbone.window_embeddings(pixels, tables, start_block, wanted)
    patches = wf.blocks[patch] if patch is not None else None
    lake_tokens = None
    if lake:
        lake_tokens, _ = combine_blocks([wf.blocks[b] for b in lake], [wf.grid] * len(lake), "coarsest")
    return wf.image.float(), [w.float() for w in wf.windows], patches, lake_tokens


class WinCLIPHead(nn.Module):
    """A fitted WinCLIP, WinCLIP+ or WinCLIP+LAKE state's scoring (see the module docstring)."""

    def __init__(self, state: Any, config: Any) -> None:
        super().__init__()
        st = copy.copy(state)
        for f in dataclasses.fields(st):  # the graph is traced on the CPU
            v = getattr(st, f.name)
            if isinstance(v, torch.Tensor):
                setattr(st, f.name, v.detach().cpu())
        self.state, self.config = st, config
        self.tables = [window_indices(tuple(st.grid), s) for s in st.window_sizes]
        self.patch = st.patch_layer
        lake = st.lake_layer
        self.lake = () if lake is None else tuple(lake) if isinstance(lake, (list, tuple)) else (lake,)
        self.facts: dict[str, Any] = {"map_grid": list(st.grid), "sigma": 0.0, "lam": float(config.fusion_weight)}

    def features(self, backbone: Backbone, pixels: torch.Tensor) -> tuple:
        chunk = getattr(backbone, "WINDOW_CHUNK", None)
        if chunk is not None:
            backbone.WINDOW_CHUNK = 1 << 40  # one chunk whatever the batch: a traced loop would fix the chunks to the example's
        try:
            return window_features(backbone, pixels, self.tables, self.config.window_start_block, self.patch, self.lake)
        finally:
            if chunk is not None:
                del backbone.WINDOW_CHUNK  # the class's again

    def forward(self, image: torch.Tensor, windows: Sequence[torch.Tensor], patches: torch.Tensor | None,
                lake_tokens: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        s = score_batch(image, windows, patches, lake_tokens, self.tables, self.state, self.config, search=matmul_nearest)
        gh, gw = self.state.grid
        zero = s.scores * 0.0
        return s.fused_map.reshape(-1, gh, gw), s.visual, s.text, s.scores, zero
