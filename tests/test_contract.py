"""The contract every detector keeps, on every backbone adapter and every registered method.

For each (backbone, method): the detector is a :class:`lakead.api.Detector`; ``predict`` returns
one score, visual and semantic part, decision and map per image, maps at each image's own size,
nothing NaN; decisions are ``scores > threshold`` with a threshold learned from the normal
images alone; scores do not depend on the batch size or on the order of the images; a save /
load round trip gives identical outputs and the same fingerprint; a model saved on one device
setting loads with another. The multi-block layer is part of the grid.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from _onnx_models import save_tiny_onnx
from conftest import texture, with_defect
from lakead import LakeConfig
from lakead.api import Detector, Prediction, Runtime
from lakead.backbones import load_backbone
from lakead.methods import METHODS, get_method, load_detector
from lakead.testing import save_random_backbone

#: adapter -> options that fit the tiny test model of that adapter
ADAPTERS = {
    "clip": dict(k=6, layer=2, image_size=32),
    "clip-multiblock": dict(k=6, layer=[1, 3], image_size=32),
    "onnx": dict(k=6, layer="block2_quantized"),
    "onnx-multiblock": dict(k=6, layer=["feat1", "block2_quantized"]),
    "dinov2": dict(k=6, layer=2, image_size=32),
    "dinov2registers": dict(k=6, layer=2, image_size=48),
    "dinov3": dict(k=6, layer=3, image_size=32),
    "siglip": dict(k=6, layer=2, image_size=48),
    "siglip-multiblock": dict(k=6, layer=[1, 3], image_size=32),
    "siglip2": dict(k=6, layer=2, image_size=32),
}
#: adapter -> the tiny random model of its family (lakead.testing preset)
FAMILY_PRESETS = {"dinov2": "tiny-dinov2", "dinov2registers": "tiny-dinov2-registers", "dinov3": "tiny-dinov3",
                  "siglip": "tiny-siglip", "siglip2": "tiny-siglip2"}
#: adapter -> (backbone kind, has a text tower) of its test model: which methods apply is known
#: when the tests are collected (the fixture checks the loaded model says the same), so that no
#: case is generated only to be skipped.
FAMILIES = {"clip": ("clip", True), "onnx": ("onnx", False), "dinov2": ("dinov2", False),
            "dinov2registers": ("dinov2", False), "dinov3": ("dinov3", False), "siglip": ("siglip", True),
            "siglip2": ("siglip2", True)}


@pytest.fixture(scope="module")
def backbones(tiny_backbone, tmp_path_factory):
    onnx = load_backbone("onnx:" + str(save_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")))
    root = tmp_path_factory.mktemp("families")
    families = {a: load_backbone(str(save_random_backbone(root / p, p))) for a, p in FAMILY_PRESETS.items()}
    return {"clip": tiny_backbone, "onnx": onnx, **families}


@pytest.fixture(scope="module")
def normals():
    rng = np.random.default_rng(3)
    return [texture(rng, (40, 48)) for _ in range(5)]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(4)
    return [texture(rng, (36, 52)), with_defect(texture(rng, (64, 40)), 20, 10, 14), texture(rng, (33, 33))]


def _applies(adapter: str, method: str) -> bool:
    """Whether a method runs on an adapter's test model (a text tower, a backbone family)."""
    kind, has_text = FAMILIES[adapter.split("-")[0]]
    m = get_method(method)
    return (has_text or not m.needs_text) and (not m.backbone_kinds or kind in m.backbone_kinds)


CASES = [(a, m) for a in ADAPTERS for m in METHODS if _applies(a, m)]


def test_every_method_and_every_adapter_has_cases(backbones):
    assert {a for a, _ in CASES} == set(ADAPTERS) and {m for _, m in CASES} == set(METHODS)
    assert {a: (bb.info.kind, bb.has_text) for a, bb in backbones.items()} == FAMILIES  # the declared families are true


@pytest.fixture(scope="module")
def fitted(backbones, normals):
    cache = {}

    def get(adapter: str, method: str):
        key = (adapter, method)
        if key not in cache:
            bb = backbones[adapter.split("-")[0]]
            cfg = LakeConfig(backbone=bb.info.source, **ADAPTERS[adapter])
            cache[key] = get_method(method).build(cfg, bb, Runtime(batch_size=2)).fit(normals, "tile")
        return cache[key]

    return get


