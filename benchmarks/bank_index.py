#!/usr/bin/env python
"""A memory bank searched through an index: AnomalyDINO's predict against its bank's size.

AnomalyDINO keeps every patch of its support images (no coreset), so its bank and its exact
search grow with the support set. Fit it on ``n`` support images made from a real category's
train images (random crops, flips, quarter turns, brightness: ``fit_scale.Augmented``) with the
MobileNetV2 of ../shared/models (tensor 400, every channel), once with ``index="exact"``; then
search the same bank through each index of ``--index`` (``hnsw``, ``hnsw:EF`` for another
``hnsw_ef_search``, ``kdtree``). On the category's test split, in one process, the runs
interleaved (``--repeats``): milliseconds per image, image AUROC, decisions changed against the
exact search, the largest relative change of an image score, and recall@1 (share of test patches
whose nearest bank vector found is at the exact neighbour's distance). Also the index's build time.

    python benchmarks/bank_index.py --shots 2000 --index hnsw,hnsw:256 --out docs/scale

Prints every number and writes ``<out>/bank-index-<category>-<shots>.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fit_scale  # noqa: E402 - sets the offline environment and sys.path for lakead

import torch  # noqa: E402

from lakead.methods.anomalydino import AnomalyDinoDetector  # noqa: E402
from lakead.backbones.base import as_blocks  # noqa: E402
from lakead.data import load_dataset  # noqa: E402
from lakead.metrics import image_metrics  # noqa: E402


def test_tokens(det: AnomalyDinoDetector, arrays: list[np.ndarray]) -> list[torch.Tensor]:
    """The test images' patch features ``(B * N, D)`` per batch, as predict scores them."""
    blocks = as_blocks(det.state_.layer)
    out = []
    for _, f in det.iter_features(arrays, blocks, None, det.state_.image_size):
        t, _ = det.embed(f, blocks)
        out.append(t.reshape(-1, t.shape[-1]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--category", default="mpdd/metal_plate")
    ap.add_argument("--shots", type=int, default=2000)
    ap.add_argument("--layer", default="400")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--index", default="hnsw,hnsw:256", help="indexes to search the bank with (hnsw:EF sets hnsw_ef_search)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="docs/scale")
    args = ap.parse_args(argv)
    ds, cat_name = args.category.split("/")
    cat = load_dataset(fit_scale.SHARED / "data" / ds, [cat_name])[0]
    test = [s.path for s in cat.test]
    labels = np.array([s.label for s in cat.test])
    backbone = "onnx:" + str(fit_scale.SHARED / "models" / "mobilenetv2-12-int8.onnx")
    out: dict = {"command": " ".join(["python", "benchmarks/bank_index.py", *(argv or sys.argv[1:])]),
                 "category": args.category, "shots": args.shots, "test_images": len(test), "defective": int(labels.sum())}
    t0 = time.monotonic()
    exact = AnomalyDinoDetector(backbone, layer=args.layer, image_size=args.image_size, batch_size=16, index="exact")
    exact.fit(fit_scale.Augmented(sorted(cat.train), args.shots), cat_name)
    out["fit_seconds"] = round(time.monotonic() - t0, 1)
    out["bank"] = list(exact.bank_.shape)
    print(f"fitted: bank {exact.bank_.shape[0]:,} x {exact.bank_.shape[1]}, {out['fit_seconds']} s", flush=True)
    dets = {"exact": exact}
    for index in filter(None, args.index.split(",")):
        name, _, ef = index.partition(":")
        det = copy.copy(exact)
        det.config = dataclasses.replace(exact.config, index=name, **({"hnsw_ef_search": int(ef)} if ef else {}))
        same = next((d for k, d in dets.items() if k.split(":")[0] == name), None)
        if same is not None:  # another ef over the same graph: not built again
            det.state_ = dataclasses.replace(exact.state_, gallery_index=same.gallery_index().serialize())
        t0 = time.monotonic()
        det.gallery_index()
        out[f"build_seconds_{index}"] = round(time.monotonic() - t0, 1)
        dets[index] = det
        print(f"built {index}: {out[f'build_seconds_{index}']} s", flush=True)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in test]
    preds, secs = fit_scale.predict_interleaved(dets, arrays, args.repeats)
    queries = test_tokens(exact, arrays)
    exact_d = [exact.nearest(q, exact.state_)[0] for q in queries]
    ref = preds["exact"]
    for kind, det in dets.items():
        out[f"ms_per_image_{kind}"] = round(float(np.median(secs[kind])) * 1e3, 1)
        out[f"ratio_to_exact_{kind}"] = round(out[f"ms_per_image_{kind}"] / out["ms_per_image_exact"], 3)
        out[f"auroc_{kind}"] = round(100 * image_metrics(labels, preds[kind].scores)["auroc"], 2)
        if kind == "exact":
            continue
        out[f"decisions_changed_{kind}"] = int((preds[kind].anomalous != ref.anomalous).sum())
        rel = np.abs(preds[kind].scores - ref.scores) / np.maximum(np.abs(ref.scores), 1e-12)
        out[f"score_rel_change_max_{kind}"] = float(rel.max())
        hits = sum(int((det.nearest(q, det.state_)[0] <= d * (1 + 1e-6)).sum()) for q, d in zip(queries, exact_d))
        out[f"recall_at_1_{kind}"] = round(hits / sum(q.shape[0] for q in queries), 4)
    out["load"] = fit_scale.loadavg()
    for k, v in out.items():
        print(f"{k}: {v}")
    fit_scale.save(Path(args.out), f"bank-index-{args.category.replace('/', '-')}-{args.shots}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
