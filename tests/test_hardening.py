"""Issue 14, library and command line: each failure of the adversarial test, reproduced.

Ghostscript never runs (1), output names unique per input (7), symlink loops (8), a killed
model replacement recovers (9), write errors as one message (11), ``--threshold nan`` (12),
control characters in class names (17), ``--out`` inside the input folder (18), the same
folder given twice (19), model file permissions (20).
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import texture
from lakead.api import read_model_meta
from lakead.batch import ERRORS_FILE, SCORES_FILE, predict_to_dir
from lakead.cli import app
from lakead.errors import ImageLoadError, LakeadError
from lakead import fileio
from lakead.fileio import FILE_MODE, atomic_directory
from lakead.images import list_images, load_image
from test_batch import detector, make_images, model_dir  # noqa: F401 - fixtures

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def flat(text: str) -> str:
    return " ".join(text.split())


def rows(out: Path) -> list[dict[str, str]]:
    with (out / SCORES_FILE).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def save_png(path: Path, seed: int, size=(40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(texture(np.random.default_rng(seed), size)).save(path)
    return path


# -- 1: Ghostscript ------------------------------------------------------------------------

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 16 16
%%EndComments
newpath 0 0 moveto 16 16 lineto stroke
showpage
%%EOF
"""


@pytest.fixture
def fake_gs(tmp_path, monkeypatch) -> Path:
    """A ``gs`` on PATH that records being called (and fails); returns the record's path."""
    from PIL import EpsImagePlugin

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "gs-called"
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> '{called}'\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # look for gs again, on this PATH
    monkeypatch.setattr(EpsImagePlugin, "gs_windows_binary", None)
    return called


def test_eps_is_not_an_image_and_ghostscript_never_runs(fake_gs, detector, tmp_path):  # noqa: F811
    from lakead.data import read_mask

    folder = tmp_path / "in"
    save_png(folder / "good.png", 1)
    (folder / "x.png").write_bytes(EPS)
    (folder / "y.eps").write_bytes(EPS)
    for f in (folder / "x.png", folder / "y.eps"):
        with pytest.raises(ImageLoadError, match="not an image"):
            load_image(f)
    with pytest.raises(LakeadError):
        read_mask(folder / "x.png")
    out = tmp_path / "out"
    summary = predict_to_dir(detector, [folder, folder / "y.eps"], out, maps="none")
    assert (summary.scored, summary.failed) == (1, 2)
    errors = (out / ERRORS_FILE).read_text()
    assert "x.png" in errors and "y.eps" in errors and "not an image" in errors
    assert not fake_gs.exists(), "gs was called"


# -- 7: output names -------------------------------------------------------------------------


def test_output_maps_are_unique_per_input(detector, tmp_path):  # noqa: F811
    from lakead.batch import OutputNames

    folder = tmp_path / "in"
    save_png(folder / "a.png", 1, (40, 40))
    Image.fromarray(texture(np.random.default_rng(2), (48, 80))).save(folder / "a.jpg")
    out = tmp_path / "out"
    summary = predict_to_dir(detector, [folder], out, maps="png,npy")
    assert summary.scored == 2
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["a.jpg.npy", "a.png.npy"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.jpg.png", "a.png.png"]
    assert np.load(out / "maps" / "a.jpg.npy").shape == (48, 80)
    assert np.load(out / "maps" / "a.png.npy").shape == (40, 40)
    again = predict_to_dir(detector, [folder], out, maps="png,npy", resume=True)
    assert (again.scored, again.skipped) == (0, 2)
    assert len(list((out / "maps").iterdir())) == 2
    # names that differ only in case get a suffix, so that a case-insensitive file system keeps both
    names = OutputNames(tmp_path)
    got = [names(tmp_path / n) for n in ("A.png", "B.png", "a.png", "sub/x.png", "b.png")]
    assert got[:2] == ["A.png", "B.png"] and got[3] == os.path.join("sub", "x.png")
    assert len({g.casefold() for g in got}) == 5
    assert got[2].startswith("a.png~") and got[4].startswith("b.png~")
    second = OutputNames(tmp_path)
    assert [second(tmp_path / n) for n in ("A.png", "B.png", "a.png", "sub/x.png", "b.png")] == got  # stable on resume


# -- 8: symlink loops -------------------------------------------------------------------------


def looped_folder(root: Path) -> Path:
    save_png(root / "0.png", 1)
    save_png(root / "sub" / "1.png", 2)
    os.symlink("..", root / "sub" / "up")
    os.symlink(".", root / "a")
    os.symlink(".", root / "b")
    return root


def test_symlink_loops_are_followed_once(tmp_path, caplog):
    root = looped_folder(tmp_path / "loop")
    script = "import sys; from lakead.images import list_images; print(len(list_images(sys.argv[1])))"
    try:
        done = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("listing a folder with two symlink loops did not finish")
    assert done.returncode == 0 and done.stdout.strip() == "2", done.stderr
    with caplog.at_level(logging.WARNING, logger="lakead"):
        got = list_images(root)
    assert [p.relative_to(root).as_posix() for p in got] == ["0.png", "sub/1.png"]
    assert "already listed" in caplog.text


def test_predict_and_fit_on_a_looped_folder_count_each_image_once(detector, tiny_clip_dir, tmp_path):  # noqa: F811
    root = tmp_path / "loop"
    save_png(root / "0.png", 1)
    save_png(root / "1.png", 2)
    save_png(root / "sub" / "2.png", 3)
    os.symlink("..", root / "sub" / "up")
    summary = predict_to_dir(detector, [root], tmp_path / "out", maps="none")
    assert summary.scored == 3
    r = invoke("fit", root, "-c", "tile", "--out", tmp_path / "m", "--backbone", tiny_clip_dir, "--layer", "2", "--k", "8")
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "m" / "lakead.json").read_text())["support"]) == 3


