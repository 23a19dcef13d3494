"""What the outputs look like (issue 25, item 7): the overlay's banner on a small image, the
console tables when piped, -q, the evaluation report's words, lakead info's paths, the demo's
hint for a dataset folder. The web cards are checked in tests/test_serve_browser.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from _synthetic import write_category
from conftest import texture
from lakead.cli import app
from lakead.viz import annotate, verdict_lines

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(2)
    for i in range(5):
        Image.fromarray(texture(rng)).save(root / f"{i:03d}.png")
    return root


def test_the_banner_leaves_a_small_image_visible():
    """On a 219 px image the score, decision and threshold wrap onto lines in the left part of
    the image, instead of one line across all of it."""
    w = 219
    image = annotate(np.full((w, w, 3), 128, np.uint8), None, verdict_lines(1.2345, 1.0511, True, False), 0.5, 1.3,
                     anomalous=True)
    banner = np.all(image == (180, 0, 0), axis=2)  # the banner's red
    cols, rows = np.flatnonzero(banner.any(axis=0)), np.flatnonzero(banner.any(axis=1))
    assert cols.size and cols.max() < 0.6 * w, cols.max()
    assert rows.max() < 0.25 * w
    assert verdict_lines(1.2345, 1.0511, True, True) == ["score 1.234", "NOT THIS PRODUCT", "(image threshold 1.051)"]


def test_quiet_fit_prints_no_table(good, tiny_clip_dir, tmp_path):
    args = ("fit", good, "-c", "tile", "--backbone", tiny_clip_dir, "--layer", "2")
    quiet = invoke("-q", *args, "-o", tmp_path / "q")
    loud = invoke(*args, "-o", tmp_path / "l")
    assert quiet.exit_code == loud.exit_code == 0, quiet.output
    assert quiet.stdout == "" and "model written to" in loud.stdout


def test_info_piped_shows_whole_paths(good, tiny_clip_dir, tmp_path):
    """lakead info | cat: the backbone path whole, not cut to the 80 columns of a terminal."""
    deep = tmp_path / ("a_folder_with_a_rather_long_name_" * 3) / "backbone"
    shutil.copytree(tiny_clip_dir, deep)  # a copy: the model records a link's target
    assert invoke("-q", "fit", good, "-c", "tile", "-o", tmp_path / "m", "--backbone", deep, "--layer", "2").exit_code == 0
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    r = subprocess.run([sys.executable, "-c", "from lakead.cli import app; app()", "info", str(tmp_path / "m")],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(str(deep)) > 80 and str(deep) in r.stdout and "…" not in r.stdout, r.stdout


@pytest.fixture(scope="module")
def no_text_eval(tiny_clip_dir, tmp_path_factory):
    """lakead eval with the text probe off and k left to its default, stdout piped (CliRunner)."""
    root = tmp_path_factory.mktemp("present")
    name = "a_category_with_a_long_name_x"
    write_category(root / "data", name, n_train=4, n_good=2, defects={"crack": 2})
    r = invoke("eval", root / "data", "--out", root / "rep", "--backbone", tiny_clip_dir, "--layer", "2", "--shots", "4",
               "--no-text", "--no-figures", env={"COLUMNS": None, "LINES": None})
    assert r.exit_code == 0, r.output
    return r, root / "rep", name


def test_the_eval_table_is_whole_when_piped(no_text_eval):
    r, _, name = no_text_eval
    rows = [line for line in r.stdout.splitlines() if name in line or "mean" in line]
    assert len(rows) == 2, r.stdout
    for line in rows:
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        assert len(cells) == 8 and all(re.fullmatch(r"\d+\.\d|n/a", c) for c in cells[1:]), line  # "55.3", not "55."


def test_the_report_says_what_ran(no_text_eval):
    _, rep, _ = no_text_eval
    text = (rep / "report.md").read_text()
    assert "text probe, fused" not in text and "text probe off" in text
    k = json.loads((rep / "metrics.json").read_text())["categories"][0]["k"]
    assert isinstance(k, int) and k >= 1
    assert f"k: {k} (default)" in text and "k: None" not in text
    assert "scope check finds out of scope: those flags add recall" in text  # why recall can exceed the oracle's


def test_demo_on_a_dataset_folder_names_its_categories(tmp_path):
    write_category(tmp_path / "mpdd", "metal_plate", n_train=1, n_good=1, defects={})
    r = invoke("demo", tmp_path / "mpdd", "--out", tmp_path / "o")
    assert r.exit_code == 1
    assert f"lakead demo {tmp_path / 'mpdd' / 'metal_plate'}" in r.stderr
    r = invoke("demo", tmp_path, "--out", tmp_path / "o")  # two levels up
    assert f"lakead demo {tmp_path / 'mpdd' / 'metal_plate'}" in r.stderr
