"""`lakead predict --ray` on a local two-worker Ray cluster gives the single-process results."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import texture
from lakead import LakeDetector
from lakead.batch import SCORES_FILE, predict_to_dir
from lakead.cli import app
from lakead.errors import LakeadError
from test_batch import make_images, partial_copy

OPTS = dict(k=8, layer=2, batch_size=4)


@pytest.fixture(scope="module")
def model_dir(tiny_backbone, tmp_path_factory):
    rng = np.random.default_rng(3)
    det = LakeDetector(tiny_backbone, **OPTS).fit([texture(rng) for _ in range(6)], "tile")
    return det.save(tmp_path_factory.mktemp("model") / "tile")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = make_images(tmp_path_factory.mktemp("images"), 30, per_folder=10)
    (root / "part001" / "broken.png").write_text("not an image")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "part002" / "tiny.png")  # smaller than a patch
    return root


@pytest.fixture(scope="module")
def reference(model_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    summary = predict_to_dir(LakeDetector.load(model_dir), [images], out, maps="npy")
    assert (summary.scored, summary.failed) == (30, 2)
    return out


@pytest.mark.slow
def test_ray_run_writes_the_single_process_results(ray_cluster, model_dir, images, reference, tmp_path):
    """Through the command line, with 2 workers: the same scores.csv, errors.csv and maps, byte for byte."""
    out = tmp_path / "ray"
    r = CliRunner().invoke(app, ["predict", str(model_dir), str(images), "--out", str(out), "--maps", "npy",
                                 "--ray", "--ray-workers", "2"])
    assert r.exit_code == 1, r.output  # two unreadable inputs
    assert "2 input(s) could not be read" in r.stderr and "smaller than one 8x8 patch" in r.stderr
    assert (out / SCORES_FILE).read_bytes() == (reference / SCORES_FILE).read_bytes()
    assert (out / "errors.csv").read_bytes() == (reference / "errors.csv").read_bytes()
    maps = sorted(p.relative_to(reference) for p in reference.rglob("*.npy"))
    assert len(maps) == 30 and maps == sorted(p.relative_to(out) for p in out.rglob("*.npy"))
    for rel in maps:
        assert np.array_equal(np.load(out / rel), np.load(reference / rel)), rel


@pytest.mark.slow
def test_ray_run_resumes_after_a_torn_line(ray_cluster, model_dir, images, reference, tmp_path):
    from lakead.distributed import predict_on_ray

    data = (reference / SCORES_FILE).read_bytes()
    keep = data.index(b"\n", len(data) // 2) + 9  # half the rows and a torn one
    out = tmp_path / "ray"
    partial_copy(reference, out, keep)
    summary = predict_on_ray(model_dir, [images], out, workers=2, maps="none", resume=True)
    assert summary.skipped + summary.scored == 30 and summary.skipped == data[:keep].count(b"\n") - 1
    assert (out / SCORES_FILE).read_bytes() == data


def test_missing_ray_gives_the_install_command(monkeypatch, model_dir, images, tmp_path):
    from lakead.distributed import predict_on_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(LakeadError, match=r"pip install 'lakead\[ray\]'"):
        predict_on_ray(model_dir, [images], tmp_path / "out")
