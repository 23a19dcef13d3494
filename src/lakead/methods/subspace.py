"""The residual-subspace method (``lakead fit --method subspace``), after SubspaceAD (Lendering,
Akdag and Bondarev, "SubspaceAD: Training-Free Few-Shot Anomaly Detection via Subspace
Modeling", CVPR 2026).

The hypothesis is the mirror image of LAKE's: LAKE keeps the channels where the normal patches
vary most and compares a test patch with its nearest normal one there; here the normal patches
define the directions they vary along, and an anomaly shows in what is left outside them.

1. Patch features: the tokens of the configured block(s) (several concatenated on the coarsest
   grid; default the last block; ONNX models: a tensor name), as they come (no normalisation).
2. Fit: the mean and covariance of every support patch (float64 moments, :mod:`lakead.pca`),
   and the top principal directions that explain ``variance_kept`` of the variance (0.99, the
   paper's); nothing else is kept: the model is the mean, the basis ``(D, K)`` and the eigenvalues.
3. A patch's score: its squared residual outside the subspace, ``||(x - mu) - B B^T (x - mu)||^2``;
   the image score: the mean of the top ``top_percent`` % (1 %) of its patch scores; the map: the
   patch scores upsampled to the model input and smoothed with a Gaussian of sigma 4 pixels.

Decisions come from the support images alone, as for the memory-bank methods
(:mod:`lakead.methods.bank`): each support image is scored against the subspace fitted
without its own patches (the moments with them taken out: an exact leave-one-out), and the
threshold is the same false-alarm budget rule as LAKE's.

Left out of the paper's recipe: the augmented copies of the one-shot support image and the
672 px DINOv2 input (``image_size`` sets the input of any backbone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..backbones import Backbone, Layer
from ..base import fact, tensor
from ..errors import ConfigError
from ..ops import combine_blocks
from ..patchops import top_percent_mean
from ..pca import Moments, principal_subspace, residual_energy
from .bank import BankDetector, BankState, Scored, Search
from .bank_options import SubspaceConfig


@dataclass(kw_only=True)
class SubspaceState(BankState):
    """What :meth:`SubspaceDetector.fit` learns. Its ``bank`` is the principal basis, one
    direction per row ``(K, D)`` (``bank_image`` all 0, unused: no direction belongs to one image)."""

    mean: torch.Tensor = tensor("(D,) float32: mean of the support patch features", device=True)
    eigenvalues: torch.Tensor = tensor("(D,) float32: variances of the support patches along every principal direction, descending")
    directions: int = fact("K, principal directions kept")
    variance_explained: float = fact("share of the support patches' variance the K directions explain")


class SubspaceDetector(BankDetector):
    """Squared residual outside the principal subspace of the normal patches (SubspaceAD)."""

    method = "subspace"
    config_class = SubspaceConfig
    state_class = SubspaceState

    def blocks(self, backbone: Backbone) -> tuple[Layer, ...]:
        return self.configured_or_last_block(backbone)

    def embed(self, features: Any, blocks) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, grid = combine_blocks([features.blocks[b] for b in blocks], [features.grids[b] for b in blocks], "coarsest")
        return tokens.float(), grid

    def build_bank(self, tokens, source, grid):
        n_img, n_tok, width = tokens.shape
        if width < 2:
            raise ConfigError(f"the subspace method needs features of at least 2 channels, got {width}")
        moments = Moments.of(tokens.reshape(n_img * n_tok, width))
        self._moments = moments  # the fit's leave-one-out takes each image out of these (not saved)
        mean, values, basis = principal_subspace(moments, float(self.config.variance_kept))
        total = float(values.sum())
        explained = float(values[: basis.shape[1]].sum()) / total if total > 0 else 1.0
        extra = dict(mean=mean, eigenvalues=values, directions=int(basis.shape[1]), variance_explained=explained)
        return basis.T.contiguous(), torch.zeros(basis.shape[1], dtype=torch.int32), extra

    def score(self, tokens: torch.Tensor, state: Any, exclude: int | None = None, search: Search | None = None) -> Scored:
        mean, basis = state.mean, state.bank.T  # (D,), (D, K)
        if exclude is not None:  # the subspace of the other support images: ``tokens`` are image ``exclude``'s own
            mean, _, basis = principal_subspace(self._moments.without(tokens.reshape(-1, tokens.shape[-1])),
                                                float(self.config.variance_kept))
            mean, basis = mean.to(tokens.device), basis.to(tokens.device)
        patches = residual_energy(tokens, mean, basis)  # (B, N)
        return Scored(top_percent_mean(patches, float(self.config.top_percent)), patches)

    def fit(self, *args, **kwargs) -> "SubspaceDetector":
        try:
            return super().fit(*args, **kwargs)  # type: ignore[return-value]
        finally:
            self.__dict__.pop("_moments", None)

    def summary(self) -> dict[str, Any]:
        st = self.check_fitted()
        return {
            **self.support_summary(st),
            "directions": st.directions,
            "variance_kept": self.config.variance_kept,
            "variance_explained": round(float(st.variance_explained), 6),
            "top_percent": self.config.top_percent,
            "model_bytes": int((st.bank.numel() + st.mean.numel()) * 4),
            **self.decision_summary(st),
        }

