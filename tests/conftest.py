"""Shared fixtures: tiny random CLIP models built once per session, synthetic images.

Tests never download anything: the hub is switched off before transformers is imported.
"""

from __future__ import annotations

import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lakead.testing import save_random_clip  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP (32 px input, patch 8, width 32, 4 blocks) in save_pretrained layout."""
    return save_random_clip(tmp_path_factory.mktemp("tiny-clip"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_clip_dir):
    """The tiny CLIP loaded once (with its text tower)."""
    from lakead.backbones import CLIPBackbone

    return CLIPBackbone.from_pretrained(str(tiny_clip_dir))


@pytest.fixture(scope="session")
def other_clip_dir(tmp_path_factory) -> Path:
    """A second tiny CLIP, same shapes, other weights: must not pass for the first."""
    return save_random_clip(tmp_path_factory.mktemp("other-clip"), "tiny", seed=1)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with 2 CPUs for the whole module, or a skip saying why there is none."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'lakead[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'lakead[ray]')")
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - any failure to start means: no cluster here
        pytest.skip(f"a local Ray cluster cannot start here: {type(exc).__name__}: {exc}")
    yield ray
    ray.shutdown()


def texture(rng: np.random.Generator, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A normal synthetic texture: smoothed grey noise (stationary, so every patch of a new
    image has look-alikes in other images)."""
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.normal(0.0, 1.0, size), 1.5)
    n = (n - n.min()) / (n.max() - n.min())
    img = 0.3 + 0.4 * n
    return (np.repeat(img[:, :, None], 3, axis=2) * 255).astype(np.uint8)


def with_defect(img: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """Paste a saturated red-and-green checker patch (foreign to the texture) into a copy."""
    out = img.copy()
    yy, xx = np.mgrid[0:size, 0:size]
    checker = ((yy // 2 + xx // 2) % 2).astype(bool)
    patch = np.zeros((size, size, 3), np.uint8)
    patch[checker] = (255, 0, 0)
    patch[~checker] = (0, 255, 0)
    out[top : top + size, left : left + size] = patch
    return out


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip with the reason."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"real data not present at {data} (see ../shared/data/README.md)")
    return data
