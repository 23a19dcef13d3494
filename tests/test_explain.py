"""Interpretability: the knee rule (k="auto"), the support-set outlier filter, and the
``lakead explain`` report (its files, its JSON against the model, its look in Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO, texture, with_defect
from lakead import ConfigError, LakeConfig, LakeDetector
from lakead.cli import app
from lakead.explain import compare_models, explain_images, variance_curve, write_report
from lakead.neurons import (
    embed_2d,
    flag_outliers,
    jaccard,
    jaccard_matrix,
    knee_k,
    neuron_fingerprints,
    patch_contributions,
    support_image_features,
)

runner = CliRunner()
OPTS = dict(layer=2, image_size=64, batch_size=8, use_text=False)
N_NORMAL, N_PLANTED = 16, 2


# -- the knee rule ---------------------------------------------------------------------------


def test_knee_of_a_step_is_the_number_of_high_channels():
    rng = np.random.default_rng(0)
    v = np.r_[10 + rng.uniform(0, 1, 12), 1 + rng.uniform(0, 0.1, 88)]
    assert knee_k(v) == 12
    assert knee_k(rng.permutation(v)) == 12  # order of the channels does not matter
    assert knee_k(v * 1e-4) == knee_k(v * 1e3) == 12  # nor the scale of the features


@pytest.mark.parametrize("tau", [5.0, 20.0, 60.0])
def test_knee_of_an_exponential_decay_matches_the_analytic_point(tau):
    # y = exp(-i / tau), both axes scaled to 0..1: the point farthest below the chord is where the
    # slope equals the chord's, i* = tau * ln((D - 1) / tau) (exactly, up to the tiny y minimum).
    d = 1024
    v = np.exp(-np.arange(d) / tau)
    expected = tau * np.log((d - 1) / tau)
    assert abs(knee_k(v) - expected) <= 1.5


def test_knee_of_a_piecewise_linear_curve_is_its_vertex():
    # steep from 100 to 10 over 30 channels, then shallow from 10 to 0 over 70: the vertex is at 30
    v = np.r_[np.linspace(100, 10, 31)[:-1], np.linspace(10, 0, 70)]
    assert knee_k(v) == 30


@pytest.mark.parametrize("curve", [np.ones(50), np.linspace(5, 1, 50), 5 - np.linspace(0, 2, 50) ** 2, [3.0, 1.0]])
def test_no_convex_bend_keeps_every_channel(curve):
    assert knee_k(curve) == len(curve)


def test_knee_rejects_bad_input():
    with pytest.raises(ValueError):
        knee_k([])
    with pytest.raises(ValueError):
        knee_k([1.0, np.nan, 0.5])


# -- the outlier filter ------------------------------------------------------------------


def test_filter_flags_planted_outliers_and_nothing_else():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (40, 4))
    x[[5, 17, 33]] += 6.0  # three planted outliers
    flags, scores = flag_outliers(x, "auto", seed=0)
    assert set(np.flatnonzero(flags).tolist()) == {5, 17, 33}
    assert scores[[5, 17, 33]].min() > np.delete(scores, [5, 17, 33]).max()
    clean, _ = flag_outliers(rng.normal(0, 1, (40, 4)), "auto", seed=0)
    assert clean.sum() <= 1  # a clean set loses (almost) nothing


def test_filter_with_a_fraction_and_the_half_cap():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (20, 4))
    assert flag_outliers(x, 0.1, seed=0)[0].sum() == 2
    # whatever the forest says, at most half of the images are flagged
    flags, _ = flag_outliers(np.r_[rng.normal(0, 1, (4, 4)), rng.normal(50, 1, (6, 4))], 0.5, seed=0)
    assert flags.sum() <= 5


def test_support_image_features_are_leave_one_out_distance_percentiles():
    base = np.zeros((10, 3))  # (N, K): tokens 100 apart, so each token's nearest other is its own copy
    base[:, 1] = 100.0 * np.arange(10)
    odd = base.copy()
    odd[4, 0] += 5.0  # one token of the third image has no look-alike elsewhere
    f = support_image_features(np.stack([base, base, odd]))  # (n, 4)
    assert f.shape == (3, 4)
    np.testing.assert_allclose(f[:2], 0.0, atol=1e-5)  # identical twins: every token has a copy
    expected = np.quantile(np.r_[np.zeros(9), 5.0], [1.0, 0.99, 0.9, 0.5])
    np.testing.assert_allclose(f[2], expected, atol=1e-4)
    with pytest.raises(ValueError):
        support_image_features(np.zeros((1, 4, 3)))


# -- small pure pieces of the report -----------------------------------------------------


def test_contributions_jaccard_fingerprints_embedding():
    c = patch_contributions(np.array([1.0, 0.0, 3.0]), np.array([0.0, 0.0, 1.0]))
    assert c.tolist() == [1.0, 0.0, 4.0]
    assert jaccard([1, 2], [3]) == 0.0 and jaccard([], []) == 1.0
    m = jaccard_matrix([[0, 1, 2, 3], [2, 3, 4, 5], [0, 1, 2, 3]])
    np.testing.assert_allclose(m, [[1, 1 / 3, 1], [1 / 3, 1, 1 / 3], [1, 1 / 3, 1]])
    v = np.array([[4.0, 1.0, 1.0, 1.0], [1.0, 1.0, 4.0, 1.0]])  # (C, D)
    fp = neuron_fingerprints(v)  # (D, C)
    assert fp.shape == (4, 2)
    np.testing.assert_allclose(fp.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(fp.std(axis=0), 1.0)
    assert fp[0, 0] > 0 > fp[0, 1] and fp[2, 1] > 0 > fp[2, 0]
    xy, explained = embed_2d(fp)
    assert xy.shape == (4, 2) and explained.sum() <= 1.0 + 1e-12
    # a linear embedding of centred points: pairwise distances are kept when C <= 2
    d_in = np.linalg.norm(fp[:, None] - fp[None], axis=-1)
    d_out = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.testing.assert_allclose(d_in, d_out, atol=1e-9)


# -- the detector: k auto and the filter from the API ------------------------------------


def with_bw_checker(img: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """A second kind of defect: a black-and-white checker."""
    out = img.copy()
    yy, xx = np.mgrid[0:size, 0:size]
    out[top : top + size, left : left + size] = (((yy // 2 + xx // 2) % 2) * 255).astype(np.uint8)[..., None]
    return out


@pytest.fixture(scope="module")
def support():
    # The planted images carry two different defects: look-alike defects would find each other
    # in the leave-one-out search and hide each other from the filter (docs/INTERPRETABILITY.md).
    rng = np.random.default_rng(20)
    normal = [texture(rng) for _ in range(N_NORMAL)]
    planted = [with_defect(texture(rng), 8, 8, 40), with_bw_checker(texture(rng), 16, 12, 36)]
    names = [f"good_{i:02d}.png" for i in range(N_NORMAL)] + [f"planted_{i}.png" for i in range(N_PLANTED)]
    return normal + planted, names


@pytest.fixture(scope="module")
def auto_model(tiny_backbone, support):
    images, names = support
    return LakeDetector(tiny_backbone, k="auto", filter_outliers=True, **OPTS).fit(images, "tile", names=names)


@pytest.fixture(scope="module")
def test_images():
    rng = np.random.default_rng(21)
    return [texture(rng), with_defect(texture(rng), 20, 28, 18)]


def test_k_auto_takes_the_knee_of_the_fitted_variance(auto_model):
    k = int(auto_model.neurons_.numel())
    assert k == knee_k(auto_model.channel_variance_.numpy())
    assert 1 <= k <= auto_model.width_
    order = np.argsort(-auto_model.channel_variance_.numpy(), kind="stable")
    assert auto_model.neurons_.tolist() == order[:k].tolist()
    s = auto_model.summary()
    assert s["k"] == k and s["k_rule"].startswith("auto")


def test_filter_drops_the_planted_defect_images(auto_model):
    planted = {f"planted_{i}.png" for i in range(N_PLANTED)}
    assert planted <= set(auto_model.outliers_)
    assert len(auto_model.outliers_) <= (N_NORMAL + N_PLANTED) // 2
    assert not planted & set(auto_model.support_)
    assert len(auto_model.support_) + len(auto_model.outliers_) == N_NORMAL + N_PLANTED
    assert auto_model.summary()["outliers_dropped"] == auto_model.outliers_
    assert auto_model.gallery_.shape[0] == len(auto_model.support_) * 64  # 8 x 8 tokens per kept image


def test_without_the_filter_nothing_is_dropped(tiny_backbone, support):
    images, names = support
    det = LakeDetector(tiny_backbone, k=5, **OPTS).fit(images, "tile", names=names)
    assert det.outliers_ == [] and len(det.support_) == len(images)
    assert det.summary()["k_rule"] == "fixed"


def test_filter_needs_a_few_images(tiny_backbone, support, caplog):
    images, names = support
    det = LakeDetector(tiny_backbone, k=4, filter_outliers=True, **OPTS).fit(images[:3], "tile", names=names[:3])
    assert det.outliers_ == [] and len(det.support_) == 3
    assert "needs at least" in caplog.text


def test_k_auto_and_filter_survive_save_and_load(auto_model, tiny_clip_dir, tmp_path, test_images):
    auto_model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "lakead.json").read_text())
    assert meta["config"]["k"] == "auto" and meta["config"]["filter_outliers"] is True
    assert meta["k"] == auto_model.neurons_.numel() and meta["outliers"] == auto_model.outliers_
    loaded = LakeDetector.load(tmp_path / "m", backbone=str(tiny_clip_dir))
    assert loaded.config.k == "auto" and loaded.config.filter_outliers
    assert loaded.neurons_.tolist() == auto_model.neurons_.tolist()
    assert loaded.outliers_ == auto_model.outliers_
    assert loaded.summary()["outliers_dropped"] == auto_model.outliers_
    np.testing.assert_allclose(loaded.predict(test_images).scores, auto_model.predict(test_images).scores, rtol=1e-5)


@pytest.mark.parametrize(
    "bad", [dict(k="Auto "), dict(k=0), dict(k=2.5), dict(filter_outliers="yes"),
            dict(outlier_contamination=0.7), dict(outlier_contamination=0), dict(outlier_contamination="most")],
)
def test_bad_k_and_filter_options_are_refused(bad):
    with pytest.raises(ConfigError):
        LakeConfig(**bad).validate()


# -- the report ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_model(tiny_backbone, support):
    images, names = support
    return LakeDetector(tiny_backbone, k=6, **OPTS).fit(images[:N_NORMAL], "tile", names=names[:N_NORMAL])


@pytest.fixture(scope="module")
def report(auto_model, second_model, test_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "rep"
    ex = explain_images(auto_model, test_images, names=["held_out.png", "defect.png"], top=4)
    comp = compare_models([auto_model, second_model], ["auto", "k6"])
    write_report(out, auto_model, ex, comp, command="pytest")
    return out, ex


def test_report_files_exist_and_every_referenced_image_is_there(report):
    out, _ = report
    page = (out / "index.html").read_text(encoding="utf-8")
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert len(srcs) == 1 + 2 * (2 + 4) + 2  # variance; per image: image, overlay, 4 neurons; jaccard, fingerprints
    for src in srcs:
        assert not src.startswith(("http:", "https:", "/")), src
        with Image.open(out / src) as im:
            assert im.size[0] > 10 and im.size[1] > 10
    assert "<script" not in page and "http" not in page.split("</style>")[0]  # self-contained
    data = json.loads((out / "report.json").read_text())
    files = {data["variance"]["figure"], data["comparison"]["jaccard_figure"], data["comparison"]["fingerprint_figure"]}
    for im in data["images"]:
        files |= {im["image"], im["overlay"], *(n["activation_map"] for n in im["top_neurons"])}
    assert files == set(srcs)


def test_report_json_matches_the_model(report, auto_model, second_model):
    out, ex = report
    data = json.loads((out / "report.json").read_text())
    var = auto_model.channel_variance_.numpy()
    k = int(auto_model.neurons_.numel())
    assert data["variance"]["k"] == k
    assert data["variance"]["neurons"] == np.argsort(-var, kind="stable")[:k].tolist() == auto_model.neurons_.tolist()
    np.testing.assert_allclose(data["variance"]["variance_sorted"], np.sort(var)[::-1])
    assert data["variance"]["elbow_k"] == knee_k(var)
    assert data["model"]["outliers_dropped"] == auto_model.outliers_
    pred = auto_model.predict([e.image for e in ex])
    for i, im in enumerate(data["images"]):
        assert im["score"] == pytest.approx(float(pred.scores[i]), rel=1e-5)
        assert im["patch_score"] == pytest.approx(float(pred.visual[i]), rel=1e-4)  # the patch is the max token
        shares = [n["share"] for n in im["top_neurons"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
        assert {n["channel"] for n in im["top_neurons"]} <= set(auto_model.neurons_.tolist())
        assert im["nearest_normal"]["support_image"] in auto_model.support_
    comp = data["comparison"]
    a, b = set(auto_model.neurons_.tolist()), set(second_model.neurons_.tolist())
    assert comp["jaccard"][0][1] == pytest.approx(len(a & b) / len(a | b))
    assert [m["k"] for m in comp["models"]] == [k, 6]
    assert len(comp["fingerprints"]) == auto_model.width_


def test_contributions_add_up_to_the_patch_distance(auto_model, test_images):
    k = int(auto_model.neurons_.numel())
    (ex,) = explain_images(auto_model, test_images[1:], top=k)
    assert ex.top_share == pytest.approx(1.0)
    raw = sum(c.squared_diff for c in ex.contributions) ** 0.5
    assert raw / auto_model.visual_scale_ == pytest.approx(ex.patch_score, rel=1e-4)
    gh, gw = auto_model.grid_
    assert 0 <= ex.patch[0] < gh and 0 <= ex.patch[1] < gw


def test_explain_runs_the_backbone_once_per_image_and_gives_predicts_numbers(auto_model, test_images, monkeypatch):
    """One forward pass per image (not predict's and then another), and predict's numbers exactly."""
    bb = auto_model.backbone
    seen = []
    real = bb.extract

    def counting(pixels, blocks, joint_block=None):
        seen.append(pixels.shape[0])
        return real(pixels, blocks, joint_block)

    monkeypatch.setattr(bb, "extract", counting)
    exs = explain_images(auto_model, test_images, top=3)
    assert sum(seen) == len(test_images)
    monkeypatch.undo()
    pred = auto_model.predict(test_images)
    for i, ex in enumerate(exs):
        assert (ex.score, ex.visual, ex.semantic, ex.anomalous) == (
            float(pred.scores[i]), float(pred.visual[i]), float(pred.semantic[i]), bool(pred.anomalous[i]))
        np.testing.assert_array_equal(ex.amap, pred.maps[i])
        assert ex.patch_score == pytest.approx(float(pred.visual[i]), rel=1e-6) and ex.threshold == pred.threshold


def test_explain_with_the_text_probe_and_batches(tiny_backbone, support, test_images):
    """With the text probe on and a batch smaller than the images: still predict's numbers."""
    images, _ = support
    det = LakeDetector(tiny_backbone, k=6, layer=2, image_size=64, batch_size=1).fit(images[:6], "tile")
    exs = explain_images(det, test_images, top=2)
    pred = det.predict(test_images)
    assert [e.score for e in exs] == [float(v) for v in pred.scores]
    assert [e.semantic for e in exs] == [float(v) for v in pred.semantic] and pred.semantic.max() > 0
    for ex, m in zip(exs, pred.maps):
        np.testing.assert_array_equal(ex.amap, m)


def test_report_without_images_or_comparison(auto_model, tmp_path):
    write_report(tmp_path / "r", auto_model)
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["images"] == [] and data["comparison"] is None
    assert "--compare" in (tmp_path / "r" / "index.html").read_text()


def test_comparison_refuses_models_of_another_block(auto_model, tiny_backbone, support):
    images, _ = support
    other = LakeDetector(tiny_backbone, k=4, **{**OPTS, "layer": 3}).fit(images[:4], "tile")
    with pytest.raises(ConfigError, match="block"):
        compare_models([auto_model, other], ["a", "b"])
    with pytest.raises(ConfigError, match="at least two"):
        compare_models([auto_model], ["a"])


def test_variance_curve_of_selection_all(tiny_backbone, support):
    images, _ = support
    det = LakeDetector(tiny_backbone, k=4, selection="all", **OPTS).fit(images[:4], "tile")
    curve = variance_curve(det)
    assert curve.k == det.width_ and curve.k_rule.startswith("all channels")


# -- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(support, test_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    images, names = support
    for img, name in zip(images, names):
        (root / "support").mkdir(exist_ok=True)
        Image.fromarray(img).save(root / "support" / name)
    (root / "test").mkdir()
    for i, img in enumerate(test_images):
        Image.fromarray(img).save(root / "test" / f"t{i}.png")
    return root


def test_cli_fit_k_auto_filter_then_explain(folders, tiny_clip_dir, tmp_path):
    common = ["--backbone", str(tiny_clip_dir), "--layer", "2", "--image-size", "64", "--no-text"]
    r = runner.invoke(app, ["fit", str(folders / "support"), "-c", "tile", "-o", str(tmp_path / "m"), "--k", "auto",
                            "--filter-outliers", *common])
    assert r.exit_code == 0, r.output
    for i in range(N_PLANTED):
        assert f"dropped as an outlier (--filter-outliers): {folders / 'support' / f'planted_{i}.png'}" in r.output
    meta = json.loads((tmp_path / "m" / "lakead.json").read_text())
    assert meta["config"]["k"] == "auto" and len(meta["outliers"]) >= N_PLANTED
    r = runner.invoke(app, ["fit", str(folders / "support"), "-c", "tile", "-o", str(tmp_path / "m2"), "--k", "5", *common])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["explain", str(tmp_path / "m"), str(folders / "test"), "--compare", str(tmp_path / "m2"),
                            "-o", str(tmp_path / "rep"), "--top-neurons", "3"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert len(data["images"]) == 2 and all(len(im["top_neurons"]) == 3 for im in data["images"])
    assert [m["k"] for m in data["comparison"]["models"]] == [meta["k"], 5]
    assert data["comparison"]["models"][0]["label"] != data["comparison"]["models"][1]["label"]  # same class: dir names added
    r = runner.invoke(app, ["explain", str(tmp_path / "m"), str(folders / "test"), "-o", str(tmp_path / "rep1"), "--max-images", "1"])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "rep1" / "report.json").read_text())["images"]) == 1


