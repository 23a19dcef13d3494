"""Export (lakead.export) and the torch-free runtime (lakead.runtime): the exported graph gives
the torch path's scores (within 1e-4 relative) and decisions, on the tiny CLIP (one block,
several blocks, the text probe's maps), on ONNX backbones and on real data with MobileNetV2;
the runtime imports no torch; bad inputs and methods that cannot be exported are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from _onnx_models import save_tiny_onnx
from conftest import SHARED, texture, with_defect
from lakead import ConfigError, LakeDetector
from lakead.errors import ModelFormatError
from lakead.export import agreement, export_model
from lakead.ops import upsample_map
from lakead.runtime import EXPORT_FILE, ExportedDetector, read_export_meta, upsample

MOBILENET = SHARED / "models" / "mobilenetv2-12-int8.onnx"
RTOL = 1e-4


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    normal = [texture(rng) for _ in range(6)]
    test = [texture(rng) for _ in range(4)] + [with_defect(texture(rng), 8 + 6 * i, 10, 16) for i in range(4)]
    test.append(texture(rng, (48, 80)))  # not square: the map comes back at its own size
    return normal, test


def fitted(backbone, normal, **options) -> LakeDetector:
    return LakeDetector(backbone, device="cpu", batch_size=4, **options).fit(normal, "widget")


def assert_agrees(det: LakeDetector, out, test) -> dict:
    exp = ExportedDetector.load(out)
    ref, got = det.predict_arrays(test), exp.predict_arrays(test)
    for name in ("scores", "visual", "semantic", "scope"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=RTOL, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(got.anomalous, ref.anomalous)
    np.testing.assert_array_equal(got.out_of_scope, ref.out_of_scope)
    assert got.threshold == ref.threshold and got.pixel_threshold == ref.pixel_threshold
    for a, b in zip(got.maps, ref.maps):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-5)
    s = np.sort(ref.scores)  # a threshold with decisions both ways, so that equal decisions mean something,
    mid = float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2  # between two scores (a tie would be decided by rounding)
    np.testing.assert_array_equal(exp.predict_arrays(test, threshold=mid).anomalous, det.predict_arrays(test, threshold=mid).anomalous)
    return agreement(det, exp, test)


@pytest.mark.parametrize("options", [dict(layer=3), dict(layer=[2, 4], block_grid="coarsest"),
                                     dict(layer=3, map_source="semantic", sigma=1.0)], ids=["one-block", "two-blocks", "text-maps"])
def test_onnx_fp32_agrees_with_torch_on_tiny_clip(tiny_backbone, images, tmp_path, options):
    normal, test = images
    det = fitted(tiny_backbone, normal, **options)
    det.save(tmp_path / "model")
    out = export_model(tmp_path / "model", tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == sorted([EXPORT_FILE, "model.onnx"])
    report = assert_agrees(det, out, test)
    assert report["decisions_same"] and report["max_relative"] < RTOL
    meta = read_export_meta(out)
    assert meta["source"]["fingerprint"] == det.fingerprint() and meta["grid"] == list(det.grid_)
    assert meta["preprocessing"]["image_size"] == det.image_size_ and meta["decision"]["threshold"] == det.threshold_
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "ArgMin" in ops and "MatMul" in ops and not any("cdist" in o.lower() for o in ops)


def test_fixed_batch_pads_the_last_batch(tiny_backbone, images, tmp_path):
    normal, test = images
    det = fitted(tiny_backbone, normal, layer=3)
    out = export_model(det, tmp_path / "exported", batch=4)
    graph = onnx.load(str(out / "model.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    assert len(test) % 4 and assert_agrees(det, out, test)["decisions_same"]


def test_onnx_backbone_exports_with_its_quantized_tensors(images, tmp_path):
    normal, test = images
    det = fitted(f"onnx:{save_tiny_onnx(tmp_path / 'tiny.onnx')}", normal, layer=["feat1", "block2_quantized"])
    out = export_model(det, tmp_path / "exported")
    assert read_export_meta(out)["input"] == "pixels"
    assert assert_agrees(det, out, test)["decisions_same"]
    with pytest.raises(ConfigError, match="only fp32"):
        export_model(det, tmp_path / "int8", precision="int8", check=test)


@pytest.mark.slow
def test_openvino_fp32_agrees_and_int8_is_reported(tiny_backbone, images, tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'lakead[runtime-openvino]')")
    normal, test = images
    det = fitted(tiny_backbone, normal, layer=3)
    out = export_model(det, tmp_path / "ov", format="openvino")
    assert {"model.xml", "model.bin", EXPORT_FILE} == {p.name for p in out.iterdir()}
    assert assert_agrees(det, out, test)["decisions_same"]
    # ONNX Runtime can also run it from the ONNX export through OpenVINO
    onnx_out = export_model(det, tmp_path / "onnx")
    np.testing.assert_allclose(ExportedDetector.load(onnx_out, engine="openvino").predict_arrays(test).scores,
                               det.predict_arrays(test).scores, rtol=RTOL)
    int8 = export_model(det, tmp_path / "int8", precision="int8", check=test)
    ops = {n.op_type for n in onnx.load(str(int8 / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
    assert read_export_meta(int8)["check"]["images"] == len(test)


def test_refusals_are_clear(tiny_backbone, tiny_clip_dir, images, tmp_path):
    normal, _ = images
    det = fitted(tiny_backbone, normal, layer=3)
    with pytest.raises(ConfigError, match="bf16 is an OpenVINO"):
        export_model(det, tmp_path / "x", precision="bf16")
    with pytest.raises(ConfigError, match="format must be one of"):
        export_model(det, tmp_path / "x", format="tflite")
    with pytest.raises(ConfigError, match="only with check images"):
        export_model(det, tmp_path / "x", precision="int8")
    with pytest.raises(ConfigError, match="batch must be"):
        export_model(det, tmp_path / "x", batch="0")
    two = LakeDetector(tiny_backbone, device="cpu", text_backbone=str(tiny_clip_dir), layer=3).fit(normal, "widget")
    with pytest.raises(ConfigError, match="second model"):
        export_model(two, tmp_path / "x")

    class Other:
        method = "mine"
        backbone = tiny_backbone

        def check_fitted(self):
            return self

    with pytest.raises(ConfigError, match="'mine' model cannot be exported: its method provides no scoring head"):
        export_model(Other(), tmp_path / "x")  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


def test_runtime_reports_damaged_exports(tiny_backbone, images, tmp_path):
    normal, test = images
    out = export_model(fitted(tiny_backbone, normal, layer=3), tmp_path / "exported")
    det = ExportedDetector.load(out)
    with pytest.raises(ConfigError, match="budget it was exported with"):
        det.predict_arrays(test[:1], false_alarm_rate=0.01)
    assert det.predict_arrays(test[:1], threshold=-1.0).anomalous.all()
    with pytest.raises(ModelFormatError, match="no such directory"):
        ExportedDetector.load(tmp_path / "missing")
    meta = json.loads((out / EXPORT_FILE).read_text())
    (out / EXPORT_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelFormatError, match="export the model again"):
        ExportedDetector.load(out)
    (out / EXPORT_FILE).write_text(json.dumps(meta))
    (out / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelFormatError, match="model.onnx: onnxruntime cannot load it"):
        ExportedDetector.load(out)
    (out / "model.onnx").unlink()
    with pytest.raises(ModelFormatError, match="model.onnx: missing"):
        ExportedDetector.load(out)


@pytest.mark.parametrize("grid,size", [((2, 3), (5, 7)), ((4, 4), (33, 17)), ((7, 5), (7, 5)), ((6, 6), (3, 4))])
def test_upsample_is_torchs_bilinear(grid, size):
    g = np.random.default_rng(1).normal(size=grid).astype(np.float32)
    np.testing.assert_allclose(upsample(g, size), upsample_map(g, size), rtol=1e-5, atol=1e-6)


BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "torchvision"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
"""


