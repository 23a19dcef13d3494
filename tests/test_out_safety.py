"""``--out`` never deletes what lakead did not write (issue 25, High): every command that writes
a directory replaces an existing ``--out`` only when it holds nothing but an earlier output of
the same kind (:mod:`lakead.outputs`); a folder with other files, an input folder and the source
model are refused with one message, and left exactly as they were."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from _synthetic import write_category
from conftest import texture
from lakead import LakeDetector
from lakead.cli import app
from lakead.errors import LakeadError
from lakead.fileio import atomic_directory
from lakead.outputs import (
    EVALUATION,
    EXPORT,
    MODEL,
    REPORT,
    RESULTS,
    OutputRefused,
    check_output,
    output_directory,
    owned_by,
)

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def flat(text: str) -> str:
    return " ".join(text.split())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what must not change."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(r, *words: str) -> str:
    text = flat(r.output)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in text, text
    return text


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("normal")
    rng = np.random.default_rng(7)
    for i in range(4):
        Image.fromarray(texture(rng)).save(root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def model(images, tiny_backbone, tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    det = LakeDetector(tiny_backbone, k=8, layer=2).fit([texture(rng) for _ in range(4)], "tile")
    return det.save(tmp_path_factory.mktemp("model") / "tile")


@pytest.fixture
def precious(tmp_path) -> Path:
    """A folder of the user's: a note and an image in a sub-folder."""
    root = tmp_path / "precious"
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "sub" / "img.png")
    return root


def fit_args(images, tiny_clip_dir, out):
    return ["fit", images, "-c", "tile", "--out", out, "--backbone", tiny_clip_dir, "--layer", "2", "--k", "8"]


# -- the policy ----------------------------------------------------------------------------------


def write_fake(path: Path, kind, doc: dict, extra: tuple[str, ...] = ()) -> None:
    path.mkdir(parents=True)
    (path / kind.marker).write_text(json.dumps(doc))
    for name in extra:
        (path / name).write_text("x")


def test_only_the_same_kind_of_lakead_output_is_replaced(tmp_path):
    check_output(tmp_path / "new", MODEL)  # missing: fine
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", MODEL)  # empty: fine
    write_fake(tmp_path / "m", MODEL, {"format": "lakead-model"}, ("tensors.safetensors",))
    assert owned_by(tmp_path / "m") is MODEL
    check_output(tmp_path / "m", MODEL)  # an earlier model: replaced
    with pytest.raises(OutputRefused, match=r"holds a lakead model, not a lakead export"):
        check_output(tmp_path / "m", EXPORT)
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(OutputRefused, match=r"holds a lakead model and files lakead did not write \(notes.txt\)"):
        check_output(tmp_path / "m", MODEL)
    # a marker that is not lakead's (another format) does not make a folder lakead's
    write_fake(tmp_path / "f", MODEL, {"format": "something-else"}, ("tensors.safetensors",))
    assert owned_by(tmp_path / "f") is None
    with pytest.raises(OutputRefused, match=r"holds files lakead did not write \(lakead.json, tensors.safetensors\)"):
        check_output(tmp_path / "f", MODEL)


def test_the_message_names_a_few_files_and_counts_the_rest(tmp_path):
    for i in range(7):
        (tmp_path / f"f{i}.txt").write_text("x")
    with pytest.raises(OutputRefused) as e:
        check_output(tmp_path, REPORT)
    msg = str(e.value)
    assert str(tmp_path) in msg and "f0.txt, f1.txt, f2.txt, f3.txt and 3 more" in msg and "\n" not in msg