@pytest.mark.parametrize("adapter,method", CASES)
def test_prediction_contract(fitted, images, adapter, method):
    det = fitted(adapter, method)
    assert isinstance(det, Detector) and det.is_fitted
    pred = det.predict(images)
    assert isinstance(pred, Prediction) and len(pred) == len(images)
    for a in (pred.scores, pred.visual, pred.semantic):
        assert a.shape == (len(images),) and a.dtype == np.float32 and np.isfinite(a).all()
    assert [m.shape for m in pred.maps] == [im.shape[:2] for im in images]
    assert all(m.dtype == np.float32 and np.isfinite(m).all() for m in pred.maps)
    assert pred.threshold == det.threshold_
    assert pred.out_of_scope.shape == (len(images),) and pred.out_of_scope.dtype == bool
    np.testing.assert_array_equal(pred.anomalous, (pred.scores > det.threshold_) | pred.out_of_scope)
    score = getattr(pred, get_method(method).score)
    assert np.isfinite(score).all()


@pytest.mark.parametrize("adapter,method", CASES)
def test_threshold_is_learned_from_the_normal_images_alone(fitted, backbones, normals, adapter, method):
    det = fitted(adapter, method)
    assert np.isfinite(det.threshold_) and det.loo_scores_.shape == (len(normals),)
    assert det.threshold_rule_ in ("conformal", "exponential") and det.false_alarm_rate_ == det.config.false_alarm_rate
    again = get_method(method).build(det.config, backbones[adapter.split("-")[0]], Runtime(batch_size=5)).fit(normals, "tile")
    assert again.threshold_ == pytest.approx(det.threshold_, rel=1e-5)


@pytest.mark.parametrize("adapter,method", CASES)
def test_batch_size_and_order_do_not_change_scores(fitted, images, adapter, method):
    det = fitted(adapter, method)
    ref = det.predict(images)
    old = det.runtime
    try:
        det.runtime = old.replace(batch_size=1)
        one = det.predict(images)
        det.runtime = old.replace(batch_size=3)
        rev = det.predict(images[::-1])
    finally:
        det.runtime = old
    np.testing.assert_allclose(one.scores, ref.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rev.scores[::-1], ref.scores, rtol=1e-5, atol=1e-6)
    for a, b in zip(rev.maps[::-1], ref.maps):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adapter,method", CASES)
def test_save_load_round_trip_is_identical(fitted, backbones, images, adapter, method, tmp_path):
    det = fitted(adapter, method)
    path = det.save(tmp_path / "m")
    meta = json.loads((path / "lakead.json").read_text())
    assert meta["method"] == det.method and not {"device", "batch_size", "precision"} & set(meta["config"])
    loaded = load_detector(path, backbone=backbones[adapter.split("-")[0]], device="cpu", batch_size=3)
    assert type(loaded) is type(det) and loaded.fingerprint() == det.fingerprint()
    a, b = det.predict(images), loaded.predict(images)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.anomalous, b.anomalous)
    assert all(np.array_equal(x, y) for x, y in zip(a.maps, b.maps))
    assert loaded.summary() == det.summary()


def test_a_model_fitted_for_cuda_loads_on_the_cpu(fitted, backbones, tmp_path):
    """Device, batch size and precision are the run's: a format-1 model that recorded
    ``device: cuda`` loads here without any override."""
    det = fitted("clip", "lake")
    path = det.save(tmp_path / "m")
    meta = json.loads((path / "lakead.json").read_text())
    meta["format_version"] = 1
    meta.pop("method")
    meta["config"].update(device="cuda:3", batch_size=64, precision="bfloat16")
    (path / "lakead.json").write_text(json.dumps(meta))
    loaded = load_detector(path, backbone=backbones["clip"])
    assert loaded.runtime == Runtime() and loaded.fingerprint() == det.fingerprint()


def test_bfloat16_runs_on_every_torch_backbone_and_is_refused_on_onnx(backbones, normals, images):
    from lakead import ConfigError, LakeDetector

    for name, bb in backbones.items():
        det = LakeDetector(bb, precision="bfloat16", **ADAPTERS[name])
        if bb.supports_autocast:
            pred = det.fit(normals, "tile").predict(images)
            assert np.isfinite(pred.scores).all()
        else:
            with pytest.raises(ConfigError, match="needs a torch backbone"):
                det.fit(normals, "tile")


def test_several_blocks_are_concatenated_on_the_coarsest_grid(fitted, backbones, normals):
    det = fitted("onnx-multiblock", "all")  # selection all: every channel of both tensors
    assert det.width_ == 8 + 12 and det.grid_ == (16, 16)
    fine = get_method("all").build(LakeConfig(backbone="x", block_grid="finest", **ADAPTERS["onnx-multiblock"]),
                                   backbones["onnx"]).fit(normals, "tile")
    assert fine.width_ == 20 and fine.grid_ == (32, 32)
