"""A whole new method in one module: the worked example of docs/ARCHITECTURE.md.

Full-width nearest neighbour: every support token of one block is the gallery; a test
token's score is its distance to the nearest one; the image score is the largest; the
threshold comes from the support images scored leave-one-out. Registering it is one line
each in ``lakead.methods.METHODS`` and ``DETECTORS`` (the test does it with monkeypatch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np
import torch

from lakead.api import Prediction
from lakead.backbones import DEFAULT_CLIP, Layer
from lakead.base import BaseDetector, LearnedState, Options, fact, option, tensor
from lakead.ops import nearest_neighbor, robust_threshold, upsample_map


@dataclass
class NearestConfig(Options):
    backbone: str = option(DEFAULT_CLIP, "Hub id, local directory, or onnx:PATH.")
    layer: Layer = option(18, "Block read (1-based; a tensor name for ONNX).")
    image_size: Optional[int] = option(None, "Square input size in pixels (default: the model's own).")
    threshold_sigmas: float = option(3.0, "Robust standard deviations above the typical normal score.")


@dataclass
class NearestState(LearnedState):
    gallery: torch.Tensor = tensor("(M, D) float32: every support token", device=True)
    layer: Layer = fact("the block read")
    image_size: int = fact("square input size")
    grid: tuple[int, int] = fact("(gh, gw) token grid")
    threshold: float = fact("decision threshold")
    map_range: tuple[float, float] = fact("colour scale of the maps")
    class_name: str = fact("what the images show")
    support: list[str] = fact("support images")
    skipped: list[str] = fact("unreadable support images")
    fitted_at: str = fact("UTC time of the fit")

    @classmethod
    def convert(cls, values: dict[str, Any]) -> dict[str, Any]:
        values["grid"], values["map_range"] = tuple(values["grid"]), tuple(values["map_range"])
        values["threshold"] = math.inf if values["threshold"] is None else float(values["threshold"])
        return values


class NearestDetector(BaseDetector):
    method = "nearest"
    config_class = NearestConfig
    state_class = NearestState

    def fit(self, images, class_name, *, names=None, support_rule=None, on_progress=None) -> "NearestDetector":
        bb = self.backbone.to(self.runtime.torch_device())
        block = bb.resolve_layer(self.config.layer)
        size = bb.check_image_size(self.config.image_size or bb.info.image_size)
        loaded = self.read_images(images, names, strict=False)
        batches = list(self.iter_features(loaded.arrays, [block], None, size))
        tokens = torch.cat([f.blocks[block] for _, f in batches])  # (n, N, D)
        n, n_tok, width = tokens.shape
        gallery = tokens.reshape(n * n_tok, width)  # (n*N, D)
        groups = torch.arange(n).repeat_interleave(n_tok)  # (n*N,)
        loo = np.array([float(nearest_neighbor(gallery[groups == i], gallery, query_groups=groups[groups == i],
                                               gallery_groups=groups)[0].max()) for i in range(n)])
        threshold = robust_threshold(loo, self.config.threshold_sigmas) if n > 1 else math.inf
        self.state_ = NearestState(
            gallery=gallery, layer=block, image_size=size, grid=batches[0][1].grids[block], threshold=threshold,
            map_range=(float(np.median(loo)), threshold if n > 1 else float(loo.max()) + 1), class_name=class_name,
            support=loaded.names, skipped=[str(e) for e in loaded.errors],
            fitted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        return self

    def predict_arrays(self, arrays, *, threshold=None, on_progress=None) -> Prediction:
        st = self.check_fitted()
        thr = st.threshold if threshold is None else float(threshold)
        scores, maps = [], []
        for start, f in self.iter_features(arrays, [st.layer], None, st.image_size):
            tok = f.blocks[st.layer]  # (B, N, D)
            d = nearest_neighbor(tok.reshape(-1, tok.shape[-1]), st.gallery)[0].reshape(tok.shape[:2])  # (B, N)
            scores += d.amax(dim=1).tolist()
            maps += [upsample_map(d[j].reshape(st.grid), arrays[start + j].shape[:2]) for j in range(d.shape[0])]
        s = np.asarray(scores, np.float32)
        return Prediction(scores=s, visual=s, semantic=np.zeros_like(s), anomalous=s > thr, maps=tuple(maps), threshold=thr)

    def summary(self) -> dict[str, Any]:
        st = self.check_fitted()
        return {"method": self.method, "class_name": st.class_name, "layer": st.layer, "threshold": st.threshold,
                "gallery_vectors": int(st.gallery.shape[0]), "support_images": len(st.support)}
