"""lakead update (issue 29): normal images added to a fitted model equal a refit on all of them
where the method is exact; versions and rollback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import texture, with_defect
from lakead import ConfigError, ImageLoadError, LakeDetector
from lakead.line.update import add_normals
from lakead.methods.lake import fit as steps

OPTS = dict(k=8, layer=2, image_size=64, batch_size=4)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(20)
    return [texture(rng) for _ in range(14)]


def _same_state(a, b, *, rtol=1e-5):
    """The learned arrays and decision facts of two LAKE states agree (up to float rounding)."""
    for name in ("gallery", "gallery_image", "scope_gallery", "scope_gallery_image"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x.cpu(), y.cpu(), rtol=rtol, atol=1e-6, msg=name)
    for name in ("loo_visual", "loo_semantic", "loo_scores", "loo_tokens", "loo_scope"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6, err_msg=name)
    for name in ("visual_scale", "threshold", "seed_threshold", "pixel_threshold", "scope_threshold"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is y, name
        elif math.isinf(x) or math.isinf(y):
            assert x == y, name
        else:
            assert x == pytest.approx(y, rel=rtol), name
    assert a.map_range == pytest.approx(b.map_range, rel=rtol)
    assert a.support == b.support and a.loo_rule == b.loo_rule and a.gallery_rule == b.gallery_rule


@pytest.mark.parametrize("opts", [
    {},
    {"distance": "cosine"},
    {"visual_top_percent": 10.0, "use_text": False},
    {"scope_check": False, "threshold_rule": "conformal", "false_alarm_rate": 0.2},
])
def test_update_equals_refit(tiny_backbone, images, opts):
    """With the neurons a refit would choose (selection all: every channel), an update equals a
    refit on the old and new images, in every array the decisions come from."""
    names = [f"img{i}" for i in range(len(images))]
    o = {**OPTS, "selection": "all", **opts}
    det = LakeDetector(tiny_backbone, **o).fit(images[:6], "tile", names=names[:6])
    upd = add_normals(det, images[6:], names=names[6:])
    ref = LakeDetector(tiny_backbone, **o).fit(images, "tile", names=names)
    _same_state(det.state_, ref.state_)
    assert upd.added == names[6:] and upd.support_before == 6 and upd.support_after == 14
    assert upd.inexact == []
    assert upd.threshold_after == det.state_.threshold


def test_update_beyond_the_caps(tiny_backbone, images, monkeypatch):
    """Beyond the leave-one-out cap the update scores evenly spaced shares of the old and the new
    images (not the refit's subset), each with the score a refit gives that image; beyond the
    scope gallery's cap it keeps a sample of that many tokens; both are said in ``inexact``."""
    names = [f"img{i}" for i in range(len(images))]
    o = {**OPTS, "selection": "all"}
    monkeypatch.setattr(steps, "MAX_LOO_IMAGES", 100)
    every = LakeDetector(tiny_backbone, **o).fit(images, "tile", names=names).state_  # every image scored
    monkeypatch.setattr(steps, "MAX_LOO_IMAGES", 5)
    monkeypatch.setattr(steps, "MAX_SCOPE_TOKENS", 700)  # 6 old images x 64 tokens fit; 14 do not
    det = LakeDetector(tiny_backbone, **o).fit(images[:6], "tile", names=names[:6])
    upd = add_normals(det, images[6:], names=names[6:])
    st = det.state_
    scored = np.flatnonzero(np.isfinite(st.loo_visual))
    assert len(scored) == 5 and (scored < 6).sum() == 2 and (scored >= 6).sum() == 3
    raw = st.loo_visual[scored] * st.visual_scale
    np.testing.assert_allclose(raw, every.loo_visual[scored] * every.visual_scale, rtol=1e-5)
    np.testing.assert_allclose(st.loo_tokens.reshape(5, 64) * st.visual_scale,
                               every.loo_tokens.reshape(14, 64)[scored] * every.visual_scale, rtol=1e-5, atol=1e-6)
    assert st.scope_gallery.shape == (700, every.scope_gallery.shape[1]) and set(st.scope_gallery_image.tolist()) == set(range(14))
    for i in scored:  # each scope score against the sampled gallery, as the fit computes it
        tok = every.scope_gallery[i * 64 : (i + 1) * 64]
        assert st.loo_scope[i] == pytest.approx(steps.scope_scores(tok[None], st.scope_gallery, st.scope_gallery_image, image=i)[0])
    assert det.thresholds(st.false_alarm_rate).image == pytest.approx(st.threshold)
    assert any("leave-one-out" in s for s in upd.inexact) and any("scope gallery" in s for s in upd.inexact)


def test_update_in_rounds_and_from_one_image(tiny_backbone, images):
    """Three updates in a row equal one refit; a model of one image (no leave-one-out, no
    scope gallery) gets its scores from the update, and says the scope check stays off."""
    o = {**OPTS, "selection": "all"}
    names = [f"img{i}" for i in range(len(images))]
    det = LakeDetector(tiny_backbone, **o).fit(images[:4], "tile", names=names[:4])
    for a, b in ((4, 5), (5, 9), (9, len(images))):
        add_normals(det, images[a:b], names=names[a:b])
    ref = LakeDetector(tiny_backbone, **o).fit(images, "tile", names=names)
    _same_state(det.state_, ref.state_)
    one = LakeDetector(tiny_backbone, **o, scope_check=False).fit(images[:1], "tile", names=names[:1])
    assert math.isinf(one.state_.threshold)
    add_normals(one, images[1:6], names=names[1:6])
    ref = LakeDetector(tiny_backbone, **o, scope_check=False).fit(images[:6], "tile", names=names[:6])
    _same_state(one.state_, ref.state_)
    one = LakeDetector(tiny_backbone, **o).fit(images[:1], "tile")
    upd = add_normals(one, images[1:6])
    assert one.state_.scope_gallery is None and any("scope check stays off" in s for s in upd.inexact)


def test_update_keeps_the_neurons(tiny_backbone, images):
    """With top-k neurons the update keeps the fit's neurons; its gallery is the refit's when the
    refit chooses the same ones, and the update's is always every image's tokens in them."""
    det = LakeDetector(tiny_backbone, **OPTS).fit(images[:6], "tile")
    neurons = det.state_.neurons.clone()
    add_normals(det, images[6:])
    assert torch.equal(det.state_.neurons, neurons)
    assert det.state_.gallery.shape == (14 * 64, 8)
    ref = LakeDetector(tiny_backbone, **OPTS).fit(images, "tile")
    if torch.equal(ref.state_.neurons, neurons):
        _same_state(det.state_, ref.state_)


def test_added_false_alarm_is_no_longer_flagged(tiny_backbone, images):
    """An image flagged as anomalous, added as normal, scores like a support image afterwards."""
    det = LakeDetector(tiny_backbone, **OPTS).fit(images[:6], "tile")
    odd = with_defect(images[7], 0, 0, 64)  # all checker: out of scope on the tiny random CLIP
    assert det.predict([odd]).anomalous[0]
    add_normals(det, [odd])
    assert not det.predict([odd]).anomalous[0]


def test_update_refuses_and_leaves_the_model(tiny_backbone, images, tmp_path):
    det = LakeDetector(tiny_backbone, **OPTS).fit(images[:4], "tile")
    state = det.state_
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="broken.png"):
        add_normals(det, [images[5], str(bad)])
    assert det.state_ is state
    with pytest.raises(ConfigError, match="no image"):
        add_normals(det, [])
    core = LakeDetector(tiny_backbone, **OPTS, gallery_size=50).fit(images[:4], "tile")
    with pytest.raises(ConfigError, match="coreset"):
        add_normals(core, images[4:6])


