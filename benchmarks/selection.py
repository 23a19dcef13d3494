#!/usr/bin/env python
"""How well ``lakead tune`` chooses from normal images alone, measured on real defects.

    python benchmarks/selection.py run [--shots 1,4,16,all] [--draws 3] [--json runs/selection.json]
    python benchmarks/selection.py report [--json runs/selection.json] > docs/selection/selection.md
    python benchmarks/selection.py decide > docs/selection/decisions.md
    python benchmarks/selection.py pixels > docs/selection/pixels.md

``run``: for every category of ``--data``, shot count and draw of the shots (seeds 0..draws-1 as
:func:`lakead.data.select_shots` draws them; one draw with every image), every candidate of
:func:`lakead.selection.default_candidates` on ``--layers`` (default 365,400,426 of the int8
MobileNetV2) is scored twice from the same support images:

- on synthetic defects of the support images, exactly as ``lakead tune`` scores it
  (:func:`lakead.selection.make_queries`, :func:`lakead.selection.score_candidates`: folds,
  defects, seed 0);
- on the category's real test images: image AUROC (the tire and metal_plate test sets whole,
  magnetic_tile's 588 thinned to ``--max-test`` evenly spaced, 200 by default, as
  benchmarks/methods.py does).

Every number goes to the JSON, so other selection rules can be evaluated from it without
running again. ``report`` prints the tables of docs/SELECTION.md: the tuned choice's real AUROC
against each fixed method with its defaults (LAKE, AnomalyDINO, subspace on tensor 400, the
block the docs use) and against the oracle (the best candidate on the real test labels, for
reference only), and the Kendall tau between synthetic and real AUROC over the candidates.
Features are extracted once per category (``benchmarks/featcache.py``).

``decide``: ``lakead tune`` itself (:func:`lakead.selection.tune`) on every training image of each
category, with the default decision options; the chosen model predicts every test image: false
alarms, recall, the recall of the best threshold at those false alarms (oracle), defective images
with a region, images called out of scope; and the time of tune against a plain fit of the chosen
configuration (both on this shared machine, side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import featcache  # noqa: E402
import realdata  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEFECTS = "tune's default (2, at least 32 in all)"
#: The fixed methods with their defaults, as a user gets them with --layer 400.
FIXED = {"LAKE (visual, default k)": "visual @ 400_quantized", "AnomalyDINO": "anomalydino @ 400_quantized",
         "subspace": "subspace @ 400_quantized"}


def run(a: argparse.Namespace) -> int:
    from lakead.backbones import load_backbone
    from lakead.data import load_dataset
    from lakead.images import load_image
    from lakead.methods.lake.config import LakeConfig
    from lakead.metrics import image_metrics
    from lakead.selection import default_candidates, make_queries, score_candidates, score_tokens
    from lakead.selection.search import extract

    torch.set_num_threads(1)
    spec = f"onnx:{a.model}"
    bb = load_backbone(spec)
    layers = a.layers.split(",")
    blocks = [bb.resolve_layer(x) for x in layers]
    base = LakeConfig(backbone=spec, use_text=False)
    cands = default_candidates(blocks)
    shots = [None if s == "all" else int(s) for s in a.shots.split(",")]
    out_path = Path(a.json)
    doc = json.loads(out_path.read_text()) if out_path.exists() else {"runs": []}
    done = {(r["category"], r["shots"], r["seed"]) for r in doc["runs"]}
    doc["settings"] = {"model": a.model, "layers": layers, "max_test": a.max_test, "folds": a.folds,
                       "defects_per_image": a.defects_per_image, "candidates": [c.label for c in cands]}
    cats = load_dataset(a.data)
    order = a.categories.split(",") if a.categories else [c.name for c in cats]
    for cat in sorted(cats, key=lambda c: next((i for i, o in enumerate(order) if o in c.name), len(order))):
        cf = featcache.category_features(cat, bb, blocks)
        keep = np.arange(len(cf.labels))
        if a.max_test and len(keep) > a.max_test:
            from lakead.methods.lake.fit import spread_subset

            keep = np.asarray(spread_subset(len(keep), a.max_test))
        test = {b: t[keep] for b, t in cf.test.items()}
        labels = cf.labels[keep]
        for s in shots:
            for seed, idx in featcache.draws(len(cf.train_paths), s, list(range(a.draws))):
                key = (cat.name, "all" if s is None else s, seed)
                if key in done:
                    continue
                t0 = time.time()
                arrays = [load_image(cf.train_paths[i]) for i in idx]
                queries = make_queries(arrays, defects_per_image=a.defects_per_image, seed=0)
                q_tokens, _ = extract(bb, queries.arrays, blocks, bb.info.image_size)
                support = {b: cf.train[b][idx] for b in blocks}
                t_feat = time.time() - t0
                synth = score_candidates(cands, support, queries, q_tokens, cf.grids, folds=a.folds, base=base)
                t_syn = time.time() - t0 - t_feat
                rows = []
                for r in synth:
                    img, _ = score_tokens(r.candidate, support, test, cf.grids, base)
                    rows.append({**r.row(), "real_image_auroc": image_metrics(labels, img.numpy())["auroc"],
                                 "samples": [[f, lab, round(v, 7)] for f, lab, v in r.samples]})
                doc["runs"].append({"category": cat.name, "shots": key[1], "seed": seed, "support": len(idx),
                                    "test_images": int(len(labels)), "candidates": rows,
                                    "seconds": {"features": round(t_feat, 1), "synthetic": round(t_syn, 1),
                                                "real": round(time.time() - t0 - t_feat - t_syn, 1)},
                                    "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3])})
                out_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = out_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(doc, indent=1) + "\n")
                tmp.replace(out_path)
                print(f"{key}: {time.time() - t0:.0f} s", flush=True)
    return 0


def kendall(x: list[float], y: list[float]) -> float:
    from scipy.stats import kendalltau

    t = kendalltau(x, y).statistic
    return float(t) if np.isfinite(t) else float("nan")


def choose(rows: list[dict]) -> dict:
    """The tune rule (lakead.selection.search.best) on saved rows."""
    key = lambda r: (round(r["synthetic_image_auroc"], 3), r["synthetic_separation"])  # noqa: E731
    top = max(key(r) for r in rows)
    return next(r for r in rows if key(r) == top)


def report(a: argparse.Namespace) -> int:
    doc = json.loads(Path(a.json).read_text())
    runs = doc["runs"]
    cats = list(dict.fromkeys(r["category"] for r in runs))
    shots = list(dict.fromkeys(r["shots"] for r in runs))
    cols = ["tune (chosen on synthetic defects)", *FIXED, "oracle (best candidate on the test labels)"]
    table: dict = {}
    taus: dict = {}
    picks: dict = {}
    for r in runs:
        rows = r["candidates"]
        by = {x["candidate"]: x for x in rows}
        vals = {cols[0]: choose(rows)["real_image_auroc"], cols[-1]: max(x["real_image_auroc"] for x in rows)}
        vals.update({name: by[label]["real_image_auroc"] for name, label in FIXED.items()})
        table.setdefault((r["shots"], r["category"]), []).append(vals)
        taus.setdefault((r["shots"], r["category"]), []).append(
            kendall([x["synthetic_image_auroc"] for x in rows], [x["real_image_auroc"] for x in rows]))
        picks.setdefault((r["shots"], r["category"]), []).append(choose(rows)["candidate"])
    s = doc["settings"]
    print(f"Image AUROC (%) on the real test images, mean over the draws; MobileNetV2 int8, candidates on "
          f"{', '.join(s['layers'])}; {s['folds']} folds, synthetic defects per held-out image: {s['defects_per_image'] or DEFAULT_DEFECTS}; "
          f"test sets thinned to at most {s['max_test']} images. Commands: `python benchmarks/selection.py run` then "
          "`python benchmarks/selection.py report > docs/selection/selection.md`; every number in runs/selection.json "
          "(docs/selection/selection.json: the same without the held-out scores).\n")
    for sh in shots:
        print(f"\n### {sh} shot{'s' if sh != 1 else ''}\n")
        print("| category | draws | " + " | ".join(cols) + " | Kendall tau (synthetic vs real) |")
        print("|---|---:|" + "---:|" * (len(cols) + 1))
        means = {c: [] for c in cols}
        for cat in cats:
            v = table.get((sh, cat))
            if not v:
                continue
            row = {c: float(np.mean([x[c] for x in v])) for c in cols}
            for c in cols:
                means[c].append(row[c])
            print(f"| {cat} | {len(v)} | " + " | ".join(f"{100 * row[c]:.1f}" for c in cols)
                  + f" | {np.nanmean(taus[(sh, cat)]):+.2f} |")
        if means[cols[0]]:
            print("| **mean** | | " + " | ".join(f"**{100 * np.mean(means[c]):.1f}**" for c in cols) + " | |")
    print("\n### What tune chose\n")
    for (sh, cat), p in picks.items():
        print(f"- {sh} shots, {cat}: " + "; ".join(p))
    secs = [r["seconds"]["features"] + r["seconds"]["synthetic"] for r in runs]
    print(f"\nTime of the synthetic scoring (features of the synthetic images + every candidate), per run: median "
          f"{np.median(secs):.0f} s, max {max(secs):.0f} s (load averages {runs[0]['loadavg']} .. {runs[-1]['loadavg']}).")
    return 0


def decide(a: argparse.Namespace) -> int:
    from lakead.backbones import load_backbone
    from lakead.data import load_dataset
    from lakead.methods.lake.config import LakeConfig
    from lakead.metrics import image_metrics, oracle_recall
    from lakead.selection import default_candidates, tune

    torch.set_num_threads(1)
    spec = f"onnx:{a.model}"
    base = LakeConfig(backbone=spec, use_text=False)
    print(f"# lakead tune on every training image, default decision (budget {base.false_alarm_rate})\n")
    print("MobileNetV2 int8, candidates on " + a.layers + "; every test image. Command: `python benchmarks/selection.py decide`.\n")
    print("| category | chosen | image AUROC | false alarms (good) | recall (defective) | oracle recall at those false alarms | "
          "defective with a region | good out of scope | defective out of scope | tune s | plain fit s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cat in load_dataset(a.data):
        bb = load_backbone(spec)
        t0 = time.time()
        res = tune(sorted(cat.train), cat.class_name, default_candidates(a.layers.split(",")), base, backbone=bb)
        t_tune = time.time() - t0
        t0 = time.time()
        plain = res.chosen.candidate.build(base, load_backbone(spec)).fit(sorted(cat.train), cat.class_name)
        t_fit = time.time() - t0
        det = res.detector
        labels = np.array([s.label for s in cat.test])
        pred = det.predict([s.path for s in cat.test])
        assert np.allclose(plain.predict([s.path for s in cat.test[:3]]).scores, pred.scores[:3], rtol=1e-4)
        far = float(pred.anomalous[labels == 0].mean())
        rec = float(pred.anomalous[labels == 1].mean())
        regions = [bool(pred.regions(i)[1]) for i in np.nonzero(labels == 1)[0]]
        scope = pred.out_of_scope if pred.out_of_scope is not None else np.zeros(len(labels), bool)
        print(f"| {cat.name} | {res.chosen.candidate.label} | {100 * image_metrics(labels, pred.scores)['auroc']:.1f} | "
              f"{100 * far:.1f} % | {100 * rec:.1f} % | {100 * oracle_recall(labels, pred.scores, far):.1f} % | "
              f"{100 * np.mean(regions):.1f} % | {100 * scope[labels == 0].mean():.1f} % | {100 * scope[labels == 1].mean():.1f} % | "
              f"{t_tune:.0f} | {t_fit:.0f} |", flush=True)
    print(f"\nLoad average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])} (2 cores, shared).")
    return 0


def pixels(a: argparse.Namespace) -> int:
    """Pixel AUROC and PRO of tune's choice with every training image (read from ``--json``)
    and of the fixed methods, each fitted and evaluated by lakead's own harness
    (:func:`lakead.evaluate.runner.evaluate_category`: full-size maps, the metrics of ``lakead eval``)."""
    import dataclasses

    from lakead.backbones import load_backbone
    from lakead.backbones.cache import FeatureCache
    from lakead.data import load_dataset
    from lakead.evaluate.runner import ImageCache, evaluate_category
    from lakead.methods.lake.config import LakeConfig
    from lakead.methods.lake.fit import spread_subset
    from lakead.selection import Candidate

    torch.set_num_threads(1)
    spec = f"onnx:{a.model}"
    base = LakeConfig(backbone=spec, use_text=False)
    doc = json.loads(Path(a.json).read_text())
    chosen = {}
    for r in doc["runs"]:
        if r["shots"] == "all":
            c = choose(r["candidates"])
            chosen[r["category"]] = Candidate(c["method"], c["options"])
    bb = FeatureCache(load_backbone(spec))
    print("| category | row | configuration | I-AUROC | P-AUROC | PRO |\n|---|---|---|---:|---:|---:|")
    for cat in load_dataset(a.data):
        if a.max_test and len(cat.test) > a.max_test:
            cat = dataclasses.replace(cat, test=tuple(cat.test[i] for i in spread_subset(len(cat.test), a.max_test)))
        rows = [("tune", chosen[cat.name])] + [(name, Candidate(label.split(" @ ")[0], {"layer": "400"}))
                                                for name, label in FIXED.items()]
        images = ImageCache()
        for name, cand in rows:
            res = evaluate_category(cat, cand.config(base), bb, method=cand.method, shots=None, seed=0, images=images)
            m = res.metrics()
            print(f"| {cat.name} | {name} | {cand.label} | {100 * m['image_auroc']:.1f} | {100 * m['pixel_auroc']:.1f} | "
                  f"{100 * m['pixel_pro']:.1f} |", flush=True)
        bb.clear()
    print(f"\nEvery training image; test sets thinned to at most {a.max_test} images as in `run`. Command: "
          "`python benchmarks/selection.py pixels > docs/selection/pixels.md`. Load average at the end: "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    realdata.add_options(r)
    r.add_argument("--layers", default="365,400,426")
    r.add_argument("--shots", default="1,4,16,all")
    r.add_argument("--draws", type=int, default=3)
    r.add_argument("--folds", type=int, default=4)
    r.add_argument("--defects-per-image", type=int, default=None, help="default: tune's (lakead.selection.search.defects_for)")
    r.add_argument("--max-test", type=int, default=200)
    r.add_argument("--categories", default="metal_plate,tire,tile", help="the order to run them in (substrings)")
    r.add_argument("--json", default=str(REPO / "runs" / "selection.json"))
    p = sub.add_parser("report")
    p.add_argument("--json", default=str(REPO / "runs" / "selection.json"))
    d = sub.add_parser("decide")
    realdata.add_options(d)
    d.add_argument("--layers", default="365,400,426")
    x = sub.add_parser("pixels")
    realdata.add_options(x)
    x.add_argument("--json", default=str(REPO / "runs" / "selection.json"))
    x.add_argument("--max-test", type=int, default=200)
    a = ap.parse_args(argv)
    return {"run": run, "report": report, "decide": decide, "pixels": pixels}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
