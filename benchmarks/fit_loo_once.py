#!/usr/bin/env python
"""Fit time of ``distance="cosine"`` with the leave-one-out search run once (issue 16) against
the fit that ran it twice (Euclidean while streaming, then again in cosine distance).

The two-search fit is the code before this change with its second search restored here: the
streaming fit's leave-one-out (:func:`lakead.methods.lake.stream.leave_one_out`) is wrapped so that
it first runs the Euclidean search of :func:`lakead.methods.lake.fit.leave_one_out` on the gallery as
it comes (what the streaming code did, its result then thrown away, as ``rescore_support``
threw it away) and then the search of today's code, which is what ``rescore_support`` ran.
Both fits run in one process on the same support set and the same loaded backbone,
alternately (``--rounds``), and must give the same leave-one-out scores and thresholds.

Real images: the train images of ``--category`` (41 for mpdd/metal_plate) and, for larger
support sets, images made from them (random crops, flips, quarter turns, brightness:
``Augmented`` of ``fit_scale.py``); MobileNetV2 (ONNX, real ImageNet weights) at tensor
``--layer``. Printed and written to ``<out>/fit-loo-once-<category>.json``: per size, the
whole fit's seconds and the seconds spent in the leave-one-out searches, each round.

    python benchmarks/fit_loo_once.py --shots 41,300 --rounds 3 --out docs/scale

The machine these figures come from has 2 cores shared with other developers: compare the
two paths only within one run (interleaved), not against other runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_scale import SHARED, Augmented, save  # noqa: E402
from scale import loadavg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", default="mpdd/metal_plate")
    ap.add_argument("--shots", default="41,300", help="support set sizes (beyond the train images: augmented)")
    ap.add_argument("--layer", default="400")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--out", default="docs/scale")
    args = ap.parse_args()

    import torch

    from lakead import LakeDetector
    from lakead.backbones import load_backbone
    from lakead.data import load_dataset
    from lakead.methods.lake import fit as steps
    from lakead.methods.lake import stream

    torch.set_num_threads(args.threads)
    ds, cat_name = args.category.split("/")
    train = sorted(load_dataset(SHARED / "data" / ds, [cat_name])[0].train)
    backbone = load_backbone("onnx:" + str(SHARED / "models" / "mobilenetv2-12-int8.onnx"))
    once = stream.leave_one_out
    searching = [0.0]  # seconds in the leave-one-out searches of the current fit

    def timed(fn):
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                searching[0] += time.perf_counter() - t0
        return run

    def twice(cfg, gallery, gallery_image, queries, n, n_tok, device):
        timed(steps.leave_one_out)(gallery, n, n_tok, device)  # the streaming code's Euclidean search, thrown away
        return timed(once)(cfg, gallery, gallery_image, queries, n, n_tok, device)

    paths = {"one search": timed(once), "two searches": twice}
    out: dict[str, Any] = {"command": " ".join(sys.argv), "category": args.category, "layer": args.layer, "k": args.k,
                           "image_size": args.image_size, "torch_threads": torch.get_num_threads(),
                           "load_before": loadavg(), "sizes": {}}
    for shots in [int(s) for s in args.shots.split(",")]:
        support = Augmented(train, shots)
        rows: dict[str, dict[str, list[float]]] = {p: {"fit_s": [], "loo_s": []} for p in paths}
        fitted: dict[str, LakeDetector] = {}
        for r in range(args.rounds):
            for name in (paths if r % 2 == 0 else list(reversed(paths))):  # alternate which goes first
                stream.leave_one_out = paths[name]
                searching[0] = 0.0
                det = LakeDetector(backbone, layer=args.layer, k=args.k, distance="cosine", image_size=args.image_size,
                                   batch_size=16, device="cpu")
                t0 = time.perf_counter()
                det.fit(support, cat_name)
                rows[name]["fit_s"].append(time.perf_counter() - t0)
                rows[name]["loo_s"].append(searching[0])
                fitted[name] = det
                print(f"{shots} shots, round {r + 1}, {name}: fit {rows[name]['fit_s'][-1]:.2f} s, "
                      f"leave-one-out {searching[0]:.2f} s", flush=True)
        stream.leave_one_out = once
        a, b = fitted["one search"], fitted["two searches"]
        np.testing.assert_allclose(a.loo_scores_, b.loo_scores_, rtol=1e-6)
        np.testing.assert_allclose(a.loo_tokens_, b.loo_tokens_, rtol=1e-6)
        assert (a.threshold_, a.pixel_threshold_) == (b.threshold_, b.pixel_threshold_)
        med = {p: {k: float(np.median(v)) for k, v in rows[p].items()} for p in paths}
        out["sizes"][str(shots)] = {
            "support_images": shots, "gallery_vectors": int(a.gallery_.shape[0]), "loo_images": int(np.isfinite(a.loo_scores_).sum()),
            "rounds": rows, "median": med,
            "fit_ratio_two_over_one": med["two searches"]["fit_s"] / med["one search"]["fit_s"],
            "same_loo_scores_and_thresholds": True,
        }
        print(f"{shots} shots: median fit {med['two searches']['fit_s']:.2f} s (two searches) -> "
              f"{med['one search']['fit_s']:.2f} s (one), leave-one-out {med['two searches']['loo_s']:.2f} -> "
              f"{med['one search']['loo_s']:.2f} s", flush=True)
    out["load_after"] = loadavg()
    save(Path(args.out), f"fit-loo-once-{args.category.replace('/', '-')}", out)


if __name__ == "__main__":
    main()
