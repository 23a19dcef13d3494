"""The ONNX backbone: tensors read and dequantized, layer names, preprocessing sources,
the detector on top of it; the real int8 MobileNetV2 behind the realdata marker."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import numpy as np
import pytest
import torch

from _onnx_models import save_tiny_onnx
from conftest import SHARED, texture, with_defect
from lakead import BackboneUnavailableError, ConfigError, LakeDetector
from lakead.backbones import load_backbone
from lakead.backbones.onnx import IMAGENET_MEAN, IMAGENET_STD, ONNXBackbone

MOBILENET = SHARED / "models" / "mobilenetv2-12-int8.onnx"


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return save_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def backbone(tiny_onnx):
    return load_backbone(f"onnx:{tiny_onnx}")


def reference_feat1(pixels: torch.Tensor, model_path) -> torch.Tensor:
    """feat1 = relu(conv(x, w1)) computed with torch from the file's own weights."""
    import onnx
    from onnx import numpy_helper

    w1 = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(model_path)).graph.initializer}["w1"]
    return torch.relu(torch.nn.functional.conv2d(pixels, torch.from_numpy(w1.copy()), padding=1))  # (B, 8, H, W)


def test_info_and_fingerprint(backbone, tiny_onnx, tmp_path):
    info = backbone.info
    assert info.kind == "onnx" and info.joint_dim is None and info.image_size == 32 and not backbone.has_text
    assert info.source == f"onnx:{tiny_onnx.resolve()}"
    assert info.fingerprint == hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()
    copy = shutil.copy(tiny_onnx, tmp_path / "moved.onnx")
    assert load_backbone(f"onnx:{copy}").info.same_model(info)
    other = load_backbone(f"onnx:{save_tiny_onnx(tmp_path / 'other.onnx', seed=1)}")
    assert not other.info.same_model(info)


def test_tokens_are_the_feature_map_row_major(backbone, tiny_onnx):
    pixels = torch.randn(3, 3, 32, 32)
    f = backbone.extract(pixels, [backbone.resolve_layer("feat1")])
    ref = reference_feat1(pixels, tiny_onnx)  # (B, C, H, W)
    tokens = f.blocks["feat1"]
    assert tokens.shape == (3, 32 * 32, 8) and f.grids == {"feat1": (32, 32)} and f.joint is None
    assert torch.allclose(tokens, ref.flatten(2).transpose(1, 2), atol=1e-4)  # (B, H*W, C)
    assert torch.allclose(tokens.reshape(3, 32, 32, 8)[1, 5, 7], ref[1, :, 5, 7], atol=1e-4)


def test_several_tensors_in_one_run_equal_each_read_alone(backbone):
    pixels = torch.randn(2, 3, 32, 32)
    both = backbone.extract(pixels, ["block2_quantized", "feat1"])
    assert list(both.blocks) == ["block2_quantized", "feat1"]
    assert both.grids == {"block2_quantized": (16, 16), "feat1": (32, 32)}
    for name in both.blocks:
        assert torch.equal(both.blocks[name], backbone.extract(pixels, [name]).blocks[name])


def test_quantized_tensor_is_dequantized(backbone):
    pixels = torch.randn(2, 3, 32, 32)
    q = backbone.extract(pixels, ["block2_quantized"]).blocks["block2_quantized"]
    ref = backbone.extract(pixels, ["block2"]).blocks["block2"]  # the graph's own DequantizeLinear
    assert q.shape == (2, 256, 12) and q.dtype == torch.float32
    assert torch.equal(q, ref)
    assert len(torch.unique(q)) > 20  # real values, not uint8 codes


def test_batch_size_does_not_change_tokens(backbone):
    pixels = torch.randn(5, 3, 32, 32)
    whole = backbone.extract(pixels, ["feat1"]).blocks["feat1"]
    parts = torch.cat([backbone.extract(pixels[i : i + 2], ["feat1"]).blocks["feat1"] for i in range(0, 5, 2)])
    assert torch.allclose(whole, parts, atol=1e-6)


