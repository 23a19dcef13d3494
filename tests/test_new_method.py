"""A new method is one module plus one registry line: the example of docs/ARCHITECTURE.md
(tests/_example_method.py, mean distance), registered, goes through the library (build, fit,
predict with a budget, regions, save, load_detector), the command line (fit, predict with
--false-alarm-rate and --masks, info, eval, export or its refusal) and the service (create,
list, predict with a budget), like the methods lakead ships."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from _example_method import MeanDistanceConfig, MeanDistanceDetector
from conftest import texture, with_defect
from lakead import methods
from lakead.api import Detector, Runtime
from lakead.cli import app


@pytest.fixture
def registered():
    m = methods.register(methods.Method("mean-distance", MeanDistanceDetector,
                                        "distance to the average normal patch (the ARCHITECTURE.md example)"))
    yield m
    methods.unregister("mean-distance")


def test_example_method_keeps_the_contract(registered, tiny_backbone, tmp_path):
    rng = np.random.default_rng(0)
    normals = [texture(rng, (40, 40)) for _ in range(6)]
    images = [texture(rng, (40, 56)), with_defect(texture(rng, (48, 48)), 16, 16, 16)]
    det = methods.get_method("mean-distance").build(MeanDistanceConfig(layer=2), tiny_backbone, Runtime(batch_size=3)).fit(
        normals, "tile")
    assert isinstance(det, Detector)
    pred = det.predict(images)
    assert [m.shape for m in pred.maps] == [(40, 56), (48, 48)]
    assert pred.scores[1] > pred.scores[0]  # the planted defect
    np.testing.assert_array_equal(pred.anomalous, pred.scores > det.threshold_)
    assert det.threshold_rule_ in ("conformal", "exponential") and pred.pixel_threshold is not None  # levels from the leave-one-out scores
    loose = det.predict(images, false_alarm_rate=0.5)  # another budget, no refit
    assert loose.threshold <= pred.threshold and det.thresholds(0.5).image == loose.threshold
    loaded = methods.load_detector(det.save(tmp_path / "m"), backbone=tiny_backbone)
    assert isinstance(loaded, MeanDistanceDetector) and loaded.fingerprint() == det.fingerprint()
    np.testing.assert_array_equal(loaded.predict(images).scores, pred.scores)
    with pytest.raises(Exception, match="unknown option"):
        MeanDistanceDetector(tiny_backbone, k=3)  # LAKE's options are not this method's


def test_learned_attributes_never_mask_errors(registered, tiny_backbone):
    det = MeanDistanceDetector(tiny_backbone, layer=2)
    with pytest.raises(Exception, match="not fitted"):
        det.threshold_
    assert isinstance(type(det).__dict__.get("mean_"), property)  # a real property, not __getattr__
    with pytest.raises(AttributeError):
        det.threshold_ = 1.0


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "good").mkdir()
    (tmp_path / "test").mkdir()
    for i in range(6):
        Image.fromarray(texture(rng, (48, 48))).save(tmp_path / "good" / f"{i}.png")
    Image.fromarray(texture(rng, (48, 48))).save(tmp_path / "test" / "ok.png")
    Image.fromarray(with_defect(texture(rng, (48, 48)), 12, 12, 20)).save(tmp_path / "test" / "bad.png")
    return tmp_path


def test_example_method_through_the_command_line(registered, tiny_clip_dir, folder, tmp_path):
    run = CliRunner()
    r = run.invoke(app, ["fit", str(folder / "good"), "--method", "mean-distance", "--class-name", "tile",
                         "--backbone", str(tiny_clip_dir), "--layer", "2", "--image-size", "32",
                         "--out", str(tmp_path / "m")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "lakead.json").read_text())["method"] == "mean-distance"
    r = run.invoke(app, ["predict", str(tmp_path / "m"), str(folder / "test"), "--out", str(tmp_path / "p"),
                         "--false-alarm-rate", "0.4", "--masks"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "p" / "scores.csv")))
    assert len(rows) == 2
    assert (tmp_path / "p" / "regions.csv").is_file()
    flagged = [row for row in rows if row["anomalous"] in ("1", "True", "true")]
    assert all((tmp_path / "p" / "masks").glob("*.png")) if flagged else True
    r = run.invoke(app, ["info", str(tmp_path / "m")], catch_exceptions=False)
    assert r.exit_code == 0 and "mean-distance" in r.output and "k_rule" not in r.output, r.output
    r = run.invoke(app, ["export", str(tmp_path / "m"), "--out", str(tmp_path / "e")], catch_exceptions=False)
    assert r.exit_code in (0, 1) and "Traceback" not in r.output  # exported, or refused in one line
    if r.exit_code == 1:
        assert "mean-distance" in r.output and not (tmp_path / "e").exists()


def test_example_method_through_the_service(registered, tiny_clip_dir, folder, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lakead.serve.app import create_app

    client = TestClient(create_app(tmp_path / "store", backbone=str(tiny_clip_dir)))
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted((folder / "good").glob("*.png"))]
    r = client.post("/models", data={"class_name": "tile", "method": "mean-distance", "layer": "2", "image_size": "32"},
                    files=files)
    assert r.status_code in (200, 201), r.text
    model = r.json()
    assert model["method"] == "mean-distance" and "k" not in model
    listed = client.get("/models").json()
    assert "damaged" not in listed and any(m["id"] == model["id"] for m in listed["models"])
    test = [("images", ("bad.png", (folder / "test" / "bad.png").read_bytes(), "image/png"))]
    r = client.post(f"/models/{model['id']}/predict", data={"false_alarm_rate": "0.4"}, files=test)
    assert r.status_code == 200, r.text
