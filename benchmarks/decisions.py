"""How the yes/no decision fares on real images: docs/DECISIONS.md.

For each category of a dataset in the MVTec layout (default ../shared/data), fit LAKE on every
training image with the MobileNetV2 of ../shared/models (a tensor, top-k neurons, no text
probe), score the test split, and report for each threshold rule and false-alarm budget the
false alarms on the good test images, the recall on the defective ones, and the recall an
oracle threshold reaches at that same false-alarm rate. Then the scope check: each category's
model on the other categories' test images (share flagged anomalous or out of scope), and the
defect regions at the default budget (share of defective images with at least one region,
pixel F1 of the masks against the ground truth).

    python benchmarks/decisions.py [--data ../shared/data] [--layer 400 --k 32] [--json out.json]

Prints markdown tables; every number comes from this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lakead import LakeDetector  # noqa: E402
from lakead.data import load_dataset, read_mask  # noqa: E402
from lakead.decision import RULES  # noqa: E402
from lakead.metrics import oracle_recall  # noqa: E402

BUDGETS = (0.01, 0.05, 0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "mobilenetv2-12-int8.onnx"))
    ap.add_argument("--layer", default="400")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write every number to this file")
    args = ap.parse_args(argv)
    cats = load_dataset(args.data)
    t0 = time.time()
    out: dict = {"layer": args.layer, "k": args.k, "categories": {}}
    models, tests = {}, {}
    for cat in cats:
        det = LakeDetector(f"onnx:{args.model}", layer=args.layer, k=args.k, use_text=False, batch_size=16)
        det.fit(cat.train, cat.class_name)
        paths = [s.path for s in cat.test]
        labels = np.array([s.label for s in cat.test])
        pred = det.predict(paths)
        models[cat.name], tests[cat.name] = det, (cat, paths, labels)
        rows = []
        for rule in RULES:
            for a in BUDGETS:
                det.config.threshold_rule = rule
                p = det.predict(paths, false_alarm_rate=a)
                far, rec = float(p.anomalous[labels == 0].mean()), float(p.anomalous[labels == 1].mean())
                rows.append({"rule": rule, "budget": a, "threshold": p.threshold, "used": det.thresholds(a).rule,
                             "false_alarms": far, "recall": rec, "oracle_recall": oracle_recall(labels, pred.scores, far)})
        det.config.threshold_rule = "auto"
        pred = det.predict(paths)  # the default budget
        with_region, f1 = [], []
        for i, s in enumerate(cat.test):
            mask, regions = pred.regions(i)
            if s.label == 1:
                with_region.append(bool(regions))
                if s.mask is not None:
                    gt = read_mask(s.mask, size=mask.shape)
                    tp = float((mask & gt).sum())
                    f1.append(2 * tp / max(1.0, float(mask.sum() + gt.sum())))
        out["categories"][cat.name] = {
            "n_support": len(det.support_), "n_good": int((labels == 0).sum()), "n_defect": int((labels == 1).sum()),
            "rules": rows, "default": {"rule": det.threshold_rule_, "threshold": det.threshold_,
                                       "false_alarms": float(pred.anomalous[labels == 0].mean()),
                                       "recall": float(pred.anomalous[labels == 1].mean()),
                                       "out_of_scope_good": float(pred.out_of_scope[labels == 0].mean())},
            "regions": {"defective_with_region": float(np.mean(with_region)), "pixel_f1": float(np.mean(f1)) if f1 else None},
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

    print(f"# decisions: MobileNetV2 tensor {args.layer}, top-{args.k}, every training image as support\n")
    for name, c in out["categories"].items():
        print(f"## {name} ({c['n_support']} support, {c['n_good']} good / {c['n_defect']} defective test images)\n")
        print("| rule | budget | used | threshold | false alarms | recall | oracle recall at those false alarms |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for r in c["rules"]:
            print(f"| {r['rule']} | {r['budget']:g} | {r['used']} | {r['threshold']:.3f} | {100 * r['false_alarms']:.1f} % "
                  f"| {100 * r['recall']:.1f} % | {100 * r['oracle_recall']:.1f} % |")
        d, g = c["default"], c["regions"]
        f1 = "n/a" if g["pixel_f1"] is None else f"{100 * g['pixel_f1']:.1f} %"
        print(f"\ndefault (budget 0.05, {d['rule']}): false alarms {100 * d['false_alarms']:.1f} %, recall "
              f"{100 * d['recall']:.1f} % (good images out of scope: {100 * d['out_of_scope_good']:.1f} %); defective images "
              f"with a region {100 * g['defective_with_region']:.1f} %, pixel F1 of the masks "
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
