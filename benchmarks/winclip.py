"""WinCLIP, WinCLIP+ and WinCLIP+LAKE end to end on ../shared/data with a random-weight CLIP.

There are no trained CLIP weights on this machine, so the accuracy columns are those of a
random network: they show that every method runs end to end through the evaluation
harness (fit, predict, maps at image size, metrics, decisions), NOT how good WinCLIP or the
plug-in is. The paper's Table IV figures (MVTec-AD pixel AUROC 82.3 -> 95.7) need the trained
ViT-B/16+ or ViT-L/14 weights; rerun this script with ``--backbone DIR`` where they exist.

The time columns are real: fit seconds per support image (the prompt ensemble's text
embeddings are timed apart, once per class: the zero-shot fit from the class name alone, which
the other fits then reuse) and predict seconds per test image, measured side by side in one run
on a shared CPU (noisy: compare ratios within one run, not across runs). The random CLIP's
tokenizer is character-level (about 60 tokens a prompt where CLIP's BPE gives about 15), so the
text time here overstates a real CLIP's::

    python benchmarks/winclip.py --preset tiny --shots 4 --max-test 24              # every category, tiny random CLIP
    python benchmarks/winclip.py --categories mpdd/metal_plate --shots 2 --max-test 6 --window-start-block 0,9
                                                                                    # ViT-B/16 size (random), one category
    python benchmarks/winclip.py --backbone ./clip-vit-b-16         # trained weights, where they exist

The two tables in docs/BENCHMARKS.md ("WinCLIP family") come from the first two commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from lakead.api import Runtime
from lakead.backbones import CLIPBackbone
from lakead.data import load_dataset
from lakead.evaluate import evaluate_category, format_percent
from lakead.methods import get_method
from lakead.testing import save_random_clip
from lakead.methods.winclip import WinCLIPConfig, WinCLIPDetector

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def spread(items, n):
    """``n`` items evenly spaced over a list (all when it has no more)."""
    if n >= len(items):
        return tuple(items)
    step = len(items) / n
    return tuple(items[int(i * step)] for i in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--categories", default=None, help="comma-separated category names (default: all)")
    ap.add_argument("--backbone", default=None, help="a CLIP directory (default: a random lakead.testing preset)")
    ap.add_argument("--preset", default="vit-b-16", help="random CLIP preset when no --backbone is given")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--max-test", type=int, default=12, help="test images per category, evenly spaced over the sorted list")
    ap.add_argument("--methods", default="winclip,winclip+,winclip+lake")
    ap.add_argument("--window-start-block", default="0", help="comma-separated alternatives")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        source = args.backbone or str(save_random_clip(Path(tmp) / args.preset, args.preset, seed=0))
        bb = CLIPBackbone.from_pretrained(source)
        cats = [dataclasses.replace(c, test=spread(sorted(c.test, key=lambda s: str(s.path)), args.max_test))
                for c in load_dataset(args.data, args.categories.split(",") if args.categories else None)]
        rt = Runtime(device="cpu", batch_size=args.batch_size)
        print(f"# WinCLIP family, {'random-weight ' + args.preset if not args.backbone else args.backbone}: "
              f"{bb.info.image_size} px, patch {bb.info.patch_size}, {args.shots} shots, "
              f"{args.max_test} test images per category; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs (shared), torch {torch.__version__}, {torch.get_num_threads()} threads\n")
        for cat in cats:  # the zero-shot fit is the prompt ensemble's embedding; the other fits reuse it
            t0 = time.perf_counter()
            WinCLIPDetector(bb).fit([], cat.class_name)
            print(f"- {cat.name}: zero-shot fit from the class name alone (242 prompts embedded, no image): "
                  f"{time.perf_counter() - t0:.1f} s")
        print()
        print("| category | method | window start block | I-AUROC | P-AUROC | PRO | threshold rule | fit s / shot | predict s / image |")
        print("|---|---|---|---|---|---|---|---|---|")
        for cat in cats:
            for name in args.methods.split(","):
                for wsb in (int(v) for v in args.window_start_block.split(",")):
                    cfg = WinCLIPConfig(backbone=source, window_start_block=wsb)
                    res = evaluate_category(cat, cfg, bb, runtime=rt, method=get_method(name), shots=args.shots, seed=0)
                    m = res.metrics()
                    print(f"| {cat.name} | {name} | {wsb} | {format_percent(m['image_auroc'])} | "
                          f"{format_percent(m['pixel_auroc'])} | {format_percent(m['pixel_pro'])} | "
                          f"{res.decision.get('rule', '?')} | {res.fit_seconds / args.shots:.2f} | "
                          f"{res.predict_seconds_per_image:.2f} |", flush=True)


if __name__ == "__main__":
    main()
