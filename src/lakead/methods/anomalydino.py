"""AnomalyDINO (Damm et al., "AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection
with DINOv2", WACV 2025) behind lakead's detector interface (``lakead fit --method anomalydino``).

The scoring rule, on the patch tokens of any backbone (DINOv2 in the paper; by default the last
block; several blocks are concatenated on the coarsest grid; ONNX models: a tensor name):

1. the memory bank: every patch token of the support images, L2-normalised;
2. a patch's score: its cosine distance ``1 - cos`` to the nearest bank vector;
3. the image score: the mean of the top ``top_percent`` % (1 %) of its patch scores
   (:func:`lakead.patchops.top_percent_mean`); the map: the patch scores upsampled to the model
   input and smoothed with a Gaussian of sigma 4 pixels.

Options of the paper, off by default:

- ``mask_background``, zero-shot masking: the first principal component of the support
  patches (fitted once, at fit, on every support patch) splits foreground from background. A
  patch is foreground when its projection on it, in standard deviations, is above
  ``mask_threshold`` (default 0: the support patches' mean) on the side that covers more than
  35 % of the central patches of the support images (20 % of each side left out), as the
  reference implementation decides the component's sign; the mask is dilated and closed by a
  3 x 3 square; an image whose mask would be empty keeps every patch. The bank keeps the
  support images' foreground patches; a test image's background patches score 0. (The
  reference fits the component per image with an absolute threshold of 10 made for DINOv2
  ViT-S features; one component for the product and a threshold in standard deviations work
  for any backbone.)
- ``rotations``: the support images rotated by 90, 180 and 270 degrees are added to the bank.

Decisions come from the support images alone: each is scored leave-one-out against the bank
without its own vectors (nor those of its rotations), and the threshold is the same
false-alarm budget rule as LAKE's (:mod:`lakead.methods.bank`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import Backbone, Layer
from ..base import fact, tensor
from .bank import BankDetector, BankState, Scored, Search
from ..ops import combine_blocks
from ..patchops import centre_share, cosine_distances, foreground_mask, pc_scores, principal_direction, top_percent_mean

#: The reference's rule for the component's sign: foreground must cover more than this share of the centre.
CENTRE_SHARE = 0.35


from .bank_options import AnomalyDinoConfig  # noqa: E402 - the options, torch-free


@dataclass(kw_only=True)
class AnomalyDinoState(BankState):
    """What :meth:`AnomalyDinoDetector.fit` learns: the bank of unit patch tokens and, with
    ``mask_background``, the principal component that masks the background."""

    pca_mean: Optional[torch.Tensor] = tensor("(D,) float32: mean of the support patches (mask_background)", optional=True)
    pca_direction: Optional[torch.Tensor] = tensor("(D,) float32: their first principal component", optional=True)
    pca_scale: Optional[float] = fact("standard deviation of the support patches along it", default=None)
    pca_sign: Optional[float] = fact("+1 or -1: which side of it is foreground", default=None)


class AnomalyDinoDetector(BankDetector):
    """AnomalyDINO's scoring rule: cosine nearest neighbour, mean of the top 1 % patch scores."""

    method = "anomalydino"
    config_class = AnomalyDinoConfig
    state_class = AnomalyDinoState

    def blocks(self, backbone: Backbone) -> tuple[Layer, ...]:
        return self.configured_or_last_block(backbone)

    def embed(self, features: Any, blocks) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, grid = combine_blocks([features.blocks[b] for b in blocks], [features.grids[b] for b in blocks], "coarsest")
        return F.normalize(tokens.float(), dim=-1), grid

    def support_arrays(self, arrays):
        if not self.config.rotations:
            return arrays, list(range(len(arrays)))
        turned = [np.ascontiguousarray(np.rot90(a, k)) for k in (1, 2, 3) for a in arrays]
        return list(arrays) + turned, list(range(len(arrays))) * 4

    def build_bank(self, tokens, source, grid):
        n_img, n_tok, width = tokens.shape
        image = source.repeat_interleave(n_tok)  # (n'*N,)
        extra: dict[str, Any] = dict(pca_mean=None, pca_direction=None, pca_scale=None, pca_sign=None)
        keep = torch.ones(n_img * n_tok, dtype=torch.bool)
        if self.config.mask_background:
            mean, direction, scale = principal_direction(tokens.reshape(-1, width))
            pc = pc_scores(tokens, mean, direction, scale)  # (n', N)
            sign = 1.0 if centre_share(pc > self.config.mask_threshold, grid) > CENTRE_SHARE else -1.0
            keep = foreground_mask(pc, grid, self.config.mask_threshold, sign).reshape(-1)
            extra = dict(pca_mean=mean, pca_direction=direction, pca_scale=scale, pca_sign=sign)
        flat = tokens.reshape(n_img * n_tok, width)[keep]
        return flat.contiguous(), image[keep].to(torch.int32), extra

    def foreground(self, tokens: torch.Tensor, state: Any) -> torch.Tensor | None:
        """``(B, N)`` bool: the patches kept by the background mask (None without the mask)."""
        if state.pca_direction is None:
            return None
        pc = pc_scores(tokens, state.pca_mean, state.pca_direction, state.pca_scale)
        return foreground_mask(pc, state.grid, self.config.mask_threshold, state.pca_sign).to(tokens.device)

    def score(self, tokens: torch.Tensor, state: Any, exclude: int | None = None, search: Search | None = None) -> Scored:
        b, n_tok, width = tokens.shape
        d, _ = self.nearest(tokens.reshape(b * n_tok, width), state, exclude, search)
        patches = cosine_distances(d).reshape(b, n_tok)  # (B, N)
        fg = self.foreground(tokens, state)
        if fg is not None:
            patches = patches.masked_fill(~fg, 0.0)
        return Scored(top_percent_mean(patches, float(self.config.top_percent)), patches)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out.update(top_percent=self.config.top_percent, mask_background=self.config.mask_background,
                   rotations=self.config.rotations)
        return out
