"""Export a fitted detector to ONNX or OpenVINO IR, to run without torch (:mod:`lakead.runtime`).

``lakead export MODEL_DIR --format onnx|openvino --out DIR [--precision fp32|bf16|int8|int8-static|auto] [--batch dynamic|N]``
writes one graph, normalised pixels ``(B, 3, S, S)`` in, scores out (:mod:`.graph`); bf16 two,
the backbone's and the head's, the head run in float32 (:mod:`.split`); and beside
it ``lakead-export.json`` (preprocessing, decision levels, map range, grid, lakead version, the
source model's fingerprint), into ``DIR`` atomically. See docs/DEPLOY.md.

Every method provides its scoring as a head (``det.scoring_head()``, :mod:`.graph`): LAKE
(and the baselines built on it), PatchCore, AnomalyDINO, WinCLIP, WinCLIP+ and WinCLIP+LAKE.
What a head cannot hold is refused with the reason, by the method itself (LAKE with a second
model for its text probe); a detector without a head is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..api import finite_or_none
from ..backbones.base import as_blocks
from ..backbones.onnx import ONNXBackbone
from ..errors import ConfigError
from ..outputs import EXPORT, check_output, output_directory
from ..methods import load_detector
from ..progress import stage
from ..runtime import EXPORT_FILE, EXPORT_FORMAT, EXPORT_VERSION, FORMATS, PRECISIONS, ExportedDetector
from .graph import INPUT, OUTPUTS, OnnxFeatureHead, TorchGraph

log = logging.getLogger("lakead")

#: ONNX opset of the exported graphs (what the TorchScript-based exporter of torch writes well).
OPSET = 17
#: Precisions each format can keep (see docs/DEPLOY.md for how far scores move); ``auto`` chooses one by the check.
FORMAT_PRECISIONS = {"onnx": ("fp32", "int8", "int8-static", "auto"), "openvino": ("fp32", "bf16", "int8", "int8-static", "auto")}
#: What the export's precision applies to: the backbone graph. The head (neuron selection, gallery products, min,
#: text probe, scope) stays float32: int8 leaves its nodes unquantized; bf16 writes it as a second graph (:mod:`.split`).
SPLIT_PRECISIONS = ("bf16",)


def parse_batch(value: str | int | None) -> int | None:
    """``"dynamic"`` (or None) -> None; a positive integer -> itself."""
    if value is None or value == "dynamic":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch must be 'dynamic' or a positive integer, got {value!r}") from None
    if n < 1:
        raise ConfigError(f"batch must be 'dynamic' or a positive integer, got {value!r}")
    return n


def check_exportable(det: Any, where: str) -> Any:
    """The detector, if its method and options can be exported (it has a scoring head, and the
    head takes its options); else a :class:`ConfigError` saying why."""
    scoring_head(det, where)
    return det


def scoring_head(det: Any, where: str) -> torch.nn.Module:
    """The method's traceable scoring (``det.scoring_head()``), or a :class:`ConfigError` saying why not."""
    method = getattr(det, "method", type(det).__name__)
    hook = getattr(det, "scoring_head", None)
    if hook is None:
        raise ConfigError(f"{where}: a {method!r} model cannot be exported: its method provides no scoring head "
                          "(scoring_head(), docs/ARCHITECTURE.md), so export cannot write its scoring as a static graph")
    try:
        return hook()
    except ConfigError as exc:
        raise ConfigError(f"{where}: a {method!r} model cannot be exported: {exc}") from None


