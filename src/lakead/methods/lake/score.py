"""Scoring with a fitted LAKE state: shared by ``predict`` and ``explain``, so both read the
same numbers from one forward pass.

Per batch of images: the visual tokens (one block, or several on one grid), each token's
distance to its nearest gallery vector in the sensitive subspace (Eq. 7) and which vector
that is, and the text probe's per-token P(anomalous) (Eq. 9-13). Then the image parts
(:func:`image_parts`: max over tokens, Eq. 8; pooled probe) and the maps (:func:`batch_maps`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...backbones.base import Backbone, Features, Layer, as_blocks
from ...ops import combine_blocks, nearest_neighbor, pool_scores, upsample_map
from .config import LakeConfig
from .fit import pool_visual, to_unit, token_distance
from .state import LakeState


@dataclass(frozen=True)
class ScoredBatch:
    """One batch scored against the gallery (B images, N visual tokens on ``grid``)."""

    start: int  # index of the batch's first image
    tokens: torch.Tensor  # (B, N, D) visual tokens, float32
    grid: tuple[int, int]  # (gh, gw) of the visual tokens
    distances: torch.Tensor  # (B, N) token scores: distance to the nearest gallery vector / visual_scale
    nearest: torch.Tensor  # (B, N) int64: which gallery vector is nearest
    probabilities: torch.Tensor | None  # (B, Nj) text probe's P(anomalous) per token; None when off
    joint_grid: tuple[int, int] | None  # grid of ``probabilities``


def visual_tokens(features: Features, blocks: Sequence[Layer], block_grid: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """The visual tokens ``(B, N, D)`` and their grid: the blocks concatenated in order on one grid."""
    return combine_blocks([features.blocks[b] for b in blocks], [features.grids[b] for b in blocks], block_grid)


#: How the nearest gallery vector is found: ``queries (Q, K) -> (distances (Q,), indices (Q,))``
#: (:meth:`lakead.index.GalleryIndex.search`; default: the exact search).
Search = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def token_distances(tokens: torch.Tensor, state: LakeState, config: LakeConfig | None = None,
                    search: Search | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, N, D)`` tokens -> ``(B, N)`` distances to the nearest gallery vector in the
    sensitive subspace divided by the visual scale (Eq. 7; the cosine distance with
    ``distance="cosine"``), and ``(B, N)`` its index, found by ``search`` (default: exact)."""
    config = config or LakeConfig()
    b, n_tok, _ = tokens.shape
    dev = state.gallery.device
    q = tokens.to(dev)[..., state.neurons.to(dev)].reshape(b * n_tok, -1)  # (B*N, K)
    if config.distance == "cosine":
        q = to_unit(q)  # the gallery holds unit vectors
    d, idx = search(q) if search is not None else nearest_neighbor(q, state.gallery)
    return (token_distance(d, config) / state.visual_scale).reshape(b, n_tok), idx.reshape(b, n_tok)


def score_batch(start: int, features: Features, state: LakeState, config: LakeConfig, backbone: Backbone,
                search: Search | None = None) -> ScoredBatch:
    """Score one batch of backbone features against the fitted state (the text probe as the
    backbone's family computes it: :meth:`~lakead.backbones.base.Backbone.text_probability`)."""
    tokens, grid = visual_tokens(features, as_blocks(state.layer), config.block_grid)
    distances, nearest = token_distances(tokens, state, config, search)
    probabilities = None
    if features.joint is not None and state.text_embeddings is not None:
        probabilities = backbone.text_probability(features.joint, state.text_embeddings)  # (B, Nj)
    return ScoredBatch(start, tokens, grid, distances, nearest, probabilities, features.joint_grid)


def image_parts(batch: ScoredBatch, config: LakeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The visual (max over tokens, Eq. 8, or the mean of the visual_top_percent) and semantic (pooled probe, 0 when off) image scores, ``(B,)`` each."""
    visual = pool_visual(batch.distances, config).cpu()
    if batch.probabilities is None:
        return visual, torch.zeros(batch.distances.shape[0])
    return visual, pool_scores(batch.probabilities, config.semantic_agg).cpu()


def batch_maps(batch: ScoredBatch, sizes: Sequence[tuple[int, int]], config: LakeConfig, image_size: int) -> list[np.ndarray]:
    """Each image's map at its own ``(H, W)``: the visual token scores (or the probe's, with
    ``map_source="semantic"``), bilinearly upsampled, optionally blurred by ``sigma`` pixels of
    the model input."""
    shown, (gh, gw) = batch.distances, batch.grid  # (B, N)
    if config.map_source == "semantic" and batch.probabilities is not None:
        shown, (gh, gw) = batch.probabilities, batch.joint_grid  # type: ignore[misc]
    grids = shown.reshape(-1, gh, gw).cpu()  # (B, gh, gw)
    maps = []
    for j, (h, w) in enumerate(sizes):
        sig = (config.sigma * h / image_size, config.sigma * w / image_size)
        maps.append(upsample_map(grids[j], (h, w), sig))
    return maps
