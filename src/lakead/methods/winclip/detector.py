"""WinCLIP (zero-shot), WinCLIP+ (few-shot) and WinCLIP+LAKE, one detector.

Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", CVPR 2023.
``reference`` says what the normal images add to the text maps (:mod:`.score`):

- ``none``: WinCLIP. Needs no image at all: ``fit([], "screw")`` builds a model from the
  class name alone; its decision is then P(anomalous) > 0.5, uncalibrated (no normal image
  to calibrate on), and says so. With normal images, they only calibrate the threshold.
- ``winclip``: WinCLIP+, reference association of windows and patches against the shots.
- ``lake``: WinCLIP+LAKE (the LAKE paper's Table IV plug-in; the coupling is ours,
  docs/METHODS.md): LAKE's sensitive-neuron gallery and distance replace the full-width
  association (``lake_fusion="add"``: averaged with it).

The decision threshold comes from normal images only: each support image scored with the
others as the reference (leave-one-out), through :func:`lakead.decision.derive_thresholds` and
the false-alarm budget, as LAKE.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from ...api import Prediction
from ...backbones.base import as_blocks
from ...base import BaseDetector, backbone_precision
from ...decision import Thresholds
from ...errors import ConfigError
from ...images import ImageInput
from ..lake.config import LakeConfig
from ..lake.fit import select_neurons
from ...ops import nearest_neighbor, upsample_map
from .config import WinCLIPConfig
from .head import WinCLIPHead, window_features
from .maps import window_indices
from .prompts import class_prototypes, prompt_ensemble
from .score import Scored, score_batch
from .state import WinCLIPState

log = logging.getLogger("lakead")

#: The threshold of a zero-shot model fitted without any normal image: P(anomalous) > 1/2.
UNCALIBRATED_THRESHOLD = 0.5
VARIANTS = {"none": "winclip", "winclip": "winclip+", "lake": "winclip+lake"}
#: Class prototypes already embedded, per loaded backbone and class name: an evaluation fits
#: several methods or shot counts per class, and the prompt ensemble (242 prompts) is the same.
_PROTOTYPES: "weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def class_text(backbone: Any, class_name: str) -> tuple[torch.Tensor, int, int]:
    """The ``(2, E)`` class prototypes of ``class_name`` on ``backbone`` (computed once per loaded
    backbone and name), and the numbers of normal and anomalous prompts averaged."""
    normal, anomalous = prompt_ensemble(class_name)
    cache = _PROTOTYPES.setdefault(backbone, {})
    if class_name not in cache:
        cache[class_name] = class_prototypes(backbone.text_embeddings(normal), backbone.text_embeddings(anomalous)).cpu()
    return cache[class_name], len(normal), len(anomalous)


class WinCLIPDetector(BaseDetector):
    """WinCLIP and its few-shot variants behind the :class:`~lakead.api.Detector` interface.

    >>> det = WinCLIPDetector("path/to/clip").fit([], "screw")  # doctest: +SKIP
    >>> det = WinCLIPDetector("path/to/clip", reference="lake").fit(normal_paths, "screw")  # doctest: +SKIP
    """

    method = "winclip"
    config_class = WinCLIPConfig
    state_class = WinCLIPState
    state_: WinCLIPState | None

    # -- features -------------------------------------------------------------------------

    def _blocks(self) -> tuple[Any, tuple]:
        """The associated patch block (or None) and LAKE's blocks (or ())."""
        cfg, bb = self.config, self.backbone
        assoc = cfg.reference == "winclip" or (cfg.reference == "lake" and cfg.lake_fusion == "add")
        patch = bb.resolve_layer(cfg.patch_layer, semantic=True) if assoc else None
        lake = tuple(bb.resolve_layer(b) for b in cfg.blocks) if cfg.reference == "lake" else ()
        return patch, lake

    def _features(self, arrays: Sequence[np.ndarray], tables, patch, lake, image_size: int):
        """Yield ``(start, image, windows, patches, lake_tokens)`` per batch."""
        bs = self.runtime.batch_size
        for start in range(0, len(arrays), bs):
            pixels = self.backbone.preprocessing(arrays[start : start + bs], image_size)
            with backbone_precision(self.runtime.precision, self.backbone):
                yield (start, *window_features(self.backbone, pixels, tables, self.config.window_start_block, patch, lake))

    def _tables(self, grid: tuple[int, int]) -> list[torch.Tensor]:
        try:
            return [window_indices(grid, s) for s in self.config.sizes]
        except ValueError as exc:
            raise ConfigError(f"window_sizes {self.config.window_sizes}: {exc} (use smaller windows or a larger image_size)") from None

    # -- fit ------------------------------------------------------------------------------

    def fit(
        self,
        images: Sequence[ImageInput],
        class_name: str,
        *,
        names: Sequence[str] | None = None,
        support_rule: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> "WinCLIPDetector":
        """Fit on normal images (none at all for zero-shot WinCLIP). Returns ``self``."""
        cfg = self.config
        bb, device = self.start_fit(class_name, purpose="it fills the text prompts")
        if not bb.has_text:
            raise ConfigError(f"WinCLIP needs a backbone with a text tower; {bb.info.source!r} has none")
        image_size = bb.check_image_size(cfg.image_size or bb.info.image_size)
        grid = bb.grid_size(image_size)
        tables = self._tables(grid)
        if not 0 <= cfg.window_start_block < bb.info.num_layers:
            raise ConfigError(f"window_start_block {cfg.window_start_block} is out of range: 0..{bb.info.num_layers - 1}")
        prototypes, n_normal, n_anomalous = class_text(bb, class_name.strip())
        prototypes = prototypes.to(device)  # (2, E)
        patch, lake = self._blocks()

        none = images is None or (isinstance(images, (list, tuple)) and len(images) == 0)
        loaded = None if none else self.read_support(images, names)
        arrays = loaded.arrays if loaded is not None else []
        given = 0 if loaded is None else len(loaded.arrays) + len(loaded.errors)
        if not arrays and cfg.reference != "none":
            raise ConfigError(f"reference={cfg.reference!r} needs normal images; only zero-shot WinCLIP (reference none) "
                              "fits on a class name alone")
        n = len(arrays)
        feats = []
        for f in self._features(arrays, tables, patch, lake, image_size):
            feats.append(f)
            if on_progress is not None:
                on_progress(f[1].shape[0])
        image = torch.cat([f[1] for f in feats]) if feats else None  # (n, E)
        windows = [torch.cat([f[2][s] for f in feats]) for s in range(len(tables))] if feats else []  # (n, nw, E) each
        patches = torch.cat([f[3] for f in feats]) if feats and patch is not None else None  # (n, N, D)
        lake_tokens = torch.cat([f[4] for f in feats]) if feats and lake else None  # (n, N, D')
        ids = torch.arange(n, dtype=torch.int32)

        state = WinCLIPState(
            text_embeddings=prototypes, window_memory=None, window_memory_scale=None, window_memory_image=None,
            patch_memory=None, patch_memory_image=None, neurons=None, gallery=None, gallery_image=None,
            loo_scores=np.zeros(0, np.float32), loo_text=np.zeros(0, np.float32), loo_visual=np.zeros(0, np.float32),
            loo_tokens=np.zeros(0, np.float32), class_name=class_name.strip(), prompts=[n_normal, n_anomalous],
            image_size=image_size, grid=tuple(grid), window_sizes=list(cfg.sizes), patch_layer=patch,
            lake_layer=(list(lake) if isinstance(cfg.layer, (list, tuple)) else lake[0]) if lake else None,
            visual_scale=1.0, threshold=math.inf, threshold_rule="none", false_alarm_rate=None, seed_threshold=None,
            pixel_threshold=None, map_range=(0.0, 1.0), support=list(loaded.names) if loaded else [],
            support_rule=support_rule or (f"{given} images as given" if given else "none: zero-shot from the class name"),
            skipped=[str(e) for e in loaded.errors] if loaded else [],
            fitted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        if patches is not None:  # WinCLIP+'s memory: every support window and patch
            nw = [w.shape[1] for w in windows]
            state.window_memory = torch.cat([w.reshape(-1, w.shape[-1]) for w in windows]).to(device)  # (Mw, E)
            state.window_memory_scale = torch.cat([torch.full((n * c,), s, dtype=torch.int32) for s, c in enumerate(nw)]).to(device)
            state.window_memory_image = torch.cat([ids.repeat_interleave(c) for c in nw])
            state.patch_memory = patches.reshape(-1, patches.shape[-1]).to(device)  # (n*N, D)
            state.patch_memory_image = ids.repeat_interleave(patches.shape[1])
        if lake_tokens is not None:  # LAKE's sensitive neurons and gallery (LAKE Eq. 3-6)
            lake_cfg = LakeConfig(backbone=cfg.backbone, k=cfg.k, selection="top")
            _, state.neurons = select_neurons(lake_tokens, lake_cfg)
            n_tok = lake_tokens.shape[1]
            state.gallery = lake_tokens[..., state.neurons].reshape(n * n_tok, -1).contiguous().to(device)  # (n*N, K)
            state.gallery_image = ids.repeat_interleave(n_tok)
            if n >= 2:  # LAKE's score_norm "loo": the median leave-one-out image score
                q = state.gallery
                d, _ = nearest_neighbor(q, q, query_groups=state.gallery_image.to(device), gallery_groups=state.gallery_image.to(device))
                state.visual_scale = float(np.median(d.reshape(n, n_tok).amax(dim=1).cpu().numpy())) or 1.0

        if n and (cfg.reference == "none" or n >= 2):
            s = score_batch(image, windows, patches, lake_tokens, tables, state, cfg,
                            image_ids=ids if cfg.reference != "none" else None)
            state.loo_scores = s.scores.cpu().numpy().astype(np.float32)
            state.loo_text = s.text.cpu().numpy().astype(np.float32)
            state.loo_visual = s.fused_map.amax(dim=1).cpu().numpy().astype(np.float32)
            state.loo_tokens = s.fused_map.reshape(-1).cpu().numpy().astype(np.float32)
        elif n:
            state.loo_scores = np.full(n, np.nan, np.float32)
            state.loo_text, state.loo_visual = state.loo_scores.copy(), state.loo_scores.copy()  # two arrays: saved apart
            log.warning("one support image: no leave-one-out score for WinCLIP+ / WinCLIP+LAKE, so every image is called "
                        "normal until a threshold is set (threshold=... / --threshold)")
        levels = self.derive_thresholds(state)
        self.store_thresholds(state, levels)
        if state.loo_tokens.size:
            state.map_range = (float(np.median(state.loo_tokens)), float(levels.seed))
            if state.map_range[1] <= state.map_range[0]:
                state.map_range = (state.map_range[0], state.map_range[0] + 1.0)
        self.state_ = state
        return self

    def threshold_scores(self, state: WinCLIPState) -> tuple[np.ndarray, np.ndarray, np.ndarray, None]:
        """The saved leave-one-out scores the levels come from: image scores, fused-map peaks (the
        seed level), fused-map values (the pixel level); no scope check."""
        return state.loo_scores, state.loo_visual, state.loo_tokens, None

    def derive_thresholds(self, state: WinCLIPState, false_alarm_rate: float | None = None) -> Thresholds:
        """The decision levels from the support images' scores (:meth:`BaseDetector.derive_thresholds`),
        or the uncalibrated 0.5 of a zero-shot model without images."""
        cfg = self.config
        if state.support:
            return super().derive_thresholds(state, false_alarm_rate)
        if false_alarm_rate is not None:
            raise ConfigError("this zero-shot model was fitted without normal images: no threshold can be derived for "
                              "a false-alarm budget; fit it with a few normal images, or give a threshold")
        t = UNCALIBRATED_THRESHOLD if cfg.threshold is None else float(cfg.threshold)
        return Thresholds(t, "uncalibrated" if cfg.threshold is None else "fixed", None, t, t, None)

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
        state = self.check_fitted()
        levels = self.thresholds(false_alarm_rate)
        thr = levels.image if threshold is None else float(threshold)
        tables = [window_indices(state.grid, s) for s in state.window_sizes]
        patch, lake = state.patch_layer, as_blocks(state.lake_layer) if state.lake_layer is not None else ()
        parts: list[Scored] = []
        maps: list[np.ndarray] = []
        for start, image, windows, patches, lake_tokens in self._features(arrays, tables, patch, lake, state.image_size):
            s = score_batch(image, windows, patches, lake_tokens, tables, state, self.config)
            parts.append(s)
            grids = s.fused_map.reshape(-1, *state.grid).cpu()  # (B, gh, gw)
            maps += [upsample_map(grids[j], arrays[start + j].shape[:2]) for j in range(grids.shape[0])]
            if on_progress is not None:
                on_progress(grids.shape[0])

        def cat(name: str) -> np.ndarray:
            return torch.cat([getattr(p, name).cpu() for p in parts]).numpy().astype(np.float32) if parts else np.zeros(0, np.float32)

        scores = cat("scores")
        return Prediction(scores=scores, visual=cat("visual"), semantic=cat("text"), anomalous=scores > thr,
                          maps=tuple(maps), threshold=thr, pixel_threshold=levels.pixel, seed_threshold=levels.seed)

    def scoring_head(self) -> torch.nn.Module:
        """The scoring as a traceable module, what ``lakead export`` traces (:mod:`.head`)."""
        return WinCLIPHead(self.check_fitted(), self.config)

    def summary(self) -> dict[str, Any]:
        """The facts of a fitted model worth printing or reporting."""
        state = self.check_fitted()
        cfg = self.config
        rule = ("uncalibrated: P(anomalous) > 0.5 of the text prompts (no normal image was given to calibrate on)"
                if state.threshold_rule == "uncalibrated" else self.describe_thresholds(state))
        out = {
            "method": VARIANTS[cfg.reference],
            "class_name": state.class_name,
            "backbone": cfg.backbone,
            "image_size": state.image_size,
            "grid": f"{state.grid[0]}x{state.grid[1]}",
            "window_sizes": ",".join(map(str, state.window_sizes)),
            "window_start_block": cfg.window_start_block,
            "prompts": f"{state.prompts[0]} normal, {state.prompts[1]} anomalous",
            "support_images": len(state.support),
            "support_rule": state.support_rule,
            "skipped_images": len(state.skipped),
            "threshold": state.threshold,
            "threshold_rule": rule,
        }
        if cfg.reference != "none":
            out["fusion"] = f"(1 - {cfg.fusion_weight:g}) x text + {cfg.fusion_weight:g} x visual"
        if state.patch_layer is not None:
            out["patch_layer"] = state.patch_layer
        if state.gallery is not None:
            out.update(lake_layer=state.lake_layer, k=int(state.neurons.numel()), lake_fusion=cfg.lake_fusion,
                       gallery_vectors=int(state.gallery.shape[0]))
        return out


__all__ = ["UNCALIBRATED_THRESHOLD", "WinCLIPDetector"]
