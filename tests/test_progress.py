"""Progress on long work (issue 25, item 4): the fit reports its leave-one-out and scope check,
the export its stages, the command line shows them as rows under the bar (none with -q), and
says what is loading while torch and the backbone load."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from conftest import texture
from lakead.cli import app
from lakead.progress import reporting

runner = CliRunner()


def recorder():
    seen: dict[str, list] = {}

    def listener(what, total):
        seen.setdefault(what, []).append([total, 0])
        return lambda n: seen[what][-1].__setitem__(1, seen[what][-1][1] + n)

    return seen, listener


@pytest.fixture(scope="module")
def normals():
    rng = np.random.default_rng(5)
    return [texture(rng, (48, 48)) for _ in range(5)]


@pytest.mark.parametrize("method", ["lake", "patchcore"])
def test_the_fit_reports_its_leave_one_out_and_scope_check(tiny_backbone, normals, method):
    from lakead import LakeConfig
    from lakead.methods import get_method

    seen, listener = recorder()
    det = get_method(method).build(LakeConfig(backbone="x", k=6, layer=2, image_size=32), tiny_backbone)
    with reporting(listener):
        det.fit(normals, "tile")
    assert seen["leave-one-out"] == [[5, 5]]  # one step of 5 images, all done
    if method == "lake":
        assert seen["scope check"] == [[5, 5]]


def test_the_export_reports_its_stages(tiny_backbone, normals, tmp_path):
    from lakead import LakeDetector
    from lakead.export import export_model

    det = LakeDetector(tiny_backbone, k=6, layer=2, image_size=32).fit(normals, "tile")
    seen, listener = recorder()
    with reporting(listener):
        export_model(det, tmp_path / "x", check=normals[:2])
    assert list(seen) == ["loading the model and its backbone", "tracing the graph (torch.onnx)",
                          "scoring 2 check images with the torch model", "writing the fp32 graph",
                          "checking the fp32 graph against the torch model on 2 images"]
    assert all(runs == [[None, 1]] for runs in seen.values())  # stages of unknown length, each ended


def test_fit_shows_its_steps_and_quiet_shows_none(tiny_clip_dir, tmp_path):
    (tmp_path / "good").mkdir()
    for i in range(5):
        Image.fromarray(texture(np.random.default_rng(i))).save(tmp_path / "good" / f"{i}.png")
    args = ["fit", str(tmp_path / "good"), "-c", "tile", "--backbone", str(tiny_clip_dir), "--layer", "2"]
    loud = runner.invoke(app, [*args, "-o", str(tmp_path / "a")])
    quiet = runner.invoke(app, ["-q", *args, "-o", str(tmp_path / "b")])
    assert loud.exit_code == quiet.exit_code == 0, loud.output
    for row in ("fit ", "leave-one-out ", "scope check "):
        assert row in loud.stderr and row not in quiet.stderr, loud.stderr


def test_loading_says_what_loads(monkeypatch):
    import lakead.cli_common as common

    screen = io.StringIO()
    monkeypatch.setattr(common, "err", Console(file=screen, force_terminal=True, width=100))
    monkeypatch.setitem(common.state, "quiet", False)  # as an earlier command with -q may have left it
    with common.loading("importing torch"):
        time.sleep(0.3)  # the spinner draws a few times a second
    assert "importing torch..." in screen.getvalue()
    screen.truncate(0)
    monkeypatch.setitem(common.state, "quiet", True)
    with common.loading("importing torch"):
        pass
    assert screen.getvalue() == ""
