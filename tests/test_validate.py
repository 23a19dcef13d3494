"""Damaged and tampered model files are refused when they are read (lakead.validate): one
ModelFormatError line naming the file and the field, never a traceback, a huge allocation or a
model that silently calls every image normal (issue 28, items 4, 7 and 8)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import texture
from lakead import LakeDetector
from lakead.errors import ModelFormatError
from lakead.export import export_model
from lakead.runtime import EXPORT_FILE, ExportedDetector
from lakead.validate import load_json


@pytest.fixture(scope="module")
def export_dir(tiny_backbone, tmp_path_factory):
    rng = np.random.default_rng(2)
    det = LakeDetector(tiny_backbone, device="cpu", layer=3).fit([texture(rng) for _ in range(5)], "widget")
    return export_model(det, tmp_path_factory.mktemp("x") / "exported")


def _set(meta: dict, path: str, value) -> None:
    *head, last = path.split(".")
    for key in head:
        meta = meta[key]
    meta[last] = value


#: field -> tampered value -> the words the refusal must contain
TAMPERED = [
    ("decision.threshold", math.nan, "decision.threshold is NaN"),
    ("decision.threshold", math.inf, "decision.threshold is Infinity"),
    ("decision.threshold", -math.inf, "decision.threshold is -Infinity"),
    ("decision.threshold", "high", "decision.threshold must be a finite number"),
    ("decision.scope_threshold", math.nan, "decision.scope_threshold is NaN"),
    ("decision.false_alarm_rate", 1.5, "decision.false_alarm_rate must be in (0, 1)"),
    ("preprocessing.std", [0.2, 0.0, 0.3], "preprocessing.std[1] must be in [0.0001, 10000]"),
    ("preprocessing.std", [0.2, 0.3], "preprocessing.std must be a list of 3 numbers"),
    ("preprocessing.mean", "grey", "preprocessing.mean must be a list of 3 numbers"),
    ("preprocessing.rescale", math.nan, "preprocessing.rescale is NaN"),
    ("preprocessing.rescale", 0, "preprocessing.rescale must be in [1e-06, 10000]"),
    ("preprocessing.mean", [9e37, 0.4, 0.4], "preprocessing.mean[0] must be in [-10000, 10000]"),
    ("preprocessing.resample", 17, "preprocessing.resample must be in [0, 5]"),
    ("preprocessing.image_size", 16000, "preprocessing.image_size must be in [8, 4096]"),
    ("preprocessing.image_size", 0, "preprocessing.image_size must be in [8, 4096]"),
    ("preprocessing.patch_size", 2.5, "preprocessing.patch_size must be a whole number"),
    ("sigma", 1e7, "sigma must be in [0, 32]"),
    ("sigma", -1, "sigma must be in [0, 32]"),
    ("lam", math.nan, "lam is NaN"),
    ("batch", -3, "batch must be in [1, 4096]"),
    ("batch", 2.0, "batch must be a whole number"),
    ("outputs", ["score"], "outputs must list the graph's outputs"),
    ("outputs", "score", "outputs must list the graph's outputs"),
    ("file", "/etc/passwd", "file must be a file name inside the export's directory"),
    ("file", "../other/model.onnx", "file must be a file name inside the export's directory"),
    ("grid", [4, 0], "grid[1] must be in [1, 32]"),
    ("map_range", [2.0, 1.0], "map_range must go from low to high"),
    ("decision", None, "decision must be an object"),
    ("preprocessing", [], "preprocessing must be an object"),
    ("class_name", 3, "class_name must be text"),
]


@pytest.mark.parametrize("field,value,message", TAMPERED, ids=[f"{f}={v!r}" for f, v, _ in TAMPERED])
def test_a_tampered_export_is_refused_at_load(export_dir, tmp_path, field, value, message):
    out = tmp_path / "x"
    out.mkdir()
    for p in export_dir.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    meta = json.loads((out / EXPORT_FILE).read_text())
    _set(meta, field, value)
    (out / EXPORT_FILE).write_text(json.dumps(meta))  # Python writes NaN / Infinity as JSON does not
    with pytest.raises(ModelFormatError, match="lakead-export.json: ") as err:
        ExportedDetector.load(out)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("front", ["lakead", "lakead-runtime"])
def test_an_export_with_a_nan_threshold_is_refused_by_the_command_lines(export_dir, tmp_path, front, capsys):
    """Before: every image called normal, exit 0 (issue 28, item 4)."""
    from PIL import Image

    out = tmp_path / "x"
    out.mkdir()
    for p in export_dir.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    meta = json.loads((out / EXPORT_FILE).read_text())
    meta["decision"]["threshold"] = math.nan
    (out / EXPORT_FILE).write_text(json.dumps(meta))
    Image.fromarray(texture(np.random.default_rng(0))).save(tmp_path / "a.png")
    args = ["predict", str(out), str(tmp_path / "a.png"), "--out", str(tmp_path / "r")]
    if front == "lakead":
        from typer.testing import CliRunner

        from lakead.cli import app

        r = CliRunner().invoke(app, args)
        code, text = r.exit_code, r.output
    else:
        from lakead.runtime_cli import main

        code = main(args)
        text = capsys.readouterr().err
    assert code == 1 and "decision.threshold is NaN" in text and "Traceback" not in text
    assert not (tmp_path / "r" / "scores.csv").exists()


@pytest.mark.parametrize("text,message", [
    ("[" * 200_000 + "]" * 200_000, "nested deeper than Python can read"),
    ('{"a": ' * 40 + "1" + "}" * 40, "nested more than 32 deep"),
    ("1" * 5000, "an integer of 5000 digits"),
    ('{"a": 1, "a": 2}', "the key 'a' appears twice"),
    ('{"a": [1, NaN]}', "a[1] is NaN"),
    ('{"a": {"b": 1e999}}', "a.b is 1e999"),
    ('{"a": -Infinity}', "a is -Infinity"),
    ("{", "cannot be parsed"),
])
def test_strict_json(tmp_path, text, message):
    with pytest.raises(ModelFormatError, match="m.json: ") as err:
        load_json(tmp_path / "m.json", text)
    assert message in str(err.value)
    assert load_json(tmp_path / "m.json", '{"a": [1, 2.5e3, null, "NaN"]}') == {"a": [1, 2500.0, None, "NaN"]}