def test_runtime_runs_without_torch(tiny_backbone, images, tmp_path):
    normal, test = images
    det = fitted(tiny_backbone, normal, layer=3)
    out = export_model(det, tmp_path / "exported")
    np.save(tmp_path / "image.npy", test[5])
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import json, numpy as np
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch should be blocked")
        import lakead
        from lakead.runtime import ExportedDetector
        from lakead.runtime_cli import main
        det = ExportedDetector.load({str(out)!r})
        pred = det.predict([np.load({str(tmp_path / 'image.npy')!r})])
        assert main(["predict", {str(out)!r}, {str(tmp_path / 'imgs')!r}, "--out", {str(tmp_path / 'results')!r}, "--masks"]) == 0
        mods = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "scipy"))
        print(json.dumps({{"score": float(pred.scores[0]), "shape": list(pred.maps[0].shape), "modules": mods}}))
    """)
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.fromarray(test[5]).save(tmp_path / "imgs" / "a.png")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert not [m for m in got["modules"] if not m.startswith("scipy")]
    assert got["shape"] == list(test[5].shape[:2])
    assert got["score"] == pytest.approx(float(det.predict_arrays([test[5]]).scores[0]), rel=RTOL)
    rows = (tmp_path / "results" / "scores.csv").read_text().splitlines()
    assert len(rows) == 2 and len(list((tmp_path / "results" / "overlays").iterdir())) == 1


def test_cli_export_then_predict_an_exported_model(tiny_clip_dir, images, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from lakead.cli import app

    normal, test = images
    for sub, imgs in (("normal", normal), ("test", test)):
        (tmp_path / sub).mkdir()
        for i, a in enumerate(imgs):
            Image.fromarray(a).save(tmp_path / sub / f"{i:02d}.png")
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    assert invoke("fit", tmp_path / "normal", "-c", "widget", "--out", tmp_path / "m", "--backbone", tiny_clip_dir,
                  "--layer", "3", "--device", "cpu").exit_code == 0
    r = invoke("export", tmp_path / "m", "--out", tmp_path / "x", "--check", tmp_path / "test")
    assert r.exit_code == 0, r.output
    assert "check" in r.output and read_export_meta(tmp_path / "x")["check"]["decisions_differ"] == 0
    assert invoke("predict", tmp_path / "m", tmp_path / "test", "--out", tmp_path / "r1", "--device", "cpu").exit_code == 0
    assert invoke("predict", tmp_path / "x", tmp_path / "test", "--out", tmp_path / "r2").exit_code == 0
    rows1 = (tmp_path / "r1" / "scores.csv").read_text().splitlines()
    rows2 = (tmp_path / "r2" / "scores.csv").read_text().splitlines()
    assert len(rows1) == len(rows2) == len(test) + 1
    for a, b in zip(rows1[1:], rows2[1:]):
        a, b = a.split(","), b.split(",")
        assert a[0] == b[0] and a[4:] == b[4:]  # same image, same decisions
        assert float(b[1]) == pytest.approx(float(a[1]), rel=RTOL)
    r = invoke("info", tmp_path / "x")
    assert r.exit_code == 0 and "onnx fp32" in r.output and "widget" in r.output
    r = invoke("predict", tmp_path / "x", tmp_path / "test", "--out", tmp_path / "r3", "--backbone", tiny_clip_dir)
    assert r.exit_code != 0 and "holds its backbone" in r.output
    r = invoke("export", tmp_path / "m", "--out", tmp_path / "y", "--precision", "fp8")
    assert r.exit_code != 0 and "precision must be one of" in r.output


def test_service_serves_an_exported_model(tiny_backbone, tiny_clip_dir, images, tmp_path):
    from lakead.serve.store import ModelStore

    normal, test = images
    det = fitted(tiny_backbone, normal, layer=3)
    export_model(det, tmp_path / "models" / "widget-onnx")
    store = ModelStore(tmp_path / "models", default_backbone=str(tiny_clip_dir), device="cpu")
    (listed,) = store.list()
    assert listed["id"] == "widget-onnx" and listed["class_name"] == "widget" and "exported graph" in listed["warnings"][0]
    pred, (vmin, vmax) = store.predict("widget-onnx", test, [f"{i}.png" for i in range(len(test))])
    np.testing.assert_allclose(pred.scores, det.predict_arrays(test).scores, rtol=RTOL)
    assert (vmin, vmax) == tuple(det.map_range_)


@pytest.mark.realdata
@pytest.mark.slow
def test_mobilenet_export_agrees_on_real_data(shared_data, tmp_path):
    if not MOBILENET.is_file():
        pytest.skip(f"{MOBILENET} not present (see ../shared/models/README.md)")
    root = shared_data / "mvtec3d_tire" / "tire"
    support = sorted((root / "train" / "good").glob("*.png"))[:6]
    tests = sorted((root / "test" / "good").glob("*.png"))[:4] + [  # a defect image of each kind
        p for d in sorted((root / "test").iterdir()) if d.name != "good" for p in sorted(d.glob("*.png"))[:1]]
    for layer in ("426_quantized", ["400", "426_quantized"]):
        det = LakeDetector(f"onnx:{MOBILENET}", layer=layer, device="cpu").fit([str(p) for p in support], "tire")
        arrays = [det.read_image(str(p)) for p in tests]
        out = export_model(det, tmp_path / f"x{len(str(layer))}")
        report = assert_agrees(det, out, arrays)
        assert report["max_relative"] < RTOL and report["decisions_same"]


def test_every_registered_method_exports_or_says_why(tiny_backbone, tiny_clip_dir, images):
    from lakead.export import check_exportable
    from lakead.methods import METHODS

    normal, _ = images
    for name, m in METHODS.items():
        det = m.build(m.config_class.from_options(backbone=str(tiny_clip_dir)), backbone=tiny_backbone)
        det = det.fit(normal[:3], "widget")
        assert check_exportable(det, name) is det, name
