"""Measurements behind docs/INTERPRETABILITY.md: a contaminated support set with and without
the outlier filter, and the elbow's k against a k sweep.

    python benchmarks/interpretability.py --out docs/results/interpretability

For every category (MVTec-AD layout, default: the three real datasets under ../shared/data):

* **contamination**: the support set is the category's normal training images plus ``m``
  defect images (m = 0, 2, 5, 10). The defect images come from a seeded pool of the
  category's defective test images; the whole pool is removed from the test set for every
  ``m``, so all settings are scored on the same test images. Each setting is fitted with
  and without ``filter_outliers`` and repeated for several seeds (different pools); the
  image AUROC (lakead.metrics.image_metrics), how many planted images the filter dropped and
  how many normal ones it dropped are recorded.
* **k sweep**: the clean support set, ``k`` over a grid and ``k="auto"``; image AUROC on the
  full test set, and where the elbow falls.

The backbone runs once per image (lakead.backbones.cache.FeatureCache). Writes ``results.json`` (every
number) and ``results.md`` (the tables of the write-up) to ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from lakead import LakeDetector
from lakead.backbones import load_backbone
from lakead.data import load_dataset, select_shots
from lakead.backbones.cache import FeatureCache
from lakead.fileio import atomic_write_text
from lakead.images import load_image
from lakead.metrics import image_metrics
from lakead.neurons import knee_k

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_CATEGORIES = ("mvtec3d_tire/tire", "magnetic_tile/tile", "mpdd/metal_plate")
DEFAULT_BACKBONE = f"onnx:{REPO.parent / 'shared' / 'models' / 'mobilenetv2-12-int8.onnx'}"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def run_category(cat, backbone, args) -> dict:
    """Both experiments on one category."""
    shots, rule = select_shots(list(cat.train), args.shots, None)
    arrays = {p: load_image(p) for p in [*shots, *(s.path for s in cat.test)]}
    normal_support = [arrays[p] for p in shots]
    normal_names = [str(p) for p in shots]
    defects = [s for s in cat.test if s.label == 1]
    base = dict(layer=args.layer, use_text=False, batch_size=args.batch_size, device="cpu")
    out: dict = {"category": cat.name, "support_rule": rule, "counts": cat.counts(), "contamination": [], "k_sweep": {}}

    # -- contamination ------------------------------------------------------------------------
    pool_size = max(args.counts)
    for seed in range(args.seeds):
        pool = random.Random(seed).sample(defects, pool_size)
        held = {s.path for s in pool}
        test = [s for s in cat.test if s.path not in held]
        test_arrays = [arrays[s.path] for s in test]
        labels = [s.label for s in test]
        for m in args.counts:
            planted = pool[:m]
            images = normal_support + [arrays[s.path] for s in planted]
            names = normal_names + [str(s.path) for s in planted]
            for filt in (False, True):
                det = LakeDetector(backbone, k=args.k, filter_outliers=filt, seed=seed, **base).fit(images, cat.class_name, names=names)
                auroc = image_metrics(labels, det.predict(test_arrays).scores)["auroc"]
                dropped = set(det.outliers_)
                row = {
                    "seed": seed, "m": m, "filter": filt, "auroc": auroc, "k": int(det.neurons_.numel()),
                    "support": len(det.support_), "dropped_planted": sum(str(s.path) in dropped for s in planted),
                    "dropped_normal": sum(n in dropped for n in normal_names), "test_images": len(test),
                }
                out["contamination"].append(row)
                print(f"  {cat.name} seed {seed} m={m:2d} filter={'on ' if filt else 'off'} AUROC {auroc:.4f} "
                      f"dropped {row['dropped_planted']}/{m} planted, {row['dropped_normal']} normal", flush=True)

    # -- k sweep on the clean support set -----------------------------------------------------
    test_arrays = [arrays[s.path] for s in cat.test]
    labels = [s.label for s in cat.test]
    sweep = []
    for k in [*args.ks, "auto"]:
        det = LakeDetector(backbone, k=k, **base).fit(normal_support, cat.class_name, names=normal_names)
        if k != "auto" and k > det.width_:
            continue
        auroc = image_metrics(labels, det.predict(test_arrays).scores)["auroc"]
        sweep.append({"k": int(det.neurons_.numel()), "auto": k == "auto", "auroc": auroc})
        print(f"  {cat.name} k={k!s:>4} ({det.neurons_.numel()} neurons) AUROC {auroc:.4f}", flush=True)
    variance = det.channel_variance_.numpy()
    out["k_sweep"] = {"width": int(variance.size), "elbow_k": knee_k(variance), "rows": sweep}
    return out


def tables(results: dict) -> str:
    """The markdown tables of the write-up."""
    lines = []
    counts = results["args"]["counts"]
    lines += ["### Contaminated support set: image AUROC (mean ± std over seeds)", "",
              "| category | filter | " + " | ".join(f"m = {m}" for m in counts) + " |",
              "|---|---|" + "---|" * len(counts)]
    for cat in results["categories"]:
        for filt in (False, True):
            cells = []
            for m in counts:
                a = np.array([r["auroc"] for r in cat["contamination"] if r["m"] == m and r["filter"] == filt])
                cells.append(f"{a.mean():.3f} ± {a.std():.3f}")
            lines.append(f"| {cat['category']} | {'on' if filt else 'off'} | " + " | ".join(cells) + " |")
    lines += ["", "### What the filter dropped (mean over seeds)", "",
              "| category | " + " | ".join(f"m = {m}: planted / normal dropped" for m in counts) + " |",
              "|---|" + "---|" * len(counts)]
    for cat in results["categories"]:
        cells = []
        for m in counts:
            rows = [r for r in cat["contamination"] if r["m"] == m and r["filter"]]
            cells.append(f"{np.mean([r['dropped_planted'] for r in rows]):.1f} / {m} · "
                         f"{np.mean([r['dropped_normal'] for r in rows]):.1f}")
        lines.append(f"| {cat['category']} | " + " | ".join(cells) + " |")
    lines += ["", "### k sweep (clean support set): image AUROC", ""]
    ks = sorted({r["k"] for cat in results["categories"] for r in cat["k_sweep"]["rows"] if not r["auto"]})
    lines += ["| category | width | elbow k | AUROC at elbow | best k (AUROC) | " + " | ".join(f"k = {k}" for k in ks) + " |",
              "|---|---|---|---|---|" + "---|" * len(ks)]
    for cat in results["categories"]:
        rows = cat["k_sweep"]["rows"]
        grid = {r["k"]: r["auroc"] for r in rows if not r["auto"]}
        auto = next(r for r in rows if r["auto"])
        best = max(grid, key=lambda k: grid[k])
        cells = [f"{grid[k]:.3f}" if k in grid else "" for k in ks]
        lines.append(f"| {cat['category']} | {cat['k_sweep']['width']} | {auto['k']} | {auto['auroc']:.3f} | "
                     f"{best} ({grid[best]:.3f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding the datasets")
    ap.add_argument("--categories", default=",".join(DEFAULT_CATEGORIES), help="category folders under --data, comma-separated")
    ap.add_argument("--backbone", default=DEFAULT_BACKBONE)
    ap.add_argument("--layer", default="426_quantized")
    ap.add_argument("--k", type=int, default=32, help="k of the contamination experiment")
    ap.add_argument("--ks", type=_ints, default=_ints("1,2,4,8,12,16,24,32,48,64,96"), help="the k sweep")
    ap.add_argument("--counts", type=_ints, default=_ints("0,2,5,10"), help="defect images mixed into the support set")
    ap.add_argument("--shots", type=int, default=64, help="normal support images (the first N by name)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    backbone = FeatureCache(load_backbone(args.backbone))
    start = time.time()
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "categories": []}
    for name in [c for c in args.categories.split(",") if c]:
        (cat,) = load_dataset(args.data / name)
        print(f"{cat.name}: {cat.counts()}", flush=True)
        results["categories"].append(run_category(cat, backbone, args))
        backbone.clear()
    results["seconds"] = round(time.time() - start, 1)
    results["command"] = "python benchmarks/interpretability.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = tables(results)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(args.out / "results.md", f"Command: `{results['command']}`\n\n" + md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
