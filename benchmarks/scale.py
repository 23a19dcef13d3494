#!/usr/bin/env python
"""Scale of ``lakead predict`` (issue 7): memory over time while streaming, and images per
second in one process against Ray.

Both commands build everything in a temporary folder (removed at the end): small synthetic
images, one flat folder of them, and a fitted model (the tiny random CLIP of the tests, or
a real ONNX backbone). They run the real command line, ``lakead predict``, as a child process
and watch it from outside every ``--every`` seconds: its resident memory (``VmRSS`` of
``/proc/PID/status``; for Ray also the sum over the driver's process tree) and the rows in
``scores.csv``. ``/proc/loadavg`` is recorded before and after every run: the machine may
be shared.

    python benchmarks/scale.py memory --images 20000 --out docs/scale
    python benchmarks/scale.py throughput --images 2000 --out docs/scale
    python benchmarks/scale.py throughput --images 2000 --backbone onnx:../shared/models/mobilenetv2-12-int8.onnx \\
        --layer 400 --size 128 --out docs/scale

``memory`` writes ``memory[-maps-...].csv`` (seconds, rows, RSS in MiB) and ``.png`` and prints
a table; ``throughput`` runs the single-process command (with the default threads, and with
``OMP_NUM_THREADS=1``) and ``--ray --ray-workers N`` on the same images and model,
``--repeats`` times interleaved, checks that every run wrote the same ``scores.csv``, and
writes ``throughput-<backbone>.json``. Two rates are given
for each run: end to end (command start to exit, so with imports, model loading and for Ray
the cluster and worker start) and steady (rows per second from the first row to the last).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


# -- inputs ---------------------------------------------------------------------------------


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smoothed grey noise, as the test fixtures use (``tests/conftest.py``)."""
    n = gaussian_filter(rng.normal(0.0, 1.0, (size, size)), 1.5)
    n = (n - n.min()) / (n.max() - n.min())
    return (np.repeat((0.3 + 0.4 * n)[:, :, None], 3, axis=2) * 255).astype(np.uint8)


def make_images(folder: Path, n: int, size: int) -> None:
    """``n`` PNGs of ``size`` x ``size`` in one flat folder: shifted copies of a few textures."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    bases = [texture(rng, size) for _ in range(8)]
    for i in range(n):
        img = np.roll(bases[i % 8], (i * 7) % size, axis=(i // 8) % 2)
        Image.fromarray(img).save(folder / f"{i:07d}.png", compress_level=1)


def make_model(work: Path, backbone: str, layer: str | None, size: int) -> Path:
    """Fit a detector on 16 textures and save it; ``tiny`` is the tests' random CLIP."""
    from lakead import LakeDetector
    from lakead.testing import save_random_clip

    rng = np.random.default_rng(1)
    support = [texture(rng, size) for _ in range(16)]
    if backbone == "tiny":
        source, opts = str(save_random_clip(work / "tiny-clip", "tiny", seed=0)), dict(k=8, layer=int(layer or 2))
    else:
        source, opts = backbone, dict(k=32, layer=layer)
    det = LakeDetector(source, device="cpu", batch_size=8, **opts).fit(support, "texture")
    return det.save(work / "model")


# -- watching a run -------------------------------------------------------------------------


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * PAGE
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class RowCounter:
    """Rows in a growing ``scores.csv`` (newlines after the header), read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.newlines = path, 0, 0

    def __call__(self) -> int:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return 0
        self.offset += len(data)
        self.newlines += data.count(b"\n")
        return max(0, self.newlines - 1)


def watch(cmd: list[str], scores: Path, every: float, whole_tree: bool, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (with ``env`` added to the environment); sample time, rows and memory until it exits."""
    before = loadavg()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    rows = RowCounter(scores)
    samples = []
    while proc.poll() is None:
        t = time.monotonic() - start
        sample = {"t": round(t, 3), "rows": rows(), "rss_mib": round(rss_bytes(proc.pid) / 2**20, 2)}
        if whole_tree:
            sample["tree_rss_mib"] = round(sum(rss_bytes(p) for p in tree(proc.pid)) / 2**20, 2)
        if sample["rss_mib"] > 0:  # 0: the process ended between poll() and the read
            samples.append(sample)
        time.sleep(every)
    samples.append({"t": round(time.monotonic() - start, 3), "rows": rows()})  # after exit: rows only
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out}\n{err}")
    return {"samples": samples, "wall_s": time.monotonic() - start, "loadavg_before": before, "loadavg_after": loadavg(),
            "stdout": out.strip()}


def predict_cmd(model: Path, images: Path, out: Path, extra: list[str], maps: str = "none") -> list[str]:
    return [sys.executable, "-c", "from lakead.cli import app; app()", "-q", "predict", str(model), str(images),
            "--out", str(out), "--maps", maps, *extra]


def rates(run: dict[str, Any], n: int) -> dict[str, float]:
    s = run["samples"]
    first = next((x for x in s if x["rows"] > 0), s[-1])
    last = s[-1]
    steady = (last["rows"] - first["rows"]) / max(last["t"] - first["t"], 1e-9)
    return {"end_to_end_img_s": round(n / run["wall_s"], 1), "steady_img_s": round(steady, 1),
            "first_row_after_s": first["t"], "wall_s": round(run["wall_s"], 1)}


# -- commands -------------------------------------------------------------------------------


