"""What the memory-bank baselines share: PatchCore (:mod:`lakead.methods.patchcore`) and AnomalyDINO
(:mod:`lakead.methods.anomalydino`) keep patch features of the normal images in a bank and score a
test patch by its distance to the nearest one; they differ in the features, the bank and the
image score. This module holds the rest, once:

- the options every such method has (:class:`BankConfig`: backbone, blocks, input size, map
  smoothing, seed, and the decision options with the same meaning as LAKE's);
- the learned state they share (:class:`BankState`);
- :class:`BankDetector`: fit (features of the support images, the bank, each support image
  scored leave-one-out against the bank without its own vectors, the decision levels from those
  normal scores alone with :func:`lakead.decision.derive_thresholds`, the same rule and false-alarm
  budget as LAKE) and predict (scores, maps at each image's own size, decisions). A method
  writes :meth:`~BankDetector.blocks`, :meth:`~BankDetector.embed`,
  :meth:`~BankDetector.build_bank` and :meth:`~BankDetector.score`.

Maps, as both papers make them: the patch scores bilinearly upsampled to the model's input
square, smoothed with a Gaussian of ``blur_sigma`` pixels (4 in both papers), then resized to
the image's own size. The pixel decision level is learned from the leave-one-out maps of the
support images (their values at each patch's cell), so it is in the units of the maps.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..api import Prediction
from ..backbones import Backbone, Layer
from ..backbones.base import Features, LayerSpec, as_blocks
from ..base import BaseDetector
from ..state import DecisionRecord, SupportRecord, fact, tensor
from ..errors import ConfigError, ModelFormatError
from ..images import ImageInput
from ..index import resolve as resolve_index
from ..support import MAX_LOO_IMAGES, spread_subset
from ..ops import matmul_nearest
from ..patchops import gaussian_matrix, resize_map, smooth_maps, upsample_blur
from ..progress import steps

log = logging.getLogger("lakead")


from .bank_options import BankConfig, _number  # noqa: E402,F401 - the options, torch-free


@dataclass(kw_only=True)
class BankState(SupportRecord, DecisionRecord):
    """What every memory-bank method learns (n support images, M bank vectors of width D)."""

    bank: torch.Tensor = tensor("(M, D) float32: the memory bank of normal patch features", device=True)
    bank_image: torch.Tensor = tensor("(M,) int32: which support image each bank vector comes from")
    loo_peaks: np.ndarray = tensor("(n,) float32: the largest value of each support image's leave-one-out map", numpy=True)
    gallery_index: Optional[np.ndarray] = tensor("(B,) uint8: the bank's HNSW index, serialized (index='hnsw')",
                                                 optional=True, numpy=True)
    layer: LayerSpec = fact("the block(s) read, in the backbone's canonical form")
    image_size: int = fact("square input size in pixels")
    grid: tuple[int, int] = fact("(gh, gw) grid of the patch features")
    width: int = fact("D, channels of the patch features")
    bank_vectors: int = fact("patch features of the support images before any subsampling")

    @classmethod
    def convert(cls, values: dict[str, Any]) -> dict[str, Any]:
        values = super().convert(values)
        for name in ("image_size", "width", "bank_vectors"):
            values[name] = int(values[name])
        return values

    def check(self, where: str) -> None:
        problems = []
        if self.bank.ndim != 2 or self.bank.shape[1] != self.width or self.bank.shape[0] == 0:
            problems.append(f"bank {tuple(self.bank.shape)} for width {self.width}")
        if self.bank_image.shape != (self.bank.shape[0],):
            problems.append(f"bank_image {tuple(self.bank_image.shape)} for {self.bank.shape[0]} bank vectors")
        if len(self.grid) != 2 or self.grid[0] * self.grid[1] < 1:
            problems.append(f"grid {self.grid}")
        if math.isnan(self.threshold):
            problems.append("threshold NaN")
        if problems:
            raise ModelFormatError(f"{where}: tensors and facts do not agree with each other ({'; '.join(problems)})")


#: A nearest-neighbour search: queries ``(Q, D)`` and the bank ``(M, D)`` -> distances ``(Q,)``, indices ``(Q,)``.
Search = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Scored:
    """One batch scored against the bank: image scores ``(B,)`` and patch scores ``(B, N)``."""

    images: torch.Tensor
    patches: torch.Tensor


class BankDetector(BaseDetector):
    """Fit and predict of a memory-bank method (see the module docstring)."""

    state_class: type[BankState]

    # -- what a method writes -------------------------------------------------------------

    def blocks(self, backbone: Backbone) -> tuple[Layer, ...]:
        """The blocks read, canonical (the configured ones, or the method's default)."""
        raise NotImplementedError

    def embed(self, features: Any, blocks: Sequence[Layer]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Backbone features of a batch -> patch features ``(B, N, D)`` float32 and their grid."""
        raise NotImplementedError

    def support_arrays(self, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
        """The images the bank is built from and which support image each comes from (augmentation)."""
        return arrays, list(range(len(arrays)))

    def build_bank(self, tokens: torch.Tensor, source: torch.Tensor, grid: tuple[int, int]
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Patch features ``(n', N, D)`` of the images of :meth:`support_arrays` and their
        support image ``(n',)`` -> the bank ``(M, D)``, its vectors' support image ``(M,)`` int32,
        and the method's own fields of the state."""
        raise NotImplementedError

    def score(self, tokens: torch.Tensor, state: Any, exclude: int | None = None, search: Search | None = None) -> Scored:
        """Patch features ``(B, N, D)`` scored against ``state.bank`` (without the vectors of
        support image ``exclude``: leave-one-out), their nearest bank vectors found by
        :meth:`nearest` (``search``: in its place, as the exported head does)."""
        raise NotImplementedError

    # -- the search -----------------------------------------------------------------------

    def index_vectors(self, state: BankState) -> torch.Tensor:
        return state.bank

    def nearest(self, queries: torch.Tensor, state: BankState, exclude: int | None = None, search: Search | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean nearest bank vector of every query ``(Q, D)``: distances ``(Q,)`` and indices
        ``(Q,)``. At predict through the ``index`` option (:meth:`gallery_index`); leaving out the
        vectors of support image ``exclude`` (the fit's leave-one-out), the exact search with groups;
        with ``search`` (``(queries, bank) -> (distances, indices)``), that one."""
        from ..ops import nearest_neighbor

        if search is not None:
            return search(queries, state.bank)
        if exclude is None:
            return self.gallery_index().search(queries)
        bank = state.bank
        groups = torch.full((queries.shape[0],), exclude, dtype=torch.int32, device=bank.device)
        return nearest_neighbor(queries, bank, query_groups=groups, gallery_groups=state.bank_image.to(bank.device))

    # -- fit ------------------------------------------------------------------------------

    def fit(
        self,
        images: Sequence[ImageInput],
        class_name: str,
        *,
        names: Sequence[str] | None = None,
        support_rule: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> "BankDetector":
        """Fit on normal images only. Returns ``self`` (unreadable images are skipped and listed)."""
        cfg = self.config
        bb, device = self.start_fit(class_name)
        blocks = self.blocks(bb)
        size = bb.check_image_size(cfg.image_size or bb.info.image_size)
        loaded = self.read_support(images, names)
        n = len(loaded.arrays)
        arrays, source = self.support_arrays(loaded.arrays)
        parts, grid = [], (0, 0)
        for start, f in self.iter_features(arrays, blocks, None, size):
            t, grid = self.embed(f, blocks)
            parts.append(t.cpu())
            if on_progress is not None:  # the images as given come first; augmented copies are not counted
                on_progress(max(0, min(start + t.shape[0], n) - start))
        tokens = torch.cat(parts)  # (n', N, D)
        src = torch.tensor(source, dtype=torch.int32)
        bank, bank_image, extra = self.build_bank(tokens, src, grid)
        originals = tokens[: n]  # support_arrays puts the images as given first
        state = self.state_class(
            bank=bank.to(device), bank_image=bank_image, loo_scores=np.full(n, np.nan, np.float32),
            loo_peaks=np.full(n, np.nan, np.float32), loo_tokens=None, layer=list(blocks) if len(blocks) > 1 else blocks[0],
            image_size=size, grid=tuple(grid), width=int(bank.shape[1]), bank_vectors=int(tokens.shape[0] * tokens.shape[1]),
            threshold=math.inf, threshold_rule="none", false_alarm_rate=None, seed_threshold=None, pixel_threshold=None,
            map_range=(0.0, 1.0), class_name=class_name.strip(), support=list(loaded.names),
            support_rule=support_rule or f"{len(images)} images as given", skipped=[str(e) for e in loaded.errors],
            fitted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), gallery_index=None, **extra)
        cells = []
        if n >= 2:
            for i in steps(spread_subset(n, MAX_LOO_IMAGES), "leave-one-out"):
                s = self.score(originals[i : i + 1].to(device), state, exclude=i)
                smooth = smooth_maps(s.patches.reshape(1, *grid), size, cfg.blur_sigma)  # (1, S, S)
                state.loo_scores[i] = float(s.images[0])
                state.loo_peaks[i] = float(smooth.max())
                cells.append(F.adaptive_avg_pool2d(smooth[None], grid).reshape(-1).cpu().numpy())
            state.loo_tokens = np.concatenate(cells).astype(np.float32)
        else:
            log.warning("only one support image: no leave-one-out threshold can be derived, so every image is "
                        "called normal until a threshold is set (threshold=... / --threshold)")
        self.store_thresholds(state, self.derive_thresholds(state))
        if state.loo_tokens is not None:
            lo, hi = float(np.median(state.loo_tokens)), state.seed_threshold or 1.0
            state.map_range = (lo, hi if hi > lo else lo + 1.0)
        self.state_ = state
        self.keep_index()  # HNSW: built once here, saved with the model
        return self

    def threshold_scores(self, state: BankState) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, None]:
        """The saved leave-one-out scores the levels come from: image scores, map peaks (the seed
        level), map values at the patches (the pixel level); no scope check."""
        return state.loo_scores, state.loo_peaks, state.loo_tokens, None

    # -- predict --------------------------------------------------------------------------

    def predict_arrays(
        self,
        arrays: Sequence[np.ndarray],
        *,
        threshold: float | None = None,
        false_alarm_rate: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Prediction:
        """:meth:`predict` for images already read (``(H, W, 3)`` uint8 arrays)."""
        st = self.check_fitted()
        levels = self.thresholds(false_alarm_rate)
        thr = levels.image if threshold is None else float(threshold)
        blocks = as_blocks(st.layer)
        dev = st.bank.device
        scores, maps = [], []
        for start, f in self.iter_features(arrays, blocks, None, st.image_size):
            tokens, grid = self.embed(f, blocks)
            s = self.score(tokens.to(dev), st)
            scores.append(s.images.cpu())
            smooth = smooth_maps(s.patches.reshape(-1, *grid), st.image_size, self.config.blur_sigma)  # (B, S, S)
            for j in range(smooth.shape[0]):
                maps.append(resize_map(smooth[j], arrays[start + j].shape[:2]))
            if on_progress is not None:
                on_progress(smooth.shape[0])
        sc = torch.cat(scores).numpy().astype(np.float32) if scores else np.zeros(0, np.float32)
        return Prediction(scores=sc, visual=sc.copy(), semantic=np.zeros_like(sc), anomalous=sc > thr, maps=tuple(maps),
                          threshold=thr, pixel_threshold=levels.pixel, seed_threshold=levels.seed)

    def scoring_head(self) -> nn.Module:
        """The scoring as a traceable module, what ``lakead export`` traces (:class:`BankHead`)."""
        return BankHead(self)

    # -- reports --------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        st = self.check_fitted()
        return {
            **self.support_summary(st),
            "bank_vectors": int(st.bank.shape[0]),
            "bank_vectors_before_subsampling": st.bank_vectors,
            "bank_bytes": int(st.bank.numel() * st.bank.element_size()),
            "index": resolve_index(self.config.index, *st.bank.shape, st.bank.device),
            **self.decision_summary(st),
        }

    def support_summary(self, st: BankState) -> dict[str, Any]:
        """What every memory-bank method's summary starts with: the method, what it was fitted on, the blocks."""
        return {
            "method": self.method,
            "class_name": st.class_name,
            "backbone": self.config.backbone,
            "layer": st.layer,
            "image_size": st.image_size,
            "width": st.width,
            "support_images": len(st.support),
            "support_rule": st.support_rule,
            "skipped_images": len(st.skipped),
        }

    def decision_summary(self, st: BankState) -> dict[str, Any]:
        """What every memory-bank method's summary ends with: the decision level and the normal scores it came from."""
        finite = st.loo_scores[np.isfinite(st.loo_scores)]
        return {
            "threshold": st.threshold,
            "threshold_rule": self.describe_thresholds(st),
            "loo_score_median": float(np.median(finite)) if finite.size else None,
            "loo_score_max": float(finite.max()) if finite.size else None,
        }

    def configured_or_last_block(self, backbone: Backbone) -> tuple[Layer, ...]:
        """The configured blocks, canonical, or the backbone's last block (AnomalyDINO's and
        SubspaceAD's default); a backbone without numbered blocks needs them named."""
        if self.config.layer is None:
            if backbone.info.num_layers < 1:
                raise ConfigError(f"backbone {backbone.info.source!r} has no numbered blocks: give the block to read (--layer)")
            return (backbone.resolve_layer(backbone.info.num_layers),)
        return tuple(backbone.resolve_layer(b) for b in self.config.blocks)

def default_pair(backbone: Backbone) -> tuple[int, ...]:
    """Two blocks at 1/2 and 3/4 of a numbered backbone's depth (PatchCore reads the 2nd and 3rd
    of a ResNet's 4 stages): blocks 12 and 18 of 24, 6 and 9 of 12; one block when they coincide.

    Raises :class:`ConfigError` for a backbone without numbered blocks (ONNX: give tensor names).
    """
    n = backbone.info.num_layers
    if n < 1:
        raise ConfigError(f"backbone {backbone.info.source!r} has no numbered blocks: give the blocks to read, "
                          "e.g. --layer 365_quantized+400")
    pair = (max(1, round(0.5 * n)), max(1, round(0.75 * n)))
    return pair[:1] if pair[0] == pair[1] else pair


class BankHead(nn.Module):
    """A fitted memory-bank detector's scoring as one traceable module (what ``lakead export``
    traces; :mod:`lakead.export.graph`): block tokens -> the method's own
    :meth:`~BankDetector.embed` and :meth:`~BankDetector.score`, the search one matrix product
    and a min (:func:`lakead.ops.matmul_nearest`) over the whole bank (as ``index="exact"``),
    and the maps upsampled to the model's input and blurred as :func:`~lakead.patchops.smooth_maps`
    does (the runtime then resizes them to each image's size, with no blur of its own)."""

    def __init__(self, det: BankDetector) -> None:
        super().__init__()
        st = det.check_fitted()
        self.det = det
        self.blocks = as_blocks(st.layer)
        self.state = copy.copy(st)
        for f in dataclasses.fields(st):  # the graph is traced on the CPU
            v = getattr(st, f.name)
            if isinstance(v, torch.Tensor):
                setattr(self.state, f.name, v.detach().cpu())
        self.size = int(st.image_size)
        sigma = float(det.config.blur_sigma)
        self.blur = gaussian_matrix(self.size, sigma) if sigma > 0 else None
        self.facts: dict[str, Any] = {"map_grid": [self.size, self.size], "sigma": 0.0, "lam": 0.0}

    def features(self, backbone: Backbone, pixels: torch.Tensor) -> tuple:
        f = backbone.extract(pixels, self.blocks, None)
        return [f.blocks[b] for b in self.blocks], [f.grids[b] for b in self.blocks], None, None

    def forward(self, tokens: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], joint: Any = None,
                joint_grid: Any = None) -> tuple[torch.Tensor, ...]:
        feats = Features(blocks=dict(zip(self.blocks, tokens)), grids=dict(zip(self.blocks, grids)))
        x, grid = self.det.embed(feats, self.blocks)  # (B, N, D)
        s = self.det.score(x, self.state, search=matmul_nearest)
        maps = upsample_blur(s.patches.reshape(-1, *grid), self.size, self.blur)  # (B, S, S)
        zero = s.images * 0.0
        return maps, s.images, zero, s.images, zero
