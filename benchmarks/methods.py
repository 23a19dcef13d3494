#!/usr/bin/env python
"""LAKE beside PatchCore and AnomalyDINO on real images with the real MobileNetV2 (issue 11):
one table, the same shots for every row; and PatchCore's fit time against the size of its bank.

    python benchmarks/methods.py table [--shots 16] [--out docs/methods]
    python benchmarks/methods.py bank  [--sizes 10000,30000,100000] [--width 1024] [--out docs/methods]

``table`` fits every row on the same ``--shots`` normal training images of each category of
``--data`` (drawn with seed 0, :func:`lakead.data.select_shots`), scores every test image and
writes ``methods.md`` and ``methods.json`` to ``--out``: image AUROC, pixel AUROC and PRO (the
mean over the categories, then per category), fit seconds per support image and predict
milliseconds per test image (each row runs the network itself: no feature cache, so the times
compare), and the memory of what each model searches (LAKE's gallery of sensitive-neuron
vectors, PatchCore's coreset, AnomalyDINO's bank; float32) with its number of vectors.

``bank`` times PatchCore's coreset step (:func:`lakead.coreset.greedy_coreset`, 10 %) on random
banks of each size, each in a fresh process that reports its peak resident memory (``VmHWM``),
and the whole PatchCore fit on magnetic_tile at 4, 16 and 64 shots; it writes ``bank.md`` and
``bank.json``. The machine may be shared: ``/proc/loadavg`` is recorded with every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MODEL = ROOT.parent / "shared" / "models" / "mobilenetv2-12-int8.onnx"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def rows(backbone: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(label, features shown, method, options) of every row of the table."""
    return [
        ("LAKE (top 32 of 64 channels)", "400", "visual", dict(layer="400", k=32)),
        ("LAKE, all channels", "400", "all", dict(layer="400")),
        ("multi-block LAKE (top 32 of 128)", "365+426, 14 x 14", "visual", dict(layer=["365", "426"], k=32)),
        ("PatchCore, coreset 10 %", "365+400, 28 x 28", "patchcore", dict(layer=["365", "400"], coreset=0.1)),
        ("PatchCore, coreset 100 %", "365+400, 28 x 28", "patchcore", dict(layer=["365", "400"], coreset=1.0)),
        ("AnomalyDINO rule", "400", "anomalydino", dict(layer="400")),
        ("AnomalyDINO rule", "365+426, 14 x 14", "anomalydino", dict(layer=["365", "426"])),
    ]


def thin(cat: Any, limit: int | None) -> Any:
    """A category with at most ``limit`` test images: evenly spaced over its sorted test set, so
    normal and defective images keep about their shares (:func:`lakead.methods.lake.fit.spread_subset`)."""
    from lakead.methods.lake.fit import spread_subset

    if not limit or len(cat.test) <= limit:
        return cat
    return dataclasses.replace(cat, test=tuple(cat.test[i] for i in spread_subset(len(cat.test), limit)))


def searched_bytes(det: Any) -> tuple[int, int]:
    """(vectors, bytes) of what a fitted detector searches for every test patch."""
    st = det.state_
    bank = getattr(st, "bank", None)
    if bank is None:
        bank = st.gallery
    return int(bank.shape[0]), int(bank.numel() * bank.element_size())


