"""The evaluation runner end to end on tiny synthetic datasets in the MVTec layout, with the
tiny random CLIP and a tiny ONNX model; ablation and baseline grids; the CLI commands."""

from __future__ import annotations

import csv
import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from _onnx_models import save_tiny_onnx
from _synthetic import write_category
from lakead import ConfigError, LakeConfig, LakeDetector, Runtime
from lakead.cli import app
from lakead.data import load_dataset, read_mask, select_shots
from lakead.evaluate import (
    METRIC_COLUMNS,
    FeatureCache,
    ImageCache,
    Variant,
    ablation_variants,
    baseline_variants,
    choose_examples,
    evaluate,
    parse_shots,
    run_grid,
)
from lakead.methods import METHODS, SCORE_FIELDS, get_method
from lakead.metrics import image_metrics, pixel_metrics
from lakead.ops import anomaly_probability, upsample_map

runner = CliRunner()
#: Four images per forward pass: the test splits (7 images) take two batches.
RT = Runtime(device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two categories: 5 normal training images, 3 normal and 4 defect test images each."""
    root = tmp_path_factory.mktemp("data")
    write_category(root, "bottle", n_train=5, n_good=3, defects={"crack": 2, "hole": 2}, seed=1)
    write_category(root, "carpet", n_train=5, n_good=3, defects={"cut": 4}, seed=2)
    return root


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return save_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def onnx_config(tiny_onnx):
    return LakeConfig(backbone=f"onnx:{tiny_onnx}", layer="block2", k=6)


def clip_config(tiny_clip_dir, **kw):
    return LakeConfig(backbone=str(tiny_clip_dir), layer=2, k=8, image_size=64, **kw)


def test_report_end_to_end_with_onnx(dataset, onnx_config, tmp_path):
    out = tmp_path / "report"
    rep = evaluate(dataset, out, onnx_config, shots=3, seed=0, examples=3, command="lakead eval ...", runtime=RT)
    assert sorted(p.name for p in out.iterdir()) == ["figures", "metrics.csv", "metrics.json", "report.md", "scores.csv"]
    doc = json.loads((out / "metrics.json").read_text())
    assert [c["name"] for c in doc["categories"]] == ["bottle", "carpet"]
    bottle = doc["categories"][0]
    assert bottle["counts"] == {"train": 5, "test_normal": 3, "test_defect": 4, "defect_without_mask": 0}
    assert bottle["support_rule"] == "3 of 5 images sampled with seed 0" and len(bottle["support"]) == 3
    assert bottle["support"] == [str(p) for p in select_shots(load_dataset(dataset / "bottle")[0].train, 3, 0)[0]]
    assert doc["settings"]["config"]["layer"] == "block2" and doc["settings"]["shots"] == 3
    assert doc["settings"]["backbone"]["kind"] == "onnx"
    # how it ran is recorded beside the options, not among them
    assert doc["settings"]["runtime"] == {"device": "cpu", "batch_size": 4, "precision": "float32", "device_used": "cpu"}
    assert not {"device", "batch_size", "precision"} & set(doc["settings"]["config"])
    # the planted checker defects are easy: wiring mistakes (flipped labels, shifted masks) would show here
    for c in doc["categories"]:
        assert c["image"]["auroc"] >= 0.9 and c["pixel"]["auroc"] >= 0.9 and c["pixel"]["pro"] >= 0.5
        assert all(0 <= b < 0.01 for b in c["pixel_error_bounds"].values())
    # the mean row is the mean of the category rows
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["category"] for r in rows] == ["bottle", "carpet", "mean"]
    for col in METRIC_COLUMNS:
        assert float(rows[2][col]) == pytest.approx((float(rows[0][col]) + float(rows[1][col])) / 2)
        assert float(rows[2][col]) == pytest.approx(doc["mean"][col])
    # image metrics recomputed from scores.csv
    scores = list(csv.DictReader((out / "scores.csv").open()))
    assert len(scores) == 14
    b = [r for r in scores if r["category"] == "bottle"]
    again = image_metrics([int(r["label"]) for r in b], [float(r["score"]) for r in b])
    assert again == pytest.approx(bottle["image"])
    # the detector's own decisions: the rates in metrics.json are those of the anomalous column
    flags = [(int(r["label"]), r["anomalous"] == "True") for r in b]
    dec = bottle["decision"]
    assert dec["false_alarm_rate"] == pytest.approx(np.mean([f for lab, f in flags if lab == 0]))
    assert dec["recall"] == pytest.approx(np.mean([f for lab, f in flags if lab == 1]))
    assert dec["threshold"] == pytest.approx(rep.results[0].decision["threshold"]) and math.isfinite(dec["threshold"])
    md = (out / "report.md").read_text()
    assert "| bottle (3 / 4) |" in md and "| **mean** |" in md and "lakead eval ..." in md
    assert "## Decisions at the threshold learned from normal images only" in md
    assert "3 of 5 images sampled with seed 0" in md and "figures/bottle.png" in md and "text probe: off" in md
    assert "- run: device cpu, batch size 4, precision float32" in md
    with Image.open(out / "figures" / "bottle.png") as im:
        assert im.width > 600 and im.height > 300
    assert [e.defect for e in rep.results[0].examples] == ["crack", "hole", "good"]


def test_pixel_metrics_match_a_direct_computation(dataset, onnx_config, tmp_path):
    """The runner's streamed pixel metrics equal fit + predict + pixel_metrics done by hand."""
    rep = evaluate(dataset, tmp_path / "r", onnx_config, categories=["carpet"], shots=None, seed=None, figures=False,
                   runtime=RT)
    (cat,) = load_dataset(dataset, ["carpet"])
    det = LakeDetector.from_config(onnx_config).fit(list(cat.train), cat.class_name)
    pred = det.predict([s.path for s in cat.test])
    masks = [read_mask(s.mask) if s.label else np.zeros(m.shape, bool) for s, m in zip(cat.test, pred.maps)]
    assert rep.results[0].pixel == pytest.approx(pixel_metrics(masks, pred.maps), abs=1e-12)
    assert rep.results[0].support_rule == "all 5 images"


def test_defect_without_mask_is_left_out_of_pixel_metrics(dataset, onnx_config, tmp_path, caplog):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset / "bottle", data / "bottle")
    gone = data / "bottle" / "ground_truth" / "hole" / "001_mask.png"
    gone.unlink()
    with caplog.at_level(logging.WARNING, logger="lakead"):
        rep = evaluate(data, tmp_path / "r", onnx_config, shots=3, figures=False, runtime=RT)
    r = rep.results[0]
    assert r.pixel_excluded == [str(data / "bottle" / "test" / "hole" / "001.png")]
    assert r.pixel_images == 6 and len(r.scores) == 7  # still scored at image level
    md = (tmp_path / "r" / "report.md").read_text()
    assert "1 defect image(s) without a mask count for image metrics only" in md
    assert "no mask" in caplog.text


