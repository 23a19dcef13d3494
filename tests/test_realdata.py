"""Smoke test on real defect images (../shared/data), with the tiny random CLIP saved locally.

Skipped with a reason where ../shared/data is absent.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from lakead.cli import app
from lakead.images import list_images

pytestmark = pytest.mark.realdata


@pytest.mark.slow
def test_fit_and_predict_on_magnetic_tile(shared_data, tiny_clip_dir, tmp_path):
    tile = shared_data / "magnetic_tile" / "tile"
    if not tile.is_dir():
        pytest.skip(f"{tile} is absent")
    runner = CliRunner()
    model = tmp_path / "model"
    r = runner.invoke(app, ["fit", str(tile / "train" / "good"), "--class-name", "magnetic_tile", "--out", str(model),
                            "--backbone", str(tiny_clip_dir), "--layer", "2", "--k", "8", "--shots", "16"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    # the maps as arrays only: rendering 588 overlays (half of this test's time) is checked elsewhere (test_outputs)
    r = runner.invoke(app, ["predict", str(model), str(tile / "test"), "--out", str(out), "--maps", "npy"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "scores.csv").open()))
    expected = list_images(tile / "test")
    assert len(rows) == len(expected) == 588
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in expected)
    assert all(np.isfinite(float(r["score"])) for r in rows)
    one = expected[0]
    rel = f"{one.relative_to(tile / 'test')}.npy"  # the name keeps the image's ending: a.png -> maps/a.png.npy
    from PIL import Image

    with Image.open(one) as im:
        assert np.load(out / "maps" / rel).shape == (im.height, im.width)


@pytest.mark.slow
def test_several_mobilenet_blocks_on_metal_plate(shared_data):
    """365 (32 x 28 x 28, average-pooled 2 x 2) + 426 (96 x 14 x 14), every channel, every training image
    as support: image AUROC 0.965 on the 67 test images (0.917 for 426 alone; docs/BENCHMARKS.md);
    the issue's reference measured 0.973, and this must stay within 0.01 of it."""
    from lakead import LakeDetector
    from lakead.metrics import image_metrics

    plate = shared_data / "mpdd" / "metal_plate"
    model = shared_data.parent / "models" / "mobilenetv2-12-int8.onnx"
    if not plate.is_dir() or not model.is_file():
        pytest.skip("mpdd/metal_plate or the MobileNetV2 model is absent")
    test = list_images([plate / "test"])
    labels = np.array([0 if p.parent.name == "good" else 1 for p in test])
    det = LakeDetector(f"onnx:{model}", layer="365_quantized,426_quantized".split(","), selection="all", use_text=False,
                       batch_size=16).fit(list_images([plate / "train" / "good"]), "metal_plate")
    assert det.width_ == 32 + 96 and det.grid_ == (14, 14)
    auroc = image_metrics(labels, det.predict(test).scores)["auroc"]
    assert auroc >= 0.973 - 0.01