def table(args: argparse.Namespace) -> None:
    from lakead import LakeConfig
    from lakead.api import Runtime
    from lakead.backbones import load_backbone
    from lakead.data import load_dataset
    from lakead.evaluate.runner import evaluate_category
    from lakead.methods import Method, get_method

    built: list[Any] = []

    @dataclass(frozen=True)
    class Recording(Method):  # the grid's detector, kept to read its memory after the run
        def build(self, config, backbone=None, runtime=None, options=None):
            det = super().build(config, backbone, runtime, options)
            built.append(det)
            return det

    spec = f"onnx:{args.model}"
    bb = load_backbone(spec)
    cats = [thin(c, args.max_test) for c in load_dataset(args.data)]
    rt = Runtime(device="cpu", batch_size=args.batch_size)
    out_rows = []
    t_all = time.perf_counter()
    for label, shown, name, opts in rows(spec):
        m = get_method(name)
        own = {f.name for f in dataclasses.fields(m.config_class)}
        base = LakeConfig(backbone=spec, use_text=False, **{k: v for k, v in opts.items() if k in set(LakeConfig.__dataclass_fields__)})
        cfg = m.configure(base, {k: v for k, v in opts.items() if k in own})
        rec = Recording(**{f.name: getattr(m, f.name) for f in dataclasses.fields(m)})
        per_cat = {}
        for cat in cats:
            load = loadavg()
            res = evaluate_category(cat, cfg, bb, runtime=rt, method=rec, shots=args.shots, seed=0)
            vectors, nbytes = searched_bytes(built[-1])
            met = res.metrics()
            per_cat[cat.name] = {
                "image_auroc": met["image_auroc"], "pixel_auroc": met["pixel_auroc"], "pixel_pro": met["pixel_pro"],
                "fit_seconds_per_image": res.fit_seconds / len(res.support),
                "predict_ms_per_image": 1000 * res.predict_seconds_per_image,
                "vectors": vectors, "megabytes": nbytes / 2**20, "support": len(res.support), "loadavg": load,
                "test_images": res.counts,
            }
            print(f"{label} [{shown}] {cat.name}: " + ", ".join(
                f"{k} {v:.3g}" for k, v in per_cat[cat.name].items() if isinstance(v, float)), flush=True)
        keys = [k for k in next(iter(per_cat.values())) if k not in ("loadavg", "support", "test_images")]
        mean = {k: float(sum(c[k] for c in per_cat.values()) / len(per_cat)) for k in keys}
        out_rows.append({"label": label, "features": shown, "method": name, "config": cfg.to_dict(),
                         "mean": mean, "categories": per_cat})
    doc = {
        "command": "python benchmarks/methods.py table " + " ".join(sys.argv[2:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": str(args.data), "model": str(args.model), "backbone": bb.info.to_dict(),
        "shots": args.shots, "shot_seed": 0, "max_test": args.max_test, "batch_size": args.batch_size, "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - t_all, 1), "rows": out_rows,
    }
    write(args.out, "methods", doc, methods_markdown(doc))


def _fmt(v: float, pct: bool = True) -> str:
    return "n/a" if v != v else (f"{100 * v:.1f}" if pct else f"{v:.3g}")


def methods_markdown(doc: dict[str, Any]) -> str:
    head = ("| method | features | I-AUROC | P-AUROC | PRO | fit s / image | predict ms / image | vectors | MB |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|")

    def line(r: dict[str, Any], m: dict[str, float]) -> str:
        return (f"| {r['label']} | {r['features']} | {_fmt(m['image_auroc'])} | {_fmt(m['pixel_auroc'])} | "
                f"{_fmt(m['pixel_pro'])} | {m['fit_seconds_per_image']:.3f} | {m['predict_ms_per_image']:.0f} | "
                f"{m['vectors']:.0f} | {m['megabytes']:.2f} |")

    lines = [f"# LAKE, PatchCore and AnomalyDINO on MobileNetV2 ({doc['date']})", "",
             f"`{doc['command']}`: {doc['shots']} shots per category (seed 0), batch size {doc['batch_size']}, "
             f"{doc['cpus']} CPUs, {doc['seconds']:.0f} s in all. Test images per category (good / defective): "
             + ", ".join(f"{c} {v['test_images']['test_normal']} / {v['test_images']['test_defect']}"
                         for c, v in doc["rows"][0]["categories"].items())
             + (f" (at most {doc['max_test']}, evenly spaced over the sorted test set)" if doc.get("max_test") else "") + ".",
             "", "**mean of the categories**", "", head,
             *(line(r, r["mean"]) for r in doc["rows"])]
    for cat in doc["rows"][0]["categories"]:
        lines += ["", f"**{cat}**", "", head, *(line(r, r["categories"][cat]) for r in doc["rows"])]
    return "\n".join(lines) + "\n"


# -- fit time against bank size ---------------------------------------------------------------


def _coreset_child(n: int, width: int) -> None:
    """In a fresh process: a random ``(n, width)`` bank, its 10 % coreset timed; JSON on stdout."""
    import torch

    from lakead.coreset import coreset_count, greedy_coreset

    bank = torch.randn(n, width, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    idx = greedy_coreset(bank, coreset_count(n, 0.1))
    seconds = time.perf_counter() - t0
    hwm = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM")]
    print(json.dumps({"n": n, "width": width, "kept": int(idx.numel()), "seconds": seconds,
                      "peak_rss_mib": int(hwm[0].split()[1]) / 1024 if hwm else None,
                      "bank_mib": n * width * 4 / 2**20}))


def bank(args: argparse.Namespace) -> None:
    from lakead import LakeConfig
    from lakead.api import Runtime
    from lakead.backbones import load_backbone
    from lakead.data import load_dataset, select_shots
    from lakead.methods import get_method

    synthetic = []
    for n in (int(v) for v in args.sizes.split(",")):
        load = loadavg()
        r = subprocess.run([sys.executable, __file__, "_coreset", str(n), str(args.width)], capture_output=True,
                           text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        synthetic.append({**json.loads(r.stdout.strip().splitlines()[-1]), "loadavg": load})
        print(synthetic[-1], flush=True)
    spec = f"onnx:{args.model}"
    bb = load_backbone(spec)
    cat = next(c for c in load_dataset(args.data) if c.name.endswith("tile"))
    real = []
    for shots in (4, 16, 64):
        chosen, _ = select_shots(cat.train, shots, 0)
        cfg = get_method("patchcore").configure(LakeConfig(backbone=spec, layer=["365", "400"]), {"coreset": 0.1})
        det = get_method("patchcore").build(cfg, bb, Runtime(device="cpu", batch_size=16))
        load = loadavg()
        t0 = time.perf_counter()
        det.fit(chosen, "tile")
        real.append({"shots": len(chosen), "bank_before": det.bank_vectors_, "bank_after": int(det.bank_.shape[0]),
                     "width": det.width_, "fit_seconds": time.perf_counter() - t0, "loadavg": load})
        print(real[-1], flush=True)
    doc = {"command": "python benchmarks/methods.py bank " + " ".join(sys.argv[2:]),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
           "synthetic": synthetic, "patchcore_fit": real}
    md = [f"# PatchCore's fit against the size of its bank ({doc['date']})", "", f"`{doc['command']}`", "",
          "| bank vectors | width | kept (10 %) | coreset s | bank MiB | peak RSS MiB |", "|---:|---:|---:|---:|---:|---:|",
          *(f"| {s['n']} | {s['width']} | {s['kept']} | {s['seconds']:.1f} | {s['bank_mib']:.0f} | {s['peak_rss_mib']:.0f} |"
            for s in synthetic),
          "", "| shots (magnetic_tile) | bank before | bank after | width | fit s |", "|---:|---:|---:|---:|---:|",
          *(f"| {r['shots']} | {r['bank_before']} | {r['bank_after']} | {r['width']} | {r['fit_seconds']:.1f} |" for r in real)]
    write(args.out, "bank", doc, "\n".join(md) + "\n")


def write(out: Path, name: str, doc: dict[str, Any], md: str) -> None:
    from lakead.fileio import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(out / f"{name}.md", md)
    print(md)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_coreset":
        _coreset_child(int(sys.argv[2]), int(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    for name in ("table", "bank"):
        s = sub.add_parser(name)
        s.add_argument("--data", type=Path, default=DATA)
        s.add_argument("--model", type=Path, default=MODEL)
        s.add_argument("--out", type=Path, default=ROOT / "docs" / "methods")
    sub.choices["table"].add_argument("--shots", type=int, default=16)
    sub.choices["table"].add_argument("--batch-size", type=int, default=16)
    sub.choices["table"].add_argument("--max-test", type=int, default=200,
                                      help="At most this many test images per category, evenly spaced (0: all).")
    sub.choices["bank"].add_argument("--sizes", default="10000,30000,100000")
    sub.choices["bank"].add_argument("--width", type=int, default=1024)
    args = p.parse_args()
    {"table": table, "bank": bank}[args.step](args)


if __name__ == "__main__":
    main()
