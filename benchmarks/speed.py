#!/usr/bin/env python
"""Speed of lakead, measured against the machine's own ceiling (issue 4).

For a full-size CLIP with random weights (built once by :func:`lakead.testing.save_random_clip`
and cached; the same arithmetic as the trained model of that size), one run measures:

- the machine's float32 matrix-multiply ceiling (GFLOP/s; and the bfloat16 one for reference);
- one backbone forward, as deep as the detector needs (block ``max(layer, semantic_layer)``),
  at batch 1 and at the fit batch size, with its FLOPs counted by
  ``torch.utils.flop_counter.FlopCounterMode`` and checked against an analytic count;
- ``predict`` at batch 1 split into preprocessing, backbone, nearest-neighbour search, text
  probe and map post-processing (the same functions ``predict`` calls), and the real
  ``predict`` end to end, measured in the same loop;
- ``fit`` on ``--shots`` (64) images against as many forwards at the fit batch size;
- peak memory (resident set on the CPU, allocated memory on CUDA) of predict and fit, and the
  gallery's size against a full-width gallery;
- images per second of ``predict`` at each ``--batch-sizes`` (1 and 8);
- faster paths (``--paths``): speed-up of the forward and change of the scores against
  float32 on a fixed synthetic set; and with ``--accuracy-data`` the image AUROC of every path
  on a real dataset (a smaller preset, default vit-b-16, fitted and scored per path).

Every time is the median of ``--repeats`` runs after one warm-up run; ratios are computed per
run from measurements taken back to back, then their median is reported.

    python benchmarks/speed.py                                  # ViT-L/14 at 336 px, the paper's model
    python benchmarks/speed.py --preset vit-b-16 --shots 16    # a quick run
    python benchmarks/speed.py --json results.json             # also write every figure as JSON
    python benchmarks/speed.py --device cuda --precision bfloat16 --batch-sizes 1,32   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lakead.api import PRECISIONS  # noqa: E402
from lakead.backbones import CLIPBackbone, as_blocks  # noqa: E402
from lakead.methods.lake.detector import LakeDetector, backbone_precision  # noqa: E402
from lakead.methods.lake.score import token_distances, visual_tokens  # noqa: E402
from lakead.fileio import atomic_directory  # noqa: E402
from lakead.ops import anomaly_probability, pool_scores, upsample_map  # noqa: E402
from lakead.testing import PRESETS, save_random_clip  # noqa: E402

#: Targets of issue 4, as ratios measured in one run.
TARGETS = {
    "predict_over_forward": 1.15,  # predict at batch 1 <= 1.15 x one backbone forward
    "backbone_over_ceiling": 1.5,  # backbone time <= 1.5 x FLOPs / matmul ceiling
    "fit_over_forwards": 1.1,  # fit for n shots <= 1.1 x n forwards
    "gallery_fraction": 0.10,  # gallery <= 10% of a full-width gallery
}

#: Faster paths that can be compared with float32; see ``build_path``.
PATH_CHOICES = ("bfloat16", "bfloat16-weights", "int8", "compile")

#: The steps of ``predict`` timed one by one by ``predict_breakdown``.
STEPS = ("preprocessing", "backbone", "nearest_neighbour", "text_probe", "map")

log_stream = sys.stderr


def say(msg: str) -> None:
    print(msg, file=log_stream, flush=True)


# -- the machine ----------------------------------------------------------------------------


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in have]
    except OSError:
        pass
    import transformers

    info = {
        "cpu": cpu,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -- timing and memory ----------------------------------------------------------------------


class Clock:
    """Wall time of a call, with CUDA synchronised before and after."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


def stats(values: Sequence[float]) -> dict[str, Any]:
    v = [float(x) for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}


