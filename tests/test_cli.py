"""The fit and predict commands end to end on the tiny CLIP, and their error messages; the
model options every command shares (made from the configuration's fields)."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from _synthetic import write_category
from conftest import texture, with_defect
from lakead.cli import app
from lakead.methods.lake import LakeConfig
from lakead.methods import METHODS

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(5)
    (root / "good").mkdir()
    for i in range(6):
        Image.fromarray(texture(rng)).save(root / "good" / f"{i:03d}.png")
    for sub in ("ok", "bad"):
        (root / "test" / sub).mkdir(parents=True)
    Image.fromarray(texture(rng)).save(root / "test" / "ok" / "000.png")
    Image.fromarray(texture(rng, (48, 80))).save(root / "test" / "ok" / "001.jpg")
    Image.fromarray(with_defect(texture(rng), 24, 32, 16)).save(root / "test" / "bad" / "000.png")
    return root


@pytest.fixture(scope="module")
def model(dataset, tiny_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tile"
    r = invoke("fit", dataset / "good", "--class-name", "tile", "--out", out, "--backbone", tiny_clip_dir,
               "--layer", "2", "--k", "8", "--image-size", "64", "--shots", "5")
    assert r.exit_code == 0, r.output
    return out


def test_fit_writes_a_model_and_reports(model, dataset):
    meta = json.loads((model / "lakead.json").read_text())
    assert meta["config"]["k"] == 8 and meta["layer"] == 2 and meta["image_size"] == 64
    assert len(meta["support"]) == 5 and meta["support_rule"] == "first 5 of 6 images sorted by name"
    assert meta["support"][0].endswith("good/000.png")
    r = invoke("info", model)
    assert r.exit_code == 0 and "tile" in r.output and "threshold" in r.output
    facts = table_rows(r.output)
    assert facts["method"] == "lake" and facts["support_rule"] == "first 5 of 6 images sorted by name"
    assert facts["layer"] == "2" and facts["k"] == "8" and float(facts["threshold"]) == pytest.approx(meta["threshold"], rel=1e-3)


def table_rows(output: str) -> dict[str, str]:
    """The rows of a printed two-column table (``lakead info``)."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def test_info_reads_a_format_1_model_without_its_backbone():
    r = invoke("info", Path(__file__).parent / "regression" / "model_v1")
    assert r.exit_code == 0, r.output
    facts = table_rows(r.output)
    assert facts["method"] == "lake" and facts["support_rule"] == "8 images as given" and facts["k"] == "8"


def test_fit_with_seeded_shots(dataset, tiny_clip_dir, tmp_path):
    r = invoke("fit", dataset / "good", "-c", "tile", "-o", tmp_path / "m", "--backbone", tiny_clip_dir,
               "--layer", "2", "--k", "4", "--shots", "3", "--seed", "7", "--no-text")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "m" / "lakead.json").read_text())
    assert meta["support_rule"] == "3 of 6 images sampled with seed 7" and meta["semantic_layer"] is None


def test_fit_and_predict_with_several_blocks(dataset, tiny_clip_dir, tmp_path):
    """--layer 1,3 on CLIP: both blocks' channels (32 + 32) on one grid; predict reads the same blocks."""
    r = invoke("fit", dataset / "good", "-c", "tile", "-o", tmp_path / "m", "--backbone", tiny_clip_dir,
               "--layer", "1,3", "--k", "12")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "m" / "lakead.json").read_text())
    assert meta["layer"] == [1, 3] and meta["config"]["layer"] == [1, 3] and meta["width"] == 64 and meta["k"] == 12
    r = invoke("predict", tmp_path / "m", dataset / "test", "--out", tmp_path / "out", "--maps", "none")
    assert r.exit_code == 0, r.output
    assert len(list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))) == 3


