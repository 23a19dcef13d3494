"""``lakead demo``, the README's first run: without network it says so and runs end to end on a
tiny random-weight CLIP; with a backbone given it uses that one (issue 15, item 1)."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from _synthetic import write_category
from lakead.backbones import hub
from lakead.cli import app

runner = CliRunner()


def test_demo_offline_runs_end_to_end_on_a_random_tiny_clip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "is_cached", lambda repo: False)
    cat = write_category(tmp_path / "data", "widget", n_train=4, n_good=2, defects={"crack": 2})
    out = tmp_path / "demo"
    r = runner.invoke(app, ["-q", "demo", str(cat), "--out", str(out)], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert "random weights" in r.stderr and "HF_HUB_OFFLINE is set" in r.stderr and "mean nothing" in r.stderr
    rows = list(csv.DictReader((out / "results" / "scores.csv").open()))
    assert len(rows) == 4
    assert sorted(p.name for p in (out / "results" / "overlays" / "crack").iterdir()) == ["000.png.png", "001.png.png"]
    assert (out / "model" / "lakead.json").is_file() and (out / "tiny-clip" / "config.json").is_file()
    assert "image AUROC" in r.stdout and "lakead fit" in r.stdout and "lakead predict" in r.stdout
    again = runner.invoke(app, ["-q", "demo", str(cat), "--out", str(out)])  # an earlier demo's results are replaced
    assert again.exit_code == 0, again.output


def test_demo_with_a_backbone_uses_it_and_says_nothing_about_the_hub(tmp_path, tiny_clip_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cat = write_category(tmp_path / "data", "widget", n_train=3, n_good=1, defects={"crack": 1})
    r = runner.invoke(app, ["-q", "demo", str(cat), "--out", str(tmp_path / "d"), "--backbone", str(tiny_clip_dir),
                            "--k", "4", "--layer", "2"], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert "random weights" not in r.stderr and not (tmp_path / "d" / "tiny-clip").exists()
    cfg = json.loads((tmp_path / "d" / "model" / "lakead.json").read_text())["config"]
    assert (cfg["backbone"], cfg["k"], cfg["layer"]) == (str(tiny_clip_dir), 4, 2)
    assert f"--backbone {tiny_clip_dir} --k 4 --layer 2" in r.stdout  # the fit command that does the same


def test_demo_names_a_folder_that_is_not_a_category(tmp_path):
    r = runner.invoke(app, ["demo", str(tmp_path), "--out", str(tmp_path / "d")], env={"COLUMNS": "300"})
    assert r.exit_code == 1 and "train/good: no such folder" in r.stderr and "MVTec layout" in r.stderr