def test_report_with_tiny_clip_and_text_probe(dataset, tiny_clip_dir, tmp_path):
    rep = evaluate(dataset, tmp_path / "r", clip_config(tiny_clip_dir), categories=["bottle"], shots=4, examples=2, runtime=RT)
    r = rep.results[0]
    assert np.all(np.isfinite(r.scores)) and np.isfinite(r.image["auroc"]) and np.isfinite(r.pixel["pro"])
    fused = [row["fused"] for row in r.rows]
    assert np.allclose(fused, [row["visual"] + 0.1 * row["semantic"] for row in r.rows], atol=1e-5)
    assert np.allclose(r.scores, fused)  # method "lake": the fused score
    assert "text probe: on" in (tmp_path / "r" / "report.md").read_text()


def test_text_method_uses_the_probe_alone(dataset, tiny_clip_dir, tmp_path):
    rep = evaluate(dataset, tmp_path / "r", clip_config(tiny_clip_dir), categories=["bottle"], shots=4, method="text",
                   figures=False, runtime=RT)
    r = rep.results[0]
    assert np.allclose(r.scores, [row["semantic"] for row in r.rows])
    assert all(0.0 <= row["semantic"] <= 1.0 for row in r.rows)
    doc = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert doc["settings"]["config"]["map_source"] == "semantic" and doc["settings"]["image_score"] == "semantic"