def test_cli_refuses_bad_values(folders, tiny_clip_dir, tmp_path):
    r = runner.invoke(app, ["fit", str(folders / "support"), "-c", "tile", "-o", str(tmp_path / "m"), "--k", "many",
                            "--backbone", str(tiny_clip_dir), "--layer", "2"])
    assert r.exit_code == 2 and "--k" in r.output
    r = runner.invoke(app, ["fit", str(folders / "support"), "-c", "tile", "-o", str(tmp_path / "m"), "--filter-outliers",
                            "--outlier-contamination", "0.9", "--backbone", str(tiny_clip_dir), "--layer", "2"])
    assert r.exit_code == 1 and "outlier_contamination" in r.output
    r = runner.invoke(app, ["explain", str(tmp_path / "missing"), "-o", str(tmp_path / "rep")])
    assert r.exit_code == 1 and "missing" in r.output
    assert not (tmp_path / "rep").exists()


# -- how it looks: headless Chromium ----------------------------------------------------------


@pytest.mark.slow
def test_report_renders_in_chromium(report, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="Python Playwright is not installed (pip install playwright)")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from explain_screenshot import chromium_path, screenshot
    finally:
        sys.path.pop(0)
    if not (os.path.exists(chromium_path()) or shutil.which(chromium_path())):
        pytest.skip(f"Chromium not found at {chromium_path()} (install Debian's chromium, or set LAKEAD_CHROMIUM)")
    out, _ = report
    shot = Path(os.environ.get("LAKEAD_SCREENSHOT_DIR", tmp_path)) / "explain_report.png"
    broken = screenshot(out, shot)
    assert broken == []
    with Image.open(shot) as im:
        assert im.size[0] >= 1000 and im.size[1] > 1500  # the whole page, not an empty viewport
        assert len(set(np.asarray(im.convert("L").resize((64, 64))).ravel().tolist())) > 20  # something drawn