def export_model(
    model: str | os.PathLike | Any,
    out: str | Path,
    *,
    format: str = "onnx",
    precision: str = "fp32",
    batch: str | int | None = None,
    check: Sequence[np.ndarray] | None = None,
    calibration: Sequence[np.ndarray] | None = None,
) -> Path:
    """Export ``model`` (a model directory or a fitted detector) into the directory ``out``; returns it.
    An existing ``out`` is replaced only when it holds a lakead export and nothing else; ``out`` may
    not be the model directory, lie inside it or hold it (:mod:`lakead.outputs`).

    ``check``: images (``(H, W, 3)`` uint8) scored by the torch path and by the exported graph
    before anything is written; the differences are recorded in the JSON, and a precision whose
    decisions differ from the torch path's on them is refused. fp32 needs none; int8 and bf16 are
    exported only with ``check`` (an empty list: the caller compares them itself, as the benchmarks do).
    ``calibration``: normal images for int8-static's activation ranges (default: the model's
    support images, read again from their paths; :mod:`.quantize`).
    """
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if precision not in (*PRECISIONS, "auto"):
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)} or auto, got {precision!r}")
    if precision not in FORMAT_PRECISIONS[format]:
        raise ConfigError(f"precision {precision} is not offered for {format}: "
                          f"{', '.join(FORMAT_PRECISIONS[format])} are (bf16 is an OpenVINO inference setting)")
    n_batch = parse_batch(batch)
    if precision == "auto" and not check:
        raise ConfigError("precision auto chooses the fastest precision whose decisions equal float32's on the check "
                          "images: give them (--check IMAGES)")
    if precision != "fp32" and check is None:
        raise ConfigError(
            f"precision {precision} is exported only with check images (--check): it is not kept by default because "
            "its decisions can differ from float32's (how far int8 moved them on real images, and why bf16 depends on "
            "the CPU that runs it: docs/DEPLOY.md)")
    is_path = isinstance(model, (str, os.PathLike))
    where = str(model) if is_path else "the detector"
    sources = [model] if is_path else []
    check_output(out, EXPORT, inputs=sources)  # before the work
    with stage("loading the model and its backbone"):
        det = load_detector(model, device="cpu") if is_path else model
        det.check_fitted()
        backbone = det.backbone
    backbone.to("cpu")  # the graph is traced on the CPU (the head copies the state there)
    head = scoring_head(det, where)
    onnx_model = isinstance(backbone, ONNXBackbone)
    if onnx_model and precision not in ("fp32", "auto"):
        raise ConfigError(f"{where}: its backbone is an ONNX model ({backbone.info.source}), exported as it is: "
                          "only fp32 applies (the model's own quantization is kept)")
    with stage("tracing the graph (torch.onnx)"):
        fp32 = _onnx_graph(det, head, n_batch, where)
    if format == "openvino":
        _refuse_for_openvino(fp32, where)
    candidates = [precision] if precision != "auto" else auto_candidates(format, onnx_model)
    ref = None
    if check:
        with stage(f"scoring {len(check)} check images with the torch model"):
            ref = _reference(det, check)
    tried: list[dict[str, Any]] = []
    with output_directory(out, EXPORT, inputs=sources) as tmp:
        for p in candidates:
            try:
                with stage(f"writing the {p} graph" + (" (quantizing to int8)" if p.startswith("int8") else "")):
                    graphs, meta = _build(det, head, fp32, format, p, n_batch, calibration, where)
                    _write(tmp, graphs, meta, format)
            except ConfigError as exc:
                if precision != "auto":
                    raise
                tried.append({"precision": p, "skipped": str(exc)})
                continue
            if not check:
                break
            with stage(f"checking the {p} graph against the torch model on {len(check)} images"):
                report = agreement(det, ExportedDetector.load(tmp), check, ref=ref)
            meta["check"] = report
            if precision == "auto":
                tried.append({"precision": p, **{k: report[k] for k in ("ran", "decisions_differ", "max_relative")}})
                meta["auto"] = {"chose": p, "tried": tried, "order": list(candidates)}
            (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            if report["decisions_same"]:
                break
            if precision != "auto" or p == candidates[-1]:
                raise ConfigError(
                    f"{where}: the {format} {p} graph (ran: {report['ran']}) decides differently from the torch path on "
                    f"{report['decisions_differ']} of {report['images']} check images (largest relative score "
                    f"difference {report['max_relative']:.3g}); nothing was written. Use --precision fp32.")
    return Path(out)


def auto_candidates(format: str, onnx_backbone: bool = False) -> list[str]:
    """What ``--precision auto`` tries, fastest first, until one decides as float32 does on the
    check images: bf16 (OpenVINO, where this CPU has bfloat16 arithmetic), int8-static, fp32."""
    if onnx_backbone:
        return ["fp32"]
    out = []
    if format == "openvino":
        try:
            import openvino as ov

            if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                out.append("bf16")
        except ImportError:
            pass
    return out + ["int8-static", "fp32"]


def _build(det: Any, head: torch.nn.Module, fp32: bytes, format: str, precision: str, n_batch: int | None,
           calibration: Sequence[np.ndarray] | None, where: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The graphs (file name -> ONNX bytes) and the JSON of one precision."""
    onnx_bytes = _quantize_int8(fp32) if precision == "int8" else fp32
    meta = _meta(det, head, format, precision, n_batch, where)
    if precision == "int8-static":
        onnx_bytes, meta["calibration"] = _quantize_int8_static(det, onnx_bytes, meta, calibration, n_batch, where)
    if precision not in SPLIT_PRECISIONS:
        return {meta["file"]: onnx_bytes}, meta
    from .split import split_head

    backbone, head_graph, cut = split_head(onnx_bytes, INPUT, OUTPUTS)
    ext = Path(meta["file"]).suffix
    meta["file"] = f"backbone{ext}"
    meta["head"] = {"file": f"head{ext}", "inputs": cut, "precision": "fp32"}
    return {meta["file"]: backbone, meta["head"]["file"]: head_graph}, meta


def _write(tmp: Path, graphs: dict[str, bytes], meta: dict[str, Any], format: str) -> None:
    """The graphs and the JSON into ``tmp`` (an earlier candidate's files removed)."""
    for f in tmp.iterdir():
        f.unlink()
    for name, onnx_bytes in graphs.items():
        if format == "onnx":
            (tmp / name).write_bytes(onnx_bytes)
        else:
            _write_openvino(onnx_bytes, tmp / name)
    (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _refuse_for_openvino(onnx_bytes: bytes, where: str) -> None:
    """A one-line refusal for a graph OpenVINO cannot convert: ONNX Runtime's quantized operators
    (``QLinear*``, ``com.microsoft`` ones), as int8 ONNX backbones hold."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    ops = sorted({(f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node
                  if n.op_type.startswith("QLinear") or n.domain == "com.microsoft"})
    if ops:
        raise ConfigError(f"{where}: OpenVINO cannot convert this graph: its backbone holds ONNX Runtime's quantized "
                          f"operators ({', '.join(ops[:4])}{', ...' if len(ops) > 4 else ''}); export it with --format onnx "
                          "(ONNX Runtime runs them, and the engine openvino does not), or fit on a float32 backbone")


def _example(det: Any, n_batch: int | None) -> torch.Tensor:
    s = det.state_.image_size
    return torch.zeros((n_batch or 2, 3, s, s), dtype=torch.float32)


def _to_onnx(module: torch.nn.Module, args: tuple, inputs: list[str], n_batch: int | None) -> bytes:
    """``module`` traced by torch's TorchScript-based ONNX exporter (the dynamo one needs
    onnxscript, and the graphs here are static); dynamic batch unless ``n_batch`` is given."""
    axes = None if n_batch else {n: {0: "batch"} for n in (*inputs, *OUTPUTS)}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's TracerWarnings about shapes (static by design) and its deprecation notice
        torch.onnx.export(module.eval(), args, buf, dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=list(OUTPUTS), dynamic_axes=axes, do_constant_folding=True)
    return buf.getvalue()


def _onnx_graph(det: Any, head: torch.nn.Module, n_batch: int | None, where: str) -> bytes:
    backbone = det.backbone
    if not isinstance(backbone, ONNXBackbone):
        return _to_onnx(TorchGraph(backbone, head), (_example(det, n_batch),), [INPUT], n_batch)
    import onnx

    if not hasattr(head, "blocks"):
        raise ConfigError(f"{where}: a {det.method!r} model on an ONNX backbone cannot be exported: its head does not "
                          "read block tokens")
    names = [str(b) for b in as_blocks(head.blocks)]
    sub = backbone.subgraph(names)
    import onnxruntime as ort

    raw = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        names, {backbone.input_name: _example(det, n_batch or (backbone.fixed_batch or 2)).numpy()})
    deq = [None if np.issubdtype(r.dtype, np.floating) else backbone.dequantization(n, r.dtype) for n, r in zip(names, raw)]
    feats = [f"feature{i}" for i in range(len(names))]
    head_model = onnx.load_from_string(_to_onnx(OnnxFeatureHead(head, deq), tuple(torch.from_numpy(r) for r in raw), feats, n_batch))
    sub_opset = max((o.version for o in sub.opset_import if o.domain in ("", "ai.onnx")), default=OPSET)
    if sub_opset < OPSET:
        sub = onnx.version_converter.convert_version(sub, OPSET)
    sub.ir_version = head_model.ir_version = max(sub.ir_version, head_model.ir_version)
    merged = onnx.compose.merge_models(sub, head_model, io_map=list(zip(names, feats)), prefix2="head/")
    rename = {backbone.input_name: INPUT, **{f"head/{o}": o for o in OUTPUTS}}  # the same names in every exported graph
    for node in merged.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        node.output[:] = [rename.get(o, o) for o in node.output]
    for v in (*merged.graph.input, *merged.graph.output):
        v.name = rename.get(v.name, v.name)
    onnx.checker.check_model(merged)
    return merged.SerializeToString()


def _quantize_int8(onnx_bytes: bytes) -> bytes:
    """The backbone's matrix products with int8 weights and dynamically quantized activations
    (ONNX Runtime's ``quantize_dynamic``); the LAKE head (gallery distances) stays float32."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load_from_string(onnx_bytes)
    head = [n.name for n in model.graph.node if n.name.startswith("/head/") or n.name.startswith("head/")]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process, logged on the root logger
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         nodes_to_exclude=head)
        root.setLevel(level)
        return dst.read_bytes()


def _quantize_int8_static(det: Any, onnx_bytes: bytes, meta: dict[str, Any], calibration: Sequence[np.ndarray] | None,
                          n_batch: int | None, where: str) -> tuple[bytes, dict[str, Any]]:
    """int8-static (:mod:`.quantize`): the graph with its blocks' linear layers in int8, calibrated
    on normal images; returns it and what the JSON records of the calibration."""
    from .quantize import calibration_images, calibration_pixels, quantize_int8_static

    images, source = calibration_images(det, calibration, where)
    quantized = quantize_int8_static(onnx_bytes, calibration_pixels(images, meta), batch=n_batch)
    return quantized, {"images": len(images), "source": source, "method": "minmax", "format": "QDQ",
                       "weights": "uint8 per output channel, asymmetric", "activations": "uint8 per tensor, asymmetric"}


def _write_openvino(onnx_bytes: bytes, xml: Path) -> None:
    """OpenVINO IR (``model.xml`` + ``model.bin``) converted from the ONNX graph by ``openvino.convert_model``."""
    try:
        import openvino as ov
    except ImportError:
        raise ConfigError("--format openvino needs the openvino package: pip install openvino") from None
    onnx_file = xml.with_suffix(".onnx")
    onnx_file.write_bytes(onnx_bytes)
    try:
        model = ov.convert_model(str(onnx_file))
    except Exception as exc:  # OpenVINO's own exception types; its message is long and multi-line
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ConfigError(f"OpenVINO cannot convert the exported graph ({first[:200]}); --format onnx writes it for "
                          "ONNX Runtime") from None
    finally:
        onnx_file.unlink()
    ov.save_model(model, str(xml), compress_to_fp16=False)


def _meta(det: Any, head: torch.nn.Module, format: str, precision: str, n_batch: int | None, where: str) -> dict[str, Any]:
    state, bb = det.state_, det.backbone
    prep = bb.preprocessing
    facts = head.facts
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "lakead_version": __version__,
        "engine": format,
        "file": "model.onnx" if format == "onnx" else "model.xml",
        "precision": precision,
        "batch": n_batch,
        "input": INPUT,
        "outputs": list(OUTPUTS),
        "source": {"model": where, "method": det.method, "fingerprint": det.fingerprint(), "backbone": bb.info.to_dict(),
                   "meta": {"lakead_version": __version__, **det.model_meta()}},  # what lakead.json of the model says
        "preprocessing": {"image_size": state.image_size, "mean": list(prep.mean), "std": list(prep.std),
                          "resample": int(prep.resample), "rescale": float(prep.rescale), "patch_size": int(bb.info.patch_size)},
        "grid": list(state.grid),
        "map_grid": list(facts["map_grid"]),
        "map_range": [float(v) for v in state.map_range],
        "sigma": float(facts["sigma"]),
        "lam": float(facts.get("lam", 0.0)),
        "decision": {
            "threshold": finite_or_none(state.threshold),
            "threshold_rule": state.threshold_rule,
            "false_alarm_rate": state.false_alarm_rate,
            "seed_threshold": state.seed_threshold,
            "pixel_threshold": state.pixel_threshold,
            "scope_threshold": getattr(state, "scope_threshold", None),
        },
        "class_name": state.class_name,
        "fitted_at": state.fitted_at,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _reference(det: Any, images: Sequence[np.ndarray]) -> Any:
    """The torch path's predictions on ``images``, searched exactly (what the graph computes)."""
    if getattr(det.config, "index", None) == "hnsw":
        det = copy.copy(det)
        det.config = dataclasses.replace(det.config, index="exact")
    return det.predict_arrays(list(images))


def agreement(det: Any, exported: ExportedDetector, images: Sequence[np.ndarray], ref: Any = None) -> dict[str, Any]:
    """How far the exported graph's predictions are from the torch path's on ``images``:
    largest relative and absolute difference of the image scores, of the maps (relative to the
    map's range), and how many decisions differ. The graph searches the whole gallery exactly, so
    a model searched through an approximate index (``index="hnsw"``) is compared searched exactly."""
    ref = _reference(det, images) if ref is None else ref
    got = exported.predict_arrays(list(images))
    rel = np.abs(got.scores - ref.scores) / np.maximum(np.abs(ref.scores), 1e-12)
    span = max(float(np.ptp(np.concatenate([m.ravel() for m in ref.maps]))), 1e-12)
    map_diff = max(float(np.abs(a - b).max()) for a, b in zip(got.maps, ref.maps)) / span
    differ = int((got.anomalous != ref.anomalous).sum())
    return {
        "images": len(images),
        "max_relative": float(rel.max()) if rel.size else 0.0,
        "max_absolute": float(np.abs(got.scores - ref.scores).max()) if rel.size else 0.0,
        "max_map_relative": map_diff if math.isfinite(map_diff) else None,
        "decisions_differ": differ,
        "decisions_same": differ == 0,
        "ran": exported.ran,
    }
