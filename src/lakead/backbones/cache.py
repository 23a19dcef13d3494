"""A backbone decorator that keeps the features of every image it has read (the grids of
:mod:`lakead.evaluate` run the network once per image and block)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from .base import Backbone, Features, Layer, WindowFeatures

#: A cache key: (image key, "block" or "joint", the block).
_Key = tuple[str, str, Any]


class FeatureCache(Backbone):
    """A backbone that remembers the outputs of every image and block it has read, so that
    the variants of a grid run the network once per image and block.

    Entries are keyed by a SHA-1 of the image's preprocessed pixels (with their shape) and
    the block: one entry per visual block, and one per joint block (the semantic branch's
    tokens in the image-text space). A request is served from the cache when every block it
    asks for (and its joint block, when it asks for one) is there; otherwise the network runs
    for the missing blocks only, on the images that lack them, so no image is run twice for
    the same block. A different image, input size or preprocessing is never served from the
    cache. Features are kept on the CPU exactly as the backbone returned them; :meth:`clear`
    empties the cache (``hits`` and ``misses`` count images and keep counting).

    The cache does not know the precision the network ran in: use one
    :class:`~lakead.api.Runtime` per cache (a grid does).
    """

    def __init__(self, inner: Backbone) -> None:
        self.inner = inner
        self.info = inner.info
        self.preprocessing = inner.preprocessing
        self.has_text = inner.has_text
        self._store: dict[_Key, tuple[torch.Tensor, tuple[int, int] | None]] = {}
        self.hits = 0  # images served wholly from the cache
        self.misses = 0  # images for which the network ran

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self.inner.device

    @device.setter
    def device(self, value: torch.device) -> None:
        self.inner.device = value

    @property
    def supports_autocast(self) -> bool:  # type: ignore[override]
        return self.inner.supports_autocast

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

    def window_embeddings(self, pixels: torch.Tensor, windows: Sequence[torch.Tensor], start_block: int = 0,
                          blocks: Sequence[Layer] = ()) -> WindowFeatures:
        """The inner backbone's, not kept (only WinCLIP reads windows; one row of a grid)."""
        return self.inner.window_embeddings(pixels, windows, start_block, blocks)

    def to(self, device: torch.device | str) -> "FeatureCache":
        self.inner.to(device)
        return self

    def clear(self) -> None:
        self._store.clear()

    def __len__(self) -> int:
        """Entries held (one per image and block)."""
        return len(self._store)

    @staticmethod
    def _image_key(pixels: torch.Tensor) -> str:
        """``(3, S, S)`` pixels -> their SHA-1 and shape."""
        return hashlib.sha1(pixels.detach().cpu().contiguous().numpy().tobytes()).hexdigest() + str(tuple(pixels.shape))

    def extract(self, pixels: torch.Tensor, blocks: Sequence[Layer], joint_block: Layer | None = None) -> Features:
        blocks = tuple(blocks)
        images = [self._image_key(pixels[i]) for i in range(pixels.shape[0])]
        wanted: list[tuple[str, Any]] = [("block", b) for b in blocks]
        if joint_block is not None:
            wanted.append(("joint", joint_block))
        # what each image lacks; images that lack the same things run together, once
        groups: dict[tuple[tuple[str, Any], ...], list[int]] = {}
        for i, img in enumerate(images):
            lacking = tuple(w for w in wanted if (img, *w) not in self._store)
            if lacking:
                groups.setdefault(lacking, []).append(i)
        n_missed = sum(len(idx) for idx in groups.values())
        self.hits += len(images) - n_missed
        self.misses += n_missed
        for lacking, idx in groups.items():
            run_blocks = [b for kind, b in lacking if kind == "block"]
            run_joint = next((b for kind, b in lacking if kind == "joint"), None)
            sub = pixels if len(idx) == len(images) else pixels[idx]
            f = self.inner.extract(sub, run_blocks, run_joint)
            if len(idx) == len(images) and len(lacking) == len(wanted):
                self._keep(images, f, run_blocks, run_joint)
                return f  # nothing was cached: exactly what the backbone returned
            self._keep([images[i] for i in idx], f, run_blocks, run_joint)
        return self._assemble(images, blocks, joint_block)

    def _keep(self, images: Sequence[str], f: Features, blocks: Sequence[Layer], joint_block: Layer | None) -> None:
        for j, img in enumerate(images):
            for b in blocks:
                self._store[(img, "block", b)] = (f.blocks[b][j].detach().cpu(), f.grids[b])
            if joint_block is not None and f.joint is not None:
                self._store[(img, "joint", joint_block)] = (f.joint[j].detach().cpu(), f.joint_grid)

    def _assemble(self, images: Sequence[str], blocks: Sequence[Layer], joint_block: Layer | None) -> Features:
        dev = self.inner.device
        feats: dict[Layer, torch.Tensor] = {}
        grids: dict[Layer, tuple[int, int]] = {}
        for b in blocks:
            entries = [self._store[(img, "block", b)] for img in images]
            feats[b] = torch.stack([e[0] for e in entries]).to(dev)  # (B, N_b, D_b)
            grids[b] = entries[0][1]  # type: ignore[assignment]
        joint = joint_grid = None
        if joint_block is not None:
            entries = [self._store[(img, "joint", joint_block)] for img in images]
            joint = torch.stack([e[0] for e in entries]).to(dev)  # (B, N, E)
            joint_grid = entries[0][1]
        return Features(blocks=feats, grids=grids, joint=joint, joint_grid=joint_grid)
