"""A whole new method in one module: the worked example of docs/ARCHITECTURE.md.

Mean distance: the average of every support token of one block is the normal patch; a test
token's score is its distance to it; the image score is the largest. The decision levels come
from the support images scored leave-one-out (each against the mean of the others), so the
false-alarm budget, ``predict --false-alarm-rate`` and ``--masks`` work as for every method.
Registering it is one line: ``lakead.methods.register(Method("mean-distance", MeanDistanceDetector,
...))`` (the tests do it with ``registered``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np
import torch

from lakead.base import BaseDetector
from lakead.fields import Layer, Options, ThresholdRule, option, shared_option
from lakead.ops import upsample_map
from lakead.state import DecisionRecord, SupportRecord, fact, tensor


@dataclass
class MeanDistanceConfig(Options):
    backbone: str = shared_option("backbone")
    layer: Layer = option(18, "Block read (1-based; a tensor name for ONNX).")
    image_size: Optional[int] = shared_option("image_size")
    false_alarm_rate: float = shared_option("false_alarm_rate")  # the decision options, declared once for every method
    threshold_rule: ThresholdRule = shared_option("threshold_rule")
    threshold: Optional[float] = shared_option("threshold")
    threshold_sigmas: float = shared_option("threshold_sigmas")

    def validate(self) -> "MeanDistanceConfig":
        super().validate()
        self.check_shared()
        return self


@dataclass(kw_only=True)
class MeanDistanceState(SupportRecord, DecisionRecord):  # the support facts and the decision levels: declared once
    mean: torch.Tensor = tensor("(D,) float32: the average support token", device=True)
    layer: Layer = fact("the block read")
    image_size: int = fact("square input size")
    grid: tuple[int, int] = fact("(gh, gw) token grid")


class MeanDistanceDetector(BaseDetector):
    method = "mean-distance"
    config_class = MeanDistanceConfig
    state_class = MeanDistanceState

    def fit(self, images, class_name, *, names=None, support_rule=None, on_progress=None) -> "MeanDistanceDetector":
        backbone, _ = self.start_fit(class_name)
        block = backbone.resolve_layer(self.config.layer)
        size = backbone.check_image_size(self.config.image_size or backbone.info.image_size)
        loaded = self.read_support(images, names)
        batches = list(self.iter_features(loaded.arrays, [block], None, size))
        tokens = torch.cat([f.blocks[block] for _, f in batches]).float()  # (n, N, D)
        n = tokens.shape[0]
        loo = np.full(n, np.nan, np.float32)
        loo_tokens = []
        if n > 1:  # each support image against the mean of the others
            total = tokens.sum(dim=(0, 1))
            per_image = tokens.shape[1]
            for i in range(n):
                others = (total - tokens[i].sum(0)) / ((n - 1) * per_image)
                d = torch.linalg.vector_norm(tokens[i] - others, dim=-1)  # (N,)
                loo[i] = float(d.max())
                loo_tokens.append(d.numpy())
        state = MeanDistanceState(
            mean=tokens.mean(dim=(0, 1)), layer=block, image_size=size, grid=batches[0][1].grids[block],
            loo_scores=loo, loo_tokens=np.concatenate(loo_tokens).astype(np.float32) if loo_tokens else None,
            class_name=class_name, support=loaded.names,
            support_rule=support_rule or f"{n} images as given", skipped=[str(e) for e in loaded.errors],
            fitted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.fit_levels(state)  # threshold, rule, budget, region levels from loo_scores / loo_tokens
        finite = loo[np.isfinite(loo)]
        state.map_range = (float(np.median(finite)) if finite.size else 0.0,
                           state.threshold if np.isfinite(state.threshold) else float(finite.max(initial=1.0)))
        self.state_ = state
        return self

    def predict_arrays(self, arrays, *, threshold=None, false_alarm_rate=None, on_progress=None):
        st = self.check_fitted()
        scores, maps = [], []
        for start, f in self.iter_features(arrays, [st.layer], None, st.image_size):
            d = torch.linalg.vector_norm(f.blocks[st.layer].float() - st.mean, dim=-1)  # (B, N)
            scores += d.amax(dim=1).tolist()
            maps += [upsample_map(d[j].reshape(st.grid), arrays[start + j].shape[:2]) for j in range(d.shape[0])]
            if on_progress is not None:
                on_progress(d.shape[0])
        return self.decide(scores, maps, threshold=threshold, false_alarm_rate=false_alarm_rate)

    def summary(self) -> dict[str, Any]:
        st = self.check_fitted()
        return {"method": self.method, "class_name": st.class_name, "backbone": self.config.backbone, "layer": st.layer,
                "image_size": st.image_size, "width": int(st.mean.shape[0]), "support_images": len(st.support),
                "threshold": st.threshold, "threshold_rule": self.describe_thresholds(st)}