def test_semantic_maps_are_the_text_probe_per_token(tiny_backbone, dataset):
    (cat,) = load_dataset(dataset, ["bottle"])
    det = LakeDetector(tiny_backbone, layer=2, k=8, image_size=64, map_source="semantic").fit(list(cat.train), "bottle")
    img = det.read_image(cat.test[-1].path)
    pred = det.predict([img])
    pixels = tiny_backbone.preprocessing([img], 64)
    f = tiny_backbone.extract(pixels, [det.layer_], det.semantic_layer_)
    p = anomaly_probability(f.joint, det.text_embeddings_, det.logit_scale_)  # (1, N)
    expected = upsample_map(p.reshape(det.grid_), img.shape[:2])
    assert np.allclose(pred.maps[0], expected, atol=1e-5)
    assert pred.semantic[0] == pytest.approx(float(p.max()), abs=1e-6)
    assert det.map_range_ == (0.5, 1.0)
    with pytest.raises(ConfigError, match="map_source='semantic' needs the text probe"):
        LakeDetector(tiny_backbone, layer=2, k=8, use_text=False, map_source="semantic").fit(list(cat.train), "bottle")


def test_text_method_needs_a_text_tower(dataset, onnx_config, tmp_path):
    with pytest.raises(ConfigError, match="method 'text' needs a text tower"):
        evaluate(dataset, tmp_path / "r", onnx_config, method="text")
    with pytest.raises(ConfigError, match="unknown method 'clip'"):
        evaluate(dataset, tmp_path / "r", onnx_config, method="clip")


def test_choose_examples():
    from pathlib import Path

    from lakead.data import Sample

    test = [Sample(Path("g0"), 0, "good", None), Sample(Path("a0"), 1, "a", None), Sample(Path("a1"), 1, "a", Path("m")),
            Sample(Path("b0"), 1, "b", Path("m")), Sample(Path("a2"), 1, "a", Path("m"))]
    assert choose_examples(test, 3) == [2, 3, 0]  # masked "a" first, then "b", then a normal image
    assert choose_examples(test, 5) == [2, 3, 4, 1, 0]
    assert choose_examples(test, 0) == []


def test_parse_shots():
    assert parse_shots("16") == 16 and parse_shots(" ALL ") is None
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(ConfigError, match="positive integer or 'all'"):
            parse_shots(bad)


def test_ablation_variants_product_and_dedupe(onnx_config):
    vs = ablation_variants(onnx_config, ks=[2, 4], lams=[0.1], shots=[2, None], layers=["block2"],
                           selections=["top", "random", "all"], seeds=[0, 1])
    labels = [(v.label["shots"], v.label["selection"], v.label["k"]) for v in vs]
    assert labels == [(2, "top", 2), (2, "top", 4), (2, "random", 2), (2, "random", 4), (2, "all", "all"),
                      ("all", "top", 2), ("all", "top", 4), ("all", "random", 2), ("all", "random", 4), ("all", "all", "all")]
    assert [v.seeds for v in vs[:5]] == [(0,), (0,), (0, 1), (0, 1), (0,)]
    with pytest.raises(ConfigError, match="selection must be one of"):
        ablation_variants(onnx_config, ks=[2], lams=[0.1], shots=[2], layers=["block2"], selections=["best"])


