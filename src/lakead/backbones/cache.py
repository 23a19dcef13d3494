"""A backbone decorator that keeps the features of every image it has read (the grids of
:mod:`lakead.evaluate` run the network once per image)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from .base import Backbone, Features


class FeatureCache(Backbone):
    """A backbone that remembers the block outputs of every image it has read, so that the
    variants of a grid run the network once per image.

    Entries are keyed by a SHA-1 of the image's preprocessed pixels and the block, so a
    different image, input size or preprocessing is never served from the cache. An entry
    made with the semantic block also serves visual-only requests. Features are kept on the
    CPU in float32 (exactly what the backbone returned); :meth:`clear` empties the cache.
    """

    def __init__(self, inner: Backbone) -> None:
        self.inner = inner
        self.info = inner.info
        self.preprocessing = inner.preprocessing
        self.has_text = inner.has_text
        self._store: dict[tuple[str, Any], tuple[torch.Tensor, torch.Tensor | None, tuple[int, int], Any]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self.inner.device

    @device.setter
    def device(self, value: torch.device) -> None:
        self.inner.device = value

    def resolve_layer(self, layer: Any, *, semantic: bool = False) -> Any:
        return self.inner.resolve_layer(layer, semantic=semantic)

    def check_image_size(self, image_size: int) -> int:
        return self.inner.check_image_size(image_size)

    def grid_size(self, image_size: int) -> tuple[int, int]:
        return self.inner.grid_size(image_size)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.inner.text_embeddings(prompts)

    @property
    def logit_scale(self) -> float:
        return self.inner.logit_scale

    def to(self, device: torch.device | str) -> "FeatureCache":
        self.inner.to(device)
        return self

    def clear(self) -> None:
        self._store.clear()

    def extract(self, pixels: torch.Tensor, layer: Any, semantic_layer: Any) -> Features:
        keys = [(hashlib.sha1(pixels[i].detach().cpu().contiguous().numpy().tobytes()).hexdigest() + str(tuple(pixels.shape[1:])), layer)
                for i in range(pixels.shape[0])]
        found = [self._store.get(k) for k in keys]
        if all(e is not None and (semantic_layer is None or e[3] == semantic_layer) for e in found):
            self.hits += len(keys)
            dev = self.inner.device
            visual = torch.stack([e[0] for e in found]).to(dev)  # type: ignore[index]
            joint = torch.stack([e[1] for e in found]).to(dev) if semantic_layer is not None else None  # type: ignore[index, misc]
            return Features(visual=visual, joint=joint, grid=found[0][2])  # type: ignore[index]
        self.misses += len(keys)
        f = self.inner.extract(pixels, layer, semantic_layer)
        for i, k in enumerate(keys):
            old = self._store.get(k)
            if old is None or (semantic_layer is not None and old[3] is None):  # never drop a joint entry
                joint = f.joint[i].detach().cpu() if f.joint is not None else None
                self._store[k] = (f.visual[i].detach().cpu(), joint, f.grid, semantic_layer)
        return f
