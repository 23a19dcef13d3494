#!/usr/bin/env python
"""``lakead update`` against a refit (issue 29): time, and where the update's time goes.

A LAKE model is fitted on ``--base`` support images of a real category (MobileNetV2 ONNX of
../shared/models, block 400, k 32: the real-image benchmarks' backbone); then, for each count in
``--added``, the same model gets that many more normal images by ``add_normals`` (in memory, from
a copy of the fitted state) and, in turn, a refit on the base and the added images together
(``fit``, in memory, the backbone loaded once for both). Neither reads or writes a model
directory; the write of a version is timed apart (``write``). The added images are the
category's good test images, then copies made from them (random crops, flips, quarter turns,
brightness; ``fit_scale.Augmented``) beyond their number. ``--repeats`` rounds, update and
refit taking turns (the first of each alternating), so that both share the machine's load; the
ratio is taken within a round. ``--base`` beyond the train images: copies made from them too.

Also printed: the update's steps (forward, leave_one_out, scope, decision, write), whether the
refit chose the same neurons (as a set: their order does not change a distance), and the update's and the refit's thresholds.

    python benchmarks/line_update.py --added 10,100 --repeats 3 --out docs/line
    python benchmarks/line_update.py --added 1000 --repeats 1 --out docs/line --name update_1000

The machine these figures come from has 2 cores shared with other developers: compare only the
ratios measured side by side within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_scale import Augmented  # noqa: E402
from realdata import add_options  # noqa: E402
from scale import loadavg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(ap)
    ap.add_argument("--category", default="magnetic_tile/tile")
    ap.add_argument("--base", type=int, default=64, help="support images of the fitted model")
    ap.add_argument("--added", default="10,100", help="comma-separated counts of images added")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="update_vs_refit")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a loaded machine, two threads "
                    "each waiting on the other made small searches x8-x15 slower, the refit's and the update's alike)")
    args = ap.parse_args()

    import torch

    from lakead.backbones import load_backbone
    from lakead.line.update import add_normals
    from lakead.line.versions import write_version
    from lakead.methods.lake.detector import LakeDetector

    torch.set_num_threads(args.threads)
    root = Path(args.data) / args.category
    train = sorted((root / "train" / "good").glob("*.png"))
    pool = sorted((root / "test" / "good").glob("*.png"))
    # beyond the train images, copies made from them (as the added images beyond the good test images)
    base = [str(p) for p in train[: args.base]] if args.base <= len(train) else list(Augmented(train, args.base))
    bb = load_backbone(f"onnx:{args.model}", need_text=False)
    opts = dict(layer=args.layer, k=args.k, device="cpu")
    fitted = LakeDetector(bb, **opts).fit(base, args.category)
    rows = []
    for m in [int(v) for v in args.added.split(",")]:
        added = [str(p) for p in pool[:m]] if m <= len(pool) else list(Augmented(pool, m))
        times: dict[str, list[float]] = {"update": [], "refit": []}
        steps: list[dict[str, float]] = []
        for r in range(args.repeats):
            order = ("update", "refit") if r % 2 == 0 else ("refit", "update")
            for kind in order:
                if kind == "update":
                    det = LakeDetector(bb, **opts)
                    det.state_ = copy.copy(fitted.state_)
                    t0 = time.perf_counter()
                    upd = add_normals(det, added)
                    times["update"].append(time.perf_counter() - t0)
                    with tempfile.TemporaryDirectory() as tmp:
                        fitted.save(Path(tmp) / "m")
                        t0 = time.perf_counter()
                        write_version(Path(tmp) / "m", det, action="update", added=upd.added)
                        steps.append({**upd.seconds, "write": time.perf_counter() - t0})
                    updated = det
                else:
                    t0 = time.perf_counter()
                    ref = LakeDetector(bb, **opts).fit(base + added, args.category)
                    times["refit"].append(time.perf_counter() - t0)
        ratios = [u / f for u, f in zip(times["update"], times["refit"])]
        common = len(set(updated.state_.neurons.tolist()) & set(ref.state_.neurons.tolist()))
        row = {"base": args.base, "added": m, "update_s": times["update"], "refit_s": times["refit"], "ratio": ratios,
               "update_steps_s": {k: float(np.median([s[k] for s in steps])) for k in steps[0]},
               "neurons_in_common": f"{common} of {args.k}",
               "threshold_update": updated.state_.threshold, "threshold_refit": ref.state_.threshold,
               "inexact": upd.inexact}
        rows.append(row)
        print(json.dumps(row))
    result = {"command": "python " + " ".join(sys.argv), "loadavg_end": loadavg(), "category": args.category,
              "backbone": f"onnx:{Path(args.model).name} block {args.layer}, k {args.k}", "rows": rows}
    print(f"load average at the end: {result['loadavg_end']}")
    print(f"{'added':>6} {'update s':>9} {'refit s':>8} {'ratio':>6}  update steps (median s)")
    for row in rows:
        st = " ".join(f"{k} {v:.2f}" for k, v in row["update_steps_s"].items())
        print(f"{row['added']:>6} {np.median(row['update_s']):>9.2f} {np.median(row['refit_s']):>8.2f} "
              f"{np.median(row['ratio']):>6.2f}  {st}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out / (args.name + '.json')}")


if __name__ == "__main__":
    main()
