"""An exported model (``lakead export``) through every front end: the Python runtime, ``lakead
predict``, ``lakead-runtime predict``, and the service (listed, read and predicting over HTTP).
Each gives the torch model's scores and decisions on the same images."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from conftest import texture, with_defect
from lakead import LakeDetector
from lakead.export import export_model
from lakead.runtime import ExportedDetector

RTOL = 1e-4


@pytest.fixture(scope="module")
def exported(tiny_backbone, tmp_path_factory):
    """(torch detector, export dir inside a models folder, test images, their PNG folder)."""
    rng = np.random.default_rng(5)
    normal = [texture(rng) for _ in range(6)]
    test = [texture(rng) for _ in range(3)] + [with_defect(texture(rng), 20, 12, 16), texture(rng, (48, 80))]
    root = tmp_path_factory.mktemp("exported")
    det = LakeDetector(tiny_backbone, device="cpu", batch_size=4, layer=3).fit(normal, "widget")
    out = export_model(det, root / "models" / "widget-onnx")
    folder = root / "test"
    folder.mkdir()
    for i, a in enumerate(test):
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    return det, out, test, folder


def _scores_csv(path) -> dict[str, tuple[float, str]]:
    with open(path, newline="") as f:
        return {r["path"].rsplit("/", 1)[-1]: (float(r["score"]), r["anomalous"]) for r in csv.DictReader(f)}


def _expected(det, test) -> tuple[np.ndarray, np.ndarray, float]:
    """The torch model's scores, and a threshold between two of them with its decisions (both
    ways, so that equal decisions mean something)."""
    scores = det.predict_arrays(test).scores
    s = np.sort(scores)
    mid = float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
    return scores, scores > mid, mid


def test_python_runtime(exported):
    det, out, test, _ = exported
    scores, anomalous, mid = _expected(det, test)
    pred = ExportedDetector.load(out).predict_arrays(test, threshold=mid)
    np.testing.assert_allclose(pred.scores, scores, rtol=RTOL)
    np.testing.assert_array_equal(pred.anomalous, anomalous)


@pytest.mark.parametrize("front", ["lakead", "lakead-runtime"])
def test_command_lines(exported, tmp_path, front):
    det, out, test, folder = exported
    scores, anomalous, mid = _expected(det, test)
    args = ["predict", str(out), str(folder), "--out", str(tmp_path / "r"), "--threshold", str(mid)]
    if front == "lakead":
        from typer.testing import CliRunner

        from lakead.cli import app

        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
    else:
        from lakead.runtime_cli import main

        assert main(args) == 0
    rows = _scores_csv(tmp_path / "r" / "scores.csv")
    got = [rows[f"{i:02d}.png"] for i in range(len(test))]
    np.testing.assert_allclose([s for s, _ in got], scores, rtol=RTOL)
    assert [a.lower() in ("1", "true") for _, a in got] == list(anomalous)


def test_service_lists_reads_and_predicts(exported, tiny_clip_dir):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from lakead.serve import create_app

    det, out, test, _ = exported
    scores, anomalous, mid = _expected(det, test)
    with TestClient(create_app(out.parent, backbone=str(tiny_clip_dir), device="cpu")) as client:
        listed = client.get("/models").json()
        assert [m["id"] for m in listed["models"]] == ["widget-onnx"] and "damaged" not in listed
        info = client.get("/models/widget-onnx")
        assert info.status_code == 200 and "exported graph" in info.json()["warnings"][0]
        files = []
        for i, a in enumerate(test):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            files.append(("images", (f"t{i}.png", buf.getvalue(), "image/png")))
        r = client.post("/models/widget-onnx/predict", files=files, data={"threshold": str(mid)})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
    np.testing.assert_allclose([x["score"] for x in res], scores, rtol=RTOL)
    assert [x["anomalous"] for x in res] == list(anomalous)
    assert [(x["height"], x["width"]) for x in res] == [a.shape[:2] for a in test]