def test_layer_names(backbone):
    assert backbone.resolve_layer("block2") == "block2"
    with pytest.raises(ConfigError) as e:
        backbone.resolve_layer(18)  # the CLIP default block number
    msg = str(e.value)
    assert "layer 18 is not a tensor" in msg and "block2 (12x16x16)" in msg and "feat1 (8x32x32)" in msg
    with pytest.raises(ConfigError, match="'output' is not a \\(B, C, H, W\\) feature map"):
        backbone.resolve_layer("output")
    with pytest.raises(ConfigError, match="needs --layer"):
        backbone.resolve_layer(None)
    with pytest.raises(ConfigError, match="no text tower"):
        backbone.resolve_layer(None, semantic=True)


def test_numeric_and_base_names_resolve(tmp_path):
    """MobileNet names tensors '382_quantized'; '--layer 382' reaches us as the int 382."""
    import onnx

    path = save_tiny_onnx(tmp_path / "t.onnx")
    m = onnx.load(str(path))
    for n in m.graph.node:  # rename feat1 -> 382_quantized (a float tensor: no dequantization)
        n.input[:] = ["382_quantized" if i == "feat1" else i for i in n.input]
        n.output[:] = ["382_quantized" if o == "feat1" else o for o in n.output]
    onnx.save(m, str(path))
    bb = load_backbone(f"onnx:{path}")
    assert bb.resolve_layer(382) == "382_quantized" and bb.resolve_layer("382") == "382_quantized"


def test_preprocessing_default_sidecar_and_argument(tiny_onnx, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lakead"):
        bb = ONNXBackbone.from_file(str(tiny_onnx))
    assert bb.preprocessing.mean == IMAGENET_MEAN and bb.preprocessing.std == IMAGENET_STD
    assert bb.preprocessing.resample == 2 and "ImageNet preprocessing" in caplog.text
    model = shutil.copy(tiny_onnx, tmp_path / "m.onnx")
    (tmp_path / "m.onnx.json").write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resample": "bicubic"}))
    side = load_backbone(f"onnx:{model}")
    assert side.preprocessing.mean == (0.5, 0.5, 0.5) and side.preprocessing.std == (0.25,) * 3 and side.preprocessing.resample == 3
    px = side.preprocessing([np.full((4, 4, 3), 255, np.uint8)], 32)
    assert torch.allclose(px, torch.full((1, 3, 32, 32), 2.0))  # (1 - 0.5) / 0.25
    from lakead.backbones import Preprocessing

    explicit = ONNXBackbone.from_file(str(model), preprocessing=Preprocessing(mean=(0.0,) * 3, std=(1.0,) * 3, resample=0))
    assert explicit.preprocessing.mean == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "cannot be parsed"),
        (json.dumps({"mean": [0.5, 0.5]}), "'mean' must be a list of 3 numbers"),
        (json.dumps({"std": [0.5, 0.0, 0.5]}), "'std' must be positive"),
        (json.dumps({"resample": "cubic"}), "'resample' must be one of"),
        (json.dumps({"means": [0.5, 0.5, 0.5]}), "unknown keys \\['means'\\]"),
        (json.dumps({"image_size": 0}), "'image_size' must be a positive integer"),
    ],
)
def test_bad_sidecar_names_the_file(tiny_onnx, tmp_path, content, problem):
    model = shutil.copy(tiny_onnx, tmp_path / "m.onnx")
    (tmp_path / "m.onnx.json").write_text(content)
    with pytest.raises(ConfigError, match=problem) as e:
        load_backbone(f"onnx:{model}")
    assert "m.onnx.json" in str(e.value)


def test_image_size_rules(tiny_onnx, tmp_path):
    fixed = load_backbone(f"onnx:{tiny_onnx}")
    assert fixed.check_image_size(32) == 32
    with pytest.raises(ConfigError, match="takes only 32 x 32"):
        fixed.check_image_size(64)
    dynamic_path = save_tiny_onnx(tmp_path / "dyn.onnx", size=None)
    dynamic = load_backbone(f"onnx:{dynamic_path}")
    assert dynamic.info.image_size == 224  # nothing says otherwise
    (tmp_path / "dyn.onnx.json").write_text(json.dumps({"image_size": 48}))
    sized = load_backbone(f"onnx:{dynamic_path}")
    assert sized.info.image_size == 48 and sized.extract(torch.zeros(1, 3, 48, 48), ["block2"]).grids["block2"] == (24, 24)


