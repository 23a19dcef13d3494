"""Mixed precision by design (lakead.export.split, lakead.runtime): the backbone graph at bf16,
the head (neuron selection, gallery products, min, text probe, scope) in float32 as a second
graph; the runtime reports the precision that actually ran (read from the engine, not the
export's setting); --precision auto picks the fastest precision whose decisions equal float32's
and records what it tried; OpenVINO refuses ONNX Runtime's quantized operators in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import SHARED, texture, with_defect
from lakead import ConfigError, LakeDetector
from lakead.export import _onnx_graph, auto_candidates, export_model, scoring_head
from lakead.export.graph import INPUT, OUTPUTS
from lakead.export.split import is_head, split_head
from lakead.runtime import ExportedDetector, read_export_meta

MOBILENET = SHARED / "models" / "mobilenetv2-12-int8.onnx"


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    normal = [texture(rng) for _ in range(6)]
    test = [texture(rng) for _ in range(4)] + [with_defect(texture(rng), 8 + 6 * i, 10, 16) for i in range(4)]
    return normal, test


@pytest.fixture(scope="module")
def lake(tiny_backbone, images):
    return LakeDetector(tiny_backbone, device="cpu", batch_size=4, layer=3).fit(images[0], "widget")


def _session(onnx_bytes):
    import onnxruntime as ort

    return ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 rounded to bfloat16 (to nearest even) and back: what a bf16 backbone's outputs hold."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def test_the_cut_graphs_compute_the_whole_graph(lake, images):
    """Backbone graph then head graph give the merged graph's outputs, bit for bit; the head
    graph holds every /head/ node and the backbone graph none."""
    fp32 = _onnx_graph(lake, scoring_head(lake, "x"), None, "x")
    backbone, head, cut = split_head(fp32, INPUT, OUTPUTS)
    assert not any(is_head(n.name) for n in onnx.load_from_string(backbone).graph.node)
    assert sum(is_head(n.name) for n in onnx.load_from_string(head).graph.node) == \
        sum(is_head(n.name) for n in onnx.load_from_string(fp32).graph.node)
    from lakead.images import preprocess

    bb = lake.backbone.preprocessing
    pixels = preprocess(images[1], lake.image_size_, bb.mean, bb.std, int(bb.resample), float(bb.rescale))
    whole = _session(fp32).run(list(OUTPUTS), {INPUT: pixels})
    feats = _session(backbone).run(cut, {INPUT: pixels})
    parts = _session(head).run(list(OUTPUTS), dict(zip(cut, feats)))
    for a, b in zip(whole, parts):
        np.testing.assert_array_equal(a, b)
    # the head's numerics with a bf16 backbone: its outputs rounded to bfloat16, the head in float32
    rounded = _session(head).run(list(OUTPUTS), {c: _bf16(f) if f.dtype == np.float32 else f for c, f in zip(cut, feats)})
    score = OUTPUTS.index("score")
    rel = np.abs(rounded[score] - whole[score]) / np.abs(whole[score])
    assert 0 < rel.max() < 0.02  # it moved (bf16 is not float32), and not far
    thr = lake.threshold_
    np.testing.assert_array_equal(rounded[score] > thr, whole[score] > thr)


@pytest.mark.slow
def test_bf16_writes_two_graphs_and_says_what_ran(lake, images, tmp_path):
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed")
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    out = export_model(lake, tmp_path / "bf16", format="openvino", precision="bf16", check=images[1])
    assert {"backbone.xml", "backbone.bin", "head.xml", "head.bin", "lakead-export.json"} == {p.name for p in out.iterdir()}
    export_model(lake, out, format="openvino", precision="bf16", check=images[1])  # an earlier bf16 export is lakead's own: replaced
    meta = read_export_meta(out)
    assert meta["file"] == "backbone.xml" and meta["head"]["file"] == "head.xml" and meta["head"]["inputs"]
    det = ExportedDetector.load(out)
    backbone_ran = "bf16" if has_bf16 else "f32"
    assert det.ran.startswith(f"backbone {backbone_ran} ") and "; head f32 " in det.ran, det.ran
    assert meta["check"]["ran"] == det.ran and meta["check"]["decisions_same"]
    assert det.summary()["ran"] == det.ran and det.runtime.precision == det.ran
    if has_bf16:  # bf16 really ran: scores moved, but less than the check's refusal
        assert meta["check"]["max_relative"] > 1e-6
    # lakead-runtime info prints it, and run.json records it
    r = subprocess.run([sys.executable, "-m", "lakead.runtime_cli", "info", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["ran"] == det.ran
    from lakead.batch import predict_to_dir
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i, a in enumerate(images[1][:3]):
        Image.fromarray(a).save(tmp_path / "imgs" / f"{i}.png")
    predict_to_dir(det, [tmp_path / "imgs"], tmp_path / "res", maps="none")
    assert json.loads((tmp_path / "res" / "run.json").read_text())["precision"] == det.ran


@pytest.mark.slow
def test_fp32_openvino_sets_float32_explicitly(lake, images, tmp_path):
    """OpenVINO's own default on a CPU with bfloat16 is bf16: the runtime asks for f32, and says f32 ran."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    det = ExportedDetector.load(export_model(lake, tmp_path / "fp32", format="openvino"))
    assert det.ran.startswith("f32 ") and "inference precision f32" in det.ran


