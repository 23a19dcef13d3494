"""The fit's forward passes on a local two-worker Ray cluster give the one-process model (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import texture, with_defect
from lakead import LakeDetector
from lakead.cli import app
from lakead.errors import LakeadError
from regression.cases import held_out_images
from test_fit_stream import compare, full_bytes

OPTS = dict(k="auto", layer=[2, 3], image_size=48, batch_size=3, filter_outliers=True, outlier_contamination=0.1)


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

    local = LakeDetector(str(tiny_clip_dir), **OPTS).fit(support, "tile")
    memory = None if passes == "one" else 2 * full_bytes(local, len(support)) - 1
    if memory is not None:
        local = LakeDetector(str(tiny_clip_dir), **OPTS).fit(support, "tile", memory=memory)
    remote = fit_on_ray(LakeDetector(str(tiny_clip_dir), **OPTS), support, "tile", workers=2, memory=memory)
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
        fit_on_ray(LakeDetector(str(tiny_clip_dir), **OPTS), support, "tile", workers=0)