def test_cli_update_history_rollback(tiny_backbone, tiny_clip_dir, images, tmp_path):
    """lakead update writes version 2 (the fit is 1), history lists both, rollback restores the
    fit's files byte for byte, and an update after it starts from the version rolled back to."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from lakead.cli import app
    from lakead.line.versions import current, read_history
    from lakead.methods import load_detector

    model = tmp_path / "model"
    LakeDetector(str(tiny_clip_dir), **OPTS).fit(images[:5], "tile").save(model)
    (model / "notes.txt").write_text("mine")  # a file lakead did not write: carried over
    fitted = {f: (model / f).read_bytes() for f in ("lakead.json", "tensors.safetensors")}
    add = tmp_path / "good"
    add.mkdir()
    for i, img in enumerate(images[5:9]):
        Image.fromarray(img).save(add / f"ok{i}.png")
    runner = CliRunner()
    r = runner.invoke(app, ["update", str(model), "--add-normal", str(add), "--by", "operator", "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output.strip().splitlines()[-1])
    assert doc["version"] == 2 and doc["support_after"] == 9 and len(doc["added"]) == 4
    det = load_detector(model)
    assert len(det.support_) == 9 and det.threshold_ == pytest.approx(doc["threshold_after"])
    hist = read_history(model)
    assert hist["current"] == 2 and [e["action"] for e in hist["versions"]] == ["fit", "update"]
    assert hist["versions"][1]["by"] == "operator" and hist["versions"][1]["added"] == doc["added"]
    assert current(model) == (2, model / "versions" / "2")
    assert (model / "notes.txt").read_text() == "mine"
    r = runner.invoke(app, ["history", str(model)])
    assert r.exit_code == 0 and "update" in r.output and "operator" in r.output
    r = runner.invoke(app, ["rollback", str(model), "1"])
    assert r.exit_code == 0, r.output
    assert {f: (model / f).read_bytes() for f in fitted} == fitted
    assert len(load_detector(model).support_) == 5
    r = runner.invoke(app, ["rollback", str(model), "7"])
    assert r.exit_code == 1 and "no version 7" in r.output
    r = runner.invoke(app, ["update", str(model), "--add-normal", str(add / "ok0.png"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    hist = read_history(model)
    assert hist["current"] == 3 and hist["versions"][2]["parent"] == 1 and hist["versions"][2]["support"] == 6
    r = runner.invoke(app, ["update", str(model), "--add-normal", str(tmp_path / "missing"), "--device", "cpu"])
    assert r.exit_code == 1 and "missing" in r.output
    assert read_history(model)["current"] == 3


def test_paired_search_agrees_with_the_fits_search():
    """cross_nearest and self_nearest find the neighbours nearest_neighbor finds (one block for
    both sides; each pair of groups once), on sizes that cross block boundaries."""
    from lakead.line.search import cross_nearest, self_nearest
    from lakead.ops import distance_to, nearest_neighbor

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 5, generator=g), torch.randn(170, 5, generator=g)
    xd2, xi, yd2, yi = cross_nearest(x, y, block_elements=4000)
    d, _ = nearest_neighbor(x, y)
    torch.testing.assert_close(distance_to(x, y, xi), d)
    d, _ = nearest_neighbor(y, x)
    torch.testing.assert_close(distance_to(y, x, yi), d)
    torch.testing.assert_close(xd2.clamp_min(0).sqrt(), distance_to(x, y, xi), rtol=1e-4, atol=1e-4)
    groups = torch.arange(17, dtype=torch.int32).repeat_interleave(10)  # 17 images of 10 tokens
    sd2, si = self_nearest(y, 10, block_elements=900)
    d, _ = nearest_neighbor(y, y, query_groups=groups, gallery_groups=groups)
    torch.testing.assert_close(distance_to(y, y, si), d)
    assert (groups[si] != groups).all()
    one = self_nearest(y[:10], 10)
    assert torch.isinf(one[0]).all() and (one[1] == -1).all()


# -- the memory-bank methods --------------------------------------------------------------------


@pytest.mark.parametrize("opts", [{}, {"rotations": True}])
def test_anomalydino_update_equals_refit(tiny_backbone, images, opts):
    """AnomalyDINO without the mask: the bank of every patch grows as a refit's does, and every
    leave-one-out score, peak and map value and the decision levels equal a refit's."""
    from lakead.methods.anomalydino import AnomalyDinoDetector

    names = [f"img{i}" for i in range(len(images))]
    det = AnomalyDinoDetector(tiny_backbone, image_size=64, **opts).fit(images[:6], "tile", names=names[:6])
    upd = add_normals(det, images[6:], names=names[6:])
    ref = AnomalyDinoDetector(tiny_backbone, image_size=64, **opts).fit(images, "tile", names=names)
    a, b = det.state_, ref.state_
    assert upd.inexact == [] and a.support == b.support and a.bank.shape == b.bank.shape
    assert sorted(a.bank_image.tolist()) == sorted(b.bank_image.tolist())
    for name in ("loo_scores", "loo_peaks", "loo_tokens"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6, err_msg=name)
    assert a.threshold == pytest.approx(b.threshold, rel=1e-5) and a.map_range == pytest.approx(b.map_range, rel=1e-5)
    test = [with_defect(images[3], 10, 10, 16)]
    np.testing.assert_allclose(det.predict(test).scores, ref.predict(test).scores, rtol=1e-5)