def test_ablation_grid(dataset, onnx_config, tmp_path):
    vs = ablation_variants(onnx_config, ks=[2, 6], lams=[0.1], shots=[3], layers=["block2"],
                           selections=["top", "random", "all"], seeds=[0, 1])
    rep = run_grid(dataset, tmp_path, vs, title="ablation", command="lakead ablate ...", runtime=RT)
    assert len(rep.rows) == 5 and rep.label_keys == ["selection", "k"]
    md = (tmp_path / "ablation.md").read_text()
    assert "| selection | k | I-AUROC |" in md and "| random | 2 (mean of seeds 0,1) |" in md
    assert "## bottle" in md and "## carpet" in md and "lakead ablate ..." in md
    rows = list(csv.DictReader((tmp_path / "ablation.csv").open()))
    assert len(rows) == 5 * 3 and {r["category"] for r in rows} == {"mean", "bottle", "carpet"}
    # a random row is the mean over its seeds, each an ordinary run
    doc = json.loads((tmp_path / "ablation.json").read_text())
    rnd = doc["rows"][2]
    assert all(0 <= rnd["pixel_error_bounds"][k] < 0.01 for k in ("auroc", "ap", "f1_max", "pro"))
    assert rnd["label"] == {"layer": "block2", "shots": 3, "selection": "random", "k": 2, "lam": 0.1, "score_norm": "loo"}
    per_seed = [
        evaluate(dataset, tmp_path / f"s{s}", LakeConfig(**{**onnx_config.to_dict(), "selection": "random", "k": 2, "seed": s}),
                 categories=["bottle"], shots=3, seed=0, figures=False, runtime=RT).results[0].metrics()["pixel_pro"]
        for s in (0, 1)
    ]
    assert rnd["categories"]["bottle"]["pixel_pro"] == pytest.approx(np.mean(per_seed))


def test_baseline_variants(onnx_config, tiny_clip_dir, caplog):
    clip = clip_config(tiny_clip_dir)
    vs = baseline_variants(clip, methods=["lake", "visual", "all", "random", "text"], shots=4, seeds=[0, 1])
    assert [(v.label["method"], v.label["score_norm"]) for v in vs] == [
        ("lake", "loo"), ("lake", "none"), ("visual", "-"), ("all", "-"), ("random", "-"), ("text", "-")]
    assert [v.score for v in vs] == ["scores", "scores", "visual", "visual", "visual", "semantic"]
    assert vs[3].config.selection == "all" and not vs[3].config.use_text and vs[4].seeds == (0, 1)
    assert [v.method for v in vs] == ["lake", "lake", "visual", "all", "random", "text"]
    with caplog.at_level(logging.WARNING, logger="lakead"):
        no_text = baseline_variants(onnx_config, methods=["lake", "text"], shots=4, has_text=False)
    assert [v.label["method"] for v in no_text] == ["lake"] and "'text' left out" in caplog.text


def test_baselines_grid_with_tiny_clip(dataset, tiny_clip_dir, tmp_path):
    vs = baseline_variants(clip_config(tiny_clip_dir), methods=["lake", "all", "text"], shots=3, score_norms=["loo"])
    rep = run_grid(dataset, tmp_path, vs, categories=["carpet"], title="baselines", runtime=RT)
    assert [r["label"]["method"] for r in rep.rows] == ["lake", "all", "text"] == [r["method"] for r in rep.rows]
    for r in rep.rows:
        assert all(np.isfinite(v) for v in r["mean"].values())
    md = (tmp_path / "baselines.md").read_text()
    assert md.count("\n| method | score_norm | k | I-AUROC |") == 2  # the mean table and carpet's
    assert "| text | - | - |" in md and "| all | - | all |" in md


def test_feature_cache_changes_nothing(dataset, tiny_clip_dir, tmp_path):
    vs = baseline_variants(clip_config(tiny_clip_dir), methods=["lake", "visual", "text"], shots=3, score_norms=["loo"])
    cached = run_grid(dataset, tmp_path / "c", vs, categories=["bottle"], cache_features=True, runtime=RT)
    plain = run_grid(dataset, tmp_path / "p", vs, categories=["bottle"], cache_features=False, runtime=RT)
    for a, b in zip(cached.rows, plain.rows):
        assert a["mean"] == pytest.approx(b["mean"], abs=1e-6)


