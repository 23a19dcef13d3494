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
    r = runner.invoke(app, ["predict", str(model), str(tile / "test"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "scores.csv").open()))
    expected = list_images(tile / "test")
    assert len(rows) == len(expected) == 588
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in expected)
    assert all(np.isfinite(float(r["score"])) for r in rows)
    one = expected[0]
    rel = one.relative_to(tile / "test").with_suffix(".npy")
    from PIL import Image

    with Image.open(one) as im:
        assert np.load(out / "maps" / rel).shape == (im.height, im.width)
