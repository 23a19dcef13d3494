#!/usr/bin/env python
"""The operator's loop on real images (issue 29): add the false alarms as normal, round by round.

A LAKE model is fitted on ``--shots`` train images of a real category (MobileNetV2 ONNX of
../shared/models, block 400, k 32). The category's good test images are split in two, evenly: the
*line* half passes by in ``--rounds`` rounds, and after each round the images of it the model flags
are added as normal (``add_normals``: what an operator's "mark as good" does); the *held-out* half
is never added and measures the false alarms. The defective test images measure the recall. After
each round the same is done by a refit on the same support images (fit on the shots and every image
added so far): false alarms, recall, how many decisions differ between the two, the thresholds, and
the time of the update against the refit's.

    python benchmarks/line_loop.py --category magnetic_tile/tile --shots 16 --false-alarm-rate 0.1 --rounds 4 --out docs/line

The machine these figures come from has 2 cores shared with other developers: the times are
there to be compared within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realdata import add_options  # noqa: E402
from scale import loadavg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(ap)
    ap.add_argument("--category", default="mpdd/metal_plate")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--false-alarm-rate", type=float, default=None, help="the model's budget (default: lakead's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a loaded machine, two threads "
                    "each waiting on the other made small searches x8-x15 slower, the refit's and the update's alike)")
    args = ap.parse_args()

    import torch

    from lakead.backbones import load_backbone
    from lakead.line.update import add_normals
    from lakead.methods.lake.detector import LakeDetector

    torch.set_num_threads(args.threads)
    root = Path(args.data) / args.category
    train = sorted((root / "train" / "good").glob("*.png"))[: args.shots]
    goods = sorted((root / "test" / "good").glob("*.png"))
    defects = sorted(p for d in (root / "test").iterdir() if d.is_dir() and d.name != "good" for p in d.glob("*.png"))
    line, held = goods[0::2], goods[1::2]
    bb = load_backbone(f"onnx:{args.model}", need_text=False)
    opts = dict(layer=args.layer, k=args.k, device="cpu")
    if args.false_alarm_rate is not None:
        opts["false_alarm_rate"] = args.false_alarm_rate
    det = LakeDetector(bb, **opts).fit([str(p) for p in train], args.category)
    held_arr = [det.read_image(str(p)) for p in held]
    bad_arr = [det.read_image(str(p)) for p in defects]
    support = [str(p) for p in train]

    def measure(d) -> dict:
        h, b = d.predict_arrays(held_arr), d.predict_arrays(bad_arr)
        return {"false_alarms": int(h.anomalous.sum()), "recall": int(b.anomalous.sum()), "threshold": d.state_.threshold,
                "decisions": np.concatenate([h.anomalous, b.anomalous])}

    rows = []
    start = measure(det)
    print(f"{args.category}: {len(train)} shots; line {len(line)} good images in {args.rounds} rounds; held-out {len(held)} "
          f"good, {len(defects)} defective")
    print(f"round  added  support | update: false alarms  recall  threshold | refit: false alarms  recall  threshold | "
          f"decisions differing | update s  refit s")
    print(f"{0:>5} {0:>6} {len(support):>8} | {start['false_alarms']:>21}/{len(held)} {start['recall']:>4}/{len(defects)} "
          f"{start['threshold']:>10.4g} |")
    chunks = np.array_split(np.arange(len(line)), args.rounds)
    for r, idx in enumerate(chunks, 1):
        batch = [str(line[i]) for i in idx]
        pred = det.predict(batch)
        flagged = [p for p, a in zip(batch, pred.anomalous) if a]
        t_update = t_refit = 0.0
        if flagged:
            t0 = time.perf_counter()
            add_normals(det, flagged)
            t_update = time.perf_counter() - t0
            support += flagged
        t0 = time.perf_counter()
        ref = LakeDetector(bb, **opts).fit(support, args.category)
        t_refit = time.perf_counter() - t0
        u, f = measure(det), measure(ref)
        differ = int((u["decisions"] != f["decisions"]).sum())
        same_neurons = sorted(det.state_.neurons.tolist()) == sorted(ref.state_.neurons.tolist())
        rows.append({"round": r, "line_images": len(batch), "added": len(flagged), "support": len(support),
                     "update": {k: v for k, v in u.items() if k != "decisions"},
                     "refit": {k: v for k, v in f.items() if k != "decisions"},
                     "decisions_differing": differ, "same_neurons": same_neurons,
                     "update_s": t_update, "refit_s": t_refit})
        print(f"{r:>5} {len(flagged):>6} {len(support):>8} | {u['false_alarms']:>21}/{len(held)} {u['recall']:>4}/{len(defects)} "
              f"{u['threshold']:>10.4g} | {f['false_alarms']:>19}/{len(held)} {f['recall']:>4}/{len(defects)} "
              f"{f['threshold']:>10.4g} | {differ:>19} | {t_update:>8.2f} {t_refit:>8.2f}"
              + ("" if same_neurons else "  (the refit chose other neurons)"))
    result = {"command": "python " + " ".join(sys.argv), "loadavg_end": loadavg(), "category": args.category,
              "shots": len(train), "false_alarm_rate": det.state_.false_alarm_rate, "held_out_good": len(held), "defective": len(defects),
              "start": {k: v for k, v in start.items() if k != "decisions"}, "rounds": rows}
    print(f"load average at the end: {result['loadavg_end']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = args.name or f"loop_{args.category.replace('/', '_')}"
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out / (name + '.json')}")


if __name__ == "__main__":
    main()
