"""How the yes/no decision fares on real images: docs/DECISIONS.md.

For each category of a dataset in the MVTec layout (default ../shared/data), fit LAKE on every
training image with the MobileNetV2 of ../shared/models (a tensor, top-k neurons, no text
probe), score the test split, and report for each threshold rule and false-alarm budget the
false alarms on the good test images, the recall on the defective ones, and the recall an
oracle threshold reaches at that same false-alarm rate. Then the scope check: each category's
model on the other categories' test images (share flagged anomalous or out of scope), and the
defect regions at the default budget (share of defective images with at least one region,
pixel F1 of the masks against the ground truth).

    python benchmarks/decisions.py [--data ../shared/data] [--layer 400 --k 32] [--distance cosine] [--top-percent 5]
                                   [--json out.json]
    python benchmarks/decisions.py --method anomalydino|patchcore   # the same budgeted decisions, another method

``--method anomalydino``: AnomalyDINO's rule on the same tensor (every channel, cosine, top 1 %);
``--method patchcore``: PatchCore on tensors 365+400 (28 x 28), coreset 10 %, as docs/methods/
benchmarks them. Neither has a scope check.

Each category's test images are scored once; the decisions of every rule and budget are derived
from those scores and the levels ``det.thresholds(budget)`` gives (what ``predict`` does with
``false_alarm_rate``, without running the backbone again).

Prints markdown tables; every number comes from this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import realdata  # noqa: E402

from lakead import LakeDetector  # noqa: E402
from lakead.methods.anomalydino import AnomalyDinoDetector  # noqa: E402
from lakead.methods.patchcore import PatchCoreDetector  # noqa: E402
from lakead.data import load_dataset, read_mask  # noqa: E402
from lakead.decision import RULES  # noqa: E402
from lakead.metrics import image_metrics, oracle_recall  # noqa: E402

BUDGETS = (0.01, 0.05, 0.1)


def decide(pred, levels):
    """``pred``'s decisions at other levels (``det.thresholds(budget)``), as ``predict`` with
    ``false_alarm_rate`` makes them: score above the image level, or scope above the scope level."""
    out = pred.scope > levels.scope if levels.scope is not None else np.zeros(len(pred), bool)
    return dataclasses.replace(pred, anomalous=(pred.scores > levels.image) | out, out_of_scope=out, threshold=levels.image,
                               pixel_threshold=levels.pixel, seed_threshold=levels.seed)


def make(args):
    """An unfitted detector of ``args.method`` on the ONNX MobileNetV2."""
    backbone = f"onnx:{args.model}"
    if args.method == "anomalydino":
        return AnomalyDinoDetector(backbone, layer=args.layer, batch_size=16)
    if args.method == "patchcore":
        return PatchCoreDetector(backbone, layer=["365", "400"], coreset=0.1, batch_size=16)
    return LakeDetector(backbone, layer=args.layer, k=args.k, use_text=False, batch_size=16, distance=args.distance,
                        visual_top_percent=args.top_percent)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    realdata.add_options(ap)
    ap.add_argument("--distance", default="euclidean", choices=("euclidean", "cosine"))
    ap.add_argument("--top-percent", type=float, default=None, help="LAKE's visual_top_percent (default: the max)")
    ap.add_argument("--method", default="lake", choices=("lake", "anomalydino", "patchcore"))
    ap.add_argument("--json", default=None, help="also write every number to this file")
    args = ap.parse_args(argv)
    cats = load_dataset(args.data)
    t0 = time.time()
    out: dict = {"method": args.method, "layer": args.layer, "k": args.k, "distance": args.distance,
                 "top_percent": args.top_percent, "categories": {}}
    models, tests = {}, {}
    for cat in cats:
        det = make(args)
        det.fit(cat.train, cat.class_name)
        paths = [s.path for s in cat.test]
        labels = np.array([s.label for s in cat.test])
        pred = det.predict(paths)
        models[cat.name], tests[cat.name] = det, (cat, paths, labels)
        rows = []
        for rule in RULES:
            for a in BUDGETS:
                det.config.threshold_rule = rule
                levels = det.thresholds(a)
                p = decide(pred, levels)
                far, rec = float(p.anomalous[labels == 0].mean()), float(p.anomalous[labels == 1].mean())
                rows.append({"rule": rule, "budget": a, "threshold": p.threshold, "used": levels.rule,
                             "false_alarms": far, "recall": rec, "oracle_recall": oracle_recall(labels, pred.scores, far)})
        det.config.threshold_rule = "auto"  # pred: the default budget and rule
        with_region, good_region, f1 = [], [], []
        for i, s in enumerate(cat.test):
            mask, regions = pred.regions(i)
            if s.label == 0:
                good_region.append(bool(regions))
            if s.label == 1:
                with_region.append(bool(regions))
                if s.mask is not None:
                    gt = read_mask(s.mask, size=mask.shape)
                    tp = float((mask & gt).sum())
                    f1.append(2 * tp / max(1.0, float(mask.sum() + gt.sum())))
        out["categories"][cat.name] = {
            "n_support": len(det.support_), "n_good": int((labels == 0).sum()), "n_defect": int((labels == 1).sum()),
            "image_auroc": float(image_metrics(labels, pred.scores)["auroc"]),
            "rules": rows, "default": {"rule": det.threshold_rule_, "threshold": det.threshold_,
                                       "false_alarms": float(pred.anomalous[labels == 0].mean()),
                                       "recall": float(pred.anomalous[labels == 1].mean()),
                                       "out_of_scope_good": float(pred.out_of_scope[labels == 0].mean())},
            "regions": {"defective_with_region": float(np.mean(with_region)), "good_with_region": float(np.mean(good_region)),
                        "pixel_f1": float(np.mean(f1)) if f1 else None},
        }
    scope = {}
    for name, det in models.items():
        for other, (cat, paths, labels) in tests.items():
            if other == name:
                continue
            p = det.predict(paths)
            scope[f"{name} -> {other}"] = {"flagged": float(p.anomalous.mean()), "out_of_scope": float(p.out_of_scope.mean())}
    out["scope"] = scope
    out["seconds"] = round(time.time() - t0, 1)

    pooled = "max" if args.top_percent is None else f"mean of the top {args.top_percent:g} % of tokens"
    what = (f"LAKE tensor {args.layer}, top-{args.k}, {args.distance} distance, image score: {pooled}" if args.method == "lake" else
            f"AnomalyDINO's rule, tensor {args.layer}" if args.method == "anomalydino" else
            "PatchCore, tensors 365+400, coreset 10 %")
    print(f"# decisions: MobileNetV2, {what}, every training image as support\n")
    for name, c in out["categories"].items():
        print(f"## {name} ({c['n_support']} support, {c['n_good']} good / {c['n_defect']} defective test images)\n")
        print("| rule | budget | used | threshold | false alarms | recall | oracle recall at those false alarms |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for r in c["rules"]:
            print(f"| {r['rule']} | {r['budget']:g} | {r['used']} | {r['threshold']:.3f} | {100 * r['false_alarms']:.1f} % "
                  f"| {100 * r['recall']:.1f} % | {100 * r['oracle_recall']:.1f} % |")
        d, g = c["default"], c["regions"]
        f1 = "n/a" if g["pixel_f1"] is None else f"{100 * g['pixel_f1']:.1f} %"
        print(f"\nimage AUROC {100 * c['image_auroc']:.1f}; default (budget 0.05, {d['rule']}): false alarms {100 * d['false_alarms']:.1f} %, recall "
              f"{100 * d['recall']:.1f} % (good images out of scope: {100 * d['out_of_scope_good']:.1f} %); defective images "
              f"with a region {100 * g['defective_with_region']:.1f} % (good images with a region "
              f"{100 * g['good_with_region']:.1f} %), pixel F1 of the masks "
              f"{f1}\n")
    print("## A model on another product's test images\n")
    print("| model -> images | flagged (anomalous or out of scope) | out of scope |")
    print("|---|---:|---:|")
    for k, v in scope.items():
        print(f"| {k} | {100 * v['flagged']:.1f} % | {100 * v['out_of_scope']:.1f} % |")
    print(f"\n{out['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
