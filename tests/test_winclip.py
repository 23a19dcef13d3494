"""WinCLIP's equations against hand-computed values on tiny tensors, the window forward against
CLIP's own, the zero-shot path without any image, and the three variants end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import texture, with_defect
from lakead import ConfigError, Runtime
from lakead.methods import get_method, load_detector
from lakead.methods.winclip import WinCLIPConfig, WinCLIPDetector
from lakead.methods.winclip.maps import association, fuse, harmonic_aggregate, harmonic_mean, text_probability, window_indices
from lakead.methods.winclip.prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, class_prototypes, prompt_ensemble
from lakead.methods.winclip.score import text_maps


# -- prompts ---------------------------------------------------------------------------------


def test_prompt_ensemble_is_every_state_in_every_template():
    normal, anomalous = prompt_ensemble("bottle_cap")
    assert len(normal) == len(NORMAL_STATES) * len(TEMPLATES) and len(anomalous) == len(ANOMALOUS_STATES) * len(TEMPLATES)
    assert len(set(normal)) == len(normal) and len(set(anomalous)) == len(anomalous)  # no template twice
    assert "a bright photo of the flawless bottle cap." in normal and "a photo of a damaged bottle cap." in anomalous
    assert not set(normal) & set(anomalous)


def test_prototypes_are_the_normalised_mean_of_normalised_embeddings():
    normal = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # unit vectors e1, e3 once normalised
    anomalous = torch.tensor([[0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -1.0]])  # e2, e2, -e3
    p = class_prototypes(normal, anomalous)
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(p[0].numpy(), [s, 0, s], atol=1e-6)  # mean (1/2, 0, 1/2), normalised
    np.testing.assert_allclose(p[1].numpy(), np.array([0, 2, -1]) / math.sqrt(5), atol=1e-6)  # mean (0, 2/3, -1/3)


# -- windows and aggregation -----------------------------------------------------------------


def test_window_geometry_on_a_3x4_grid():
    # patches numbered row-major:   0 1 2 3 / 4 5 6 7 / 8 9 10 11
    assert window_indices((3, 4), 2).tolist() == [
        [0, 1, 4, 5], [1, 2, 5, 6], [2, 3, 6, 7], [4, 5, 8, 9], [5, 6, 9, 10], [6, 7, 10, 11]]
    assert window_indices((3, 4), 3).tolist() == [[0, 1, 2, 4, 5, 6, 8, 9, 10], [1, 2, 3, 5, 6, 7, 9, 10, 11]]
    assert window_indices((3, 4), 1).tolist() == [[i] for i in range(12)]
    with pytest.raises(ValueError, match="does not fit"):
        window_indices((3, 4), 4)


def test_harmonic_aggregation_by_hand():
    w = window_indices((2, 3), 2)  # windows {0,1,3,4} and {1,2,4,5}
    agg = harmonic_aggregate(torch.tensor([[0.2, 0.6], [1.0, 1.0]]), w, 6)
    # patches 0, 3: only window 0 -> 0.2; 2, 5: only window 1 -> 0.6; 1, 4: both -> 2 / (1/0.2 + 1/0.6) = 0.3
    np.testing.assert_allclose(agg[0].numpy(), [0.2, 0.3, 0.6, 0.2, 0.3, 0.6], rtol=1e-6)
    np.testing.assert_allclose(agg[1].numpy(), np.ones(6), rtol=1e-6)
    assert harmonic_aggregate(torch.tensor([[0.5]]), torch.tensor([[0, 1]]), 3)[0, 2] == 0  # patch 2: no window
    np.testing.assert_allclose(harmonic_mean(torch.tensor([[0.5, 1.0], [0.25, 1.0]])).numpy(), [1 / 3, 1.0], rtol=1e-6)


def test_text_probability_is_a_tempered_softmax_of_cosines():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])  # cosines (1, 0), (.707, .707), (0, 1)
    p = text_probability(z, protos, 0.5)
    expected = [1 / (1 + math.exp(2.0)), 0.5, 1 / (1 + math.exp(-2.0))]
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-6)


def test_zero_shot_map_is_the_harmonic_mean_of_image_and_window_scales():
    protos = torch.eye(2)
    image = torch.tensor([[1.0, 1.0]])  # P = 0.5
    windows = [torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])]  # P = sigmoid(1/T), sigmoid(-1/T)
    table = window_indices((2, 3), 2)  # {0, 1, 3, 4}, {1, 2, 4, 5}
    p_img, m0 = text_maps(image, windows, [table], 6, protos, 1.0)
    a, b = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0))
    win = [a, 2 / (1 / a + 1 / b), b] * 2
    expected = [2 / (1 / 0.5 + 1 / v) for v in win]
    assert float(p_img[0]) == pytest.approx(0.5)
    np.testing.assert_allclose(m0[0].numpy(), expected, rtol=1e-5)


# -- reference association and fusion ----------------------------------------------------------


def test_association_is_half_the_smallest_cosine_distance():
    memory = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    q = torch.tensor([[[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]]])
    a = association(q, memory)
    # q0 = memory 0: 0; q1: best cos 1/sqrt(2) -> (1 - .7071) / 2; q2: best cos with (-1,-1) = 1/sqrt(2)
    np.testing.assert_allclose(a[0].numpy(), [0.0, (1 - 1 / math.sqrt(2)) / 2, (1 - 1 / math.sqrt(2)) / 2], atol=1e-6)


def test_association_leaves_out_the_query_s_own_image():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    owner = torch.tensor([0, 1], dtype=torch.int32)
    q = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])  # image 0 and image 1, the same token
    a = association(q, memory, query_image=torch.tensor([0, 1], dtype=torch.int32), memory_image=owner)
    np.testing.assert_allclose(a[:, 0].numpy(), [0.5, 0.0], atol=1e-6)  # image 0 only sees (0, 1): cos 0


def test_fusion_weights():
    t, v = torch.tensor([0.2, 0.8]), torch.tensor([0.6, 0.0])
    np.testing.assert_allclose(fuse(t, v, 0.5).numpy(), [0.4, 0.4], rtol=1e-6)
    np.testing.assert_allclose(fuse(t, v, 0.25).numpy(), [0.3, 0.6], rtol=1e-6)
    assert fuse(t, None, 0.5) is t


# -- the window forward ------------------------------------------------------------------------


def test_a_window_covering_every_patch_is_clip_s_image_embedding(tiny_backbone):
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    every = torch.arange(16)[None]  # one window: the whole 4x4 grid
    wf = tiny_backbone.window_embeddings(px, [every, window_indices((4, 4), 2)], 0, [2, 4])
    ref = tiny_backbone.model.get_image_features(pixel_values=px)
    ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    torch.testing.assert_close(wf.image, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wf.windows[0][:, 0], ref, rtol=1e-5, atol=1e-5)
    assert wf.windows[1].shape == (2, 9, ref.shape[1]) and wf.grid == (4, 4)
    torch.testing.assert_close(wf.blocks[4], tiny_backbone.extract(px, [4]).blocks[4])
    # a window of one patch: the tower saw the class token and that patch only
    single = tiny_backbone.window_embeddings(px, [torch.tensor([[5]])], 0).windows[0][:, 0]
    vision = tiny_backbone.model.vision_model
    h = vision.pre_layrnorm(vision.embeddings(px))[:, [0, 6]]  # class token and patch 5
    for layer in vision.encoder.layers:
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
    torch.testing.assert_close(single, tiny_backbone.to_joint(h[:, 0]), rtol=1e-5, atol=1e-5)


# -- the detectors -----------------------------------------------------------------------------


def test_zero_shot_runs_without_any_image(tiny_backbone, tmp_path):
    det = WinCLIPDetector(tiny_backbone).fit([], "tile")
    assert det.support_ == [] and det.threshold_ == 0.5 and det.threshold_rule_ == "uncalibrated"
    assert "uncalibrated" in det.summary()["threshold_rule"]
    rng = np.random.default_rng(0)
    images = [texture(rng, (40, 56)), with_defect(texture(rng, (48, 48)), 16, 16, 16)]
    pred = det.predict(images)
    assert [m.shape for m in pred.maps] == [(40, 56), (48, 48)] and ((pred.scores > 0) & (pred.scores < 1)).all()
    np.testing.assert_array_equal(pred.anomalous, pred.scores > 0.5)
    with pytest.raises(ConfigError, match="without normal images"):
        det.predict(images, false_alarm_rate=0.1)
    with pytest.raises(ConfigError, match="without normal images"):  # what predict --false-alarm-rate asks first
        det.thresholds(0.1)
    loaded = load_detector(det.save(tmp_path / "m"), backbone=tiny_backbone)
    np.testing.assert_array_equal(loaded.predict(images).scores, pred.scores)
    with pytest.raises(ConfigError, match="needs normal images"):
        WinCLIPDetector(tiny_backbone, reference="winclip").fit([], "tile")


@pytest.mark.parametrize("method", ["winclip+", "winclip+lake"])
def test_few_shot_variants_see_the_planted_defect_in_their_visual_part(tiny_backbone, method):
    rng = np.random.default_rng(1)
    normals = [texture(rng, (48, 48)) for _ in range(6)]
    images = [texture(rng, (48, 48)), with_defect(texture(rng, (48, 48)), 8, 8, 24)]
    det = get_method(method).build(WinCLIPConfig(k=8, layer=3), tiny_backbone).fit(normals, "tile")
    pred = det.predict(images)
    assert pred.visual[1] > pred.visual[0]  # random weights: only the visual part can know the defect
    w = det.config.fusion_weight
    np.testing.assert_allclose(pred.scores, (1 - w) * pred.semantic + w * pred.visual, rtol=1e-5)
    assert det.loo_scores_.shape == (6,) and np.isfinite(det.threshold_)
    assert det.summary()["method"] == method
    levels, fitted = det.thresholds(0.3), det.thresholds()  # another budget from the saved scores, no refit
    assert fitted.image == det.threshold_ and fitted.seed == det.seed_threshold_ and levels.budget == 0.3
    again = det.predict(images, false_alarm_rate=0.3)
    assert (again.threshold, again.seed_threshold, again.pixel_threshold) == (levels.image, levels.seed, levels.pixel)


def test_lake_fusion_add_uses_both_visual_references(tiny_backbone):
    rng = np.random.default_rng(2)
    normals = [texture(rng, (40, 40)) for _ in range(4)]
    det = WinCLIPDetector(tiny_backbone, reference="lake", lake_fusion="add", k=4, layer=2).fit(normals, "tile")
    assert det.window_memory_ is not None and det.gallery_ is not None
    assert det.predict(normals[:1]).visual[0] >= 0


def test_bad_options_are_refused(tiny_backbone):
    with pytest.raises(ConfigError, match="window_sizes"):
        WinCLIPDetector(tiny_backbone, window_sizes="2,x")
    with pytest.raises(ConfigError, match="fusion_weight"):
        WinCLIPDetector(tiny_backbone, fusion_weight=1.5)
    with pytest.raises(ConfigError, match="does not fit"):
        WinCLIPDetector(tiny_backbone, window_sizes="5").fit([], "tile")  # a 4x4 grid
    with pytest.raises(ConfigError, match="unknown option"):
        WinCLIPDetector(tiny_backbone, lam=0.1)


def test_shared_option_names_mean_the_same_as_lake_s():
    import dataclasses

    from lakead import LakeConfig

    lake = {f.name: f for f in dataclasses.fields(LakeConfig)}
    for f in dataclasses.fields(WinCLIPConfig):
        if f.name in lake:
            assert f.default == lake[f.name].default and f.type == lake[f.name].type, f.name


# -- the command line --------------------------------------------------------------------------


@pytest.mark.slow  # loads the tiny CLIP from disk several times
def test_cli_fits_zero_shot_without_images_and_few_shot_with_them(tiny_clip_dir, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from lakead.cli import app

    rng = np.random.default_rng(5)
    normal = tmp_path / "normal"
    normal.mkdir()
    for i in range(4):
        Image.fromarray(texture(rng, (40, 40))).save(normal / f"n{i}.png")
    Image.fromarray(with_defect(texture(rng, (48, 48)), 8, 8, 16)).save(tmp_path / "d.png")
    run = CliRunner().invoke
    bb = ["--backbone", str(tiny_clip_dir)]
    r = run(app, ["fit", "--method", "winclip", "-c", "tile", "-o", str(tmp_path / "zero"), *bb])
    assert r.exit_code == 0, r.output
    assert "uncalibrated" in r.output and load_detector(tmp_path / "zero").support_ == []
    r = run(app, ["fit", "--method", "winclip+lake", "-c", "tile", "-o", str(tmp_path / "lake"), "--k", "4", "--layer", "2",
                  "--fusion-weight", "0.7", *bb, str(normal)])
    assert r.exit_code == 0, r.output
    det = load_detector(tmp_path / "lake")
    assert det.config.reference == "lake" and det.config.fusion_weight == 0.7 and len(det.support_) == 4
    for model in ("zero", "lake"):
        r = run(app, ["predict", str(tmp_path / model), str(tmp_path / "d.png"), "-o", str(tmp_path / f"out-{model}")])
        assert r.exit_code == 0, r.output
        assert (tmp_path / f"out-{model}" / "scores.csv").read_text().count("\n") == 2
    r = run(app, ["fit", "-c", "tile", "-o", str(tmp_path / "lake-none"), *bb])  # LAKE needs images
    assert r.exit_code == 2 and "needs normal images" in r.output
    r = run(app, ["fit", "--method", "winclip", "--lam", "0.3", "-c", "tile", "-o", str(tmp_path / "x"), *bb])
    assert r.exit_code == 0 and "does not use --lam" in r.output  # named in a warning
    r = run(app, ["info", str(tmp_path / "lake")])
    assert r.exit_code == 0 and "winclip" in r.output


@pytest.mark.slow  # loads the tiny CLIP from disk several times
def test_the_service_store_fits_and_lists_a_winclip_model(tiny_clip_dir, tmp_path):
    from lakead.serve.store import ModelStore

    rng = np.random.default_rng(6)
    store = ModelStore(tmp_path / "models", default_backbone=str(tiny_clip_dir), device="cpu")
    info = store.create([texture(rng, (40, 40)) for _ in range(3)], ["a.png", "b.png", "c.png"], "tile",
                        {"k": 4, "layer": 2, "fusion_weight": 0.25}, method="winclip+lake")
    assert info["method"] == "winclip" and info["k"] == 4 and info["support_images"] == 3
    pred, _ = store.predict(info["id"], [with_defect(texture(rng, (48, 48)), 8, 8, 16)], ["d.png"])
    assert pred.maps[0].shape == (48, 48)
    det = load_detector(tmp_path / "models" / info["id"])
    assert det.config.reference == "lake" and det.config.fusion_weight == 0.25


@pytest.mark.slow  # loads the tiny CLIP from disk several times
def test_lakead_eval_runs_each_winclip_method(tiny_clip_dir, tmp_path):
    from typer.testing import CliRunner

    from _synthetic import write_category
    from lakead.cli import app

    write_category(tmp_path / "data", "bottle", n_train=4, n_good=2, defects={"crack": 2}, seed=3)
    for method in ("winclip", "winclip+", "winclip+lake"):
        out = tmp_path / method
        r = CliRunner().invoke(app, ["eval", str(tmp_path / "data"), "--out", str(out), "--shots", "3", "--method", method,
                                     "--backbone", str(tiny_clip_dir), "--k", "4", "--layer", "2", "--no-figures"])
        assert r.exit_code == 0, r.output
        report = (out / "report.md").read_text()
        assert f"method: `{method}`" in report and "window_sizes=2,3" in report


@pytest.mark.slow  # three methods over a synthetic dataset
def test_baselines_grid_runs_the_winclip_methods_beside_lake(tiny_backbone, tmp_path):
    from _synthetic import write_category
    from lakead import LakeConfig
    from lakead.data import load_dataset
    from lakead.evaluate import baseline_variants, run_grid

    write_category(tmp_path / "data", "bottle", n_train=4, n_good=2, defects={"crack": 2}, seed=4)
    base = LakeConfig(backbone=tiny_backbone.info.source, k=4, layer=2)
    variants = baseline_variants(base, methods=["lake", "winclip", "winclip+lake"], shots=3, score_norms=["loo"],
                                 options={"fusion_weight": 0.25})
    assert [v.config.fusion_weight for v in variants[1:]] == [0.25, 0.25]
    report = run_grid(load_dataset(tmp_path / "data"), tmp_path / "out", variants, backbone=tiny_backbone,
                      runtime=Runtime(device="cpu", batch_size=4), title="baselines")
    assert [r["label"]["method"] for r in report.rows] == ["lake", "winclip", "winclip+lake"]


def test_a_few_shot_model_fitted_on_one_image_saves_and_loads(tiny_backbone, tmp_path):
    """One support image: no leave-one-out score (NaN), no threshold; the model still saves."""
    rng = np.random.default_rng(5)
    det = WinCLIPDetector(tiny_backbone, reference="winclip").fit([texture(rng, (40, 40))], "tile")
    assert np.isnan(det.loo_scores_).all() and det.threshold_ == math.inf
    loaded = load_detector(det.save(tmp_path / "m"), backbone=tiny_backbone)
    assert np.isnan(loaded.loo_visual_).all() and loaded.threshold_ == math.inf
