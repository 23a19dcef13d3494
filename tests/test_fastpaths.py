"""Fast paths give the scores of the reference float32 path, within a stated tolerance.

The kept fast paths (docs/PERFORMANCE.md): ``precision="bfloat16"`` (torch.autocast around the
backbone) and batching (batch-size invariance is tested in test_detector.py). No timing is
asserted anywhere: speed is measured by benchmarks/speed.py.

Tolerance. Visual scores are normalised by the median leave-one-out score of the support
set, so a typical normal image scores about 1. bfloat16 keeps 8 bits of mantissa (a relative
rounding of 2^-9 per product), and the distances are computed in float32 from bfloat16
features; we accept ``BF16_TOL = 0.02`` on fused scores and maps, 2% of a typical normal
score. The tiny model moves them by about 0.005.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO, texture, with_defect
from lakead import ConfigError, LakeDetector
from lakead.cli import app

BF16_TOL = 0.02
OPTS = dict(k=8, layer=2, image_size=64, batch_size=4)


@pytest.fixture(scope="module")
def normals():
    rng = np.random.default_rng(20)
    return [texture(rng) for _ in range(8)]


@pytest.fixture(scope="module")
def test_images():
    rng = np.random.default_rng(21)
    return [texture(rng) for _ in range(5)] + [with_defect(texture(rng), 20, 28, 16), with_defect(texture(rng, (48, 80)), 10, 40, 14)]


@pytest.fixture(scope="module")
def reference(tiny_backbone, normals, test_images):
    det = LakeDetector(tiny_backbone, **OPTS).fit(normals, "tile")
    return det, det.predict(test_images)


def _max_map_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a.maps, b.maps))


def test_bfloat16_matches_float32(tiny_backbone, normals, test_images, reference):
    ref, ref_pred = reference
    det = LakeDetector(tiny_backbone, precision="bfloat16", **OPTS).fit(normals, "tile")
    pred = det.predict(test_images)
    assert np.abs(pred.scores - ref_pred.scores).max() <= BF16_TOL
    assert np.abs(pred.visual - ref_pred.visual).max() <= BF16_TOL
    assert np.abs(pred.semantic - ref_pred.semantic).max() <= BF16_TOL
    assert _max_map_diff(pred, ref_pred) <= BF16_TOL
    assert abs(det.threshold_ - ref.threshold_) <= BF16_TOL
    assert set(det.neurons_.tolist()) == set(ref.neurons_.tolist())
    # the planted defects still rank above every normal image, as they do in float32
    assert pred.scores[5:].min() > pred.scores[:5].max()
    assert ref_pred.scores[5:].min() > ref_pred.scores[:5].max()
    # the gallery and every output stay float32 whatever the backbone ran in
    assert det.gallery_.dtype == torch.float32 and pred.scores.dtype == np.float32
    assert all(m.dtype == np.float32 for m in pred.maps)


def test_bfloat16_really_runs_in_bfloat16(tiny_backbone, normals, reference):
    ref, _ = reference
    det = LakeDetector(tiny_backbone, precision="bfloat16", **OPTS).fit(normals[:3], "tile")
    pixels = tiny_backbone.preprocessing(normals[:1], 64)
    seen = []
    handle = tiny_backbone.model.vision_model.encoder.layers[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        det.predict(normals[:1])
        ref.predict(normals[:1])
    finally:
        handle.remove()
    assert seen == [torch.bfloat16, torch.float32]
    assert pixels.dtype == torch.float32


def test_bfloat16_leaves_a_shared_backbone_float32(tiny_backbone, normals, test_images, reference):
    ref, ref_pred = reference
    LakeDetector(tiny_backbone, precision="bfloat16", **OPTS).fit(normals, "tile").predict(test_images)
    assert {p.dtype for p in tiny_backbone.model.parameters()} == {torch.float32}
    again = ref.predict(test_images)
    np.testing.assert_array_equal(again.scores, ref_pred.scores)
    np.testing.assert_array_equal(again.maps[0], ref_pred.maps[0])


def test_precision_is_a_setting_of_the_run_not_of_the_model(tiny_backbone, normals, test_images, tmp_path):
    with pytest.raises(ConfigError, match="precision must be one of"):
        LakeDetector(tiny_backbone, precision="float16", **OPTS)
    det = LakeDetector(tiny_backbone, precision="bfloat16", **OPTS).fit(normals, "tile")
    before = det.predict(test_images)
    det.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "lakead.json").read_text())["config"]
    assert not {"precision", "device", "batch_size"} & set(saved)
    assert LakeDetector.load(tmp_path / "m", backbone=tiny_backbone).runtime.precision == "float32"
    loaded = LakeDetector.load(tmp_path / "m", backbone=tiny_backbone, precision="bfloat16")
    assert loaded.runtime.precision == "bfloat16"
    after = loaded.predict(test_images)
    np.testing.assert_allclose(after.scores, before.scores, rtol=0, atol=1e-6)


def test_precision_needs_a_torch_backbone(tmp_path, normals):
    from _onnx_models import save_tiny_onnx

    weights = save_tiny_onnx(tmp_path / "tiny.onnx", size=32)
    det = LakeDetector(f"onnx:{weights}", k=4, layer="feat1", image_size=32, precision="bfloat16", use_text=False)
    with pytest.raises(ConfigError, match="needs a torch backbone"):
        det.fit(normals[:2], "tile")


def test_cli_precision_on_fit_and_predict(tiny_clip_dir, normals, tmp_path):
    from PIL import Image

    good = tmp_path / "good"
    good.mkdir()
    for i, img in enumerate(normals[:4]):
        Image.fromarray(img).save(good / f"{i}.png")
    runner = CliRunner()
    model = tmp_path / "model"
    r = runner.invoke(app, ["fit", str(good), "-c", "tile", "-o", str(model), "--backbone", str(tiny_clip_dir), "--k", "8",
                            "--layer", "2", "--image-size", "64", "--device", "cpu", "--precision", "bfloat16"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "precision" not in json.loads((model / "lakead.json").read_text())["config"]  # the run's, not the model's
    outs = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / f"out-{precision}"
        r = runner.invoke(app, ["predict", str(model), str(good), "-o", str(out), "--maps", "none", "--precision", precision],
                          catch_exceptions=False)
        assert r.exit_code == 0, r.output
        lines = (out / "scores.csv").read_text().splitlines()
        col = lines[0].split(",").index("score")
        outs[precision] = np.array([float(line.split(",")[col]) for line in lines[1:]])
    assert np.abs(outs["float32"] - outs["bfloat16"]).max() <= BF16_TOL
    r = runner.invoke(app, ["predict", str(model), str(good), "-o", str(tmp_path / "x"), "--precision", "half"])
    assert r.exit_code == 2 and "'half' is not one of float32, bfloat16" in r.output  # a usage error


def _load_speed_script():
    spec = importlib.util.spec_from_file_location("lakead_speed_benchmark", REPO / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_runs_and_reports_every_figure(tmp_path, capsys):
    """The benchmark's code paths on the tiny model (its figures are meaningless at this size)."""
    speed = _load_speed_script()
    out = tmp_path / "speed.json"
    speed.main(["--preset", "tiny", "--model-cache", str(tmp_path / "models"), "--shots", "4", "--repeats", "1",
                "--batch-repeats", "1", "--fit-repeats", "1", "--batch-sizes", "1,2", "--image-hw", "40x56", "--layer", "2", "--k", "8",
                "--skip", "ceiling", "--paths", "bfloat16,int8", "--check-shots", "3", "--check-images", "2", "--json", str(out)])
    res = json.loads(out.read_text())
    steps = ("preprocessing", "backbone", "nearest_neighbour", "text_probe", "map", "predict")
    assert all(res["predict"][k]["median"] > 0 for k in steps)
    assert res["predict"]["text_embedding_calls"] == 0 and res["fit"]["text_embedding_calls_per_fit"] == 1
    # FlopCounterMode (attention through the math kernel) agrees with the analytic count
    assert res["backbone"]["flops"] == pytest.approx(res["backbone"]["analytic_flops"], rel=1e-6)
    # k = 8 of 32 channels, float32, plus the int32 image index of every gallery vector
    assert res["gallery"]["fraction"] == pytest.approx((8 * 4 + 4) / (32 * 4 + 4))
    assert set(res["ratios"]) == {"predict_over_forward", "fit_over_forwards", "gallery_fraction"}
    for path in ("bfloat16", "int8"):
        assert res["paths"][path]["scores"]["max_abs_score"] < 0.1
    assert "throughput" in res and set(res["throughput"]) == {"batch_1", "batch_2"}
    assert "ratios (target)" in capsys.readouterr().out
    # the Markdown tables of docs/PERFORMANCE.md are rendered from the JSON, without measuring again
    speed.main(["--from-json", str(out), "--markdown", str(tmp_path / "speed.md")])
    table = (tmp_path / "speed.md").read_text()
    assert "| predict_over_forward |" in table and "| bfloat16 |" in table and "| int8 |" in table
