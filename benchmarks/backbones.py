"""Forward time of every backbone family at full size (random weights) at its native input size
and above it (448 px, and 518 or 512 px: the largest multiple of the patch that peers use).

The models are built in memory from ``lakead.testing`` presets (nothing is downloaded: a
random model runs the same arithmetic as a trained one of its size). Each row times
``backbone.extract`` of one image through every block (and into the joint space for models
with a text tower), the best of ``--repeats`` runs after one warm-up run (the
least disturbed one on a shared machine)::

    python benchmarks/backbones.py                      # every family, markdown table on stdout
    python benchmarks/backbones.py --only dinov2-base --repeats 5

The figures in docs/BACKBONES.md come from this command.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from lakead.backbones.base import Preprocessing
from lakead.backbones.clip import CLIPBackbone
from lakead.backbones.dinov2 import DINOv2Backbone, DINOv3Backbone
from lakead.backbones.hf import image_size_from_config
from lakead.backbones.siglip import SigLIP2Backbone, SigLIPBackbone
from lakead.testing import random_backbone_parts, random_clip

#: preset -> (adapter, family shown)
ROWS = {
    "vit-b-16": (CLIPBackbone, "CLIP ViT-B/16"),
    "vit-l-14-336": (CLIPBackbone, "CLIP ViT-L/14-336 (the paper's)"),
    "dinov2-small": (DINOv2Backbone, "DINOv2 ViT-S/14"),
    "dinov2-base": (DINOv2Backbone, "DINOv2 ViT-B/14"),
    "dinov2-large": (DINOv2Backbone, "DINOv2 ViT-L/14"),
    "dinov3-vitb16": (DINOv3Backbone, "DINOv3 ViT-B/16"),
    "siglip-base-patch16-224": (SigLIPBackbone, "SigLIP ViT-B/16"),
    "siglip2-base-patch16-naflex": (SigLIP2Backbone, "SigLIP 2 ViT-B/16 NaFlex"),
}


def build(preset: str):
    cls = ROWS[preset][0]
    prep = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample=3)
    if cls is CLIPBackbone:
        model, _, size = random_clip(preset)
        model.text_model = None  # the prompts are embedded once per fit; not timed
        return CLIPBackbone(model, prep, source=preset, image_size=size)
    model, processor, _ = random_backbone_parts(preset)
    text = getattr(model, "text_model", None) is not None
    if text:
        model.text_model = None
    _, native = image_size_from_config(processor, preset, _patch(model))
    bb = cls(model, prep, source=preset, image_size=native)
    bb.has_text = text  # the joint mapping of the tokens is timed; the prompts are not
    return bb


def _patch(model) -> int:
    cfg = getattr(model.config, "vision_config", model.config)
    return int(cfg.patch_size)


def sizes(bb) -> list[int]:
    p, native = bb.info.patch_size, bb.info.image_size
    big = 518 if p == 14 else 512
    return sorted({native, 448 // p * p, big})


def time_one(bb, size: int, repeats: int) -> float:
    x = torch.randn(1, 3, size, size)
    joint = bb.num_layers if bb.info.joint_dim else None
    bb.extract(x, [bb.num_layers], joint)  # warm-up
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        bb.extract(x, [bb.num_layers], joint)
        runs.append(time.perf_counter() - t)
    return min(runs)  # the least disturbed run: the machine is shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(ROWS), help="presets to time (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"<!-- {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"best of {args.repeats} after a warm-up, batch 1, float32, load average {os.getloadavg()[0]:.1f} at start -->")
    print("| model | blocks | width | default block | default k | text probe | input px | tokens | forward s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in args.only or ROWS:
        bb = build(preset)
        for size in sizes(bb):
            s = time_one(bb, size, args.repeats)
            g = size // bb.info.patch_size
            print(f"| {ROWS[preset][1]} | {bb.num_layers} | {bb.width} | {bb.default_layer()} | {bb.default_k()} | "
                  f"{'yes' if bb.info.joint_dim else 'no'} | {size}{' (native)' if size == bb.info.image_size else ''} | "
                  f"{g}x{g} | {s:.2f} |", flush=True)
        del bb


if __name__ == "__main__":
    main()
