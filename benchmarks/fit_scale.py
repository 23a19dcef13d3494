#!/usr/bin/env python
"""Scale of ``lakead fit`` and of predict against the support set's size (issue 16).

Four measurements, each printing a table and writing ``<out>/<name>.json``:

``memory``: peak resident memory (``ru_maxrss`` of the child, from ``os.wait4``) and wall
time of the real command line, ``lakead fit``, on ``n`` support images in one folder
(copies of the 64 real 800 x 600 tire images of ``../shared/data``, or synthetic textures),
the tiny random CLIP of the tests. ``--main SRC`` also runs the code in ``SRC`` (for example
``/work/main/src``, the code before this change) on the same folders, interleaved.
``--repeats N`` runs each fit N times on the same folder (the spread between runs of one
command; each run's ratio is against the smallest size's run of the same number). The child
inherits the environment, so ``MALLOC_ARENA_MAX=2 python benchmarks/fit_scale.py memory ...``
measures the fit under that allocator setting.

    python benchmarks/fit_scale.py memory --sizes 200,2000 --image-size 224 --main /work/main/src --out docs/scale
    python benchmarks/fit_scale.py memory --sizes 64,1000,5000,10000 --image-size 64 --source synthetic \\
        --gallery-size 4096 --out docs/scale

``predict``: seconds per predicted image against the number of support images, with the
exact gallery and with ``gallery_size`` (the 64-shot gallery's size), in one process, the
runs interleaved (``--repeats``), tiny CLIP. ``exactness``: a real backbone (MobileNetV2
ONNX) on a real category: ``n`` support images made from its train images (random crops,
flips, quarter turns, brightness), fitted exact and reduced; image AUROC of both on the test
split, recall@1 of the reduced search (share of test tokens whose nearest gallery vector is
the exact one: same distance), change in scores and decisions, predict time of both.
``spill``: the second pass against spilling the full-width tokens to a float16 memory-mapped
file: time of each and how far the float16 gallery is from the exact one.

    python benchmarks/fit_scale.py predict --sizes 64,1000,5000,10000 --out docs/scale
    python benchmarks/fit_scale.py exactness --shots 10000 --category mpdd/metal_plate --out docs/scale
    python benchmarks/fit_scale.py spill --images 1000 --out docs/scale

The machine these figures come from has 2 cores shared with other developers: times vary
from run to run, so compare only the ratios measured side by side within one run.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import loadavg, texture  # noqa: E402


def tiny_clip(work: Path) -> str:
    from lakead.testing import save_random_clip

    return str(save_random_clip(work / "tiny-clip", "tiny", seed=0))


class Textures(Sequence):
    """``n`` synthetic textures, made when read (never all in memory)."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:  # iteration stops here
            raise IndexError(i)
        return texture(np.random.default_rng((self.seed, i % self.n)), self.size)


