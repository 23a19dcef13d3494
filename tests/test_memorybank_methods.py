"""PatchCore and AnomalyDINO: their arithmetic against values computed by hand on tiny tensors,
their options, the paths the contract tests do not take (background mask, rotations, coreset
sizes, default blocks), and the command line (fit, predict, info, eval, baselines) on the tiny
random models of lakead.testing. The contract (shapes, maps, invariances, save/load, decisions
from normal images) is tests/test_contract.py, which runs every registered method."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _onnx_models import save_tiny_onnx
from _synthetic import write_category
from conftest import texture, with_defect
from lakead import LakeConfig
from lakead.methods.anomalydino import AnomalyDinoConfig, AnomalyDinoDetector
from lakead.api import Runtime
from lakead.backbones import load_backbone
from lakead.cli import app
from lakead.errors import ConfigError
from lakead.methods.bank import default_pair
from lakead.methods import get_method, load_detector
from lakead.options import method_option_specs
from lakead.methods.patchcore import PatchCoreConfig, PatchCoreDetector
from lakead.patchops import (
    centre_share,
    foreground_mask,
    local_average,
    patchcore_features,
    principal_direction,
    project_width,
    reweighted_score,
    smooth_maps,
    top_percent_mean,
)

# -- arithmetic ---------------------------------------------------------------------------------


def test_local_average_is_the_zero_padded_3x3_mean():
    grid = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    out = local_average(grid.reshape(1, 9, 1), (3, 3))[0, :, 0].reshape(3, 3)
    # centre: all nine; corner (0, 0): 1+2+4+5 over 9 cells (zero padding counts); edge (0, 1): 1+2+3+4+5+6 over 9
    assert out[1, 1].item() == pytest.approx(45 / 9)
    assert out[0, 0].item() == pytest.approx(12 / 9)
    assert out[0, 1].item() == pytest.approx(21 / 9)
    assert out[2, 2].item() == pytest.approx((5 + 6 + 8 + 9) / 9)
    two = torch.stack([grid, 10 * grid], -1).reshape(1, 9, 2)  # channels are averaged separately
    assert local_average(two, (3, 3))[0, 4].tolist() == pytest.approx([5.0, 50.0])


def test_projection_and_two_blocks_on_the_first_grid():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    assert project_width(x, 3).tolist() == [[1.5, 3.5, 5.5]]
    assert project_width(torch.tensor([[2.0, 4.0]]), 4).tolist() == [[2.0, 2.0, 4.0, 4.0]]  # narrower: repeated
    # block a: 4 x 4 grid, 2 channels (1, 3); block b: 2 x 2 grid, 4 channels, one value per cell
    a = torch.tensor([1.0, 3.0]).repeat(1, 16, 1)  # (1, 16, 2)
    cells = torch.tensor([10.0, 20.0, 30.0, 40.0])
    b = cells[None, :, None].repeat(1, 1, 4)  # (1, 4, 4)
    out, grid = patchcore_features([a, b], [(4, 4), (2, 2)], width=2, neighbourhood=1)
    assert grid == (4, 4) and out.shape == (1, 16, 2)
    # a projected to 2: (1, 3); b resized bilinearly: the top-left fine cell is the top-left coarse value 10;
    # concatenated (1, 3, 10, 10) then pooled to 2: (2, 10)
    assert out[0, 0].tolist() == pytest.approx([2.0, 10.0])
    # the fine cell (1, 1) lies between the coarse cells: bilinear weights 3/4, 1/4 per axis
    expected = 0.75 * 0.75 * 10 + 0.75 * 0.25 * 20 + 0.25 * 0.75 * 30 + 0.25 * 0.25 * 40
    assert out[0, 5, 1].item() == pytest.approx(expected)


def test_reweighting_by_hand():
    # Eq. 7: w = 1 - exp(d0) / sum_j exp(dj); s = w * s*
    d = torch.tensor([[2.0, 2.0, 2.0, 2.0], [2.0, 5.0, 5.0, 5.0]])
    out = reweighted_score(torch.tensor([2.0, 2.0]), d)
    assert out[0].item() == pytest.approx(2.0 * (1 - 1 / 4))  # equally far: 1 - 1/b
    w = 1 - math.exp(2) / (math.exp(2) + 3 * math.exp(5))
    assert out[1].item() == pytest.approx(2.0 * w, rel=1e-6)  # m* much closer than its neighbours: weight near 1


def test_top_one_percent_mean_by_hand():
    d = torch.zeros(2, 300)
    d[0, :5] = torch.tensor([9.0, 7.0, 5.0, 1.0, 1.0])  # 1 % of 300: the top 3
    d[1, 0] = 4.0
    assert top_percent_mean(d, 1.0).tolist() == pytest.approx([7.0, 4.0 / 3])
    assert top_percent_mean(d, 100.0).tolist() == pytest.approx([23.0 / 300, 4.0 / 300])
    assert top_percent_mean(torch.tensor([[1.0, 3.0]]), 1.0).tolist() == [3.0]  # at least one patch


def test_first_principal_component_and_the_mask():
    rng = np.random.default_rng(0)
    fg = rng.normal(0, 0.1, (20, 3)) + np.array([5.0, 0, 0])
    bg = rng.normal(0, 0.1, (80, 3))
    x = torch.tensor(np.concatenate([fg, bg]), dtype=torch.float32)
    mean, direction, sd = principal_direction(x)
    assert abs(direction[0].item()) == pytest.approx(1.0, abs=1e-2)
    assert mean[0].item() == pytest.approx(1.0, abs=0.05)  # 20 % of the rows at 5
    assert sd == pytest.approx(2.0, abs=0.05)  # a two-point mixture 0.2 / 0.8 at distance 5: sqrt(0.16) * 5
    # a 9 x 9 grid whose central 3 x 3 is foreground: dilated (5 x 5), closed (7 x 7, then eroded back to 5 x 5)
    scores = torch.full((1, 81), -1.0)
    centre = [i * 9 + j for i in range(3, 6) for j in range(3, 6)]
    scores[0, centre] = 3.0
    m = foreground_mask(scores, (9, 9), 0.0, 1.0).reshape(9, 9)
    assert m.sum().item() == 25 and m[2:7, 2:7].all()
    assert foreground_mask(-scores, (9, 9), 0.0, -1.0).reshape(9, 9)[2:7, 2:7].all()  # the sign flips the side
    assert centre_share(scores > 0, (9, 9)) == pytest.approx(9 / 36)  # the centre: rows and columns 1..6
    empty = foreground_mask(torch.full((1, 49), -1.0), (7, 7), 0.0, 1.0)
    assert empty.all()  # an empty mask keeps every patch


def test_smoothing_keeps_a_constant_and_spreads_a_peak():
    flat = smooth_maps(torch.full((1, 4, 4), 2.0), 32, 4.0)
    assert flat.shape == (1, 32, 32) and torch.allclose(flat, torch.full_like(flat, 2.0))
    g = torch.zeros(1, 8, 8)
    g[0, 4, 4] = 1.0
    sharp, smooth = smooth_maps(g, 64, 0.0), smooth_maps(g, 64, 4.0)
    assert smooth.max() < sharp.max() and smooth.sum().item() == pytest.approx(sharp.sum().item(), rel=1e-3)


# -- detectors ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def normals():
    rng = np.random.default_rng(11)
    return [texture(rng, (48, 48)) for _ in range(6)]


@pytest.fixture(scope="module")
def onnx_backbone(tmp_path_factory):
    return load_backbone("onnx:" + str(save_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")))


def test_default_blocks_scale_with_depth(tiny_backbone, onnx_backbone):
    class Info:
        def __init__(self, n):
            self.info = type("I", (), {"num_layers": n, "source": "x"})()

    assert default_pair(Info(24)) == (12, 18) and default_pair(Info(12)) == (6, 9) and default_pair(Info(1)) == (1,)
    det = PatchCoreDetector(tiny_backbone, image_size=32)
    assert det.blocks(tiny_backbone) == tuple(default_pair(tiny_backbone))
    with pytest.raises(ConfigError, match="--layer 365_quantized"):
        PatchCoreDetector(onnx_backbone).blocks(onnx_backbone)
    with pytest.raises(ConfigError, match="give the block"):
        AnomalyDinoDetector(onnx_backbone).blocks(onnx_backbone)


def test_coreset_share_sets_the_bank_size(tiny_backbone, normals):
    full = PatchCoreDetector(tiny_backbone, image_size=32, coreset=1.0).fit(normals, "tile")
    tenth = PatchCoreDetector(tiny_backbone, image_size=32, coreset=0.1).fit(normals, "tile")
    n = full.bank_vectors_
    assert full.bank_.shape[0] == n and tenth.bank_.shape[0] == math.ceil(0.1 * n)
    # every coreset vector is one of the full bank's, and it keeps which image it came from
    rows = {tuple(r) for r in full.bank_.numpy().round(6).tolist()}
    assert all(tuple(r) in rows for r in tenth.bank_.numpy().round(6).tolist())
    assert set(tenth.bank_image_.tolist()) <= set(range(len(normals)))
    assert tenth.summary()["bank_vectors"] == math.ceil(0.1 * n)


def test_patchcore_image_score_is_the_reweighted_max(tiny_backbone, normals):
    det = PatchCoreDetector(tiny_backbone, image_size=32, coreset=1.0).fit(normals, "tile")
    plain = PatchCoreDetector(tiny_backbone, image_size=32, coreset=1.0, neighbours=1).fit(normals, "tile")
    rng = np.random.default_rng(1)
    img = [with_defect(texture(rng, (48, 48)), 10, 10, 14)]
    tokens, _ = det.embed(det.backbone.extract(det.backbone.preprocessing(img, 32), det.blocks(det.backbone)),
                          det.blocks(det.backbone))
    s = det.score(tokens, det.state_)
    d = torch.cdist(tokens[0], det.bank_)  # (N, M) by brute force
    nn_d, nn_i = d.min(dim=1)
    star, where = nn_d.max(0)
    m_star = det.bank_[nn_i[where]]
    near = torch.cdist(m_star[None], det.bank_)[0].topk(9, largest=False).indices
    dists = (det.bank_[near] - tokens[0, where]).norm(dim=1)
    w = 1 - torch.softmax(dists.double(), 0)[0]
    assert s.images[0].item() == pytest.approx(float(w * star), rel=1e-4)
    assert s.patches[0].tolist() == pytest.approx(nn_d.tolist(), rel=1e-4, abs=1e-5)
    assert plain.predict(img).scores[0] == pytest.approx(float(star), rel=1e-4)  # neighbours=1: the max


def test_anomalydino_scores_are_cosine_distances(tiny_backbone, normals):
    det = AnomalyDinoDetector(tiny_backbone, image_size=32, layer=2).fit(normals, "tile")
    assert torch.allclose(det.bank_.norm(dim=1), torch.ones(det.bank_.shape[0]), atol=1e-5)
    rng = np.random.default_rng(2)
    img = [with_defect(texture(rng, (48, 48)), 5, 5, 20)]
    f = det.backbone.extract(det.backbone.preprocessing(img, 32), [2])
    raw = f.blocks[2][0]  # (N, D) before normalising
    cos = torch.nn.functional.normalize(raw, dim=1) @ torch.nn.functional.normalize(det.bank_, dim=1).T
    patch = (1 - cos.max(dim=1).values)  # (N,)
    k = max(1, int(patch.numel() * 0.01))
    assert det.predict(img).scores[0] == pytest.approx(float(patch.topk(k).values.mean()), rel=1e-4, abs=1e-6)


def test_anomalydino_mask_and_rotations(tiny_backbone, normals):
    plain = AnomalyDinoDetector(tiny_backbone, image_size=32, layer=2).fit(normals, "tile")
    turned = AnomalyDinoDetector(tiny_backbone, image_size=32, layer=2, rotations=True).fit(normals, "tile")
    assert turned.bank_.shape[0] == 4 * plain.bank_.shape[0]
    assert sorted(set(turned.bank_image_.tolist())) == list(range(len(normals)))  # rotations count as their image
    assert np.isfinite(turned.loo_scores_).all() and np.isfinite(turned.threshold_)
    masked = AnomalyDinoDetector(tiny_backbone, image_size=32, layer=2, mask_background=True).fit(normals, "tile")
    assert masked.pca_direction_.shape == (plain.width_,) and masked.pca_sign_ in (1.0, -1.0)
    assert 0 < masked.bank_.shape[0] <= plain.bank_.shape[0]
    fg = masked.foreground(masked.embed(masked.backbone.extract(
        masked.backbone.preprocessing(normals[:2], 32), [2]), [2])[0], masked.state_)
    assert fg.shape == (2, masked.grid_[0] * masked.grid_[1]) and fg.any(dim=1).all()
    pred = masked.predict(normals[:2])
    assert pred.scores.shape == (2,) and np.isfinite(pred.scores).all()


def test_options_are_checked():
    for bad, msg in [(dict(coreset=0.0), "coreset"), (dict(coreset=1.5), "coreset"), (dict(neighbours=0), "neighbours"),
                     (dict(neighbourhood=2), "odd"), (dict(width=0), "width"), (dict(blur_sigma=-1.0), "blur_sigma"),
                     (dict(false_alarm_rate=1.0), "false_alarm_rate"), (dict(bogus=1), "unknown option")]:
        with pytest.raises(ConfigError, match=msg):
            PatchCoreConfig.from_options(**bad)
    for bad, msg in [(dict(top_percent=0.0), "top_percent"), (dict(top_percent=101.0), "top_percent"),
                     (dict(mask_background="yes"), "mask_background")]:
        with pytest.raises(ConfigError, match=msg):
            AnomalyDinoConfig.from_options(**bad)


def test_a_lake_configuration_carries_the_shared_options():
    lake = LakeConfig(backbone="b", layer=[1, 2], image_size=48, seed=3, false_alarm_rate=0.1, k=7)
    m = get_method("patchcore")
    cfg = m.configure(lake, {"coreset": 0.5, "top_percent": 2.0})
    assert isinstance(cfg, PatchCoreConfig) and cfg.layer == [1, 2] and cfg.image_size == 48 and cfg.seed == 3
    assert cfg.false_alarm_rate == 0.1 and cfg.coreset == 0.5
    assert m.unused(lake, {"coreset": 0.5, "top_percent": 2.0}) == ["k", "top_percent"]
    assert get_method("lake").unused(lake, {"coreset": 0.5}) == ["coreset"]
    specs = method_option_specs()
    assert specs["coreset"][1] == ("patchcore",) and specs["blur_sigma"][1] == ("patchcore", "anomalydino", "subspace")


def test_load_refuses_a_damaged_bank(tiny_backbone, normals, tmp_path):
    from safetensors.torch import load_file, save_file

    from lakead.errors import ModelFormatError

    det = PatchCoreDetector(tiny_backbone, image_size=32).fit(normals, "tile")
    path = det.save(tmp_path / "m")
    t = load_file(str(path / "tensors.safetensors"))
    t["bank"] = t["bank"][:, :3].contiguous()
    save_file(t, str(path / "tensors.safetensors"))
    with pytest.raises(ModelFormatError, match="bank"):
        load_detector(path, backbone=tiny_backbone)


# -- the command line ------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_category(root, "tile", n_train=5, n_good=2, defects={"crack": 2}, seed=3)
    return root


@pytest.mark.parametrize("method,extra,check", [
    ("patchcore", ["--coreset", "0.5", "--neighbours", "4"], {"coreset": 0.5, "neighbours": 4}),
    ("anomalydino", ["--layer", "2", "--top-percent", "5", "--rotations"], {"top_percent": 5.0, "rotations": True}),
])
def test_fit_predict_info_with_a_method(data, tiny_clip_dir, tmp_path, method, extra, check):
    model = tmp_path / "m"
    r = invoke("fit", data / "tile" / "train" / "good", "-c", "tile", "-o", model, "--backbone", tiny_clip_dir,
               "--image-size", "32", "--method", method, *extra)
    assert r.exit_code == 0, r.output
    meta = json.loads((model / "lakead.json").read_text())
    assert meta["method"] == method and all(meta["config"][k] == v for k, v in check.items())
    r = invoke("predict", model, data / "tile" / "test", "--out", tmp_path / "o", "--masks")
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "o" / "scores.csv").read_text().splitlines()) == 5
    r = invoke("info", model)
    assert r.exit_code == 0 and method in r.output


def test_options_a_method_does_not_read_are_named(data, tiny_clip_dir, tmp_path):
    r = invoke("fit", data / "tile" / "train" / "good", "-c", "tile", "-o", tmp_path / "m", "--backbone", tiny_clip_dir,
               "--image-size", "32", "--layer", "2", "--method", "anomalydino", "--coreset", "0.5", "--k", "3")
    assert r.exit_code == 0, r.output
    assert "does not use --k, --coreset" in " ".join(r.stderr.split())


@pytest.mark.slow
def test_eval_and_baselines_with_the_memory_bank_methods(data, tiny_clip_dir, tmp_path):
    r = invoke("eval", data, "--out", tmp_path / "e", "--backbone", tiny_clip_dir, "--image-size", "32",
               "--shots", "4", "--method", "patchcore", "--coreset", "0.25", "--no-figures", "--examples", "0")
    assert r.exit_code == 0, r.output
    settings = json.loads((tmp_path / "e" / "metrics.json").read_text())["settings"]
    assert settings["method"] == "patchcore" and settings["config"]["coreset"] == 0.25
    r = invoke("baselines", data, "--out", tmp_path / "b", "--backbone", tiny_clip_dir, "--image-size", "32",
               "--layer", "2", "--k", "4", "--shots", "4", "--methods", "visual,patchcore,anomalydino",
               "--coreset", "0.5", "--batch-size", "4")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "b" / "baselines.json").read_text())
    rows = {row["method"]: row for row in doc["rows"]}
    assert set(rows) == {"visual", "patchcore", "anomalydino"}
    assert rows["patchcore"]["config"]["coreset"] == 0.5 and rows["patchcore"]["label"]["k"] == "-"
    assert rows["visual"]["config"]["k"] == 4
    assert all(0.0 <= row["mean"]["image_auroc"] <= 100.0 for row in doc["rows"])
    assert "patchcore" in (tmp_path / "b" / "baselines.md").read_text()


# -- the service ------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_service_creates_and_uses_a_patchcore_model(tiny_clip_dir, tmp_path, normals):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from lakead.serve import create_app

    def files(arrays):
        out = []
        for i, a in enumerate(arrays):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            out.append(("images", (f"n{i}.png", buf.getvalue(), "image/png")))
        return out

    with TestClient(create_app(tmp_path / "models", backbone=str(tiny_clip_dir), device="cpu", batch_size=4)) as c:
        info = c.get("/info").json()
        assert "patchcore" in info["methods"] and info["method_options"]["coreset"] == 0.1
        form = {"class_name": "tile", "image_size": "32", "method": "patchcore", "coreset": "0.5", "k": "3"}
        r = c.post("/models", data=form, files=files(normals))
        assert r.status_code == 201, r.text
        model = r.json()
        assert model["method"] == "patchcore"
        meta = json.loads((tmp_path / "models" / model["id"] / "lakead.json").read_text())
        assert meta["config"]["coreset"] == 0.5
        r = c.post(f"/models/{model['id']}/predict", files=files(normals[:2]))
        assert r.status_code == 200, r.text
        r = c.post("/models", data={**form, "coreset": "2"}, files=files(normals))
        assert r.status_code in (400, 422) and "coreset" in r.text
        r = c.post("/models", data={**form, "method": "magic"}, files=files(normals))
        assert r.status_code in (400, 422) and "magic" in r.text