def test_fixed_batch_of_one_runs_image_by_image(tmp_path):
    bb = load_backbone(f"onnx:{save_tiny_onnx(tmp_path / 'b1.onnx', batch=1)}")
    pixels = torch.randn(3, 3, 32, 32)
    out = bb.extract(pixels, ["feat1"]).blocks["feat1"]
    assert out.shape == (3, 1024, 8)
    assert torch.allclose(out[2], bb.extract(pixels[2:3], ["feat1"]).blocks["feat1"][0])


@pytest.mark.parametrize("what", ["missing", "directory", "garbage", "empty"])
def test_unreadable_model(tmp_path, what):
    target = {"missing": tmp_path / "nope.onnx", "directory": tmp_path, "garbage": tmp_path / "g.onnx", "empty": ""}[what]
    if what == "garbage":
        target.write_bytes(b"\x00not an onnx model at all" * 10)
    with pytest.raises(BackboneUnavailableError) as e:
        load_backbone(f"onnx:{target}")
    assert (str(target) if what != "empty" else "needs a file path") in str(e.value)


def test_detector_on_onnx(tiny_onnx, tmp_path, caplog):
    rng = np.random.default_rng(3)
    normals = [texture(rng) for _ in range(6)]
    held = [texture(rng) for _ in range(3)]
    defect = with_defect(texture(rng), 20, 24, 14)
    with caplog.at_level(logging.WARNING, logger="lakead"):
        det = LakeDetector(f"onnx:{tiny_onnx}", layer="block2", k=6, batch_size=4).fit(normals, "tile")
    assert caplog.text.count("no text tower") == 1
    assert det.layer_ == "block2" and det.grid_ == (16, 16) and det.text_embeddings_ is None
    pred = det.predict(held + [defect])
    assert np.all(pred.semantic == 0) and np.array_equal(pred.scores, pred.visual)
    assert pred.scores[-1] > pred.scores[:-1].max()
    assert pred.maps[-1].shape == (64, 64)
    y, x = np.unravel_index(np.argmax(pred.maps[-1]), pred.maps[-1].shape)
    assert 14 <= y < 40 and 18 <= x < 44  # the peak at (or right next to) the pasted patch
    det.save(tmp_path / "model")
    again = LakeDetector.load(tmp_path / "model")
    assert np.allclose(again.predict(held + [defect]).scores, pred.scores, atol=1e-6)
    with pytest.raises(ConfigError, match="k=13 is larger than the width"):
        LakeDetector(f"onnx:{tiny_onnx}", layer="block2", k=13).fit(normals, "tile")


@pytest.mark.realdata
def test_real_mobilenet_int8(tmp_path):
    if not MOBILENET.is_file():
        pytest.skip(f"{MOBILENET} is absent (see ../shared/models/README.md)")
    bb = load_backbone(f"onnx:{MOBILENET}")
    assert bb.info.fingerprint == "83530ad811bc31d2b60a5599a21265a5057608c9b044b4ee758cc22f2309f54f"
    assert bb.info.image_size == 224
    pixels = torch.randn(2, 3, 224, 224)
    for name, width, side in [("339", 24, 56), ("382", 64, 14), ("426_quantized", 96, 14), ("452_quantized", 160, 7)]:
        block = bb.resolve_layer(name)
        f = bb.extract(pixels, [block])
        assert f.blocks[block].shape == (2, side * side, width) and f.grids[block] == (side, side)
        assert torch.isfinite(f.blocks[block]).all()
    # our dequantization of 627_quantized equals the graph's own DequantizeLinear output 627
    assert torch.equal(bb.extract(pixels, ["627_quantized"]).blocks["627_quantized"], bb.extract(pixels, ["627"]).blocks["627"])
