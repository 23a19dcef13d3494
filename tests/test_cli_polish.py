"""What --help, info and the tables show, and settings kept in a file (issue 15, items 8 and 9):
plain types in --help, -q/-v after the command, serve --backbone names onnx:, info shows the
shots rule, category names whole in the eval table; --config (YAML or TOML) and
--print-config round trips, command-line values over the file's, unknown keys named."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from _synthetic import write_category
from conftest import texture
from lakead.cli import app
from lakead.helpstyle import hoist_global_flags

runner = CliRunner()
COMMANDS = ["", "fit", "predict", "info", "explain", "eval", "ablate", "baselines", "serve", "download-backbone", "tune"]


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(2)
    for i in range(5):
        Image.fromarray(texture(rng)).save(root / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_plain_types(command):
    r = invoke(*command.split(), "--help", env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert re.findall(r"<[a-z][\w\[\], ]*>", r.output) == []  # no <bool>, <int>, <list[Path]>
    if command == "fit":
        assert "PATH..." in r.output and "INTEGER" in r.output and "Usage: lakead fit [OPTIONS] [NORMAL...]" in r.output  # optional: zero-shot WinCLIP fits on a class name


def test_serve_backbone_help_names_onnx():
    r = invoke("serve", "--help", env={"COLUMNS": "200"})
    line = next(line for line in r.output.splitlines() if "--backbone " in line)
    assert "onnx:PATH" in line


def test_global_flags_after_the_command(good, tiny_clip_dir, tmp_path):
    assert hoist_global_flags(["fit", "d", "-v", "--", "-q"], {"fit"}) == ["-v", "fit", "d", "--", "-q"]
    assert hoist_global_flags(["--help"], {"fit"}) == ["--help"]
    loud = invoke("fit", good, "-c", "tile", "-o", tmp_path / "a", "--backbone", tiny_clip_dir, "--layer", "2")
    quiet = invoke("fit", good, "-c", "tile", "-o", tmp_path / "b", "--backbone", tiny_clip_dir, "--layer", "2", "-q")
    assert loud.exit_code == quiet.exit_code == 0, quiet.output
    assert "support set:" in loud.stderr and "support set:" not in quiet.stderr  # the INFO line, gone with -q


def test_info_shows_the_shots_rule(good, tiny_clip_dir, tmp_path):
    for extra, rule in ((["--shots", "3"], "first 3 of 5 images sorted by name"),
                        (["--shots", "3", "--seed", "1"], "3 of 5 images sampled with seed 1"),
                        ([], "all 5 images")):
        model = tmp_path / f"m{len(extra)}"
        assert invoke("-q", "fit", good, "-c", "tile", "-o", model, "--backbone", tiny_clip_dir, "--layer", "2", *extra).exit_code == 0
        r = invoke("info", model, env={"COLUMNS": "200"})
        assert re.search(rf"support_rule\s*│\s*{rule}", r.output), r.output


def test_eval_table_keeps_category_names_whole(tiny_clip_dir, tmp_path):
    name = "a_rather_long_category_name_x"
    write_category(tmp_path / "data", name, n_train=3, n_good=1, defects={"crack": 1})
    r = invoke("-q", "eval", tmp_path / "data", "--out", tmp_path / "rep", "--backbone", tiny_clip_dir, "--layer", "2",
               "--shots", "3", "--no-figures", env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert name in r.output  # on one line, not cut to 'a_rather_lo…'


# -- config files ---------------------------------------------------------------------------------


def test_print_config_round_trips_and_fits(good, tiny_clip_dir, tmp_path):
    printed = invoke("fit", good, "-c", "tile", "-o", tmp_path / "m", "--backbone", tiny_clip_dir, "--k", "5",
                     "--layer", "2", "--no-text", "--false-alarm-rate", "0.1", "--print-config")
    assert printed.exit_code == 0, printed.output
    text = printed.stdout
    assert not (tmp_path / "m").exists()  # printed, not run
    assert "\nk: 5\n" in text and "\nlayer: 2\n" in text and "\ntext: false\n" in text and "\nclass_name: tile\n" in text
    assert "# Number of sensitive neurons kept" in text  # the help as comments
    (tmp_path / "fit.yaml").write_text(text)
    again = invoke("fit", "--config", tmp_path / "fit.yaml", "--print-config")
    assert again.exit_code == 0 and again.stdout == text
    r = invoke("-q", "fit", "--config", tmp_path / "fit.yaml")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "m" / "lakead.json").read_text())["config"]
    assert (cfg["k"], cfg["layer"], cfg["use_text"], cfg["false_alarm_rate"]) == (5, 2, False, 0.1)


def test_command_line_wins_over_the_file_and_toml_reads(tmp_path):
    (tmp_path / "c.toml").write_text('k = 7\nlayer = [2, 3]\ntext = false\nclass-name = "tile"\nout = "m"\nnormal = ["a", "b"]\n')
    r = invoke("fit", "--config", tmp_path / "c.toml", "--k", "9", "--print-config")
    assert r.exit_code == 0, r.output
    assert "\nk: 9\n" in r.stdout and "\nlayer: 2,3\n" in r.stdout and "\ntext: false\n" in r.stdout
    assert "\nnormal:\n- a\n- b\n" in r.stdout
    r = invoke("fit", "--config", tmp_path / "c.toml", "x", "--print-config")  # an argument on the command line wins too
    assert "\nnormal:\n- x\n" in r.stdout


def test_ablate_reads_lists_from_a_file(tmp_path):
    (tmp_path / "grid.yaml").write_text("k: [4, 8]\nlayer: ['2', '2+3']\nshots: '2,3'\n")
    from lakead.configfile import read_config

    assert read_config(tmp_path / "grid.yaml")["k"] == [4, 8]
    r = invoke("ablate", tmp_path / "missing", "--out", tmp_path / "o", "--config", tmp_path / "grid.yaml",
               "--backbone", "onnx:none.onnx")
    assert r.exit_code == 1 and "missing" in r.output  # the file's lists parsed; stopped at the data


@pytest.mark.parametrize("content, suffix, message", [
    ("lamda: 0.2\n", ".yaml", "unknown key 'lamda'; did you mean 'lam'?"),
    ("k: [1, 2\n", ".yaml", "not valid YAML"),
    ("k = \n", ".toml", "not valid TOML"),
    ("- 1\n- 2\n", ".yaml", "expected option: value pairs"),
    ("k: 1\n", ".json", "YAML (.yaml, .yml) or TOML (.toml)"),
])
def test_bad_config_files_are_named(tmp_path, content, suffix, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    r = invoke("eval", tmp_path, "--out", tmp_path / "o", "--config", path, env={"COLUMNS": "300"})
    assert r.exit_code == 2
    flat = " ".join(r.output.replace("│", " ").split())
    assert str(path) in flat and message in flat


def test_missing_config_file(tmp_path):
    r = invoke("ablate", tmp_path, "--out", tmp_path / "o", "--config", tmp_path / "none.yaml", env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "no such file" in r.output
