#!/usr/bin/env python
"""Speed of the exported paths against torch, side by side in one run (issue 13).

For each full-size random-weight CLIP vision tower (``--presets``, default ViT-B/16 224 px and
ViT-L/14 336 px, built once by :func:`lakead.testing.save_random_clip`; the same arithmetic as
trained weights), a LAKE detector is fitted on a few synthetic images, saved, and exported with
``lakead.export``; then ``predict`` of one image (batch 1, end to end: preprocessing, forward,
nearest neighbour, text probe, map) is timed on every path in interleaved rounds (one call of
each path per round, the order rotated every round), so that the shared machine's load falls
on all paths alike. Reported: the median time per path, its ratio to torch float32 (the median
of the per-round ratios), the largest relative difference of the scores from torch float32's and
whether any decision differs, on ``--check`` images; and, in the same run, this CPU's float32
and bfloat16 matrix-multiply ceilings (as benchmarks/speed.py measures them), with the forward's
FLOPs over each path's time against the bfloat16 ceiling.

    python benchmarks/export_speed.py                         # both towers
    python benchmarks/export_speed.py --presets vit-b-16 --rounds 5 --json out.json

Paths: torch fp32, torch bf16 (``--precision bfloat16``: torch.autocast), ONNX Runtime fp32,
OpenVINO fp32, OpenVINO bf16 (the backbone graph at OpenVINO's bf16 inference hint, then the head
graph in float32: what ``--precision bf16`` writes; on a CPU without bfloat16 arithmetic OpenVINO
runs float32, and the run says so), OpenVINO bf16 whole graph (the float32 graph compiled at the
bf16 hint, head included: what bf16 exports were before the head was split off, for comparison), ONNX Runtime int8 and OpenVINO int8 (dynamic int8 weights
and activations in the backbone's matrix products, the head float32), ONNX Runtime int8-static
and OpenVINO int8-static (the blocks' linear layers in int8, calibrated on the fit's support
images: ``--precision int8-static``). No GPU path here. ``--threads N``: N threads for torch and
for each engine (1: one thread per engine, the fairest comparison on a shared machine). Each
path's ``ran`` is what the engine reports it ran (``ExportedDetector.ran``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from speed import Clock, loadavg, machine_info, matmul_ceiling, model_dir, say, synthetic_images, vit_flops  # noqa: E402

from lakead.export import export_model  # noqa: E402
from lakead.methods.lake import LakeDetector  # noqa: E402
from lakead.runtime import ExportedDetector  # noqa: E402

#: path name -> (format, precision) of the export; None: the torch detector at that precision
PATHS = {
    "torch fp32": None, "torch bf16": None, "ONNX Runtime fp32": ("onnx", "fp32"), "OpenVINO fp32": ("openvino", "fp32"),
    "OpenVINO bf16": ("openvino", "bf16"), "OpenVINO bf16 whole graph": ("openvino", "bf16-whole"), "ONNX Runtime int8": ("onnx", "int8"), "OpenVINO int8": ("openvino", "int8"),
    "ONNX Runtime int8-static": ("onnx", "int8-static"), "OpenVINO int8-static": ("openvino", "int8-static"),
}


def whole_graph_bf16(out: Path, threads: int | None) -> ExportedDetector:
    """The float32 OpenVINO export ``out`` run at the bf16 inference hint, head included (the
    bf16 export before the head was split off; not something ``lakead export`` writes now)."""
    from lakead.runtime import _OpenVINO

    det = ExportedDetector.load(out, batch_size=1, threads=threads)
    det.engine = _OpenVINO(out / det.meta["file"], threads, "bf16")
    det.ran = f"whole graph: {det.engine.ran()}"
    return det


def build(preset: str, work: Path, cache: Path | None, shots: int, paths: list[str], threads: int | None = None
          ) -> tuple[dict, dict]:
    """The detectors of every path for ``preset``, and facts about the model."""
    from lakead.backbones import CLIPBackbone

    src = model_dir(preset, cache)
    bb = CLIPBackbone.from_pretrained(str(src))
    support = synthetic_images(shots, (256, 256), seed=4)
    det = LakeDetector(backbone=bb, device="cpu", batch_size=1).fit(support, "object")
    det.save(work / f"{preset}-model")
    runners: dict = {}
    export_s = {}
    for name in paths:
        spec = PATHS[name]
        if spec is None:
            runners[name] = LakeDetector.load(work / f"{preset}-model", backbone=bb, device="cpu", batch_size=1,
                                              precision="bfloat16" if "bf16" in name else "float32")
            continue
        fmt, prec = spec
        say(f"{preset}: exporting {name}...")
        t0 = time.perf_counter()
        whole = prec == "bf16-whole"
        prec = "fp32" if whole else prec
        out = work / f"{preset}-{fmt}-{prec}"
        if not out.exists():
            export_model(work / f"{preset}-model", out, format=fmt, precision=prec,
                         check=None if prec == "fp32" else [],  # timed here whatever its decisions (compared below)
                         calibration=support if prec == "int8-static" else None)
        export_s[name] = time.perf_counter() - t0
        runners[name] = whole_graph_bf16(out, threads) if whole else ExportedDetector.load(out, batch_size=1, threads=threads)
    depth = max(det.layer_, det.semantic_layer_)
    facts = {"preset": preset, "image_size": det.image_size_, "layer": det.layer_, "semantic_layer": det.semantic_layer_,
             "forward_flops": vit_flops(bb, det.image_size_, depth, 1, joint=True), "export_seconds": export_s,
             "k": int(det.neurons_.numel()), "gallery": int(det.gallery_.shape[0])}
    return runners, facts


def measure(runners: dict, image: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds: each path once per round (one warm-up round first), order rotated."""
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            runners[n].predict_arrays([image])
            if r:
                times[n].append(time.perf_counter() - t0)
    return times