def test_feature_cache_hits_and_keys(tiny_backbone):
    cache = FeatureCache(tiny_backbone)
    px = torch.randn(3, 3, 64, 64)
    full = cache.extract(px, [2], 4)  # with the joint block
    assert cache.misses == 3 and cache.hits == 0
    vis = cache.extract(px[1:], [2])  # served from the entries above
    assert cache.hits == 2 and vis.joint is None and torch.equal(vis.blocks[2], full.blocks[2][1:])
    assert vis.grids == {2: (8, 8)}
    again = cache.extract(px, [2], 4)
    assert cache.hits == 5 and torch.equal(again.joint, full.joint) and again.joint_grid == full.joint_grid
    cache.extract(px + 1e-3, [2])  # other pixels: computed
    cache.extract(px, [3])  # another block: computed
    assert cache.misses == 9
    cache.clear()
    cache.extract(px[:1], [2])
    assert cache.misses == 10
    assert cache.supports_autocast == tiny_backbone.supports_autocast


def test_feature_cache_runs_each_image_and_block_once(tiny_backbone, monkeypatch):
    """A request that is partly cached runs the network for the missing blocks of the images
    that lack them, and only those; the answer equals the backbone's own."""
    runs = []
    real = tiny_backbone.extract

    def counting(pixels, blocks, joint_block=None):
        runs.append((pixels.shape[0], tuple(blocks), joint_block))
        return real(pixels, blocks, joint_block)

    monkeypatch.setattr(tiny_backbone, "extract", counting)
    cache = FeatureCache(tiny_backbone)
    px = torch.randn(4, 3, 64, 64)
    cache.extract(px[:2], [2])
    got = cache.extract(px, [2, 3], 4)  # images 0-1 lack block 3 and the joint block; 2-3 lack everything
    assert sorted(runs[1:]) == [(2, (2, 3), 4), (2, (3,), 4)]
    assert cache.misses == 6 and cache.hits == 0
    want = real(px, [2, 3], 4)
    for b in (2, 3):
        torch.testing.assert_close(got.blocks[b], want.blocks[b], rtol=1e-5, atol=1e-5)
        assert got.grids[b] == want.grids[b]
    torch.testing.assert_close(got.joint, want.joint, rtol=1e-5, atol=1e-5)
    n = len(runs)
    cache.extract(px.flip(0), [3, 2], 4)  # any order of images and blocks: all cached
    assert len(runs) == n and cache.hits == 4


def test_a_grid_of_two_variants_runs_the_backbone_once_per_image(dataset, tiny_clip_dir, tiny_backbone, tmp_path, monkeypatch):
    import lakead.evaluate.grids as grids

    caches = []

    class Recorded(FeatureCache):
        def __init__(self, inner):
            super().__init__(inner)
            caches.append(self)

    monkeypatch.setattr(grids, "FeatureCache", Recorded)
    runs: list[tuple[str, object]] = []  # (image, block) pairs the network ran
    real = tiny_backbone.extract

    def counting(pixels, blocks, joint_block=None):
        for i in range(pixels.shape[0]):
            img = FeatureCache._image_key(pixels[i])
            runs.extend((img, ("block", b)) for b in blocks)
            if joint_block is not None:
                runs.append((img, ("joint", joint_block)))
        return real(pixels, blocks, joint_block)

    monkeypatch.setattr(tiny_backbone, "extract", counting)
    vs = baseline_variants(clip_config(tiny_clip_dir), methods=["lake", "visual"], shots=3, score_norms=["loo"])
    run_grid(dataset, tmp_path, vs, categories=["bottle"], backbone=tiny_backbone, runtime=RT)
    (cache,) = caches
    images = 3 + 7  # the shots and the test images of bottle, the same for both rows
    assert cache.misses == images and cache.hits == images
    assert len(runs) == len(set(runs)) == 2 * images  # block 2 and the joint block, once each per image