def test_predict_writes_scores_overlays_and_maps(model, dataset, tmp_path):
    out = tmp_path / "out"
    r = invoke("predict", model, dataset / "test", "--out", out, "--maps", "png,npy")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [row["path"].split("test/")[1] for row in rows] == ["bad/000.png", "ok/000.png", "ok/001.jpg"]
    assert set(rows[0]) == {"path", "score", "visual", "semantic", "anomalous", "out_of_scope"}
    scores = {row["path"].split("test/")[1]: float(row["score"]) for row in rows}
    assert scores["bad/000.png"] > max(scores["ok/000.png"], scores["ok/001.jpg"])
    for name, size in (("bad/000.png", (64, 64)), ("ok/000.png", (64, 64)), ("ok/001.jpg", (48, 80))):
        amap = np.load(out / "maps" / f"{name}.npy")
        assert amap.shape == size and amap.dtype == np.float32
        assert Image.open(out / "overlays" / f"{name}.png").size == (size[1], size[0])
    assert not (out / "errors.csv").exists()


def test_predict_lists_unreadable_inputs_and_scores_the_rest(model, dataset, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "broken.png").write_text("not an image")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(inputs / "small.png")
    Image.fromarray(texture(np.random.default_rng(0))).save(inputs / "fine.png")
    out = tmp_path / "out"
    r = invoke("predict", model, inputs, "--out", out)
    assert r.exit_code == 1
    assert "broken.png" in r.stderr and "not an image" in r.stderr and "2 input(s) could not be read" in r.stderr
    errors = list(csv.DictReader((out / "errors.csv").open()))
    assert {e["path"].rsplit("/", 1)[1]: e["error"] for e in errors} == {
        "broken.png": "not an image, or an image format Pillow cannot read",
        "small.png": "image is 4x4 pixels, smaller than one 8x8 patch",
    }
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [row["path"].rsplit("/", 1)[1] for row in rows] == ["fine.png"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--k", "999"], "k=999 is larger than the width of block 2 (32 channels)"),
        (["--layer", "7"], "layer 7 is out of range: this CLIP has blocks 1..4"),
        (["--image-size", "50"], "image_size 50 must be a positive multiple of the patch size 8"),
        (["--lam", "-1"], "lam must be a finite number >= 0"),
        (["--outlier-contamination", "0.9"], "outlier_contamination must be 'auto' or a fraction in (0, 0.5]"),
    ],
)
def test_fit_bad_options(dataset, tiny_clip_dir, tmp_path, extra, message):
    out = tmp_path / "m"
    base = ["--layer", "2", "--k", "8"]
    r = invoke("fit", dataset / "good", "-c", "tile", "-o", out, "--backbone", tiny_clip_dir, *base, *extra)
    assert r.exit_code == 1 and message in " ".join(r.stderr.split())
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_fit_bad_inputs(dataset, tiny_clip_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke("fit", empty, "-c", "tile", "-o", tmp_path / "m", "--backbone", tiny_clip_dir)
    assert r.exit_code == 1 and "no images found" in r.stderr and "empty" in r.stderr
    r = invoke("fit", tmp_path / "missing", "-c", "tile", "-o", tmp_path / "m", "--backbone", tiny_clip_dir)
    assert r.exit_code == 1 and "no such file or directory" in r.stderr
    r = invoke("fit", dataset / "good", "-c", "", "-o", tmp_path / "m", "--backbone", tiny_clip_dir, "--layer", "2")
    assert r.exit_code == 1 and "class_name must be a non-empty string" in r.stderr
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_text("x")
    r = invoke("fit", junk, "-c", "tile", "-o", tmp_path / "m", "--backbone", tiny_clip_dir, "--layer", "2")
    assert r.exit_code == 1 and "no readable support image" in r.stderr and "a.png" in r.stderr
    r = invoke("fit", dataset / "good", "-c", "tile", "-o", tmp_path / "m", "--backbone", tmp_path / "nothing")
    assert r.exit_code == 1 and "save_pretrained" in r.stderr and "Hub" in r.stderr
    r = invoke("fit", dataset / "good", "-c", "tile", "-o", tmp_path / "m", "--bogus-option", "1")
    assert r.exit_code == 2 and "No such option" in r.stderr
    assert not (tmp_path / "m").exists()


def test_predict_bad_model_dir(dataset, tmp_path, model):
    r = invoke("predict", tmp_path / "nope", dataset / "test", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "no such model directory" in r.stderr
    meta = json.loads((model / "lakead.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    (old / "lakead.json").write_text(json.dumps({**meta, "format_version": 0}))
    r = invoke("predict", old, dataset / "test", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "format version 0" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [[], ["fit"], ["predict"], ["info"], ["explain"], ["eval"], ["ablate"], ["baselines"],
                                     ["serve"], ["download-backbone"]])
def test_help(command):
    r = invoke(*command, "--help")
    assert r.exit_code == 0 and "Usage" in r.output


# -- the model options: one per configuration field, the same on every command ---------------

MODEL_COMMANDS = ("fit", "eval", "ablate", "baselines")


def plain(text: str) -> str:
    """Printed text with the frame of typer's error panel removed, on one line."""
    return " ".join(text.replace("│", " ").split())


def _params(command: str) -> dict:
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}


@pytest.mark.parametrize("field", dataclasses.fields(LakeConfig), ids=lambda f: f.name)
def test_every_config_field_is_an_option_of_every_model_command(field):
    for command in MODEL_COMMANDS:
        params = _params(command)
        assert field.name in params, (command, field.name)
        p = params[field.name]
        if field.name == "use_text":
            assert p.opts == ["--text"] and p.secondary_opts == ["--no-text"]
        elif field.type == "bool" or isinstance(field.default, bool):
            assert p.opts == ["--" + field.name.replace("_", "-")] and p.secondary_opts
        else:
            assert p.opts == ["--" + field.name.replace("_", "-")], (command, p.opts)
        if field.name != "seed":  # the commands declare --seed themselves: it also draws the shots
            assert " ".join(field.metadata["help"].split()[:4]) in " ".join(p.help.split()), (command, field.name)
        if command in ("fit", "eval") and field.name != "seed":
            assert p.default == field.default, (command, field.name, p.default)


@pytest.mark.parametrize("method", sorted({m.config_class.__name__: m for m in METHODS.values()}.values(), key=lambda m: m.name),
                         ids=lambda m: m.config_class.__name__)
def test_shared_options_are_declared_once_for_every_method(method):
    """backbone, image_size and the decision options mean the same in every method: the default
    and help of lakead.fields.SHARED_OPTIONS, LAKE's type, and the same check."""
    from lakead.errors import ConfigError
    from lakead.fields import SHARED_OPTIONS

    lake = {f.name: f for f in dataclasses.fields(LakeConfig)}
    own = [f for f in dataclasses.fields(method.config_class) if f.name in SHARED_OPTIONS]
    assert {f.name for f in own} >= {"false_alarm_rate", "threshold_rule", "threshold", "threshold_sigmas"}
    for f in own:
        assert (f.default, f.metadata["help"]) == SHARED_OPTIONS[f.name] and f.type == lake[f.name].type, f.name
    for name, bad, message in (("false_alarm_rate", 1.0, r"false_alarm_rate must be a number in \(0, 1\)"),
                               ("threshold_sigmas", -1.0, "threshold_sigmas must be a finite number >= 0"),
                               ("threshold", float("nan"), "threshold must be a number"),
                               ("threshold_rule", "median", "threshold_rule must be one of")):
        with pytest.raises(ConfigError, match=message):
            method.config_class(**{name: bad}).validate()


def test_runtime_and_method_options():
    for command in (*MODEL_COMMANDS, "predict", "explain", "serve"):
        assert {"device", "batch_size", "precision"} <= set(_params(command)), command
    for command in ("info", "download-backbone"):
        assert not {"device", "batch_size", "precision"} & set(_params(command)), command
    assert _params("eval")["method"].default == "lake"
    assert "--method" in _params("baselines")["methods"].opts
    for name in ("k", "lam", "layer", "selection", "score_norm"):
        assert _params("ablate")[name].metavar.endswith(",..."), name
    assert "'+' joins several blocks" in " ".join(_params("ablate")["layer"].help.split())


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_a_bad_choice_is_a_usage_error(command, tmp_path):
    where = [tmp_path, "-c", "tile"] if command == "fit" else [tmp_path]
    r = invoke(command, *where, "--out", tmp_path / "o", "--selection", "best")
    assert r.exit_code == 2
    flat = plain(r.stderr)
    assert "--selection" in flat and "'best' is not one of top, random, bottom, all" in flat
    r = invoke(command, *where, "--out", tmp_path / "o", "--k", "many")
    assert r.exit_code == 2 and "expected an integer or 'auto'" in plain(r.stderr)
    r = invoke(command, *where, "--out", tmp_path / "o", "--precision", "half")
    assert r.exit_code == 2 and "'half' is not one of float32, bfloat16" in plain(r.stderr)
    assert not (tmp_path / "o").exists()


def test_bad_method_is_a_usage_error(tmp_path):
    r = invoke("eval", tmp_path, "--out", tmp_path / "o", "--method", "magic")
    assert r.exit_code == 2 and f"is not one of {', '.join(METHODS)}" in plain(r.stderr)
    r = invoke("baselines", tmp_path, "--out", tmp_path / "o", "--methods", "lake,magic")
    assert r.exit_code == 2 and "'magic' is not one of" in plain(r.stderr)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    write_category(root, "tile", n_train=5, n_good=2, defects={"crack": 2}, seed=3)
    return root


def test_eval_takes_every_fit_option(eval_data, tiny_clip_dir, tmp_path):
    """k auto (refused by eval before), the outlier filter, the threshold rule, the map source
    and the run's precision: the same options as fit."""
    out = tmp_path / "r"
    r = invoke("eval", eval_data, "--out", out, "--backbone", tiny_clip_dir, "--layer", "2", "--k", "auto",
               "--image-size", "64", "--shots", "4", "--filter-outliers", "--threshold-sigmas", "2",
               "--map-source", "semantic", "--no-text", "--text", "--precision", "float32", "--device", "cpu",
               "--batch-size", "3", "--no-figures", "--examples", "0")
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "metrics.json").read_text())
    cfg = doc["settings"]["config"]
    assert cfg["k"] == "auto" and cfg["filter_outliers"] is True and cfg["threshold_sigmas"] == 2
    assert cfg["map_source"] == "semantic" and cfg["use_text"] is True and cfg["layer"] == 2
    assert doc["settings"]["runtime"]["batch_size"] == 3
    cmd = doc["settings"]["command"]
    assert "--k auto" in cmd and "--filter-outliers" in cmd and "--map-source semantic" in cmd
    assert "--text" not in cmd.split() and "--no-text" not in cmd  # the default, given twice: left out


def test_eval_method_and_no_text_in_the_command_line(eval_data, tiny_clip_dir, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(eval_data / "tile", data / "tile")
    out = tmp_path / "r"
    r = invoke("eval", data, "--out", out, "--backbone", tiny_clip_dir, "--layer", "2", "--k", "4", "--image-size", "64",
               "--shots", "3", "--first", "--method", "visual", "--no-text", "--no-figures", "--examples", "0")
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["method"] == "visual" and settings["shot_seed"] is None
    assert "--no-text" in settings["command"] and "--method visual" in settings["command"]


def test_error_messages_are_printed_verbatim(tmp_path):
    """Brackets in paths are not taken for rich markup."""
    missing = tmp_path / "[bold]data[/]"
    r = invoke("fit", missing, "-c", "tile", "-o", tmp_path / "m")
    assert r.exit_code == 1 and "[bold]data[/]: no such file or directory" in r.stderr