# -- real data: MobileNetV2 on two real categories ------------------------------------------------


@pytest.mark.realdata
def test_report_on_real_data(shared_data, tmp_path):
    from conftest import SHARED

    model = SHARED / "models" / "mobilenetv2-12-int8.onnx"
    if not model.is_file():
        pytest.skip(f"{model} is absent (see ../shared/models/README.md)")
    opts = ["--backbone", f"onnx:{model}", "--layer", "426_quantized", "--k", "auto", "--shots", "12"]
    tire, metal = shared_data / "mvtec3d_tire" / "tire", shared_data / "mpdd" / "metal_plate"
    for cat, name in [(tire, "tire"), (metal, "metal_plate")]:
        r = runner.invoke(app, ["fit", str(cat / "train" / "good"), "-c", name, "-o", str(tmp_path / name), *opts])
        assert r.exit_code == 0, r.output
    test = [str(next((tire / "test" / d).iterdir())) for d in ("good", "cut")]
    r = runner.invoke(app, ["explain", str(tmp_path / "tire"), *test, "--compare", str(tmp_path / "metal_plate"),
                            "-o", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    det = LakeDetector.load(tmp_path / "tire")
    var = det.channel_variance_.numpy()
    assert len(var) == 96 and data["variance"]["k"] == knee_k(var) == det.neurons_.numel()
    assert data["variance"]["neurons"] == np.argsort(-var, kind="stable")[: data["variance"]["k"]].tolist()
    assert [im["name"] for im in data["images"]] == test
    assert np.array(data["comparison"]["jaccard"]).shape == (2, 2)
    for src in re.findall(r"<img src='([^']+)'", (tmp_path / "rep" / "index.html").read_text()):
        assert (tmp_path / "rep" / src).is_file()
