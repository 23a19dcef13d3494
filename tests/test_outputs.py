"""What predict writes by default, and an output folder that already holds results (issue 15,
item 5): png overlays only unless raw maps are asked for; an earlier run's results are never
replaced silently (``--resume`` goes on with them, ``--overwrite`` replaces them cleanly)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import texture
from lakead import LakeDetector
from lakead.batch import SCORES_FILE, predict_to_dir
from lakead.cli import app
from lakead.errors import LakeadError


@pytest.fixture(scope="module")
def model_dir(tiny_backbone, tmp_path_factory):
    rng = np.random.default_rng(3)
    det = LakeDetector(tiny_backbone, k=8, layer=2).fit([texture(rng) for _ in range(4)], "tile")
    return det.save(tmp_path_factory.mktemp("model") / "tile")


@pytest.fixture(scope="module")
def detector(model_dir):
    return LakeDetector.load(model_dir)


def _images(root, names):
    rng = np.random.default_rng(5)
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(texture(rng, (40, 40))).save(root / name)
    return root


def test_default_maps_are_the_overlays_only(detector, tmp_path):
    images = _images(tmp_path / "in", ["a.png", "b.png"])
    predict_to_dir(detector, [images], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == ["a.png.png", "b.png.png"]
    assert not (tmp_path / "out" / "maps").exists()
    predict_to_dir(detector, [images], tmp_path / "both", maps="png,npy")
    assert np.load(tmp_path / "both" / "maps" / "a.png.npy").shape == (40, 40)


def test_an_earlier_run_is_refused_resumed_or_overwritten(detector, tmp_path):
    first = _images(tmp_path / "first", ["a.png", "b.png", "c.png"])
    out = tmp_path / "out"
    predict_to_dir(detector, [first], out, maps="png,npy", masks=True)
    before = (out / SCORES_FILE).read_bytes()
    (out / "notes.txt").write_text("mine")

    with pytest.raises(LakeadError, match=r"earlier run \(scores.csv\).*--resume.*--overwrite"):
        predict_to_dir(detector, [first], out)
    assert (out / SCORES_FILE).read_bytes() == before  # untouched
    with pytest.raises(LakeadError, match="choose one"):
        predict_to_dir(detector, [first], out, resume=True, overwrite=True)

    assert predict_to_dir(detector, [first], out, maps="png,npy", masks=True, resume=True).skipped == 3

    second = _images(tmp_path / "second", ["z.png"])
    summary = predict_to_dir(detector, [second], out, overwrite=True)
    assert summary.scored == 1
    assert [line.split(",")[0] for line in (out / SCORES_FILE).read_text().splitlines()[1:]] == [str(second / "z.png")]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["z.png.png"]  # the first run's are gone
    assert not (out / "maps").exists() and not (out / "masks").exists() and not (out / "regions.csv").exists()
    assert (out / "notes.txt").read_text() == "mine"  # not a result: left alone


def test_cli_refuses_an_earlier_run_before_loading_the_model(model_dir, tmp_path):
    images = _images(tmp_path / "in", ["a.png"])
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(app, ["-q", "predict", str(model_dir), str(images), "--out", str(out)]).exit_code == 0
    refused = runner.invoke(app, ["-q", "predict", str(model_dir), str(images), "--out", str(out)])
    assert refused.exit_code == 1
    assert "earlier run" in refused.output and "--resume" in refused.output and "--overwrite" in refused.output
    both = runner.invoke(app, ["predict", str(model_dir), str(images), "--out", str(out), "--resume", "--overwrite"])
    assert both.exit_code == 2
    again = runner.invoke(app, ["-q", "predict", str(model_dir), str(images), "--out", str(out), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert not (out / "maps").exists()