@pytest.mark.parametrize("name", sorted(METHODS))
def test_evaluate_runs_every_method(name, dataset, tiny_clip_dir, tiny_backbone, tmp_path):
    m = get_method(name)
    if m.needs_text and not tiny_backbone.has_text:
        pytest.skip(f"method {name!r} needs a text tower")
    rep = evaluate(dataset, tmp_path / "r", clip_config(tiny_clip_dir), categories=["carpet"], shots=3, method=name,
                   figures=False, backbone=tiny_backbone, runtime=RT)
    (r,) = rep.results
    assert m.score in SCORE_FIELDS and np.all(np.isfinite(r.scores)) and len(r.scores) == 7
    field = {"scores": "fused", "visual": "visual", "semantic": "semantic"}[m.score]
    assert np.allclose(r.scores, [row[field] for row in r.rows])
    assert np.isfinite(r.image["auroc"]) and np.isfinite(r.pixel["auroc"])
    s = rep.settings
    assert s["method"] == name and s["image_score"] == m.score and s["runtime"]["batch_size"] == 4
    for key, value in m.overrides.items():
        assert s["config"][key] == value
    # a Method object works as well as its name, and gives the same numbers
    again = evaluate(dataset, tmp_path / "r2", clip_config(tiny_clip_dir), categories=["carpet"], shots=3, method=m,
                     figures=False, backbone=tiny_backbone, runtime=RT)
    assert np.allclose(again.results[0].scores, r.scores, atol=1e-6)


def test_a_grid_row_can_be_any_method(dataset, tiny_clip_dir, tmp_path):
    base = clip_config(tiny_clip_dir)
    vs = [Variant({"row": "lake"}, base, "scores", 3), Variant({"row": "bottom"}, base, "visual", 3, method="bottom")]
    rep = run_grid(dataset, tmp_path, vs, categories=["carpet"], title="rows", runtime=RT)
    assert [r["method"] for r in rep.rows] == ["lake", "bottom"]
    assert rep.settings["runtime"]["batch_size"] == 4
    one = evaluate(dataset, tmp_path / "b", base, categories=["carpet"], shots=3, method="bottom", figures=False, runtime=RT)
    assert rep.rows[1]["mean"] == pytest.approx(one.mean, abs=1e-6)
    with pytest.raises(ConfigError, match="unknown method 'best'"):
        run_grid(dataset, tmp_path, [Variant({"row": 1}, base, "scores", 3, method="best")], runtime=RT)


def test_image_cache_reads_with_a_callable_or_a_detector(dataset, onnx_config):
    (cat,) = load_dataset(dataset, ["bottle"])
    path = cat.test[0].path
    calls = []

    def read(p):
        calls.append(p)
        return np.zeros((4, 5, 3), np.uint8)

    cache = ImageCache()
    assert cache.read(read, path).shape == (4, 5, 3)
    assert cache.read(read, path).shape == (4, 5, 3) and calls == [path]  # kept
    cache.clear()
    det = LakeDetector.from_config(onnx_config)
    assert cache.read(det, path).shape == det.read_image(path).shape
    assert cache.read_or_path(det, path.with_name("missing.png")) == path.with_name("missing.png")


# -- the command line ---------------------------------------------------------------------


def test_cli_eval(dataset, tiny_onnx, tmp_path):
    out = tmp_path / "r"
    r = runner.invoke(app, ["eval", str(dataset), "--out", str(out), "--backbone", f"onnx:{tiny_onnx}", "--layer", "block2",
                            "--k", "6", "--shots", "3", "--categories", "carpet", "--batch-size", "4", "--examples", "2"])
    assert r.exit_code == 0, r.output
    assert "carpet" in r.output and (out / "figures" / "carpet.png").is_file()
    doc = json.loads((out / "metrics.json").read_text())
    cmd = doc["settings"]["command"]
    assert cmd.startswith(f"lakead eval {dataset} --out {out}") and "--layer block2" in cmd and "--k 6" in cmd


