"""Does the false-alarm budget hold with a handful of normal images? docs/DECISIONS.md.

decisions.py fits on every training image (41 to 64). A user often has fewer: with ``n``
support images a budget below ``1 / (n + 1)`` has no order statistic and ``auto`` extrapolates
the exponential tail. For each category of a dataset in the MVTec layout (default
../shared/data) and each support size, fit LAKE with the MobileNetV2 of ../shared/models on
``shots`` training images drawn at random (one draw per seed), score the whole test split, and
report at each budget the false alarms on the good test images and the recall on the defective
ones (mean over the draws, and their range), with the rule ``auto`` used.

    python benchmarks/fewshot.py [--shots 5,10,20] [--seeds 5] [--budgets 0.05,0.1]
                                 [--distance cosine --top-percent 5] [--data ../shared/data]

Prints a markdown table; every number comes from this run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import realdata  # noqa: E402
from decisions import decide  # noqa: E402
from lakead import LakeDetector  # noqa: E402
from lakead.data import load_dataset  # noqa: E402
from lakead.metrics import image_metrics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    realdata.add_options(ap)
    ap.add_argument("--shots", default="5,10,20", help="support sizes (comma-separated)")
    ap.add_argument("--seeds", type=int, default=5, help="random draws of the support images per size")
    ap.add_argument("--budgets", default="0.05,0.1", help="false-alarm budgets (comma-separated)")
    ap.add_argument("--distance", default="euclidean", choices=("euclidean", "cosine"))
    ap.add_argument("--top-percent", type=float, default=None, help="LAKE's visual_top_percent (default: the max)")
    args = ap.parse_args(argv)
    shots = [int(v) for v in args.shots.split(",")]
    budgets = [float(v) for v in args.budgets.split(",")]
    t0 = time.time()
    pooled = "max" if args.top_percent is None else f"mean of the top {args.top_percent:g} % of tokens"
    print(f"# few-shot decisions: MobileNetV2, LAKE tensor {args.layer}, top-{args.k}, {args.distance} distance, "
          f"image score: {pooled}, {args.seeds} random draws of the support images per size\n")
    print("| category | support images | budget | rule (draws) | false alarms (good): mean [min, max] "
          "| recall (defective): mean [min, max] | image AUROC: mean |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for cat in load_dataset(args.data):
        paths = [s.path for s in cat.test]
        labels = np.array([s.label for s in cat.test])
        for n in shots:
            rows: dict[float, list[tuple[str, float, float]]] = {a: [] for a in budgets}
            aurocs = []
            for seed in range(args.seeds):
                pick = np.random.default_rng(seed).choice(len(cat.train), size=min(n, len(cat.train)), replace=False)
                det = LakeDetector(f"onnx:{args.model}", layer=args.layer, k=args.k, use_text=False, batch_size=16,
                                   distance=args.distance, visual_top_percent=args.top_percent)
                det.fit([cat.train[i] for i in sorted(pick)], cat.class_name)
                pred = det.predict(paths)
                aurocs.append(float(image_metrics(labels, pred.scores)["auroc"]))
                for a in budgets:
                    levels = det.thresholds(a)
                    p = decide(pred, levels)
                    rows[a].append((levels.rule, float(p.anomalous[labels == 0].mean()), float(p.anomalous[labels == 1].mean())))
            for a in budgets:
                used = sorted({r for r, _, _ in rows[a]})
                far = np.array([f for _, f, _ in rows[a]])
                rec = np.array([r for _, _, r in rows[a]])
                print(f"| {cat.name} | {n} | {a:g} | {', '.join(used)} | {100 * far.mean():.1f} % [{100 * far.min():.1f}, "
                      f"{100 * far.max():.1f}] | {100 * rec.mean():.1f} % [{100 * rec.min():.1f}, {100 * rec.max():.1f}] "
                      f"| {100 * np.mean(aurocs):.1f} |")
    print(f"\n{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
