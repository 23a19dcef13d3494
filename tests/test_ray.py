"""On a local two-worker Ray cluster (one per module: it starts once for both): `lakead predict --ray`
gives the single-process results, and the fit's forward passes give the one-process model (issue 16)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import texture, with_defect
from lakead import LakeDetector
from lakead.batch import SCORES_FILE, predict_to_dir
from lakead.cli import app
from lakead.errors import LakeadError
from regression.cases import held_out_images
from test_batch import make_images, partial_copy
from test_fit_stream import compare, full_bytes

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


# -- the fit on Ray --------------------------------------------------------------------------------

FIT_OPTS = dict(k="auto", layer=[2, 3], image_size=48, batch_size=3, filter_outliers=True, outlier_contamination=0.1)


@pytest.fixture(scope="module")
def support(tmp_path_factory):
    root = tmp_path_factory.mktemp("support")
    rng = np.random.default_rng(12)
    images = [texture(rng) for _ in range(10)] + [with_defect(texture(rng), 10, 10, 30)]
    paths = []
    for i, img in enumerate(images):
        paths.append(root / f"{i:02d}.png")
        Image.fromarray(img).save(paths[-1])
    (root / "broken.png").write_text("not an image")
    paths.insert(4, root / "broken.png")
    return [str(p) for p in paths]


@pytest.mark.slow
@pytest.mark.parametrize("passes", ["one", "two"])
def test_fit_on_ray_gives_the_one_process_model(ray_cluster, tiny_backbone, tiny_clip_dir, support, passes):
    from lakead.distributed import fit_on_ray

    local = LakeDetector(str(tiny_clip_dir), **FIT_OPTS).fit(support, "tile")
    memory = None if passes == "one" else 2 * full_bytes(local, len(support)) - 1
    if memory is not None:
        local = LakeDetector(str(tiny_clip_dir), **FIT_OPTS).fit(support, "tile", memory=memory)
    remote = fit_on_ray(LakeDetector(str(tiny_clip_dir), **FIT_OPTS), support, "tile", workers=2, memory=memory)
    assert remote.fit_passes == local.fit_passes and (remote.fit_passes >= 4) == (passes == "two")
    assert local.outliers_ and len(local.skipped_) == 1
    compare(local, remote, held_out_images())
    # the moments were merged in the same order: the variances are the same numbers, not only close
    np.testing.assert_allclose(local.channel_variance_.numpy(), remote.channel_variance_.numpy(), rtol=1e-12, atol=0)


@pytest.mark.slow
def test_fit_command_on_ray(ray_cluster, tiny_clip_dir, support, tmp_path):
    folder = tmp_path / "good"
    folder.mkdir()
    for p in support[:6]:
        if not p.endswith("broken.png"):
            (folder / p.rsplit("/", 1)[1]).write_bytes(open(p, "rb").read())
    args = ["fit", str(folder), "-c", "tile", "--backbone", str(tiny_clip_dir), "--layer", "2", "--k", "6",
            "--image-size", "32", "--gallery-size", "20", "--fit-memory", "8KiB"]
    r1 = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "local")])
    r2 = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "2"])
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output)
    a, b = LakeDetector.load(tmp_path / "local"), LakeDetector.load(tmp_path / "ray")
    assert a.gallery_.shape[0] == 20 and "greedy coreset" in a.gallery_rule_
    compare(a, b, held_out_images())


def test_fit_options_only_with_ray(tiny_clip_dir, tmp_path):
    r = CliRunner().invoke(app, ["fit", str(tmp_path), "-c", "x", "--out", str(tmp_path / "m"), "--ray-workers", "2"])
    assert r.exit_code == 2 and "only used with --ray" in r.output
    r = CliRunner().invoke(app, ["fit", str(tmp_path), "-c", "x", "--out", str(tmp_path / "m"), "--fit-memory", "lots"])
    assert r.exit_code == 2 and "fit memory must be a size" in r.output


def test_fit_on_ray_refuses_zero_workers(tiny_clip_dir, support):
    from lakead.distributed import fit_on_ray

    pytest.importorskip("ray")
    with pytest.raises(LakeadError, match="at least 1"):
        fit_on_ray(LakeDetector(str(tiny_clip_dir), **FIT_OPTS), support, "tile", workers=0)