@pytest.mark.slow
def test_auto_chooses_the_first_precision_that_passes_and_records_it(lake, images, tmp_path):
    # onnx: bf16 is not offered, int8-static needs the support images, which were arrays here: skipped, then fp32
    assert auto_candidates("onnx") == ["int8-static", "fp32"]
    out = export_model(lake, tmp_path / "auto", precision="auto", check=images[1])
    meta = read_export_meta(out)
    assert meta["precision"] == "fp32" and meta["auto"]["chose"] == "fp32"
    skipped = meta["auto"]["tried"][0]
    assert skipped["precision"] == "int8-static" and "calibrat" in skipped["skipped"]
    assert meta["auto"]["tried"][1]["decisions_differ"] == 0
    # with calibration images int8-static is tried and kept when it decides as float32 does, else fp32
    out = export_model(lake, tmp_path / "auto8", precision="auto", check=images[1], calibration=images[0])
    meta = read_export_meta(out)
    first = meta["auto"]["tried"][0]
    assert first["precision"] == "int8-static" and "decisions_differ" in first
    assert meta["precision"] == ("int8-static" if first["decisions_differ"] == 0 else "fp32")
    with pytest.raises(ConfigError, match="auto chooses"):
        export_model(lake, tmp_path / "none", precision="auto")


def test_openvino_refuses_quantized_onnx_operators_in_one_line(tmp_path):
    from onnx import TensorProto, helper

    from lakead.export import _refuse_for_openvino

    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 1, 4, 4])
    node = helper.make_node("QLinearAdd", ["x", "s", "z", "x", "s", "z", "s", "z"], ["y"], domain="com.microsoft")
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.UINT8, [], [0])]
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], initializer=inits))
    with pytest.raises(ConfigError) as exc:
        _refuse_for_openvino(model.SerializeToString(), "m/")
    msg = str(exc.value)
    assert "\n" not in msg and "com.microsoft.QLinearAdd" in msg and "--format onnx" in msg


@pytest.mark.realdata
@pytest.mark.slow
def test_mobilenet_int8_to_openvino_is_refused_by_the_command_line(shared_data, tmp_path):
    if not MOBILENET.is_file():
        pytest.skip(f"{MOBILENET} not present (see ../shared/models/README.md)")
    from typer.testing import CliRunner

    from lakead.cli import app

    good = shared_data / "mvtec3d_tire" / "tire" / "train" / "good"
    r = CliRunner().invoke(app, ["fit", str(good), "-c", "tire", "--out", str(tmp_path / "m"), "--backbone",
                                 f"onnx:{MOBILENET}", "--layer", "426_quantized", "--device", "cpu", "--shots", "4"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["export", str(tmp_path / "m"), "--format", "openvino", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "Traceback" not in r.output and "QLinear" in r.output and "--format onnx" in r.output
    assert not (tmp_path / "x").exists()
