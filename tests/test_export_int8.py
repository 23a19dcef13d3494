"""int8-static export (lakead.export.quantize): only the backbone blocks' linear layers are
quantized (the LAKE head and the text head stay float32), the calibration comes from the
model's own normal images (given, or its support images read again), the JSON records it, and
an export whose decisions differ from the torch path's on the check images is refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import texture, with_defect
from lakead import ConfigError, LakeDetector
from lakead.export import export_model
from lakead.export import quantize as Q
from lakead.runtime import ExportedDetector, read_export_meta


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    normal = [texture(rng) for _ in range(6)]
    test = [texture(rng) for _ in range(4)] + [with_defect(texture(rng), 8 + 6 * i, 10, 16) for i in range(4)]
    return normal, test


def fitted(backbone, normal) -> LakeDetector:
    return LakeDetector(backbone, device="cpu", batch_size=4, layer=3).fit(normal, "widget")


def _quantized_inputs(model: onnx.ModelProto) -> dict[str, bool]:
    """Each MatMul/Gemm node -> whether an input comes from a DequantizeLinear (it runs in int8)."""
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    return {n.name: any(made_by.get(i) == "DequantizeLinear" for i in n.input)
            for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}


def test_int8_static_quantizes_the_blocks_and_keeps_the_head_float32(tiny_backbone, images, tmp_path):
    normal, test = images
    det = fitted(tiny_backbone, normal)
    out = export_model(det, tmp_path / "s8", precision="int8-static", check=test, calibration=normal)
    meta = read_export_meta(out)
    assert meta["precision"] == "int8-static" and meta["calibration"]["images"] == len(normal)
    assert meta["calibration"]["source"].startswith("given") and meta["check"]["decisions_same"]
    q = _quantized_inputs(onnx.load(str(out / "model.onnx")))
    blocks = [n for n in q if Q.BLOCK_NODE.match(n)]
    weighted = [n for n in blocks if "proj" in n or "fc" in n]
    assert weighted and all(q[n] for n in weighted)  # every linear layer of every block in int8
    assert not any(q[n] for n in q if n.startswith("/head/"))  # gallery distances, text similarity: float32
    assert not q["/visual_projection/MatMul"]  # the text head's projection: float32
    assert not any(q[n] for n in blocks if n.endswith("self_attn/MatMul") or n.endswith("self_attn/MatMul_1"))
    # it moves scores (int8) but not far, and the same run gives the same numbers
    ref = det.predict_arrays(test).scores
    got = ExportedDetector.load(out).predict_arrays(test).scores
    rel = np.abs(got - ref) / np.abs(ref)
    assert 0 < rel.max() < 0.5
    np.testing.assert_array_equal(ExportedDetector.load(out).predict_arrays(test).scores, got)


def test_int8_static_calibrates_on_the_support_images_by_default(tiny_backbone, images, tmp_path, monkeypatch):
    normal, test = images
    (tmp_path / "good").mkdir()
    for i, a in enumerate(normal):
        Image.fromarray(a).save(tmp_path / "good" / f"{i}.png")
    monkeypatch.chdir(tmp_path)  # the support paths are kept as given to fit: relative here
    det = fitted(tiny_backbone, [f"good/{i}.png" for i in range(len(normal))])
    det.save(tmp_path / "model")
    out = export_model(tmp_path / "model", tmp_path / "s8", precision="int8-static", check=test)
    assert read_export_meta(out)["calibration"]["source"].startswith("the model's support images (6 of 6")
    (tmp_path / "good" / "0.png").unlink()
    (tmp_path / "good" / "1.png").rename(tmp_path / "good" / "moved.png")
    out = export_model(tmp_path / "model", tmp_path / "s8b", precision="int8-static", check=test)
    assert read_export_meta(out)["calibration"]["images"] == 4
    for p in (tmp_path / "good").iterdir():
        p.unlink()
    with pytest.raises(ConfigError, match="give them with --calibrate .*0 of 6 found.*good/0.png"):
        export_model(tmp_path / "model", tmp_path / "s8c", precision="int8-static", check=test)
    with pytest.raises(ConfigError, match="at least 2 calibration images"):
        export_model(tmp_path / "model", tmp_path / "s8c", precision="int8-static", check=test, calibration=normal[:1])
    with pytest.raises(ConfigError, match="only with check images"):
        export_model(tmp_path / "model", tmp_path / "s8c", precision="int8-static", calibration=normal)
    assert not (tmp_path / "s8c").exists()


def test_int8_static_whose_decisions_differ_is_refused(tiny_backbone, images, tmp_path, monkeypatch):
    normal, test = images
    # the Gaussian tail (lower than auto's for these 6 images) so that the decisions go both ways and a graph
    # blind to its input differs
    det = LakeDetector(tiny_backbone, device="cpu", batch_size=4, layer=3, threshold_rule="gaussian").fit(normal, "widget")
    ref = det.predict_arrays(test)
    assert 0 < ref.anomalous.sum() < len(test)
    real = Q.quantize_int8_static

    def miscalibrated(onnx_bytes, pixels, **kw):  # ranges from near-blank images: every activation clipped
        return real(onnx_bytes, pixels * 1e-4, **kw)

    monkeypatch.setattr(Q, "quantize_int8_static", miscalibrated)
    with pytest.raises(ConfigError, match="decides differently from the torch path on [1-9]"):
        export_model(det, tmp_path / "bad", precision="int8-static", check=test, calibration=normal)
    assert not (tmp_path / "bad").exists()


def test_quantizable_nodes_are_the_blocks_weight_products():
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="/layers.0/mlp/fc1/MatMul"),
             helper.make_node("MatMul", ["a", "a"], ["b"], name="/layers.0/self_attn/MatMul"),
             helper.make_node("MatMul", ["b", "w"], ["c"], name="/visual_projection/MatMul"),
             helper.make_node("MatMul", ["c", "w"], ["d"], name="/head/MatMul"),
             helper.make_node("Gemm", ["d", "w"], ["e"], name="/encoder/layer.11/output/dense/Gemm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 2])], [w])
    model = helper.make_model(graph)
    assert Q.quantizable_nodes(model) == ["/layers.0/mlp/fc1/MatMul", "/encoder/layer.11/output/dense/Gemm"]
    assert Q.quantizable_nodes(model, attention=True) == ["/layers.0/mlp/fc1/MatMul", "/layers.0/self_attn/MatMul",
                                                          "/encoder/layer.11/output/dense/Gemm"]


def test_cli_export_int8_static_with_calibration_images(tiny_clip_dir, images, tmp_path):
    from typer.testing import CliRunner

    from lakead.cli import app

    normal, test = images
    for sub, imgs in (("normal", normal), ("test", test)):
        (tmp_path / sub).mkdir()
        for i, a in enumerate(imgs):
            Image.fromarray(a).save(tmp_path / sub / f"{i:02d}.png")

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    assert invoke("fit", tmp_path / "normal", "-c", "widget", "--out", tmp_path / "m", "--backbone", tiny_clip_dir,
                  "--layer", "3", "--device", "cpu").exit_code == 0
    r = invoke("export", tmp_path / "m", "--out", tmp_path / "x", "--precision", "int8-static", "--check", tmp_path / "test",
               "--calibrate", tmp_path / "normal")
    assert r.exit_code == 0, r.output
    meta = read_export_meta(tmp_path / "x")
    assert meta["calibration"] == {**meta["calibration"], "images": len(normal), "source": "given (--calibrate)"}
    assert meta["check"]["images"] == len(test) and "int8-static" in invoke("info", tmp_path / "x").output
    r = invoke("export", tmp_path / "m", "--out", tmp_path / "y", "--precision", "int8-static", "--calibrate", tmp_path / "normal")
    assert r.exit_code != 0 and "only with check images" in r.output and not (tmp_path / "y").exists()
