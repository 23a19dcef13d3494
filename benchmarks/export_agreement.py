#!/usr/bin/env python
"""How far the exported paths' scores and decisions move from the torch path's, on real images.

For each category of ``--data`` (MVTec layout; default ../shared/data), a detector is fitted on
``--shots`` normal images with each backbone of ``--backbones`` (default: the real int8
MobileNetV2 ONNX model at its block ``426_quantized``, and the tiny random CLIP of
:mod:`lakead.testing` with its text probe, which the torch path runs in float32), exported at
every precision its backbone allows, and the test images (at most ``--max-test`` per category,
evenly spaced) are scored by the torch path and by each export. Reported per backbone, path and
category: the largest relative score difference, the number of decisions that differ (at the
model's own threshold), and the image AUROC of both.

    python benchmarks/export_agreement.py --json agreement.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lakead.data import load_dataset
from lakead.export import export_model
from lakead.lake import LakeDetector
from lakead.lake.fit import spread_subset
from lakead.metrics import image_metrics
from lakead.runtime import ExportedDetector
from lakead.testing import save_random_clip

ROOT = Path(__file__).resolve().parents[1]
PATHS = {"onnx": [("onnx", "fp32")], "clip": [("onnx", "fp32"), ("openvino", "fp32"), ("onnx", "int8"), ("openvino", "int8"),
                                               ("openvino", "bf16")]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--max-test", type=int, default=60)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    mobilenet = ROOT.parent / "shared" / "models" / "mobilenetv2-12-int8.onnx"
    res: dict = {"command": "python benchmarks/export_agreement.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    with tempfile.TemporaryDirectory(prefix="lakead-agreement-") as tmp:
        tiny = save_random_clip(Path(tmp) / "tiny-clip", "tiny", seed=0)
        backbones = {"onnx": (f"onnx:{mobilenet}", dict(layer="426_quantized")), "clip": (str(tiny), dict(layer=3))}
        for cat in sorted((c for ds in sorted(args.data.iterdir()) if ds.is_dir() for c in load_dataset(ds)), key=lambda c: c.name):
            support = [str(p) for p in cat.train[: args.shots]]
            pick = spread_subset(len(cat.test), args.max_test)
            tests = [cat.test[i] for i in pick]
            labels = np.array([t.label for t in tests])
            for kind, (spec, options) in backbones.items():
                det = LakeDetector(spec, device="cpu", batch_size=8, **options).fit(support, cat.name)
                arrays = [det.read_image(str(t.path)) for t in tests]
                ref = det.predict_arrays(arrays)
                for fmt, prec in PATHS[kind]:
                    out = export_model(det, Path(tmp) / f"{kind}-{fmt}-{prec}", format=fmt, precision=prec,
                                       check=None if prec == "fp32" else [])  # compared here, on every test image
                    got = ExportedDetector.load(out).predict_arrays(arrays)
                    rel = np.abs(got.scores - ref.scores) / np.maximum(np.abs(ref.scores), 1e-12)
                    row = {"category": cat.name, "backbone": kind, "path": f"{fmt} {prec}", "images": len(arrays),
                           "max_relative_score": float(rel.max()), "decisions_differ": int((got.anomalous != ref.anomalous).sum()),
                           "auroc_torch": image_metrics(labels, ref.scores)["auroc"], "auroc_export": image_metrics(labels, got.scores)["auroc"]}
                    res["rows"].append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