# -- 9: a killed replacement ------------------------------------------------------------------

KILL = textwrap.dedent("""
    import os, shutil, sys, types
    pkg = types.ModuleType("lakead")
    pkg.__path__ = [sys.argv[4]]  # the package without its __init__ (no torch import)
    sys.modules["lakead"] = pkg
    from lakead import fileio
    target, step, exchange = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    calls = [0]
    def dying(fn):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == step:
                os._exit(9)  # as kill -9: no handler, no cleanup
            return fn(*args, **kwargs)
        return wrapped
    if hasattr(fileio, "_exchange") and not exchange:
        fileio._exchange = lambda a, b: False
    for mod, name in ((os, "replace"), (os, "rename"), (shutil, "rmtree"), (fileio, "_exchange")):
        if hasattr(mod, name):
            setattr(mod, name, dying(getattr(mod, name)))
    with fileio.atomic_directory(target) as tmp:
        (tmp / "lakead.json").write_text(open(os.path.join(target, "lakead.json")).read().replace('"old"', '"new"'))
    print("finished")
""")


PACKAGE = str(Path(fileio.__file__).parent)


def write_model(path: Path, class_name: str) -> None:
    with atomic_directory(path) as tmp:
        doc = {"format": "lakead-model", "format_version": 2, "method": "lake", "config": {}, "class_name": class_name}
        (tmp / "lakead.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_a_killed_replacement_never_loses_the_model(tmp_path, exchange):
    finished = False
    for step in range(1, 6):
        target = tmp_path / f"m{step}" / "M"
        write_model(target, "old")
        done = subprocess.run([sys.executable, "-c", KILL, str(target), str(step), "1" if exchange else "0", PACKAGE],
                              capture_output=True, text=True, timeout=120)
        finished = finished or "finished" in done.stdout
        assert done.returncode in (0, 9), done.stderr
        if not target.exists():  # killed between the two renames of the fallback
            assert not exchange, "the exchange never leaves the target missing"
            # the next write puts the old one back before replacing it ...
            copy = tmp_path / f"copy{step}"
            shutil.copytree(target.parent, copy, symlinks=True)
            write_model(copy / "M", "newer")
            assert read_model_meta(copy / "M")["class_name"] == "newer"
            assert not [p for p in copy.iterdir() if ".old" in p.name]
            # ... and so does the next load
        # the next load finds a complete model, old or new
        assert read_model_meta(target)["class_name"] in ("old", "new")
        # and the next write replaces it cleanly
        write_model(target, "newer")
        assert read_model_meta(target)["class_name"] == "newer"
        assert not [p for p in target.parent.iterdir() if ".old" in p.name]
    assert finished  # the last step is past the end: the swap completed


# -- 11: write errors ---------------------------------------------------------------------------


def one_error(r) -> str:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.output
    return lines[0]


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("few"), 3)