class Augmented(Sequence):
    """``n`` images made from real ones: a random 85-100% crop, flips, quarter turns and
    brightness (deterministic per index), never all in memory."""

    def __init__(self, paths: list[Path], n: int, seed: int = 0) -> None:
        self.paths, self.n, self.seed = paths, n, seed
        self.cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:  # iteration (read_all) stops here
            raise IndexError(i)
        i %= self.n
        k = i % len(self.paths)
        if k not in self.cache:
            self.cache[k] = np.asarray(Image.open(self.paths[k]).convert("RGB"))
        img = self.cache[k]
        if i < len(self.paths):
            return img
        rng = np.random.default_rng((self.seed, i))
        h, w = img.shape[:2]
        s = rng.uniform(0.85, 1.0)
        ch, cw = int(h * s), int(w * s)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        out = img[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            out = out[:, ::-1]
        if rng.random() < 0.5:
            out = out[::-1]
        out = np.rot90(out, int(rng.integers(0, 4)))
        return np.clip(out.astype(np.float32) * rng.uniform(0.9, 1.1), 0, 255).astype(np.uint8)


def predict_interleaved(dets: dict[str, Any], arrays: list[np.ndarray], repeats: int) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Each detector's prediction of ``arrays`` and its seconds per image in each of ``repeats``
    rounds, the detectors taking turns within a round (so that they share the machine's load)."""
    preds, secs = {}, {k: [] for k in dets}
    for _ in range(repeats):
        for kind, det in dets.items():
            t0 = time.perf_counter()
            preds[kind] = det.predict_arrays(arrays)
            secs[kind].append((time.perf_counter() - t0) / len(arrays))
    return preds, secs


def save(out: Path, name: str, data: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out / (name + '.json')}")


# -- memory ----------------------------------------------------------------------------------


def make_folder(folder: Path, n: int, source: str, size: int) -> None:
    folder.mkdir(parents=True)
    if source == "tire":
        real = sorted((SHARED / "data" / "mvtec3d_tire" / "tire" / "train" / "good").glob("*.png"))
        for i in range(n):
            shutil.copyfile(real[i % len(real)], folder / f"{i:06d}.png")  # copies: a link would be listed once
    else:
        for i in range(n):
            Image.fromarray(texture(np.random.default_rng((0, i)), size)).save(folder / f"{i:06d}.png", compress_level=1)


def run_fit(src: str, folder: Path, model: Path, clip: str, args: argparse.Namespace, new: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-c", "from lakead.cli import app; app()", "--quiet", "fit", str(folder), "-c", "tire", "--out", str(model),
           "--backbone", clip, "--image-size", str(args.image_size), "--device", "cpu"]
    if new:
        cmd += ["--fit-memory", args.fit_memory] + (["--gallery-size", str(args.gallery_size)] if args.gallery_size else [])
    env = {**os.environ, "PYTHONPATH": src}
    before, t0 = loadavg(), time.monotonic()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode() if p.stderr else ""
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    meta = json.loads((model / "lakead.json").read_text())
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": round(time.monotonic() - t0, 1),
            "gallery_rule": meta.get("gallery_rule", "every support token"), "load_before": before, "load_after": loadavg()}


def memory(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lakead-fitscale-") as tmp:
        work = Path(tmp)
        clip = tiny_clip(work)
        for n in sizes:
            folder = work / f"n{n}"
            make_folder(folder, n, args.source, args.size)
            codes = [("this", str(ROOT / "src"), True)] + ([("main", args.main, False)] if args.main else [])
            for repeat in range(args.repeats):  # the same fit again on the same folder: the spread between runs
                for label, src, new in codes:
                    r = run_fit(src, folder, work / f"model-{label}-{n}-{repeat}", clip, args, new)
                    rows.append({"n": n, "code": label, "repeat": repeat, **r})
                    print(f"n={n:>6} {label:>5} run {repeat + 1}: peak RSS {r['peak_rss_mib']:8.1f} MiB  {r['seconds']:7.1f} s  "
                          f"({r['gallery_rule']})", flush=True)
            shutil.rmtree(folder)
    smallest = {(r["code"], r["repeat"]): r["peak_rss_mib"] for r in rows if r["n"] == sizes[0]}
    for r in rows:  # against the smallest size's run of the same number
        r["rss_vs_smallest"] = round(r["peak_rss_mib"] / smallest[(r["code"], r["repeat"])], 3)
    if args.repeats > 1:
        for code in dict.fromkeys(r["code"] for r in rows):
            for n in sizes:
                runs = [r for r in rows if r["code"] == code and r["n"] == n]
                peaks = ", ".join(f"{r['peak_rss_mib']:.1f}" for r in runs)
                print(f"n={n:>6} {code:>5}: peak RSS {peaks} MiB, "
                      f"x{min(r['rss_vs_smallest'] for r in runs):.2f} to x{max(r['rss_vs_smallest'] for r in runs):.2f} "
                      f"of the {sizes[0]}-image run of the same number")
    name = f"fit-memory-{args.source}-{args.image_size}px" + (f"-gallery{args.gallery_size}" if args.gallery_size else "") \
        + (f"-x{args.repeats}" if args.repeats > 1 else "")
    save(Path(args.out), name, {"command": " ".join(sys.argv), "image_size": args.image_size, "source": args.source,
                                "repeats": args.repeats, "fit_memory": args.fit_memory, "gallery_size": args.gallery_size, "rows": rows})


# -- predict time ----------------------------------------------------------------------------


def predict_time(args: argparse.Namespace) -> None:
    import torch

    from lakead import LakeDetector

    sizes = [int(s) for s in args.sizes.split(",")]
    test = Textures(args.test_images, args.size, seed=99)[:]
    from lakead.backbones import load_backbone

    with tempfile.TemporaryDirectory(prefix="lakead-predict-") as tmp:
        clip = load_backbone(tiny_clip(Path(tmp)))  # loaded once, shared by every model
        opts = dict(layer=2, image_size=args.size, batch_size=16, device="cpu")
        n_tok = (args.size // 8) ** 2
        cap = 64 * n_tok
        models = {}
        for n in sizes:
            for kind in ("exact", "reduced"):
                t0 = time.monotonic()
                det = LakeDetector(clip, **opts, **({"gallery_size": cap} if kind == "reduced" else {}))
                det.fit(Textures(n, args.size), "texture", memory="1GiB")
                models[(n, kind)] = det
                print(f"{time.strftime('%H:%M:%S')} fitted n={n} {kind}: {det.gallery_.shape[0]:,} vectors in "
                      f"{time.monotonic() - t0:.0f} s", flush=True)
        times: dict[tuple[int, str], list[float]] = {k: [] for k in models}
        for _ in range(args.repeats):  # interleaved: every model once per round
            for key, det in models.items():
                t0 = time.perf_counter()
                det.predict_arrays(test)
                times[key].append((time.perf_counter() - t0) / len(test))
    rows = []
    for (n, kind), ts in times.items():
        per = float(np.median(ts))
        rows.append({"n": n, "gallery": kind, "vectors": int(models[(n, kind)].gallery_.shape[0]), "ms_per_image": per * 1e3})
    for r in rows:
        r["vs_64"] = round(r["ms_per_image"] / next(x["ms_per_image"] for x in rows if x["gallery"] == r["gallery"]
                                                     and x["n"] == min(sizes)), 3)
        print(f"n={r['n']:>6} {r['gallery']:>7}: {r['vectors']:>9,} vectors  {r['ms_per_image']:8.2f} ms/image  x{r['vs_64']}")
    save(Path(args.out), f"predict-vs-shots-{args.size}px", {"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
                                                             "load": loadavg(), "rows": rows})


# -- exactness on real data ------------------------------------------------------------------


def exactness(args: argparse.Namespace) -> None:
    import copy
    import dataclasses

    import torch

    from lakead import LakeDetector
    from lakead.data import load_dataset
    from lakead.metrics import image_metrics
    from lakead.ops import nearest_neighbor

    ds, cat_name = args.category.split("/")
    cat = load_dataset(SHARED / "data" / ds, [cat_name])[0]
    train = sorted(cat.train)
    test = [s.path for s in cat.test]
    labels = np.array([s.label for s in cat.test])
    backbone = "onnx:" + str(SHARED / "models" / "mobilenetv2-12-int8.onnx")
    opts = dict(layer=args.layer, batch_size=16, device="cpu", scope_check=False, **({"k": args.k} if args.k else {}))
    support = Augmented(train, args.shots)
    n_tok = (args.image_size // 16) ** 2
    cap = args.gallery_size or 64 * n_tok  # default: the size of a 64-shot gallery
    out: dict[str, Any] = {"command": " ".join(sys.argv), "category": args.category, "shots": args.shots,
                           "test_images": len(test), "defective": int(labels.sum()), "gallery_size": cap}
    dets = {}
    for kind in args.models.split(","):
        t0 = time.monotonic()
        det = LakeDetector(backbone, image_size=args.image_size, **opts,
                           **({"gallery_size": cap} if kind == "reduced" else {"index": "exact"} if kind == "exact" else {}))
        det.fit(Augmented(train, 64) if kind == "64-shot" else support, cat_name, memory="1GiB")
        dets[kind] = det
        out[f"fit_seconds_{kind}"] = round(time.monotonic() - t0, 1)
        print(f"fitted {kind}: {det.gallery_.shape[0]:,} vectors, neurons {det.neurons_.tolist()}, "
              f"{out[f'fit_seconds_{kind}']} s; {det.gallery_rule_}; index {det.summary()['index']}", flush=True)
    for index in filter(None, args.index.split(",")):  # the exact model's gallery searched through an index
        name, _, ef = index.partition(":")
        det = copy.copy(next((d for k, d in dets.items() if k.split(":")[0] == f"exact+{name}"), dets["exact"]))  # ef: same index
        det.config = dataclasses.replace(det.config, index=name, **({"hnsw_ef_search": int(ef)} if ef else {}))
        t0 = time.monotonic()
        det.gallery_index()  # built once (at fit, for hnsw: saved with the model)
        out[f"build_seconds_exact+{index}"] = round(time.monotonic() - t0, 1)
        dets[f"exact+{index}"] = det
        print(f"built {index}: {out[f'build_seconds_exact+{index}']} s", flush=True)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in test]
    preds, secs = predict_interleaved(dets, arrays, args.repeats)
    for kind in dets:
        out[f"auroc_{kind}"] = image_metrics(labels, preds[kind].scores)["auroc"]
        out[f"ms_per_image_{kind}"] = float(np.median(secs[kind])) * 1e3
        out[f"threshold_{kind}"] = dets[kind].threshold_
    ex = preds["exact"]
    queries = [b.tokens[..., dets["exact"].neurons_].reshape(-1, dets["exact"].neurons_.numel())
               for b in dets["exact"].iter_scored(arrays, text=False)]  # the test tokens in the sensitive subspace
    exact_d = [nearest_neighbor(q, dets["exact"].gallery_)[0] for q in queries]
    for kind, det in dets.items():
        if kind in ("exact", "64-shot"):
            continue
        red = preds[kind]
        out[f"auroc_change_{kind}"] = out[f"auroc_{kind}"] - out["auroc_exact"]
        out[f"decisions_changed_{kind}"] = int((ex.anomalous != red.anomalous).sum())
        rel = np.abs(red.visual - ex.visual) / np.maximum(np.abs(ex.visual), 1e-12)
        out[f"visual_score_rel_change_median_{kind}"] = float(np.median(rel))
        out[f"visual_score_rel_change_max_{kind}"] = float(rel.max())
        # recall@1: share of test tokens whose neighbour found is at the exact neighbour's distance
        assert torch.equal(dets["exact"].neurons_, det.neurons_)
        search = det.gallery_index().search
        hits = sum(int((search(q)[0] <= d * (1 + 1e-6)).sum()) for q, d in zip(queries, exact_d))
        out[f"recall_at_1_{kind}"] = hits / sum(q.shape[0] for q in queries)
    out["load"] = loadavg()
    for k, v in out.items():
        print(f"{k}: {v}")
    save(Path(args.out), f"exactness-{args.category.replace('/', '-')}-{args.shots}"
         + (f"-gallery{args.gallery_size}" if args.gallery_size else "") + (f"-k{args.k}" if args.k else "")
         + ("-index-" + args.index.replace(",", "-").replace(":", "ef") if args.index else "") + ("" if args.models == "exact,reduced,64-shot" else "-" + args.models.replace(",", "-")), out)


# -- second pass against a float16 spill -------------------------------------------------------


def spill(args: argparse.Namespace) -> None:
    import torch

    from lakead import LakeDetector
    from lakead.methods.lake import stream

    images = Textures(args.images, args.size)
    with tempfile.TemporaryDirectory(prefix="lakead-spill-") as tmp:
        clip = tiny_clip(Path(tmp))
        det = LakeDetector(clip, layer=2, image_size=args.image_size, batch_size=16, device="cpu", scope_check=False)
        t0 = time.monotonic()
        det.fit(images, "texture", memory=len(images) * (args.image_size // 8) ** 2 * 32 * 4)  # half of it: two passes
        two_pass = time.monotonic() - t0
        assert det.fit_passes == 2
        # the alternative: one forward pass, the full-width tokens written to a float16 memmap
        ctx = stream.Context((det.layer_,), None, det.image_size_, None)
        gh, gw = det.grid_
        t0 = time.monotonic()
        mm = np.lib.format.open_memmap(Path(tmp) / "tokens.npy", mode="w+", dtype=np.float16,
                                       shape=(len(images), gh * gw, det.width_))
        moments, filled = None, 0
        for s in range(0, len(images), 16):
            done = stream.run_job(det, stream.Job(images[s : s + 16], [str(i) for i in range(s, min(s + 16, len(images)))],
                                                  full=True), ctx)
            moments = done.moments if moments is None else moments.merge(done.moments)
            mm[filled : filled + done.full.shape[0]] = done.full.numpy().astype(np.float16)
            filled += done.full.shape[0]
        mm.flush()
        neurons = det.neurons_.numpy()
        gallery16 = np.concatenate([np.asarray(mm[s : s + 256][:, :, neurons], dtype=np.float32).reshape(-1, len(neurons))
                                    for s in range(0, filled, 256)])
        spill_s = time.monotonic() - t0
        disk = (Path(tmp) / "tokens.npy").stat().st_size
        exact = det.gallery_.numpy()
        diff = np.abs(gallery16 - exact)
        # the spill's variance comes from the same moments: the neurons are the same; only the gallery differs
        test = Textures(32, args.size, seed=99)[:]
        pred = det.predict_arrays(test)
        det.state_.gallery = torch.from_numpy(gallery16)
        pred16 = det.predict_arrays(test)
    out = {"command": " ".join(sys.argv), "images": args.images, "image_size": args.image_size,
           "two_pass_fit_seconds": round(two_pass, 1), "spill_fit_seconds_without_loo": round(spill_s, 1),
           "spill_file_mib": disk / 2**20, "gallery_max_abs_diff": float(diff.max()),
           "gallery_max_rel_diff": float((diff / np.maximum(np.abs(exact), 1e-6)).max()),
           "score_max_abs_diff": float(np.abs(pred.scores - pred16.scores).max()),
           "decisions_changed": int((pred.anomalous != pred16.anomalous).sum()), "load": loadavg()}
    for k, v in out.items():
        print(f"{k}: {v}")
    save(Path(args.out), f"spill-{args.images}", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--sizes", default="200,2000")
    m.add_argument("--image-size", type=int, default=224)
    m.add_argument("--source", choices=["tire", "synthetic"], default="tire")
    m.add_argument("--size", type=int, default=64, help="synthetic image side in pixels")
    m.add_argument("--fit-memory", default="256MiB")
    m.add_argument("--gallery-size", type=int, default=None)
    m.add_argument("--main", default=None, help="also run the code in this src folder (PYTHONPATH)")
    m.add_argument("--repeats", type=int, default=1, help="runs of each fit (the spread between runs of one command)")
    p = sub.add_parser("predict")
    p.add_argument("--sizes", default="64,1000,5000,10000")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--test-images", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    e = sub.add_parser("exactness")
    e.add_argument("--category", default="mpdd/metal_plate")
    e.add_argument("--shots", type=int, default=10000)
    e.add_argument("--layer", default="400")
    e.add_argument("--image-size", type=int, default=224)
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--gallery-size", type=int, default=None, help="coreset size (default: a 64-shot gallery's)")
    e.add_argument("--k", type=int, default=None, help="sensitive neurons (default: LAKE's, 6 of 64 here)")
    e.add_argument("--models", default="exact,reduced,64-shot",
                   help="what to fit: exact (index exact), auto (the default options), reduced (coreset), 64-shot")
    e.add_argument("--index", default="", help="indexes to search the exact gallery with, e.g. kdtree,hnsw,hnsw:256 "
                   "(hnsw:EF sets hnsw_ef_search)")
    s = sub.add_parser("spill")
    s.add_argument("--images", type=int, default=1000)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--image-size", type=int, default=224)
    for q in (m, p, e, s):
        q.add_argument("--out", default="docs/scale")
    args = ap.parse_args()
    {"memory": memory, "predict": predict_time, "exactness": exactness, "spill": spill}[args.cmd](args)


if __name__ == "__main__":
    main()
