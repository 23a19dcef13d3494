"""LakeDetector end to end on the tiny random CLIP: fit, predict, save, load, errors."""

from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import texture, with_defect
from lakead import ConfigError, ImageLoadError, LakeadError, LakeDetector, ModelFormatError, NotFittedError, Prediction
from lakead.decision import exponential_threshold
from lakead.ops import anomaly_probability, robust_threshold

OPTS = dict(k=8, layer=2, image_size=64, batch_size=4)


@pytest.fixture(scope="module")
def normals():
    rng = np.random.default_rng(10)
    return [texture(rng) for _ in range(8)]


@pytest.fixture(scope="module")
def fitted(tiny_backbone, normals):
    return LakeDetector(tiny_backbone, **OPTS).fit(normals, "tile")


@pytest.fixture(scope="module")
def tests_imgs():
    rng = np.random.default_rng(11)
    held = [texture(rng) for _ in range(5)]
    return held + [with_defect(texture(rng), 24, 32, 16)]


def test_prediction_contract(fitted, tests_imgs):
    sizes = [(64, 64), (50, 90), (120, 33)]
    rng = np.random.default_rng(1)
    imgs = tests_imgs + [texture(rng, s) for s in sizes]
    p = fitted.predict(imgs)
    assert isinstance(p, Prediction) and len(p) == len(imgs)
    for arr in (p.scores, p.visual, p.semantic):
        assert arr.shape == (len(imgs),) and arr.dtype == np.float32 and np.isfinite(arr).all()
    assert p.anomalous.dtype == np.bool_
    assert [m.shape for m in p.maps] == [im.shape[:2] for im in imgs]
    assert all(m.dtype == np.float32 and np.isfinite(m).all() for m in p.maps)
    assert np.allclose(p.scores, p.visual + 0.1 * p.semantic, atol=1e-6)
    assert np.array_equal(p.anomalous, p.scores > p.threshold)
    assert ((p.semantic >= 0) & (p.semantic <= 1)).all()


def test_planted_defect_scores_highest_and_map_peaks_inside(fitted, tests_imgs):
    p = fitted.predict(tests_imgs)
    assert p.scores[-1] > p.scores[:-1].max()
    assert p.visual[-1] > p.visual[:-1].max()
    y, x = np.unravel_index(p.maps[-1].argmax(), p.maps[-1].shape)
    assert 24 <= y < 40 and 32 <= x < 48  # the pasted patch
    # bilinear upsampling between token centres: the map's peak is at most the visual score
    assert p.visual[-1] * 0.95 <= p.maps[-1].max() <= p.visual[-1] * (1 + 1e-6)


def test_gallery_and_neurons(fitted, normals):
    n_tok = 8 * 8
    assert fitted.gallery_.shape == (len(normals) * n_tok, 8)
    assert fitted.neurons_.tolist() == torch.sort(fitted.channel_variance_, descending=True, stable=True).indices[:8].tolist()
    assert fitted.gallery_image_.tolist() == np.repeat(np.arange(len(normals)), n_tok).tolist()


def test_semantic_is_the_text_probe(fitted, tests_imgs):
    bb = fitted.backbone
    f = bb.extract(bb.preprocessing(tests_imgs, 64), [2], 4)
    text = torch.nn.functional.normalize(bb.text_embeddings(fitted.prompts_), dim=-1)
    want = anomaly_probability(f.joint, text, bb.logit_scale).amax(1).numpy()
    assert np.allclose(fitted.predict(tests_imgs).semantic, want, atol=1e-5)
    assert fitted.prompts_ == ["a photo of a normal tile.", "a photo of an anomalous tile."]


def test_leave_one_out_threshold(fitted, normals):
    assert fitted.loo_scores_.shape == (len(normals),) and np.isfinite(fitted.loo_scores_).all()
    assert np.median(fitted.loo_visual_) == pytest.approx(1.0)  # score_norm="loo"
    # 8 support images: a budget of 0.05 (0.045 for the defect score, beside the scope check) is below
    # 1/(n+1), so the threshold is the exponential tail of the leave-one-out scores (never under the
    # largest), and says so
    assert fitted.threshold_rule_ == "exponential" and fitted.false_alarm_rate_ == 0.05
    want = max(exponential_threshold(fitted.loo_scores_, 0.045), fitted.loo_scores_.max())
    assert fitted.threshold_ == pytest.approx(want, rel=1e-5)
    said = fitted.summary()["threshold_rule"]  # what `lakead info` and the page say
    assert "0.045 of it for the defect score beside the scope check" in said and "exponential tail" in said
    assert "22 support images or more give the split-conformal guarantee" in said  # 1/(22 + 1) <= 0.045
    assert fitted.threshold_ > np.median(fitted.loo_scores_)
    old = LakeDetector(fitted.backbone, **OPTS, threshold_rule="sigmas").fit(normals, "tile")
    assert old.threshold_ == pytest.approx(robust_threshold(old.loo_scores_, 3.0), rel=1e-5)
    # each LOO score is the image scored against the others only: do it by hand for image 0
    others = LakeDetector(fitted.backbone, **OPTS, score_norm="none").fit(normals[1:], "tile")
    others.state_.neurons = fitted.neurons_  # same subspace as the full fit
    others.state_.gallery = fitted.gallery_[64:]
    raw = others.predict([normals[0]]).visual[0]
    assert raw / fitted.visual_scale_ == pytest.approx(fitted.loo_visual_[0], rel=1e-5)