def test_cli_eval_errors(dataset, tiny_onnx, tmp_path):
    base = ["eval", str(dataset), "--out", str(tmp_path / "r"), "--backbone", f"onnx:{tiny_onnx}"]
    r = runner.invoke(app, [*base, "--layer", "nope"])
    assert r.exit_code == 1 and "layer 'nope' is not a tensor" in r.output and "block2 (12x16x16)" in r.output
    r = runner.invoke(app, [*base, "--layer", "block2", "--k", "6", "--shots", "many"])
    assert r.exit_code == 1 and "shots must be a positive integer or 'all'" in r.output
    r = runner.invoke(app, [*base, "--layer", "block2", "--categories", "wood"])
    assert r.exit_code == 1 and "no category 'wood'; available: bottle, carpet" in r.output


def test_cli_eval_mask_size_mismatch(dataset, tiny_onnx, tmp_path):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(dataset / "carpet", data / "carpet")
    mask = data / "carpet" / "ground_truth" / "cut" / "002_mask.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    r = runner.invoke(app, ["eval", str(data), "--out", str(tmp_path / "r"), "--backbone", f"onnx:{tiny_onnx}", "--layer", "block2"])
    assert r.exit_code == 1
    flat = " ".join(r.output.split())
    assert str(mask) in flat and str(data / "carpet" / "test" / "cut" / "002.png") in flat


def test_cli_ablate_and_baselines(dataset, tiny_onnx, tmp_path):
    common = ["--backbone", f"onnx:{tiny_onnx}", "--layer", "block2", "--categories", "bottle", "--batch-size", "4"]
    r = runner.invoke(app, ["ablate", str(dataset), "--out", str(tmp_path / "a"), *common, "--k", "2,6",
                            "--selection", "top,bottom", "--shots", "2,all"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((tmp_path / "a" / "ablation.csv").open()))
    assert len(rows) == 8 * 2 and {r["shots"] for r in rows} == {"2", "all"}
    r = runner.invoke(app, ["baselines", str(dataset), "--out", str(tmp_path / "b"), *common, "--k", "6", "--shots", "3",
                            "--seeds", "0"])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "b" / "baselines.md").read_text()
    for method in ("lake", "visual", "all", "random", "bottom"):
        assert f"| {method} |" in md
    assert "| text |" not in md  # no text tower
    r = runner.invoke(app, ["ablate", str(dataset), "--out", str(tmp_path / "c"), *common, "--k", "two"])
    assert r.exit_code == 2 and "Invalid value for '--k'" in r.output and "'two'" in r.output  # a usage error


@pytest.mark.realdata
def test_eval_on_shared_data_with_mobilenet(shared_data, tmp_path):
    from conftest import SHARED

    model = SHARED / "models" / "mobilenetv2-12-int8.onnx"
    if not model.is_file():
        pytest.skip(f"{model} is absent (see ../shared/models/README.md)")
    out = tmp_path / "r"
    r = runner.invoke(app, ["eval", str(shared_data), "--out", str(out), "--backbone", f"onnx:{model}", "--layer", "400",
                            "--k", "8", "--shots", "4", "--categories", "metal_plate", "--batch-size", "16", "--examples", "2"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "metrics.json").read_text())
    (plate,) = doc["categories"]
    assert plate["name"] == "mpdd/metal_plate" and plate["pixel_images"] == 67 and len(plate["support"]) == 4
    assert all(v is not None and 0 <= v <= 1 for v in [*plate["image"].values(), *plate["pixel"].values()])
    assert all(b < 0.01 for b in plate["pixel_error_bounds"].values())
    assert (out / "figures" / "mpdd__metal_plate.png").is_file()