def test_inputs_and_links(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(OutputRefused, match="is the input"):
        check_output(src, MODEL, inputs=[src])
    with pytest.raises(OutputRefused, match="is inside the input"):
        check_output(src / "m", MODEL, inputs=[src])
    with pytest.raises(OutputRefused, match="holds the input"):
        check_output(tmp_path, MODEL, inputs=[src])
    os.symlink(src, tmp_path / "link")
    with pytest.raises(OutputRefused, match="is the input"):  # by real path
        check_output(tmp_path / "link", MODEL, inputs=[src])
    with pytest.raises(OutputRefused, match="symbolic link"):
        check_output(tmp_path / "link", MODEL)


def test_files_that_appear_during_the_work_stop_the_swap(tmp_path):
    target = tmp_path / "m"
    write_fake(target, MODEL, {"format": "lakead-model", "v": "old"})
    with pytest.raises(OutputRefused, match="notes.txt"):
        with output_directory(target, MODEL) as tmp:
            (tmp / "lakead.json").write_text(json.dumps({"format": "lakead-model", "v": "new"}))
            (target / "notes.txt").write_text("written meanwhile")
    assert json.loads((target / "lakead.json").read_text())["v"] == "old"
    assert (target / "notes.txt").read_text() == "written meanwhile"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left


def test_atomic_directory_calls_the_check_before_the_swap(tmp_path):
    calls = []
    with atomic_directory(tmp_path / "d", before_replace=lambda: calls.append((tmp_path / "d").exists())) as tmp:
        (tmp / "a").write_text("x")
    assert calls == [False] and (tmp_path / "d" / "a").exists()


# -- fit -----------------------------------------------------------------------------------------


def test_fit_refuses_a_folder_with_other_files(images, tiny_clip_dir, precious):
    before = snapshot(precious)
    text = refused(invoke(*fit_args(images, tiny_clip_dir, precious)), str(precious), "notes.txt", "sub")
    assert "lakead did not write" in text
    assert snapshot(precious) == before


def test_fit_refuses_its_image_folder_as_out(images, tiny_clip_dir):
    before = snapshot(images)
    refused(invoke(*fit_args(images, tiny_clip_dir, images)), "is the input")
    refused(invoke(*fit_args(images, tiny_clip_dir, images / "model")), "is inside the input")
    assert snapshot(images) == before


def test_fit_replaces_its_own_model_and_nothing_else(images, tiny_clip_dir, model, tmp_path):
    out = tmp_path / "m"
    assert invoke(*fit_args(images, tiny_clip_dir, out)).exit_code == 0
    first = json.loads((out / "lakead.json").read_text())["fitted_at"]
    r = invoke(*fit_args(images, tiny_clip_dir, out), "--k", "4")
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "lakead.json").read_text())
    assert meta["config"]["k"] == 4 and sorted(p.name for p in out.iterdir()) == ["lakead.json", "tensors.safetensors"]
    assert meta["fitted_at"] >= first
    (out / "notes.txt").write_text("mine")
    refused(invoke(*fit_args(images, tiny_clip_dir, out)), "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


def test_save_refuses_a_folder_with_other_files(model, precious):
    before = snapshot(precious)
    with pytest.raises(OutputRefused, match="notes.txt"):
        LakeDetector.load(model).save(precious)
    assert snapshot(precious) == before


# -- export --------------------------------------------------------------------------------------


def test_export_refuses_the_model_and_other_files(model, precious, tmp_path):
    pytest.importorskip("onnx")
    before = snapshot(model)
    refused(invoke("export", model, "--out", model), "is the input")
    refused(invoke("export", model, "--out", model / "onnx"), "is inside the input")
    refused(invoke("export", model, "--out", model.parent), "holds the input")
    assert snapshot(model) == before
    mine = snapshot(precious)
    refused(invoke("export", model, "--out", precious), "notes.txt")
    assert snapshot(precious) == mine
    other = tmp_path / "other_model"  # a lakead model is not an export
    LakeDetector.load(model).save(other)
    refused(invoke("export", model, "--out", other), "holds a lakead model, not a lakead export")


def test_export_replaces_an_earlier_export(model, tmp_path):
    pytest.importorskip("onnx")
    out = tmp_path / "exp"
    assert invoke("export", model, "--out", out).exit_code == 0
    assert owned_by(out) is EXPORT
    r = invoke("export", model, "--out", out, "--batch", "2")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "lakead-export.json").read_text())["batch"] == 2


# -- explain -------------------------------------------------------------------------------------


def test_explain_refuses_other_files_the_model_and_the_images(model, images, precious, tmp_path):
    mine, before = snapshot(precious), snapshot(model)
    refused(invoke("explain", model, "--out", precious), "notes.txt")
    refused(invoke("explain", model, "--out", model), "is the input")
    refused(invoke("explain", model, images, "--out", images / "report"), "is inside the input")
    assert snapshot(precious) == mine and snapshot(model) == before
    out = tmp_path / "report"
    assert invoke("explain", model, "--out", out).exit_code == 0
    assert owned_by(out) is REPORT
    assert invoke("explain", model, "--out", out).exit_code == 0  # its own report: replaced


# -- eval, ablate, baselines ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    write_category(root, "tile", n_train=4, n_good=2, defects={"crack": 2}, seed=3)
    return root


EVAL_OPTS = ["--layer", "2", "--k", "8", "--image-size", "64", "--shots", "3", "--no-figures", "--examples", "0"]