def test_threshold_override(tiny_backbone, normals, tests_imgs):
    det = LakeDetector(tiny_backbone, **OPTS, threshold=0.0).fit(normals, "tile")
    assert det.threshold_ == 0.0 and det.predict(tests_imgs).anomalous.all()
    p = det.predict(tests_imgs, threshold=1e9)
    assert not p.anomalous.any() and p.threshold == 1e9


def test_single_shot_warns_and_never_flags(tiny_backbone, normals, tests_imgs, caplog):
    with caplog.at_level(logging.WARNING, logger="lakead"):
        det = LakeDetector(tiny_backbone, **OPTS).fit(normals[:1], "tile")
    assert "only one support image" in caplog.text
    assert math.isinf(det.threshold_) and not det.predict(tests_imgs).anomalous.any()


def test_input_kinds_agree(fitted, tests_imgs, tmp_path):
    paths = []
    for i, a in enumerate(tests_imgs[:3]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    by_array = fitted.predict(tests_imgs[:3]).scores
    assert np.array_equal(fitted.predict(paths).scores, by_array)
    assert np.array_equal(fitted.predict([str(p) for p in paths]).scores, by_array)
    assert np.array_equal(fitted.predict([Image.open(p) for p in paths]).scores, by_array)
    assert np.array_equal(fitted.predict(tests_imgs[0]).scores, by_array[:1])  # a single image


def test_save_load_round_trip(fitted, tests_imgs, tmp_path):
    out = fitted.save(tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["lakead.json", "tensors.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    meta = json.loads((out / "lakead.json").read_text())
    assert meta["format_version"] == 2 and meta["method"] == "lake" and meta["config"]["k"] == 8 and meta["class_name"] == "tile"
    assert not {"device", "batch_size", "precision"} & set(meta["config"])  # settings of the run, not of the model
    loaded = LakeDetector.load(out)
    a, b = fitted.predict(tests_imgs), loaded.predict(tests_imgs)
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.anomalous, b.anomalous)
    assert all(np.array_equal(x, y) for x, y in zip(a.maps, b.maps))
    assert loaded.threshold_ == fitted.threshold_ and loaded.support_ == fitted.support_
    assert not loaded.backbone.has_text  # the text embeddings were saved; the text tower is not loaded
    assert loaded.fingerprint() == fitted.fingerprint()
    # saving again over it replaces it whole
    fitted.save(out)
    assert LakeDetector.load(out).threshold_ == fitted.threshold_


def test_failed_save_leaves_nothing(fitted, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(LakeadError, match="disk full"):  # one message naming the path and the cause
        fitted.save(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_load_errors(fitted, tmp_path, other_clip_dir):
    with pytest.raises(ModelFormatError, match="no such model directory"):
        LakeDetector.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="not a lakead model directory"):
        LakeDetector.load(tmp_path / "empty")
    model = fitted.save(tmp_path / "m")
    meta = json.loads((model / "lakead.json").read_text())
    old = tmp_path / "old"
    shutil.copytree(model, old)
    (old / "lakead.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelFormatError, match="format version 99.*reads format versions 1, 2: fit the model again"):
        LakeDetector.load(old)
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    (bad / "lakead.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="cannot be parsed"):
        LakeDetector.load(bad)
    with pytest.raises(ModelFormatError, match="fitted with backbone .* use the same model"):
        LakeDetector.load(model, backbone=str(other_clip_dir))
    torn = tmp_path / "torn"
    shutil.copytree(model, torn)
    (torn / "tensors.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelFormatError, match="cannot be read"):
        LakeDetector.load(torn)


def test_bad_options(tiny_backbone, normals):
    with pytest.raises(ConfigError, match="k=999 is larger than the width of block 2 \\(32 channels\\)"):
        LakeDetector(tiny_backbone, **{**OPTS, "k": 999}).fit(normals, "tile")
    with pytest.raises(ConfigError, match="layer 9 is out of range"):
        LakeDetector(tiny_backbone, **{**OPTS, "layer": 9}).fit(normals, "tile")
    with pytest.raises(ConfigError, match="semantic_layer 0 is out of range"):
        LakeDetector(tiny_backbone, **OPTS, semantic_layer=0).fit(normals, "tile")
    with pytest.raises(ConfigError, match="class_name must be a non-empty"):
        LakeDetector(tiny_backbone, **OPTS).fit(normals, "  ")
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        LakeDetector(tiny_backbone, **{**OPTS, "image_size": 30}).fit(normals, "tile")
    for bad in (dict(k=0), dict(lam=-1.0), dict(semantic_agg="median"), dict(selection="best"),
                dict(score_norm="z"), dict(batch_size=0), dict(sigma=-1.0), dict(device="tpu")):
        with pytest.raises(ConfigError):
            LakeDetector(tiny_backbone, **{**OPTS, **bad})
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['kk'\]"):
        LakeDetector(tiny_backbone, kk=3)  # a misspelled option is not swallowed
    with pytest.raises(AttributeError, match="state_"):
        LakeDetector(tiny_backbone).gallery_ = torch.zeros(1)  # learned state is set through state_ only


def test_bad_images(tiny_backbone, fitted, normals, tmp_path, caplog):
    tiny = np.zeros((5, 40, 3), np.uint8)
    with pytest.raises(ImageLoadError, match="smaller than one 8x8 patch"):
        fitted.predict([normals[0], tiny])
    text = tmp_path / "x.png"
    text.write_text("no")
    with caplog.at_level(logging.WARNING, logger="lakead"):
        det = LakeDetector(tiny_backbone, **OPTS).fit([*normals[:3], text], "tile")
    assert len(det.support_) == 3 and "x.png: not an image" in det.skipped_[0] and "x.png" in caplog.text
    with pytest.raises(ConfigError, match="no readable support image among the 2 given.*x.png"):
        LakeDetector(tiny_backbone, **OPTS).fit([text, tmp_path / "missing.png"], "tile")


def test_not_fitted(tiny_backbone, normals):
    with pytest.raises(NotFittedError, match="not fitted"):
        LakeDetector(tiny_backbone, **OPTS).predict(normals[:1])


def test_selection_and_text_options(tiny_backbone, normals, tests_imgs):
    full = LakeDetector(tiny_backbone, **OPTS, selection="all").fit(normals, "tile")
    assert full.gallery_.shape[1] == 32
    bottom = LakeDetector(tiny_backbone, **OPTS, selection="bottom").fit(normals, "tile")
    var = bottom.channel_variance_
    assert var[bottom.neurons_].max() <= var.sort().values[7]
    r1 = LakeDetector(tiny_backbone, **OPTS, selection="random", seed=1).fit(normals, "tile")
    r2 = LakeDetector(tiny_backbone, **OPTS, selection="random", seed=2).fit(normals, "tile")
    assert r1.neurons_.tolist() != r2.neurons_.tolist() and len(set(r1.neurons_.tolist())) == 8
    vis = LakeDetector(tiny_backbone, **OPTS, use_text=False).fit(normals, "tile")
    p = vis.predict(tests_imgs)
    assert (p.semantic == 0).all() and np.array_equal(p.scores, p.visual) and vis.text_embeddings_ is None


def test_raw_scores_are_the_normalised_ones_times_the_scale(tiny_backbone, normals, tests_imgs, fitted):
    raw = LakeDetector(tiny_backbone, **OPTS, score_norm="none").fit(normals, "tile")
    assert raw.visual_scale_ == 1.0
    assert np.allclose(raw.predict(tests_imgs).visual, fitted.predict(tests_imgs).visual * fitted.visual_scale_, rtol=1e-5)


def test_blur_keeps_sizes_and_lowers_peaks(tiny_backbone, normals, tests_imgs, fitted):
    blurred = LakeDetector(tiny_backbone, **OPTS, sigma=4.0).fit(normals, "tile").predict(tests_imgs)
    sharp = fitted.predict(tests_imgs)
    assert [m.shape for m in blurred.maps] == [m.shape for m in sharp.maps]
    assert blurred.maps[-1].max() < sharp.maps[-1].max()
    assert np.array_equal(blurred.scores, sharp.scores)  # blur is for maps only


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 7))
def test_scores_do_not_depend_on_batch_size(fitted, tests_imgs, batch):
    ref = fitted.predict(tests_imgs)
    old = fitted.runtime
    fitted.runtime = old.replace(batch_size=batch)
    try:
        p = fitted.predict(tests_imgs)
    finally:
        fitted.runtime = old
    assert np.allclose(p.scores, ref.scores, rtol=1e-5, atol=1e-6)
    assert all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(p.maps, ref.maps))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(list(range(8))), batch=st.integers(1, 8))
def test_scores_do_not_depend_on_support_order(tiny_backbone, normals, fitted, tests_imgs, order, batch):
    det = LakeDetector(tiny_backbone, **{**OPTS, "batch_size": batch}).fit([normals[i] for i in order], "tile")
    assert det.neurons_.tolist() == fitted.neurons_.tolist()
    assert det.threshold_ == pytest.approx(fitted.threshold_, rel=1e-5)
    assert np.allclose(det.predict(tests_imgs).scores, fitted.predict(tests_imgs).scores, rtol=1e-5, atol=1e-6)
