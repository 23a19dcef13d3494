"""Tiny synthetic datasets in the MVTec-AD layout, written to a temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from conftest import texture, with_defect


def write_category(
    root: Path,
    name: str,
    *,
    n_train: int = 6,
    n_good: int = 3,
    defects: dict[str, int] | None = None,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    normal_dir: str = "good",
    mask_suffix: str = "_mask",
) -> Path:
    """``root/name`` with ``train/<normal_dir>``, ``test/<normal_dir>``, ``test/<defect>`` and
    ``ground_truth/<defect>/<stem><mask_suffix>.png``. Each defect image holds one pasted
    checker patch of 12 to 16 pixels; its mask is 255 there, 0 elsewhere."""
    rng = np.random.default_rng(seed)
    cat = root / name
    defects = {"crack": 2} if defects is None else defects
    for split, n in (("train", n_train), ("test", n_good)):
        d = cat / split / normal_dir
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(texture(rng, size)).save(d / f"{i:03d}.png")
    for defect, n in defects.items():
        d, g = cat / "test" / defect, cat / "ground_truth" / defect
        d.mkdir(parents=True, exist_ok=True)
        g.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            s = int(rng.integers(12, 17))
            top, left = int(rng.integers(0, size[0] - s)), int(rng.integers(0, size[1] - s))
            Image.fromarray(with_defect(texture(rng, size), top, left, s)).save(d / f"{i:03d}.png")
            mask = np.zeros(size, np.uint8)
            mask[top : top + s, left : left + s] = 255
            Image.fromarray(mask).save(g / f"{i:03d}{mask_suffix}.png")
    return cat