def memory(args: argparse.Namespace, work: Path) -> None:
    images = work / "images"
    t = time.monotonic()
    make_images(images, args.images, args.size)
    print(f"{args.images} images of {args.size}x{args.size} px written in {time.monotonic() - t:.0f} s", flush=True)
    model = make_model(work, args.backbone, args.layer, args.size)
    run = watch(predict_cmd(model, images, work / "out", ["--batch-size", str(args.batch_size)], args.maps),
                work / "out" / "scores.csv", args.every, whole_tree=False)
    s = run["samples"]
    assert s[-1]["rows"] == args.images, s[-1]
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.maps == "none" else "-maps-" + args.maps.replace(",", "-")
    with (args.out / f"memory{tag}.csv").open("w") as fh:
        fh.write("seconds,rows,rss_mib\n")
        fh.writelines(f"{x['t']},{x['rows']},{x.get('rss_mib', '')}\n" for x in s)
    scoring = [x for x in s if x["rows"] > 0 and "rss_mib" in x]
    rss_at = {q: next(x for x in scoring if x["rows"] >= q * args.images) if q < 1 else scoring[-1]
              for q in (0.1, 0.25, 0.5, 0.75, 1.0)}
    summary = {
        "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
        "images": args.images, "size": args.size, "backbone": args.backbone, "batch_size": args.batch_size,
        "maps": args.maps, "loadavg_before": run["loadavg_before"], "loadavg_after": run["loadavg_after"], **rates(run, args.images),
        "rss_mib_at_fraction": {str(q): x["rss_mib"] for q, x in rss_at.items()},  # 1.0: the last sample
        "rss_mib_max_while_scoring": max(x["rss_mib"] for x in scoring),
        "growth_mib_from_10pct_to_end": round(max(x["rss_mib"] for x in scoring if x["rows"] >= rss_at[0.1]["rows"])
                                              - rss_at[0.1]["rss_mib"], 2),
    }
    (args.out / f"memory{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot([x for x in s if "rss_mib" in x], args, args.out / f"memory{tag}.png")
    print("| images scored | seconds | RSS (MiB) |\n|---:|---:|---:|")
    for x in sample_rows(scoring, 11):
        print(f"| {x['rows']} | {x['t']:.0f} | {x['rss_mib']:.1f} |")
    print(json.dumps(summary, indent=2))


def sample_rows(samples: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    idx = sorted({round(i * (len(samples) - 1) / (k - 1)) for i in range(k)})
    return [samples[i] for i in idx]


def plot(samples: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [x["t"] for x in samples]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(t, [x["rss_mib"] for x in samples], color="tab:blue")
    ax.set_xlabel("seconds since the command started")
    ax.set_ylabel("resident memory (MiB)", color="tab:blue")
    ax.set_ylim(0, max(x["rss_mib"] for x in samples) * 1.15)
    ax2 = ax.twinx()
    ax2.plot(t, [x["rows"] for x in samples], color="tab:orange")
    ax2.set_ylabel("images scored", color="tab:orange")
    ax.set_title(f"lakead predict --maps {args.maps}, {args.images} images of {args.size} px, one process", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def throughput(args: argparse.Namespace, work: Path) -> None:
    images = work / "images"
    make_images(images, args.images, args.size)
    model = make_model(work, args.backbone, args.layer, args.size)
    runs = {}
    bs = ["--batch-size", str(args.batch_size)]
    variants = (
        ("single process", bs, {}),
        ("single process, OMP_NUM_THREADS=1", bs, {"OMP_NUM_THREADS": "1"}),
        (f"ray, {args.workers} local workers", [*bs, "--ray", "--ray-workers", str(args.workers)], {}),
    )
    outs = []
    for rep in range(args.repeats):  # interleaved, so that a change of load hits every variant
        for name, extra, env in variants:
            out = work / f"out-{len(outs)}"
            outs.append(out)
            run = watch(predict_cmd(model, images, out, extra), out / "scores.csv", args.every,
                        whole_tree="--ray" in extra, env=env)
            assert run["samples"][-1]["rows"] == args.images
            result = {**rates(run, args.images), "loadavg_before": run["loadavg_before"], "loadavg_after": run["loadavg_after"]}
            runs.setdefault(name, []).append(result)
            print(name, json.dumps(result), flush=True)
    same = [(outs[0] / "scores.csv").read_bytes() == (o / "scores.csv").read_bytes() for o in outs[1:]]
    summary = {"command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]), "images": args.images,
               "size": args.size, "backbone": args.backbone, "layer": args.layer, "batch_size": args.batch_size,
               "cpus": os.cpu_count(), "scores_csv_identical_across_runs": all(same), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "tiny" if args.backbone == "tiny" else Path(args.backbone.split(":", 1)[-1]).stem
    (args.out / f"throughput-{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("memory", "throughput"))
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--backbone", default="tiny", help="tiny (the tests' random CLIP) or onnx:PATH")
    ap.add_argument("--layer", default=None, help="block or ONNX tensor read (default: 2 for tiny)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--maps", default="none", help="--maps of lakead predict for memory (none, png, npy, png,npy)")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers for throughput")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each variant for throughput")
    ap.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("--out", type=Path, default=Path("docs/scale"))
    args = ap.parse_args()
    if not Path("/proc/loadavg").exists():
        raise SystemExit("this benchmark reads /proc (Linux)")
    work = Path(tempfile.mkdtemp(prefix="lakead-scale-"))
    try:
        (memory if args.what == "memory" else throughput)(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