def agreement(runners: dict, images: list[np.ndarray]) -> dict[str, dict]:
    ref = runners["torch fp32"].predict_arrays(images)
    out = {}
    for n, det in runners.items():
        p = det.predict_arrays(images)
        rel = np.abs(p.scores - ref.scores) / np.maximum(np.abs(ref.scores), 1e-12)
        out[n] = {"max_relative_score": float(rel.max()), "decisions_differ": int((p.anomalous != ref.anomalous).sum()),
                  "ran": getattr(det, "ran", f"torch {det.runtime.precision}")}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="vit-b-16,vit-l-14-336")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated, from: " + ", ".join(PATHS))
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per tower (ViT-L/14-336 is slow on 2 cores: keep few)")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--check", type=int, default=6, help="images whose scores and decisions are compared with torch fp32")
    ap.add_argument("--ceiling-float32", default="1024,2048", help="square matrix sizes of the float32 ceiling")
    ap.add_argument("--ceiling-bfloat16", default="512,1024",
                    help="square matrix sizes of the bfloat16 ceiling (small: a CPU without bfloat16 arithmetic takes minutes per 2048 product)")
    ap.add_argument("--model-cache", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="threads of torch and of each engine (default: their own)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if "torch fp32" not in paths:
        paths.insert(0, "torch fp32")
    clock = Clock(torch.device("cpu"))
    res: dict = {"command": "python benchmarks/export_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "machine": machine_info(torch.device("cpu")), "loadavg_start": loadavg(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "gpu": "not measured (no GPU in this run)", "towers": []}
    import openvino as ov

    res["openvino_cpu_capabilities"] = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    sizes = {dt: [(n, n, n) for n in map(int, getattr(args, f"ceiling_{dt}").split(","))] for dt in ("float32", "bfloat16")}
    res["ceiling"] = {"float32": matmul_ceiling(clock, torch.device("cpu"), torch.float32, sizes["float32"], 3),
                      "bfloat16": matmul_ceiling(clock, torch.device("cpu"), torch.bfloat16, sizes["bfloat16"], 1)}
    say(f"ceilings: fp32 {res['ceiling']['float32']['ceiling_gflops']:.0f} GFLOP/s, "
        f"bf16 {res['ceiling']['bfloat16']['ceiling_gflops']:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="lakead-export-speed-") as tmp:
        for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
            runners, facts = build(preset, Path(tmp), args.model_cache, args.shots, paths, args.threads)
            images = synthetic_images(args.check, (256, 256), seed=7, defects=True)
            facts["agreement"] = agreement(runners, images)
            say(f"{preset}: timing {args.rounds} interleaved rounds of {len(runners)} paths...")
            times = measure(runners, images[0], args.rounds)
            ref = times["torch fp32"]
            ceiling_s = facts["forward_flops"] / (res["ceiling"]["bfloat16"]["ceiling_gflops"] * 1e9)
            facts["paths"] = {n: {"median_s": statistics.median(t), "runs_s": t,
                                  "time_over_torch_fp32": statistics.median(a / b for a, b in zip(t, ref)),
                                  "speedup_over_torch_fp32": statistics.median(b / a for a, b in zip(t, ref)),
                                  "time_over_bf16_ceiling": statistics.median(t) / ceiling_s} for n, t in times.items()}
            res["towers"].append(facts)
            for n, v in facts["paths"].items():
                say(f"  {n:18s} {v['median_s'] * 1e3:8.1f} ms  x{v['speedup_over_torch_fp32']:.2f} faster than torch fp32  "
                    f"{v['time_over_bf16_ceiling']:.2f} x bf16-ceiling time; max rel. score diff "
                    f"{facts['agreement'][n]['max_relative_score']:.2g}, decisions differ {facts['agreement'][n]['decisions_differ']}; "
                    f"ran {facts['agreement'][n]['ran']}")
            del runners
    res["loadavg_end"] = loadavg()
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
