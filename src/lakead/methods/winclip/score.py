"""Scoring a batch with a fitted WinCLIP state (shared by ``fit``'s leave-one-out and ``predict``).

Per image, on the ``(gh, gw)`` patch grid:

1. text map ``M0`` (zero-shot, Sec. 4.2): P(anomalous) of the image embedding (the whole
   image, broadcast to every patch) and of every window, each scale's windows aggregated to
   patches harmonically (Eq. 2), the scales combined by their harmonic mean;
2. visual map ``V`` (what the normal images add): WinCLIP+'s reference association (Eq. 4)
   of the patch tokens and of each scale's window embeddings, windows aggregated harmonically,
   the three maps averaged (Sec. 4.3); or LAKE's distance of each patch token to its nearest
   gallery vector in the sensitive subspace, divided by the visual scale; or (``lake_fusion``
   add) the mean of both;
3. fused map ``(1 - w) M0 + w V`` and image score ``(1 - w) text + w max V`` (WinCLIP+: w = 1/2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...ops import nearest_neighbor
from .config import WinCLIPConfig
from .maps import association, fuse, harmonic_aggregate, harmonic_mean, text_probability
from .state import WinCLIPState


#: An exact nearest-neighbour search: queries ``(Q, D)``, memory ``(M, D)`` -> distances ``(Q,)``, indices ``(Q,)``.
Search = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Scored:
    """One batch scored (B images, N patches)."""

    scores: torch.Tensor  # (B,) the fused image score
    text: torch.Tensor  # (B,) the text part of it
    visual: torch.Tensor  # (B,) max of the visual map (0 without one)
    text_map: torch.Tensor  # (B, N) M0
    visual_map: torch.Tensor | None  # (B, N) V, None for zero-shot
    fused_map: torch.Tensor  # (B, N)


def text_maps(image: torch.Tensor, windows: Sequence[torch.Tensor], tables: Sequence[torch.Tensor], n_patches: int,
              prototypes: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The class token's P(anomalous) ``(B,)`` and the zero-shot map ``M0 (B, N)``."""
    p_image = text_probability(image, prototypes, temperature)  # (B,)
    scales = [p_image[:, None].expand(-1, n_patches)]
    for table, emb in zip(tables, windows):
        scales.append(harmonic_aggregate(text_probability(emb, prototypes, temperature), table, n_patches))
    return p_image, harmonic_mean(torch.stack(scales))  # (B,), (B, N)


def winclip_association(windows: Sequence[torch.Tensor], patches: torch.Tensor, tables: Sequence[torch.Tensor],
                        state: WinCLIPState, image_ids: torch.Tensor | None = None, search: Search = nearest_neighbor) -> torch.Tensor:
    """WinCLIP+'s visual map ``(B, N)``: the mean of the patch association and of each scale's
    window association aggregated harmonically; ``image_ids (B,)``: leave those images out."""
    n_patches = patches.shape[1]
    loo = image_ids is not None
    maps = [association(patches, state.patch_memory, query_image=image_ids if loo else None,
                        memory_image=state.patch_memory_image if loo else None, search=search)]
    for s, (table, emb) in enumerate(zip(tables, windows)):
        sel = state.window_memory_scale == s  # (Mw,)
        mem_image = state.window_memory_image.to(sel.device)[sel] if loo else None
        a = association(emb, state.window_memory[sel], query_image=image_ids if loo else None, memory_image=mem_image,
                        search=search)
        maps.append(harmonic_aggregate(a, table, n_patches))
    return torch.stack(maps).mean(dim=0)  # (B, N)


def lake_distances(tokens: torch.Tensor, state: WinCLIPState, image_ids: torch.Tensor | None = None,
                   search: Search = nearest_neighbor) -> torch.Tensor:
    """LAKE's token distances ``(B, N)``: each patch token's distance to its nearest gallery vector
    in the sensitive subspace (LAKE Eq. 7), not yet divided by the visual scale."""
    b, n_tok, _ = tokens.shape
    dev = state.gallery.device
    q = tokens.to(dev)[..., state.neurons.to(dev)].reshape(b * n_tok, -1)  # (B*N, K)
    if image_ids is not None:
        d, _ = nearest_neighbor(q, state.gallery, query_groups=image_ids.to(dev).repeat_interleave(n_tok),
                                gallery_groups=state.gallery_image.to(dev))
    else:
        d, _ = search(q, state.gallery)
    return d.reshape(b, n_tok)


def score_batch(image: torch.Tensor, windows: Sequence[torch.Tensor], patches: torch.Tensor | None,
                lake_tokens: torch.Tensor | None, tables: Sequence[torch.Tensor], state: WinCLIPState,
                config: WinCLIPConfig, image_ids: torch.Tensor | None = None, search: Search = nearest_neighbor) -> Scored:
    """Score one batch from its features (see the module docstring): ``image (B, E)``, one
    ``(B, nw, E)`` per window size, the associated ``patches (B, N, D)`` and LAKE's
    ``lake_tokens (B, N, D')`` (None when unused). ``image_ids``: the support images' own
    indices (the fit's leave-one-out); ``search``: the exact nearest-neighbour search otherwise
    (the exported head's matrix product, :func:`lakead.ops.matmul_nearest`)."""
    gh, gw = state.grid
    n_patches = gh * gw
    p_image, text_map = text_maps(image, windows, tables, n_patches, state.text_embeddings.to(image.device), config.temperature)
    text = p_image if config.text_score == "class" else 0.5 * (p_image + text_map.amax(dim=1))
    parts = []
    if state.window_memory is not None and patches is not None:
        parts.append(winclip_association(windows, patches, tables, state, image_ids, search).to(text_map.device))
    if state.gallery is not None and lake_tokens is not None:
        parts.append((lake_distances(lake_tokens, state, image_ids, search) / state.visual_scale).to(text_map.device))
    visual_map = torch.stack(parts).mean(dim=0) if parts else None
    if visual_map is None:
        zero = torch.zeros_like(text)
        return Scored(text, text, zero, text_map, None, text_map)
    visual = visual_map.amax(dim=1)
    w = config.fusion_weight
    return Scored(fuse(text, visual, w), text, visual, text_map, visual_map, fuse(text_map, visual_map, w))