def test_patchcore_update_says_what_is_not_exact(tiny_backbone, images):
    """PatchCore: the bank grows by a coreset of the new patches at the model's ratio (a refit's bank
    has the same size), the new images are scored against it, the old keep their scores; said."""
    from lakead.methods.patchcore import PatchCoreDetector

    det = PatchCoreDetector(tiny_backbone, image_size=64, coreset=0.25).fit(images[:6], "tile")
    old_scores = det.state_.loo_scores.copy()
    upd = add_normals(det, images[6:])
    ref = PatchCoreDetector(tiny_backbone, image_size=64, coreset=0.25).fit(images, "tile")
    st = det.state_
    assert abs(st.bank.shape[0] - ref.state_.bank.shape[0]) <= 1 and st.bank_vectors == ref.state_.bank_vectors
    np.testing.assert_array_equal(st.loo_scores[:6], old_scores)
    assert np.isfinite(st.loo_scores[6:]).all() and math.isfinite(st.threshold)
    assert any("coreset" in s for s in upd.inexact) and any("keep their fitted scores" in s for s in upd.inexact)
    odd = with_defect(images[7], 0, 0, 64)
    before = det.predict([odd]).scores[0]
    add_normals(det, [odd])
    assert det.predict([odd]).scores[0] < 0.5 * before  # a coreset of its own patches is in the bank now
