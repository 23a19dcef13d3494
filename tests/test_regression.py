"""Same configuration, same inputs: the same numbers as the code before the architecture change.

The expected values were recorded from commit 412c465 by ``python tests/regression/cases.py
record``: scores, their visual and semantic parts, decisions, threshold, neuron indices,
leave-one-out scores, map range and every map, for six configurations on the tiny random CLIP
and the tiny ONNX model. ``model_v1`` is a model directory that code wrote (format 1).
"""

from __future__ import annotations

import numpy as np
import pytest

from _onnx_models import save_tiny_onnx
from lakead import LakeDetector
from lakead.backbones import load_backbone
from regression.cases import CASES, MODEL_V1, OLD_DECISION, RECORD, held_out_images, run_case

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def recorded():
    with np.load(RECORD) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def onnx_backbone(tmp_path_factory):
    return load_backbone("onnx:" + str(save_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")))


def _expected(recorded: dict, case: str) -> dict[str, np.ndarray]:
    return {k.split("/", 1)[1]: v for k, v in recorded.items() if k.startswith(case + "/")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_numbers_as_before(case, recorded, tiny_backbone, onnx_backbone):
    kind, opts = CASES[case]
    det = LakeDetector(tiny_backbone if kind == "clip" else onnx_backbone, **opts, **OLD_DECISION)
    got = run_case(det)
    want = _expected(recorded, case)
    assert sorted(got) == sorted(want)
    np.testing.assert_array_equal(got["neurons"], want["neurons"])
    np.testing.assert_array_equal(got["anomalous"], want["anomalous"])
    for key in sorted(want):
        if key not in ("neurons", "anomalous"):
            np.testing.assert_allclose(np.asarray(got[key], dtype=np.float64), want[key].astype(np.float64), **TOL, err_msg=key)


def test_format_1_model_still_loads_and_predicts_the_same(recorded, tiny_clip_dir):
    det = LakeDetector.load(MODEL_V1, backbone=str(tiny_clip_dir))
    pred = det.predict(held_out_images())
    want = _expected(recorded, "lake")
    np.testing.assert_allclose(pred.scores, want["scores"], **TOL)
    np.testing.assert_allclose(pred.semantic, want["semantic"], **TOL)
    np.testing.assert_array_equal(det.neurons_.numpy(), want["neurons"])
    for i, m in enumerate(pred.maps):
        np.testing.assert_allclose(m, want[f"map{i}"], **TOL)
