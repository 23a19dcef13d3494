#!/usr/bin/env python
"""How far the exported paths' scores and decisions move from the torch path's, on real images.

For each category of ``--data`` (MVTec layout; default ../shared/data), a detector is fitted on
``--shots`` normal images with each backbone of ``--backbones`` (default: the real int8
MobileNetV2 ONNX model at its block ``426_quantized``, and the tiny random CLIP of
:mod:`lakead.testing` with its text probe, which the torch path runs in float32), exported at
every precision its backbone allows, and the test images (at most ``--max-test`` per category,
evenly spaced) are scored by the torch path and by each export. Reported per backbone, path and
category: the largest relative score difference, the number of decisions that differ (at the
model's own threshold; split into the score's side of the threshold and the scope check's flag),
and the image AUROC of both.

int8-static (``--precision int8-static``) is calibrated on the category's support images (the
images the model was fitted on). ``--static-variants`` adds the int8-static choices that were
not kept (int8 weights, with and without 7-bit ``reduce_range``; int8 activations and weights;
the attention's activation products quantized too), exported the same way, for the comparison
in docs/DEPLOY.md. ``--backbones clip`` skips MobileNetV2 (exported fp32 only).

    python benchmarks/export_agreement.py --json agreement.json
    python benchmarks/export_agreement.py --backbones clip --static-variants --max-test 40 --json static.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np

from lakead.data import load_dataset
from lakead.export import export_model
from lakead.export import quantize
from lakead.methods.lake import LakeDetector
from lakead.methods.lake.fit import spread_subset
from lakead.metrics import image_metrics
from lakead.runtime import ExportedDetector
from lakead.testing import save_random_clip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_speed import whole_graph_bf16  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PATHS = {"onnx": [("onnx", "fp32")], "clip": [("onnx", "fp32"), ("openvino", "fp32"), ("onnx", "int8"), ("openvino", "int8"),
                                               ("openvino", "bf16"), ("openvino", "bf16-whole"), ("onnx", "int8-static"),
                                               ("openvino", "int8-static")]}
#: int8-static choices not kept (name -> options of lakead.export.quantize.quantize_int8_static), ONNX Runtime
STATIC_VARIANTS = {"u8s8": dict(weights="int8"), "u8s8 reduce_range": dict(weights="int8", reduce_range=True),
                   "s8s8": dict(weights="int8", activations="int8"), "u8u8 attention": dict(attention=True)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--max-test", type=int, default=60)
    ap.add_argument("--backbones", default="onnx,clip", help="comma-separated, from: onnx, clip")
    ap.add_argument("--static-variants", action="store_true", help="also the int8-static choices not kept")
    ap.add_argument("--paths", default=None, help="comma-separated 'format precision' pairs to run, e.g. "
                    "'onnx fp32,openvino bf16,openvino bf16-whole' (bf16-whole: the float32 graph at the bf16 hint, head "
                    "included, as bf16 exports were before the head was split off); default: all")
    ap.add_argument("--categories", default=None, help="comma-separated category names (default: all)")
    ap.add_argument("--clip", default="tiny", help="the random CLIP preset of lakead.testing for the clip backbone "
                    "(tiny, vit-b-16, vit-l-14-336: full size, random weights, its text probe on; default tiny)")
    ap.add_argument("--layer", type=int, default=None, help="the clip backbone's block read (default: 3 on the tiny CLIP, LAKE's own default on the others)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    wanted = None if args.paths is None else {tuple(p.split()) for p in args.paths.split(",") if p.strip()}
    kinds = [k.strip() for k in args.backbones.split(",") if k.strip()]
    mobilenet = ROOT.parent / "shared" / "models" / "mobilenetv2-12-int8.onnx"
    res: dict = {"command": "python benchmarks/export_agreement.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    with tempfile.TemporaryDirectory(prefix="lakead-agreement-") as tmp:
        tiny = save_random_clip(Path(tmp) / "clip", args.clip, seed=0)
        backbones = {"onnx": (f"onnx:{mobilenet}", dict(layer="426_quantized")), "clip": (str(tiny), {} if args.layer is None and args.clip != "tiny" else dict(layer=args.layer or 3))}
        cats = sorted((c for ds in sorted(args.data.iterdir()) if ds.is_dir() for c in load_dataset(ds)), key=lambda c: c.name)
        if args.categories:
            cats = [c for c in cats if c.name in args.categories.split(",")]
        for cat in cats:
            support = [str(p) for p in cat.train[: args.shots]]
            pick = spread_subset(len(cat.test), args.max_test)
            tests = [cat.test[i] for i in pick]
            labels = np.array([t.label for t in tests])
            for kind in kinds:
                spec, options = backbones[kind]
                det = LakeDetector(spec, device="cpu", batch_size=8, **options).fit(support, cat.name)
                arrays = [det.read_image(str(t.path)) for t in tests]
                calibration = [det.read_image(s) for s in support]
                ref = det.predict_arrays(arrays)
                paths = [(fmt, prec, "", {}) for fmt, prec in PATHS[kind] if wanted is None or (fmt, prec) in wanted]
                if args.static_variants and kind == "clip":
                    paths += [("onnx", "int8-static", f" {v}", o) for v, o in STATIC_VARIANTS.items()]
                for fmt, prec, variant, qopts in paths:
                    whole = prec == "bf16-whole"
                    with mock.patch.object(quantize, "quantize_int8_static", partial(quantize.quantize_int8_static, **qopts)):
                        out = export_model(det, Path(tmp) / f"{kind}-{fmt}-{prec}{variant}", format=fmt,
                                           precision="fp32" if whole else prec,
                                           check=None if prec in ("fp32", "bf16-whole") else [],  # compared here, on every test image
                                           calibration=calibration if prec == "int8-static" else None)
                    exp = whole_graph_bf16(out, None) if whole else ExportedDetector.load(out)
                    got = exp.predict_arrays(arrays)
                    rel = np.abs(got.scores - ref.scores) / np.maximum(np.abs(ref.scores), 1e-12)
                    row = {"category": cat.name, "backbone": kind if kind == "onnx" else f"clip {args.clip}", "path": f"{fmt} {prec}{variant}", "ran": exp.ran, "images": len(arrays),
                           "max_relative_score": float(rel.max()), "decisions_differ": int((got.anomalous != ref.anomalous).sum()),
                           # the two parts of a decision: the score above the threshold, the scope check's flag
                           "score_decisions_differ": int(((got.scores > ref.threshold) != (ref.scores > ref.threshold)).sum()),
                           "scope_flags_differ": int((got.out_of_scope != ref.out_of_scope).sum()),
                           "median_scope_change": float(np.median(got.scope / ref.scope - 1)) if ref.scope is not None and got.scope is not None else None,
                           "auroc_torch": image_metrics(labels, ref.scores)["auroc"], "auroc_export": image_metrics(labels, got.scores)["auroc"]}
                    res["rows"].append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
