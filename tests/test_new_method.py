"""A new method is one module plus one registry line: the example of docs/ARCHITECTURE.md
(tests/_example_method.py), registered, goes through build, fit, predict, save and
load_detector like LAKE, and is evaluated by the same harness."""

from __future__ import annotations

import numpy as np
import pytest

from _example_method import NearestConfig, NearestDetector
from conftest import texture, with_defect
from lakead.api import Detector, Runtime
from lakead import methods


@pytest.fixture
def registered(monkeypatch):
    m = methods.Method("nearest", NearestDetector, "full-width nearest neighbour (the ARCHITECTURE.md example)")
    monkeypatch.setitem(methods.METHODS, "nearest", m)
    monkeypatch.setitem(methods.DETECTORS, "nearest", NearestDetector)
    return m


def test_example_method_keeps_the_contract(registered, tiny_backbone, tmp_path):
    rng = np.random.default_rng(0)
    normals = [texture(rng, (40, 40)) for _ in range(4)]
    images = [texture(rng, (40, 56)), with_defect(texture(rng, (48, 48)), 16, 16, 16)]
    det = methods.get_method("nearest").build(NearestConfig(layer=2), tiny_backbone, Runtime(batch_size=3)).fit(normals, "tile")
    assert isinstance(det, Detector)
    pred = det.predict(images)
    assert [m.shape for m in pred.maps] == [(40, 56), (48, 48)]
    assert pred.scores[1] > pred.scores[0]  # the planted defect
    np.testing.assert_array_equal(pred.anomalous, pred.scores > det.threshold_)
    loaded = methods.load_detector(det.save(tmp_path / "m"), backbone=tiny_backbone)
    assert isinstance(loaded, NearestDetector) and loaded.fingerprint() == det.fingerprint()
    np.testing.assert_array_equal(loaded.predict(images).scores, pred.scores)
    with pytest.raises(Exception, match="unknown option"):
        NearestDetector(tiny_backbone, k=3)  # LAKE's options are not this method's
