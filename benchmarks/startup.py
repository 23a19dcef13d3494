#!/usr/bin/env python
"""Start-up time of the ``lakead`` command (issue 15, item 4): how long a command takes before
it does anything, measured in fresh processes.

Times ``lakead --help``, ``lakead fit --help`` and ``lakead info MODEL`` (a model fitted on a
tiny random CLIP, written once to a temporary directory), and for reference
``python -c pass`` and ``python -c "import torch"`` (what the commands used to pay before
any work). Every figure is the median of ``--rounds`` runs, the commands interleaved round by
round so that the machine's load falls on all of them alike.

    python benchmarks/startup.py                 # 7 rounds
    python benchmarks/startup.py --rounds 15 --json startup.json
    python benchmarks/startup.py --baseline-src /path/to/older/checkout/src   # side by side with older code
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _lakead() -> list[str]:
    return [sys.executable, "-m", "lakead.cli"]  # what the lakead script runs, whichever copy PYTHONPATH names


def _time(cmd: list[str], src: Path | None = None) -> float:
    env = os.environ.copy()
    if src is not None:
        env["PYTHONPATH"] = str(src)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed


def _fit_tiny_model(tmp: Path) -> Path:
    from lakead.methods.lake import LakeDetector
    from lakead.testing import save_random_clip
    import numpy as np

    clip = save_random_clip(tmp / "tiny-clip", "tiny")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    model = tmp / "model"
    LakeDetector(backbone=str(clip)).fit(images, class_name="thing").save(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    ap.add_argument("--baseline-src", type=Path, help="Also time the lakead commands of another copy of the code "
                    "(its src/ folder, e.g. a checkout of an older commit), interleaved with this one.")
    args = ap.parse_args()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = _fit_tiny_model(Path(tmp))
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "lakead --help": [*_lakead(), "--help"],
            "lakead fit --help": [*_lakead(), "fit", "--help"],
            "lakead info MODEL": [*_lakead(), "info", str(model)],
        }
        runs = {name: (cmd, None) for name, cmd in commands.items()}
        if args.baseline_src:
            runs.update({f"{name} (baseline)": (cmd, args.baseline_src.resolve()) for name, cmd in commands.items()
                         if name.startswith("lakead")})
        for cmd, src in runs.values():  # warm the file cache once
            _time(cmd, src)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, (cmd, src) in runs.items():
                times[name].append(_time(cmd, src))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    load_end = os.getloadavg()
    print(f"start-up, median of {args.rounds} rounds in fresh processes ({os.cpu_count()} CPUs, {sys.version.split()[0]}; "
          f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f}):")
    for name, m in medians.items():
        print(f"  {name:28s} {m:6.2f} s   (min {min(times[name]):.2f}, max {max(times[name]):.2f})")
    torch_s = medians["python -c 'import torch'"]
    for name in ("lakead --help", "lakead fit --help", "lakead info MODEL"):
        print(f"  {name} / import torch: {medians[name] / torch_s:.2f}")
        if f"{name} (baseline)" in medians:
            ratios = [a / b for a, b in zip(times[name], times[f"{name} (baseline)"])]
            print(f"  {name} / baseline: {statistics.median(ratios):.2f} (median of the per-round ratios)")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "median_s": medians, "times_s": times,
                                         "load_average": [load_start, load_end]}, indent=2))


if __name__ == "__main__":
    main()