def repeat(clock: Clock, fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    for _ in range(warmup):
        clock(fn)
    return stats([clock(fn)[0] for _ in range(repeats)])


class PeakMemory:
    """Peak memory of a block of code: the resident set (VmHWM, reset through
    ``/proc/self/clear_refs``) on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def _rss_kib(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    @contextlib.contextmanager
    def measure(self, into: dict[str, Any], key: str):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield
            into[key] = {"peak_mib": torch.cuda.max_memory_allocated(self.device) / 2**20, "before_mib": base / 2**20, "what": "cuda allocated"}
            return
        reset = True
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            reset = False
        base = self._rss_kib("VmRSS")
        yield
        peak = self._rss_kib("VmHWM")
        if peak is None or base is None:
            into[key] = None
            return
        into[key] = {
            "peak_mib": peak / 1024,
            "before_mib": base / 1024,
            "what": "process resident set" + ("" if reset else " (peak since start: VmHWM could not be reset)"),
        }


# -- inputs and models ----------------------------------------------------------------------


def synthetic_images(n: int, hw: tuple[int, int], seed: int, defects: bool = False) -> list[np.ndarray]:
    """``n`` RGB uint8 images of smooth noise; with ``defects`` every other one gets a bright square."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    h, w = hw
    out = []
    for i in range(n):
        small = gaussian_filter(rng.normal(0.0, 1.0, (h // 4, w // 4, 3)), (2, 2, 0))
        small = (small - small.min()) / (np.ptp(small) + 1e-9)
        img = np.kron(small, np.ones((4, 4, 1)))[:h, :w]
        img = np.pad(img, ((0, h - img.shape[0]), (0, w - img.shape[1]), (0, 0)), mode="edge")
        arr = (img * 200 + 25).astype(np.uint8)
        if defects and i % 2 == 1:
            s = max(4, min(h, w) // 8)
            y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            arr[y : y + s, x : x + s] = (255, 0, 0)
        out.append(arr)
    return out


def model_dir(preset: str, where: Path | None) -> Path:
    """The cached random-weight CLIP of ``preset`` (built on first use)."""
    root = where or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lakead" / "bench"
    path = root / f"{preset}-seed0"
    if not (path / "config.json").is_file():
        say(f"building a random-weight CLIP {preset} in {path} (once)...")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(path) as tmp:
            save_random_clip(tmp, preset, seed=0)
    return path


def vit_flops(backbone: CLIPBackbone, image_size: int, depth: int, batch: int, joint: bool) -> float:
    """Analytic multiply-add count x 2 of the vision tower up to block ``depth``.

    Per block with ``T = N + 1`` tokens, width ``D``, MLP width ``M``: ``T (4 D^2 + 2 D M)``
    for the projections and the MLP, ``2 T^2 D`` for attention (QK^T and AV); plus the patch
    embedding ``N * 3 p^2 * D`` and, for the text probe, ``N * D * E`` for the visual
    projection. Layer norms, softmax and activations are not counted (nor are they by
    FlopCounterMode).
    """
    vcfg = backbone.model.config.vision_config
    p, d, m = int(vcfg.patch_size), int(vcfg.hidden_size), int(vcfg.intermediate_size)
    n = (image_size // p) ** 2
    t = n + 1
    macs = n * 3 * p * p * d + depth * (t * (4 * d * d + 2 * d * m) + 2 * t * t * d)
    if joint:
        macs += n * d * backbone.info.joint_dim
    return 2.0 * batch * macs


def count_flops(det: LakeDetector, pixels: torch.Tensor, layer: int, semantic_layer: int | None) -> float:
    """FLOPs of one backbone call counted by FlopCounterMode. Attention runs through the
    math kernel while counting, so that its matrix products are seen (the fused CPU kernel
    has no FLOP formula)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        det.backbone.extract(pixels, [layer], semantic_layer)
    return float(counter.get_total_flops())


def default_layer(backbone: CLIPBackbone, layer: int | None) -> int:
    """The visual block: as given, else 3/4 of the depth (18 of 24, LAKE.md's default)."""
    return layer if layer is not None else max(1, round(0.75 * backbone.num_layers))


# -- measurements ---------------------------------------------------------------------------


def matmul_ceiling(clock: Clock, device: torch.device, dtype: torch.dtype, shapes: Sequence[tuple[int, int, int]], repeats: int) -> dict[str, Any]:
    """GFLOP/s of ``torch.matmul`` for each ``(m, k, n)``; the ceiling is the best median."""
    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        c = torch.empty(m, n, device=device, dtype=dtype)
        t = repeat(clock, lambda: torch.matmul(a, b, out=c), repeats)
        rows.append({"shape": [m, k, n], "gflops": 2.0 * m * k * n / t["median"] / 1e9, "seconds": t})
        del a, b, c
    best = max(rows, key=lambda r: r["gflops"])
    return {"dtype": str(dtype).replace("torch.", ""), "ceiling_gflops": best["gflops"], "best_shape": best["shape"], "shapes": rows}


def extract_fn(det: LakeDetector, pixels: torch.Tensor) -> Callable[[], Any]:
    """One backbone call exactly as ``predict`` makes it (same blocks, same precision)."""
    bb = det.backbone

    blocks = as_blocks(det.layer_)

    def run():
        with backbone_precision(det.runtime.precision, bb):
            return bb.extract(pixels, blocks, det.semantic_layer_)

    return run


def predict_breakdown(clock: Clock, det: LakeDetector, image: np.ndarray, repeats: int) -> dict[str, Any]:
    """``predict`` of one image, step by step and end to end, in the same loop."""
    bb, cfg = det.backbone, det.config
    blocks = as_blocks(det.layer_)
    h, w = image.shape[:2]
    gh, gw = det.grid_
    sig = (cfg.sigma * h / det.image_size_, cfg.sigma * w / det.image_size_)
    parts: dict[str, list[float]] = {k: [] for k in (*STEPS, "predict")}
    ratios = []
    for r in range(repeats + 1):  # the first run is the warm-up
        t_pre, pixels = clock(lambda: bb.preprocessing([image], det.image_size_))
        t_bb, f = clock(extract_fn(det, pixels))
        t_nn, tok = clock(lambda: token_distances(visual_tokens(f, blocks, cfg.block_grid)[0], det.state_)[0])
        t_txt = 0.0
        if f.joint is not None and det.text_embeddings_ is not None:
            t_txt, _ = clock(lambda: pool_scores(anomaly_probability(f.joint, det.text_embeddings_, det.logit_scale_), cfg.semantic_agg).cpu())
        t_map, _ = clock(lambda: upsample_map(tok.reshape(gh, gw).cpu(), (h, w), sig))
        t_pred, _ = clock(lambda: det.predict([image]))
        if r == 0:
            continue
        for k, v in zip(parts, (t_pre, t_bb, t_nn, t_txt, t_map, t_pred)):
            parts[k].append(v)
        ratios.append(t_pred / t_bb)
    out = {k: stats(v) for k, v in parts.items()}
    step_sum = sum(out[k]["median"] for k in STEPS)
    out["sum_of_steps"] = step_sum
    out["predict_over_forward"] = stats(ratios)
    out["non_network_fraction"] = 1.0 - out["backbone"]["median"] / out["predict"]["median"]
    return out


def fit_measure(clock: Clock, memory: PeakMemory, mem: dict, det: LakeDetector, support: list[np.ndarray], repeats: int,
                forward: Callable[[], Any], n_batches: int) -> dict[str, Any]:
    """``fit`` on the support images, and ``n_batches`` forwards at the fit batch size right
    after it, ``repeats`` times (after one warm-up forward). The first fit also gives the peak
    memory and counts the text-tower calls."""
    clock(forward)
    fits, fwds, ratios = [], [], []
    calls = {"n": 0}
    for i in range(repeats):
        if i == 0:
            with memory.measure(mem, "fit"), count_calls(det.backbone, "text_embeddings") as calls:
                t_fit, _ = clock(lambda: det.fit(support, "object"))
        else:
            t_fit, _ = clock(lambda: det.fit(support, "object"))
        t_fwd = sum(clock(forward)[0] for _ in range(n_batches))
        fits.append(t_fit)
        fwds.append(t_fwd)
        ratios.append(t_fit / t_fwd)
    return {"fit": stats(fits), "forwards": stats(fwds), "fit_over_forwards": stats(ratios), "text_embedding_calls_per_fit": calls["n"]}


def count_calls(obj: Any, name: str):
    """Context manager counting calls of ``obj.name`` (an instance method)."""
    calls = {"n": 0}
    orig = getattr(obj, name)

    def wrapped(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    @contextlib.contextmanager
    def ctx():
        setattr(obj, name, wrapped)
        try:
            yield calls
        finally:
            delattr(obj, name)

    return ctx()


def gallery_memory(det: LakeDetector) -> dict[str, Any]:
    g = det.gallery_
    rows = int(g.shape[0])
    kept = g.element_size() * g.numel() + det.gallery_image_.element_size() * det.gallery_image_.numel()
    full = rows * det.width_ * 4 + det.gallery_image_.element_size() * det.gallery_image_.numel()
    return {"vectors": rows, "k": int(g.shape[1]), "width": det.width_, "bytes": kept, "full_width_bytes": full, "fraction": kept / full}


# -- faster paths ---------------------------------------------------------------------------


def build_path(name: str, base: CLIPBackbone) -> tuple[CLIPBackbone, str]:
    """A backbone and the detector precision for one path. ``base`` is never modified.

    - ``bfloat16``: the library option ``precision="bfloat16"`` (torch.autocast; weights stay float32);
    - ``bfloat16-weights``: a copy of the model with bfloat16 weights (no autocast);
    - ``int8``: a copy whose vision Linear layers are dynamically quantized to int8 (CPU only);
    - ``compile``: the same weights, the vision tower run through ``torch.compile`` (inductor with
      frozen weights, ``options={"freezing": True}``: without it inductor is no faster here).
    """
    def fresh(model) -> CLIPBackbone:
        bb = CLIPBackbone(model, base.preprocessing, tokenizer=base.tokenizer, source=base.info.source, image_size=base.info.image_size)
        return bb.to(base.device)

    if name == "bfloat16":
        return base, "bfloat16"
    if name == "bfloat16-weights":
        model = copy.deepcopy(base.model)
        model.vision_model.to(torch.bfloat16)
        model.visual_projection.to(torch.bfloat16)
        return fresh(model), "float32"
    if name == "int8":
        if base.device.type != "cpu":
            raise SystemExit("--paths int8 runs on the CPU only (dynamic quantization)")
        import warnings

        from torch.ao.quantization import quantize_dynamic

        model = copy.deepcopy(base.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.vision_model = quantize_dynamic(model.vision_model, {torch.nn.Linear}, dtype=torch.qint8)
        return fresh(model), "float32"
    if name == "compile":
        # A copy whose embeddings and blocks are compiled one by one: the backbone calls the vision
        # tower's submodules in order up to the deepest block it needs (a compiled vision_model as a
        # whole would never be called), so each of them is what gets compiled.
        model = copy.deepcopy(base.model)
        vision = model.vision_model
        opts = dict(dynamic=False, options={"freezing": True})
        vision.embeddings = torch.compile(vision.embeddings, **opts)
        for i, block in enumerate(vision.encoder.layers):
            vision.encoder.layers[i] = torch.compile(block, **opts)
        return fresh(model), "float32"
    raise SystemExit(f"unknown path {name!r}; choose from {PATH_CHOICES}")


def compare(ref, other) -> dict[str, Any]:
    """Score differences of two predictions on the same images."""
    d = np.abs(other.scores - ref.scores)
    dv = np.abs(other.visual - ref.visual)
    ds = np.abs(other.semantic - ref.semantic)
    dm = max(float(np.abs(a - b).max()) for a, b in zip(ref.maps, other.maps))
    spread = float(np.ptp(ref.scores)) or 1.0
    return {
        "max_abs_score": float(d.max()),
        "max_abs_visual": float(dv.max()),
        "max_abs_semantic": float(ds.max()),
        "max_abs_map": dm,
        "max_abs_score_over_spread": float(d.max()) / spread,
        "decisions_changed": int((ref.anomalous != other.anomalous).sum()),
        "rank_agreement": float(_spearman(ref.scores, other.scores)),
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def paths_section(args, clock: Clock, base: CLIPBackbone, det_kwargs: dict, depth: int, image1: np.ndarray, fit_bs: int) -> dict[str, Any]:
    """Forward speed-up and score change of every path against float32 on a fixed synthetic set."""
    support = synthetic_images(args.check_shots, args.image_hw, seed=1)
    test = synthetic_images(args.check_images, args.image_hw, seed=2, defects=True)
    out: dict[str, Any] = {"check_shots": args.check_shots, "check_images": args.check_images}
    ref = LakeDetector(backbone=base, **{**det_kwargs, "precision": "float32"})
    ref.fit(support, "object")
    ref_pred = ref.predict(test)
    px1 = base.preprocessing([image1], ref.image_size_)
    pxb = base.preprocessing([image1] * fit_bs, ref.image_size_)
    for name in args.paths:
        say(f"  path {name}...")
        bb, precision = build_path(name, base)
        det = LakeDetector(backbone=bb, **{**det_kwargs, "precision": precision})
        t_first, _ = clock(lambda: det.fit(support, "object"))  # includes any compilation
        pred = det.predict(test)
        row: dict[str, Any] = {"first_fit_s": t_first}
        for label, px in (("batch_1", px1), (f"batch_{fit_bs}", pxb)):
            f_ref, f_path = extract_fn(ref, px), extract_fn(det, px)
            first, _ = clock(f_path)  # warm-up; for compile, the compilation of a new input shape (batch 1)
            t_ref, t_path, speedups = [], [], []
            for r in range((args.repeats if px.shape[0] == 1 else args.batch_repeats) + 1):
                a, _ = clock(f_ref)
                b, _ = clock(f_path)
                if r:
                    t_ref.append(a), t_path.append(b), speedups.append(a / b)
            row[label] = {"float32_s": stats(t_ref), "path_s": stats(t_path), "speedup": stats(speedups), "first_call_s": first}
            saving = (statistics.median(t_ref) - statistics.median(t_path)) / px.shape[0]  # seconds per image
            overhead = first - statistics.median(t_path)
            if name == "compile":
                # images after which the one-off compilation of this shape has paid for itself
                row[label]["break_even_images"] = overhead / saving if saving > 0 else None
        row["scores"] = compare(ref_pred, pred)
        row["neurons_shared"] = len(set(ref.neurons_.tolist()) & set(det.neurons_.tolist())) / ref.neurons_.numel()
        out[name] = row
        del det, bb
    return out


def accuracy_section(args, clock: Clock, device: torch.device) -> dict[str, Any]:
    """Image AUROC of float32 and every path on a real dataset, with a (smaller) random CLIP."""
    from lakead.data import load_dataset, select_shots
    from lakead.metrics import image_metrics

    cat = load_dataset(args.accuracy_data, check_masks=False)[0]
    shots, rule = select_shots(list(cat.train), args.accuracy_shots)
    labels = np.array([s.label for s in cat.test])
    source = args.accuracy_backbone or str(model_dir(args.accuracy_preset, args.model_cache))
    base = CLIPBackbone.from_pretrained(source).to(device)
    kwargs = dict(k=min(args.k, base.width), layer=default_layer(base, None), device=str(device), batch_size=8)
    out: dict[str, Any] = {"data": str(args.accuracy_data), "category": cat.name,
                           "preset": "given backbone" if args.accuracy_backbone else args.accuracy_preset, "backbone": source,
                           "support_rule": rule, "test_images": len(cat.test), "defective": int(labels.sum()),
                           "layer": kwargs["layer"], "k": kwargs["k"]}
    ref = None
    for name in ["float32", *args.paths]:
        say(f"  accuracy {name}...")
        if name == "float32":
            bb, precision = base, "float32"
        else:
            bb, precision = build_path(name, base)
        det = LakeDetector(backbone=bb, precision=precision, **kwargs)
        t_fit, _ = clock(lambda: det.fit(shots, cat.class_name))
        t_pred, pred = clock(lambda: det.predict([s.path for s in cat.test]))
        row = {"fit_s": t_fit, "predict_s": t_pred, "image": image_metrics(labels, pred.scores),
               "image_visual_only": image_metrics(labels, pred.visual)}
        if ref is None:
            ref = pred
        else:
            row["vs_float32"] = compare(ref, pred)
        out[name] = row
    return out


# -- the run --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="vit-l-14-336", choices=sorted(PRESETS), help="random CLIP to time (default: the paper's ViT-L/14 at 336 px)")
    ap.add_argument("--model-cache", type=Path, default=None, help="where the random CLIPs are kept (default ~/.cache/lakead/bench)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="float32", choices=PRECISIONS, help="detector precision for the main measurements")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, one per core)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per batch-1 figure (after one warm-up)")
    ap.add_argument("--batch-repeats", type=int, default=3, help="timed runs per batched figure and per fit")
    ap.add_argument("--shots", type=int, default=64, help="support images for fit")
    ap.add_argument("--fit-repeats", type=int, default=3, help="timed fits (each followed by as many forwards as it makes)")
    ap.add_argument("--batch-sizes", default="1,8", help="batch sizes for images per second; the largest is also the fit batch size")
    ap.add_argument("--image-hw", default="600x800", help="HxW of the synthetic test images (maps are upsampled to this size)")
    ap.add_argument("--k", type=int, default=100, help="sensitive neurons (default 100; at most the model's width)")
    ap.add_argument("--layer", type=int, default=None, help="visual block (default: 3/4 of the depth, block 18 of 24 as in LAKE.md)")
    ap.add_argument("--paths", default=None, help=f"faster paths to compare with float32, comma-separated from {','.join(PATH_CHOICES)}; "
                    "'none' for none (default: bfloat16,int8,compile on the CPU; bfloat16,compile on CUDA)")
    ap.add_argument("--check-shots", type=int, default=16, help="support images of the score check of the paths")
    ap.add_argument("--check-images", type=int, default=8, help="test images of the score check of the paths")
    ap.add_argument("--accuracy-data", type=Path, default=None, help="an MVTec-layout category for the AUROC check of the paths (off by default)")
    ap.add_argument("--accuracy-preset", default="vit-b-16", choices=sorted(PRESETS), help="random CLIP for the AUROC check")
    ap.add_argument("--accuracy-backbone", default=None, help="a real CLIP (local directory or hub id) for the AUROC check instead of the random preset")
    ap.add_argument("--accuracy-shots", type=int, default=None, help="support images of the AUROC check (default: all)")
    ap.add_argument("--skip", default="", help="sections to skip, comma-separated: ceiling,fit,throughput,paths,accuracy")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH", help="write every figure as JSON to PATH (or stdout with no PATH)")
    ap.add_argument("--markdown", default=None, metavar="PATH", help="also write the figures as Markdown tables to PATH")
    ap.add_argument("--from-json", default=None, metavar="PATH", help="do not measure: print (and --markdown) the figures of an earlier --json file")
    args = ap.parse_args(argv)
    args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    h, _, w = args.image_hw.partition("x")
    args.image_hw = (int(h), int(w))
    args.skip = {s for s in args.skip.split(",") if s}
    if args.paths is None:
        args.paths = ["bfloat16", "int8", "compile"] if args.device == "cpu" else ["bfloat16", "compile"]
    elif args.paths == "none":
        args.paths = []
    else:
        args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        bad = [p for p in args.paths if p not in PATH_CHOICES]
        if bad:
            ap.error(f"--paths: unknown {bad}; choose from {PATH_CHOICES}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = Clock(device)
    memory = PeakMemory(device)
    res: dict[str, Any] = {"command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]), "machine": machine_info(device),
                           "loadavg_start": loadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    say(f"machine: {res['machine']['cpu']}, {res['machine']['logical_cpus']} CPUs, torch {torch.__version__}; load {res['loadavg_start']}")

    path = model_dir(args.preset, args.model_cache)
    bb = CLIPBackbone.from_pretrained(str(path)).to(device)
    layer = bb.resolve_layer(default_layer(bb, args.layer))
    semantic_layer = bb.num_layers
    depth = max(layer, semantic_layer)
    fit_bs = max(args.batch_sizes)
    det_kwargs = dict(k=min(args.k, bb.width), layer=layer, device=str(device), batch_size=fit_bs)
    res["model"] = {"preset": args.preset, "dir": str(path), "layer": layer, "semantic_layer": semantic_layer, "depth": depth,
                    "image_size": bb.info.image_size, "grid": list(bb.grid_size(bb.info.image_size)), "width": bb.width, "k": det_kwargs["k"],
                    "precision": args.precision, "image_hw": list(args.image_hw), "shots": args.shots}
    image = synthetic_images(1, args.image_hw, seed=3)[0]
    support = synthetic_images(args.shots, args.image_hw, seed=4)

    # 1. the ceiling
    if "ceiling" not in args.skip:
        say("matmul ceiling...")
        s = bb.info.image_size
        tokens = (s // bb.info.patch_size) ** 2 + 1
        vcfg = bb.model.config.vision_config
        model_shapes = [(tokens, vcfg.hidden_size, vcfg.intermediate_size), (fit_bs * tokens, vcfg.hidden_size, vcfg.intermediate_size)]
        squares = [(n, n, n) for n in ((1024, 2048, 4096) if device.type == "cpu" else (4096, 8192))]
        res["ceiling"] = {"float32": matmul_ceiling(clock, device, torch.float32, squares + model_shapes, args.repeats),
                          "bfloat16": matmul_ceiling(clock, device, torch.bfloat16, squares + model_shapes, args.repeats)}
        if device.type == "cuda":
            res["ceiling"]["float32"]["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)

    # 2. fit (also gives the detector every later step uses)
    det = LakeDetector(backbone=bb, precision=args.precision, **det_kwargs)
    mem: dict[str, Any] = {}
    if "fit" not in args.skip:
        say(f"fit on {args.shots} shots x {args.fit_repeats}...")
        pixels_b = bb.preprocessing(support[:fit_bs], bb.info.image_size)

        def forward_b():
            with backbone_precision(args.precision, bb):
                return bb.extract(pixels_b, [layer], semantic_layer)

        n_batches = math.ceil(args.shots / fit_bs)
        res["fit"] = fit_measure(clock, memory, mem, det, support, args.fit_repeats, forward_b, n_batches)
        res["fit"].update({"shots": args.shots, "batch_size": fit_bs, "forward_batches": n_batches})
        res["fit"]["text_embeddings_s"] = repeat(clock, lambda: bb.text_embeddings(["a photo of a normal object.", "a photo of an anomalous object."]), args.repeats)
    else:
        det.fit(support[: max(2, min(args.shots, 8))], "object")
    res["gallery"] = gallery_memory(det)

    # 3. the backbone forward and its FLOPs
    say("backbone forward...")
    px1 = bb.preprocessing([image], det.image_size_)
    flops = count_flops(det, px1, layer, semantic_layer)
    analytic = vit_flops(bb, det.image_size_, depth, 1, joint=True)
    fwd = repeat(clock, extract_fn(det, px1), args.repeats)
    res["backbone"] = {"flops": flops, "analytic_flops": analytic, "flops_counter_over_analytic": flops / analytic,
                       "batch_1": fwd, "gflops_per_s": flops / fwd["median"] / 1e9}
    if "ceiling" in res:
        ceil = res["ceiling"]["bfloat16" if args.precision == "bfloat16" else "float32"]["ceiling_gflops"]
        res["backbone"]["over_ceiling"] = fwd["median"] / (flops / (ceil * 1e9))
        res["backbone"]["ceiling_used"] = "bfloat16" if args.precision == "bfloat16" else "float32"

    # 4. predict, step by step, batch 1
    say("predict at batch 1, step by step...")
    det.runtime = det.runtime.replace(batch_size=1)
    with memory.measure(mem, "predict_batch_1"):
        res["predict"] = predict_breakdown(clock, det, image, args.repeats)
    with count_calls(bb, "text_embeddings") as calls:
        det.predict([image])
        res["predict"]["text_embedding_calls"] = calls["n"]

    # 5. images per second
    if "throughput" not in args.skip:
        res["throughput"] = {}
        for b in args.batch_sizes:
            say(f"throughput at batch {b}...")
            det.runtime = det.runtime.replace(batch_size=b)
            imgs = [image] * b
            n_runs = args.repeats if b == 1 else args.batch_repeats
            with memory.measure(mem, f"predict_batch_{b}"):
                t = repeat(clock, lambda: det.predict(imgs), n_runs)
            pxb = bb.preprocessing(imgs, det.image_size_)
            tf = repeat(clock, extract_fn(det, pxb), n_runs)
            res["throughput"][f"batch_{b}"] = {"predict_s": t, "images_per_s": b / t["median"], "ms_per_image": 1000 * t["median"] / b,
                                               "forward_s": tf, "forward_gflops_per_s": b * flops / tf["median"] / 1e9}
    det.runtime = det.runtime.replace(batch_size=fit_bs)
    res["memory"] = mem
    if device.type == "cpu":
        res["memory"]["rss_now_mib"] = (PeakMemory._rss_kib("VmRSS") or 0) / 1024

    # 6. faster paths
    if args.paths and "paths" not in args.skip:
        say("faster paths...")
        res["paths"] = paths_section(args, clock, bb, det_kwargs, depth, image, fit_bs)
    if args.accuracy_data is not None and "accuracy" not in args.skip:
        say("AUROC check of the paths on real data...")
        res["accuracy"] = accuracy_section(args, clock, device)

    res["loadavg_end"] = loadavg()
    res["ratios"] = ratios(res)
    return res


def ratios(res: dict[str, Any]) -> dict[str, Any]:
    """The targets' ratios from medians (``value``, what the targets are judged on) and, as a
    check on a shared machine, from the best run of each measurement (``best_runs``: the
    fastest run is the least disturbed by other processes)."""
    out: dict[str, Any] = {}

    def add(name: str, value: float | None, best: float | None = None) -> None:
        if value is not None:
            out[name] = {"value": value, "best_runs": best, "target": TARGETS[name], "met": bool(value <= TARGETS[name])}

    p = res["predict"]
    add("predict_over_forward", p["predict_over_forward"]["median"], p["predict"]["min"] / p["backbone"]["min"])
    b = res["backbone"]
    if "over_ceiling" in b:
        c = res["ceiling"][b["ceiling_used"]]
        best_ceiling = max(2.0 * math.prod(r["shape"]) / r["seconds"]["min"] for r in c["shapes"])
        add("backbone_over_ceiling", b["over_ceiling"], b["batch_1"]["min"] * best_ceiling / b["flops"])
    if "fit" in res:
        f = res["fit"]
        add("fit_over_forwards", f["fit_over_forwards"]["median"], f["fit"]["min"] / f["forwards"]["min"])
    add("gallery_fraction", res["gallery"]["fraction"], res["gallery"]["fraction"])
    return out


def report(res: dict[str, Any]) -> str:
    """The figures as text."""
    lines = []
    m = res["machine"]
    lines.append(f"machine: {m['cpu']} ({m['logical_cpus']} CPUs, {m['torch_threads']} torch threads), torch {m['torch']}, "
                 f"device {m['device']}{' ' + m['gpu'] if 'gpu' in m else ''}")
    lines.append(f"load average: start {res['loadavg_start']}, end {res['loadavg_end']}")
    md = res["model"]
    lines.append(f"model: random {md['preset']}, {md['image_size']} px, blocks {md['layer']}/{md['semantic_layer']}, precision {md['precision']}")
    if "ceiling" in res:
        for k, c in res["ceiling"].items():
            lines.append(f"matmul ceiling {k}: {c['ceiling_gflops']:.1f} GFLOP/s (best shape {c['best_shape']})")
    b = res["backbone"]
    lines.append(f"backbone forward, batch 1: {b['batch_1']['median'] * 1000:.1f} ms, {b['flops'] / 1e9:.1f} GFLOP "
                 f"(analytic {b['analytic_flops'] / 1e9:.1f}), {b['gflops_per_s']:.1f} GFLOP/s")
    p = res["predict"]
    steps = ", ".join(f"{k} {p[k]['median'] * 1000:.1f} ms" for k in STEPS)
    lines.append(f"predict batch 1: {p['predict']['median'] * 1000:.1f} ms end to end; {steps}")
    if "fit" in res:
        f = res["fit"]
        lines.append(f"fit {f['shots']} shots: {f['fit']['median']:.2f} s; {f['forward_batches']} forwards at batch {f['batch_size']}: "
                     f"{f['forwards']['median']:.2f} s; text embeddings {f['text_embeddings_s']['median'] * 1000:.1f} ms "
                     f"({f['text_embedding_calls_per_fit']} call per fit, {p['text_embedding_calls']} per predict)")
    for k, t in res.get("throughput", {}).items():
        lines.append(f"throughput {k}: {t['images_per_s']:.3f} images/s ({t['ms_per_image']:.1f} ms/image), "
                     f"forward {t['forward_gflops_per_s']:.1f} GFLOP/s")
    for k, v in res["memory"].items():
        if isinstance(v, dict):
            lines.append(f"peak memory {k}: {v['peak_mib']:.0f} MiB ({v['what']}; {v['before_mib']:.0f} MiB before)")
    g = res["gallery"]
    lines.append(f"gallery: {g['vectors']} x {g['k']} = {g['bytes'] / 2**20:.1f} MiB vs full width {g['full_width_bytes'] / 2**20:.1f} MiB")
    for name, row in res.get("paths", {}).items():
        if not isinstance(row, dict):
            continue
        sp = ", ".join(f"{k} x{v['speedup']['median']:.2f}" + (f" (first call {v['first_call_s']:.1f} s, break-even after "
                                                                  f"{v['break_even_images']:.0f} images)" if v.get("break_even_images") else "")
                       for k, v in row.items() if k.startswith("batch_"))
        s = row["scores"]
        lines.append(f"path {name}: forward speed-up {sp}; max |d score| {s['max_abs_score']:.2e} "
                     f"({s['max_abs_score_over_spread']:.1%} of the spread), max |d map| {s['max_abs_map']:.2e}, "
                     f"neurons shared {row['neurons_shared']:.0%}, decisions changed {s['decisions_changed']}")
    if "accuracy" in res:
        a = res["accuracy"]
        for name, row in a.items():
            if isinstance(row, dict) and "image" in row:
                extra = f", max |d score| {row['vs_float32']['max_abs_score']:.2e}" if "vs_float32" in row else ""
                lines.append(f"AUROC {a['category']} ({a['preset']}) {name}: {row['image']['auroc']:.4f} "
                             f"(visual only {row['image_visual_only']['auroc']:.4f}); fit {row['fit_s']:.1f} s, predict {row['predict_s']:.1f} s{extra}")
    lines.append("ratios (target):")
    for k, r in res["ratios"].items():
        lines.append(f"  {k}: {r['value']:.3f} (<= {r['target']}) {'met' if r['met'] else 'MISSED'}; from the best runs {r['best_runs']:.3f}")
    return "\n".join(lines)


def markdown(res: dict[str, Any]) -> str:
    """The figures as Markdown tables (for docs/PERFORMANCE.md)."""
    m, md = res["machine"], res["model"]
    ms = lambda v: f"{v * 1000:.1f}"  # noqa: E731
    out = [f"`{res['command']}`", "",
           f"Machine: {m['cpu']}, {m['logical_cpus']} CPUs ({', '.join(m['cpu_flags'])}), {m['torch_threads']} torch threads, "
           f"torch {m['torch']}, transformers {m['transformers']}, device {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}. "
           f"Load average (1, 5, 15 min) at start {res['loadavg_start']}, at end {res['loadavg_end']}; started {res['started']}.",
           f"Model: random-weight {md['preset']}, {md['image_size']} px ({md['grid'][0]}x{md['grid'][1]} tokens, width {md['width']}), "
           f"visual block {md['layer']}, text probe block {md['semantic_layer']}, k = {md['k']}, precision {md['precision']}; "
           f"test images {md['image_hw'][0]}x{md['image_hw'][1]}. Times are medians of the runs given.", ""]
    out += ["| ratio | measured (medians) | target | met | from the best runs |", "|---|---|---|---|---|"]
    for k, r in res["ratios"].items():
        out.append(f"| {k} | {r['value']:.3f} | <= {r['target']} | {'yes' if r['met'] else '**no**'} | {r['best_runs']:.3f} |")
    out += ["", "| figure | value |", "|---|---|"]
    for k, c in res.get("ceiling", {}).items():
        out.append(f"| matmul ceiling, {k} | {c['ceiling_gflops']:.1f} GFLOP/s (best of {len(c['shapes'])} shapes: {c['best_shape']}) |")
    b = res["backbone"]
    n = len(b["batch_1"]["runs"])
    out.append(f"| backbone forward, batch 1 ({n} runs) | {ms(b['batch_1']['median'])} ms, {b['flops'] / 1e9:.1f} GFLOP "
               f"(FlopCounterMode; analytic {b['analytic_flops'] / 1e9:.1f}), {b['gflops_per_s']:.1f} GFLOP/s |")
    p = res["predict"]
    n = len(p["predict"]["runs"])
    for k in STEPS:
        out.append(f"| predict batch 1, {k.replace('_', ' ')} ({n} runs) | {ms(p[k]['median'])} ms |")
    out.append(f"| predict batch 1, end to end ({n} runs) | {ms(p['predict']['median'])} ms "
               f"(sum of the steps {ms(p['sum_of_steps'])} ms; text tower calls: {p['text_embedding_calls']}) |")
    if "fit" in res:
        f = res["fit"]
        out.append(f"| fit, {f['shots']} shots ({len(f['fit']['runs'])} runs) | {f['fit']['median']:.2f} s; "
                   f"{f['forward_batches']} forwards at batch {f['batch_size']} right after: {f['forwards']['median']:.2f} s; "
                   f"text embeddings {ms(f['text_embeddings_s']['median'])} ms, {f['text_embedding_calls_per_fit']} call per fit |")
    for k, t in res.get("throughput", {}).items():
        out.append(f"| predict {k.replace('_', ' ')} ({len(t['predict_s']['runs'])} runs) | {t['images_per_s']:.3f} images/s "
                   f"({t['ms_per_image']:.1f} ms/image); its forward alone {t['forward_gflops_per_s']:.1f} GFLOP/s |")
    for k, v in res["memory"].items():
        if isinstance(v, dict):
            out.append(f"| peak memory, {k.replace('_', ' ')} | {v['peak_mib']:.0f} MiB ({v['what']}; {v['before_mib']:.0f} MiB before) |")
    g = res["gallery"]
    out.append(f"| gallery | {g['vectors']} x {g['k']} float32 + int32 image index = {g['bytes'] / 2**20:.2f} MiB; "
               f"full width ({g['width']}): {g['full_width_bytes'] / 2**20:.2f} MiB; {g['fraction']:.1%} |")
    if "paths" in res:
        ps = res["paths"]
        out += ["", f"Faster paths against float32 (forward speed-up: median of per-run ratios, float32 and the path timed back to back; "
                    f"scores: fit on {ps['check_shots']} synthetic shots, {ps['check_images']} synthetic test images, half with a defect):", "",
                "| path | speed-up batch 1 | speed-up batched | max abs diff score | of the score spread | max abs diff map | neurons shared | decisions changed | first fit (s) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for name, row in ps.items():
            if not isinstance(row, dict):
                continue
            bkeys = [k for k in row if k.startswith("batch_")]
            sp = [f"x{row[k]['speedup']['median']:.2f}" + (f" (compile {row[k]['first_call_s']:.0f} s, break-even {row[k]['break_even_images']:.0f} images)"
                                                           if row[k].get("break_even_images") else "") for k in bkeys]
            sc = row["scores"]
            out.append(f"| {name} | {sp[0]} | {sp[-1]} ({bkeys[-1].replace('_', ' ')}) | {sc['max_abs_score']:.2e} | {sc['max_abs_score_over_spread']:.1%} | "
                       f"{sc['max_abs_map']:.2e} | {row['neurons_shared']:.0%} | {sc['decisions_changed']} | {row['first_fit_s']:.1f} |")
    if "accuracy" in res:
        a = res["accuracy"]
        out += ["", f"Image AUROC on {a['data']} ({a['test_images']} test images, {a['defective']} defective; support: {a['support_rule']}), "
                    f"random-weight {a['preset']}, block {a['layer']}, k = {a['k']}:", "",
                "| path | image AUROC | AUROC visual only | max abs diff score vs float32 | fit (s) | predict (s) |", "|---|---|---|---|---|---|"]
        for name, row in a.items():
            if isinstance(row, dict) and "image" in row:
                d = f"{row['vs_float32']['max_abs_score']:.2e}" if "vs_float32" in row else "(reference)"
                out.append(f"| {name} | {row['image']['auroc']:.4f} | {row['image_visual_only']['auroc']:.4f} | {d} | {row['fit_s']:.1f} | {row['predict_s']:.1f} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        res["ratios"] = ratios(res)
    else:
        res = run(args)
    text = report(res)
    if args.json == "-":
        print(text, file=sys.stderr)
        print(json.dumps(res, indent=2))
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
