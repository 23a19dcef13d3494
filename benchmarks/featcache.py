"""Block tokens of every training and test image of a category, extracted once and kept on disk
(``runs/features/``), for the benchmarks that score many configurations on the same images
(defaults.py, selection.py). Pure reading: the network runs once per image and block set.

The cache file is keyed by the category, the backbone's fingerprint, the blocks and the input
size; delete ``runs/features`` to extract again.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "runs" / "features"


@dataclass
class CategoryFeatures:
    """Tokens of one category: ``train[block]`` ``(n, N, D)`` float32 in sorted-path order,
    ``test[block]`` ``(T, N, D)``, their grids, the test labels ``(T,)`` and the paths."""

    name: str
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    grids: dict[str, tuple[int, int]]
    labels: np.ndarray
    train_paths: list[str]
    test_paths: list[str]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def extract(arrays: list[np.ndarray], backbone, blocks: list[str], size: int, batch: int = 16
            ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """``(H, W, 3)`` uint8 images -> each block's tokens ``(B, N, D)`` float32 and grids."""
    parts: dict[str, list[torch.Tensor]] = {b: [] for b in blocks}
    grids: dict[str, tuple[int, int]] = {}
    for s in range(0, len(arrays), batch):
        f = backbone.extract(backbone.preprocessing(arrays[s : s + batch], size), blocks)
        for b in blocks:
            parts[b].append(f.blocks[b].float().cpu())
            grids[b] = tuple(f.grids[b])
    return {b: torch.cat(v) for b, v in parts.items()}, grids


def category_features(cat, backbone, blocks: list[str], size: int | None = None) -> CategoryFeatures:
    """The tokens of every training and test image of ``cat`` at ``blocks`` (canonical names),
    read from the cache or extracted now and cached."""
    from lakead.images import load_image

    size = size or backbone.info.image_size
    key = hashlib.sha1(f"{backbone.info.fingerprint}|{'+'.join(blocks)}|{size}".encode()).hexdigest()[:12]
    path = CACHE / f"{_slug(cat.name)}-{key}.pt"
    train_paths = sorted(str(p) for p in cat.train)
    test_paths = [str(s.path) for s in cat.test]
    if path.exists():
        d = torch.load(path, weights_only=False)
        if d["train_paths"] == train_paths and d["test_paths"] == test_paths:
            return CategoryFeatures(cat.name, d["train"], d["test"], d["grids"], d["labels"], train_paths, test_paths)
    train, grids = extract([load_image(p) for p in train_paths], backbone, blocks, size)
    test, _ = extract([load_image(p) for p in test_paths], backbone, blocks, size)
    labels = np.array([s.label for s in cat.test], np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(dict(train=train, test=test, grids=grids, labels=labels, train_paths=train_paths, test_paths=test_paths), tmp)
    tmp.replace(path)
    return CategoryFeatures(cat.name, train, test, grids, labels, train_paths, test_paths)


def draws(n: int, shots: int | None, seeds: list[int]) -> list[tuple[int, list[int]]]:
    """The support images of each draw: ``(seed, indices into the sorted training images)``, as
    :func:`lakead.data.select_shots` draws them (all images once when ``shots`` is None or >= n)."""
    import random

    if shots is None or shots >= n:
        return [(0, list(range(n)))]
    return [(s, sorted(random.Random(s).sample(range(n), shots))) for s in seeds]