def test_eval_refuses_other_files_and_the_data_folder(data, tiny_clip_dir, precious, tmp_path):
    mine, before = snapshot(precious), snapshot(data)
    refused(invoke("eval", data, "--out", precious, "--backbone", tiny_clip_dir, *EVAL_OPTS), "notes.txt")
    refused(invoke("eval", data, "--out", data / "runs", "--backbone", tiny_clip_dir, *EVAL_OPTS), "is inside the input")
    assert snapshot(precious) == mine and snapshot(data) == before
    out = tmp_path / "ev"
    for _ in range(2):  # its own evaluation: replaced
        r = invoke("eval", data, "--out", out, "--backbone", tiny_clip_dir, *EVAL_OPTS)
        assert r.exit_code == 0, r.output
    assert owned_by(out) is EVALUATION
    r = invoke("ablate", data, "--out", out, "--backbone", tiny_clip_dir, "--layer", "2", "--k", "4,8",
               "--image-size", "64", "--shots", "3")
    refused(r, "holds a lakead evaluation, not a lakead ablation")


def test_ablate_and_baselines_refuse_other_files(data, tiny_clip_dir, precious):
    mine = snapshot(precious)
    refused(invoke("ablate", data, "--out", precious, "--backbone", tiny_clip_dir, "--layer", "2", "--k", "4,8"),
            "notes.txt")
    refused(invoke("baselines", data, "--out", precious, "--backbone", tiny_clip_dir), "notes.txt")
    assert snapshot(precious) == mine


# -- predict, demo, download-backbone ------------------------------------------------------------


def test_predict_overwrite_removes_only_its_own_results(model, images, tmp_path):
    out = tmp_path / "res"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "truth.png").write_text("the user's ground truth")
    r = invoke("predict", model, images, "--out", out, "--overwrite")
    refused(r, "masks", "no run.json")
    assert (out / "masks" / "truth.png").exists()
    (out / "masks" / "truth.png").unlink()
    (out / "masks").rmdir()
    (out / "notes.txt").write_text("mine")
    assert invoke("predict", model, images, "--out", out).exit_code == 0  # beside other files: fine
    assert owned_by(out) is RESULTS
    assert invoke("predict", model, images, "--out", out, "--overwrite").exit_code == 0  # its own results
    assert (out / "notes.txt").read_text() == "mine"


def test_predict_refuses_the_model_and_the_image_folder(model, images):
    before, imgs = snapshot(model), snapshot(images)
    refused(invoke("predict", model, images, "--out", model), "is the input")
    refused(invoke("predict", model, images, "--out", model / "results"), "is inside the input")
    refused(invoke("predict", model, images, "--out", images), "is the input")
    assert snapshot(model) == before and snapshot(images) == imgs


def test_demo_refuses_its_category_and_foreign_files(data, tiny_clip_dir, tmp_path):
    cat = data / "tile"
    before = snapshot(data)
    refused(invoke("demo", cat, "--out", cat, "--backbone", tiny_clip_dir), "is the input")
    refused(invoke("demo", cat, "--out", cat / "demo", "--backbone", tiny_clip_dir), "is inside the input")
    out = tmp_path / "demo"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("mine")
    refused(invoke("demo", cat, "--out", out, "--backbone", tiny_clip_dir), "notes.txt")
    assert snapshot(data) == before and (out / "model" / "notes.txt").read_text() == "mine"


def test_download_backbone_refuses_other_files_before_any_download(precious, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mine = snapshot(precious)
    refused(invoke("download-backbone", "openai/clip-vit-base-patch32", precious), "notes.txt")
    assert snapshot(precious) == mine


def test_the_kinds_agree_with_their_writers():
    from lakead import api, rundir, runtime

    assert (MODEL.marker, MODEL.recognise({"format": api.FORMAT_NAME})) == (api.CONFIG_FILE, True)
    assert api.TENSORS_FILE in MODEL.names
    assert (EXPORT.marker, EXPORT.recognise({"format": runtime.EXPORT_FORMAT})) == (runtime.EXPORT_FILE, True)
    assert (RESULTS.marker, RESULTS.recognise({"format": rundir.RUN_FORMAT})) == (rundir.RUN_FILE, True)
    assert {rundir.SCORES_FILE, rundir.ERRORS_FILE, rundir.REGIONS_FILE, *rundir.RESULT_DIRS} <= set(RESULTS.names)
    assert issubclass(OutputRefused, LakeadError)
