"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022)
behind lakead's detector interface (``lakead fit --method patchcore``).

1. Locally aware patch features (Sec. 3.1): the tokens of two blocks (by default at 1/2 and
   3/4 of the backbone's depth, as the paper reads the 2nd and 3rd stages of a WideResNet-50;
   ONNX models: tensor names, e.g. ``--layer 365_quantized+400``), each averaged over every
   patch's 3 x 3 neighbourhood, the deeper one bilinearly resized to the first one's grid, each
   projected to a fixed width by adaptive average pooling, then pooled together to that width
   (:func:`lakead.patchops.patchcore_features`).
2. The memory bank: every patch feature of the support images, reduced by greedy k-center
   coreset subsampling to ``coreset`` of its size (default 10 %; :mod:`lakead.coreset`, with the
   paper's random projection to 128 dimensions for the distances).
3. Scores: a patch's distance to its nearest bank vector; the image score is the largest,
   reweighted as in Eq. 7 by how isolated the nearest bank vector is among its ``neighbours``
   nearest bank vectors (:func:`lakead.patchops.reweighted_score`); the map is the patch scores
   upsampled to the model input and smoothed with a Gaussian of sigma 4 pixels.

Decisions come from the support images alone: each is scored leave-one-out against the coreset
with its own vectors left out (one coreset for all, chosen from every image; without image i it
covers the others' patches less densely, so these normal scores lean high, not low), and the
threshold is the same false-alarm budget rule as LAKE's (:mod:`lakead.methods.bank`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..backbones import Backbone, Layer
from ..coreset import coreset_count, greedy_coreset
from .bank import BankDetector, BankState, Scored, Search, default_pair
from ..patchops import patchcore_features, reweighted_score

log = logging.getLogger("lakead")

#: The paper's width of the patch features (WideResNet-50: 1024).
PAPER_WIDTH = 1024


from .bank_options import PatchCoreConfig  # noqa: E402 - the options, torch-free


@dataclass(kw_only=True)
class PatchCoreState(BankState):
    """What :meth:`PatchCoreDetector.fit` learns: the coreset bank (see :class:`BankState`)."""


class PatchCoreDetector(BankDetector):
    """PatchCore: locally aware patch features, a coreset memory bank, reweighted nearest-neighbour scores."""

    method = "patchcore"
    config_class = PatchCoreConfig
    state_class = PatchCoreState

    def blocks(self, backbone: Backbone) -> tuple[Layer, ...]:
        if self.config.layer is None:
            return tuple(backbone.resolve_layer(b) for b in default_pair(backbone))
        return tuple(backbone.resolve_layer(b) for b in self.config.blocks)

    def embed(self, features: Any, blocks) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens = [features.blocks[b] for b in blocks]
        width = self.config.width or min(PAPER_WIDTH, sum(t.shape[-1] for t in tokens))
        return patchcore_features(tokens, [features.grids[b] for b in blocks], width, self.config.neighbourhood)

    def build_bank(self, tokens, source, grid):
        n_img, n_tok, width = tokens.shape
        flat = tokens.reshape(n_img * n_tok, width)  # (n*N, D)
        image = source.repeat_interleave(n_tok)  # (n*N,)
        count = coreset_count(flat.shape[0], float(self.config.coreset))
        if count < flat.shape[0]:
            keep = greedy_coreset(flat, count, seed=self.config.seed).sort().values
            log.debug("coreset: %d of %d patch features", count, flat.shape[0])
            flat, image = flat[keep], image[keep]
        return flat.contiguous(), image.to(torch.int32), {}

    def score(self, tokens: torch.Tensor, state: Any, exclude: int | None = None, search: Search | None = None) -> Scored:
        b, n_tok, width = tokens.shape
        bank = state.bank
        d, idx = self.nearest(tokens.reshape(b * n_tok, width), state, exclude, search)
        d, idx = d.reshape(b, n_tok), idx.reshape(b, n_tok)  # (B, N)
        star, where = d.max(dim=1)  # (B,): s* and the most anomalous patch
        rows = torch.arange(b, device=tokens.device)
        allowed = torch.ones(bank.shape[0], dtype=torch.bool, device=bank.device)
        if exclude is not None:
            allowed = state.bank_image.to(bank.device) != exclude
        k = min(int(self.config.neighbours), int(allowed.sum()))
        if k <= 1:
            return Scored(star, d)
        m_star = idx[rows, where]  # (B,) index of m*
        to_bank = torch.cdist(bank[m_star], bank, compute_mode="donot_use_mm_for_euclid_dist")  # (B, M)
        # out of place (torch's ONNX exporter rewrote a shared constant of the backbone after these in-place writes)
        to_bank = to_bank.masked_fill(~allowed, float("inf"))
        own = torch.arange(bank.shape[0], device=bank.device)[None, :] == m_star[:, None]  # (B, M): m*
        to_bank = to_bank.masked_fill(own, -1.0)  # m* itself first, whatever ties
        near = to_bank.topk(k, dim=1, largest=False).indices  # (B, b)
        test_star = tokens[rows, where]  # (B, D): m_test*
        dist = (bank[near] - test_star[:, None, :]).square().sum(-1).sqrt()  # (B, b)
        return Scored(reweighted_score(star, dist), d)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["coreset"] = self.config.coreset
        return out