def test_fit_write_errors_are_one_message(tiny_clip_dir, few, tmp_path, monkeypatch):
    fit = ["fit", few, "-c", "tile", "--backbone", tiny_clip_dir, "--layer", "2", "--k", "8"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_error(invoke(*fit, "--out", afile))
    assert str(afile) in line and "not a directory" in line
    line = one_error(invoke(*fit, "--out", afile / "m"))
    assert str(afile) in line
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    line = one_error(invoke(*fit, "--out", tmp_path / "m"))
    assert str(tmp_path / "m") in line and "No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing half-written


def test_predict_and_explain_write_errors_are_one_message(model_dir, few, tmp_path, monkeypatch):  # noqa: F811
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_error(invoke("predict", model_dir, few, "--out", afile / "out"))
    assert str(afile) in line
    line = one_error(invoke("explain", model_dir, few, "--out", afile / "report"))
    assert str(afile) in line

    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    line = one_error(invoke("predict", model_dir, few, "--out", tmp_path / "out"))
    assert "No space left on device" in line and str(tmp_path / "out") in line
    monkeypatch.setattr(os, "fsync", real_fsync)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_read_only_output_is_one_message(model_dir, few, tmp_path):  # noqa: F811
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = one_error(invoke("predict", model_dir, few, "--out", ro / "out"))
        assert str(ro) in line and "ermission" in line
    finally:
        ro.chmod(0o755)


# -- 12: --threshold nan --------------------------------------------------------------------


def test_predict_refuses_a_nan_threshold(model_dir, few, detector, tmp_path):  # noqa: F811
    r = invoke("predict", model_dir, few, "--out", tmp_path / "out", "--threshold", "nan")
    assert r.exit_code != 0 and "threshold" in flat(r.output)
    assert not (tmp_path / "out").exists()
    with pytest.raises(LakeadError, match="threshold"):
        predict_to_dir(detector, [few], tmp_path / "out2", threshold=float("nan"))


# -- 17: control characters in class names -----------------------------------------------------


def test_info_escapes_control_characters_and_fit_refuses_them(model_dir, few, tiny_clip_dir, tmp_path):  # noqa: F811
    evil = tmp_path / "evil"
    shutil.copytree(model_dir, evil)
    meta = json.loads((evil / "lakead.json").read_text())
    meta["class_name"] = "tile\x1b[2J\x1b]0;pwned\x07[bold]x"
    (evil / "lakead.json").write_text(json.dumps(meta))
    r = invoke("info", evil)
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output
    assert "tile\\x1b[2J" in r.output and "[bold]x" in r.output
    r = invoke("fit", few, "-c", "tile\x1b[31m", "--out", tmp_path / "m", "--backbone", tiny_clip_dir,
               "--layer", "2", "--k", "8")
    assert r.exit_code != 0 and "control character" in flat(r.output) and "\x1b" not in r.output
    assert not (tmp_path / "m").exists()


# -- 18: --out inside the input folder --------------------------------------------------------


def test_out_inside_the_input_folder_is_not_scored(detector, tmp_path):  # noqa: F811
    root = make_images(tmp_path / "in", 4)
    out = root / "results"
    first = predict_to_dir(detector, [root], out)
    assert first.scored == 4
    again = predict_to_dir(detector, [root], out, resume=True)
    assert (again.scored, again.skipped) == (0, 4)
    fresh = predict_to_dir(detector, [root], out, overwrite=True)
    assert fresh.scored == 4
    assert all("results" not in r["path"] for r in rows(out))


# -- 19: the same input twice --------------------------------------------------------------------


def test_inputs_are_deduplicated_by_real_path(detector, tmp_path, caplog):  # noqa: F811
    root = make_images(tmp_path / "in", 4, per_folder=2)
    os.symlink(root, tmp_path / "alias")
    one = root / "part000" / "00000.png"
    with caplog.at_level(logging.WARNING, logger="lakead"):
        for given in ([root, root], [root, tmp_path / "alias"], [root, root / "part001"], [one, root, one]):
            got = list_images(given)
            assert len(got) == 4 and len({p.resolve() for p in got}) == 4, given
    assert "already listed" in caplog.text
    summary = predict_to_dir(detector, [root, root], tmp_path / "out", maps="none")
    assert summary.scored == 4
    assert len(rows(tmp_path / "out")) == 4


# -- 20: model file permissions ------------------------------------------------------------------


def test_model_files_have_the_usual_permissions(model_dir):  # noqa: F811
    for name in ("lakead.json", "tensors.safetensors"):
        assert stat.S_IMODE(os.stat(model_dir / name).st_mode) == FILE_MODE, name
