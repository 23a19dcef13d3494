#!/usr/bin/env python
"""Which default k (LAKE's sensitive neurons) on a block of a given width: the paper's share
alone (``round(100 * width / 1024)``: 6 of 64 channels) against the rule lakead uses
(:func:`lakead.fields.default_k`: that share, at least 100, every channel of a narrower block),
measured on every category of ``--data`` at several shot counts, several draws each.

    python benchmarks/defaults.py [--shots 1,4,16,all] [--draws 3] [--layers 400,426,591]

Per tensor, shot count and category: LAKE's visual image score (the largest over the tokens of
the Euclidean distance to the nearest support token in the top-k variance channels, Eq. 7-8;
the leave-one-out normalisation divides every score of a model by one number, so it does not
change the AUROC) with each rule's k, image AUROC on every test image, the mean over the draws.
Features are extracted once per category (``benchmarks/featcache.py``). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import featcache  # noqa: E402
import realdata  # noqa: E402

from lakead.backbones import load_backbone  # noqa: E402
from lakead.data import load_dataset  # noqa: E402
from lakead.fields import PAPER_K, PAPER_WIDTH, default_k  # noqa: E402
from lakead.metrics import image_metrics  # noqa: E402
from lakead.ops import channel_variance, nearest_neighbor, top_k_channels  # noqa: E402


def share_k(width: int) -> int:
    """The rule before: the paper's share of the channels alone."""
    return max(1, round(PAPER_K * width / PAPER_WIDTH))


def lake_scores(support: torch.Tensor, test: torch.Tensor, k: int) -> np.ndarray:
    """LAKE's visual image scores: support ``(n, N, D)``, test ``(T, N, D)`` -> ``(T,)``."""
    n, n_tok, width = support.shape
    flat = support.reshape(n * n_tok, width)
    neurons = top_k_channels(channel_variance(flat), k)
    gallery = flat[:, neurons].contiguous()
    t = test.shape[0]
    d, _ = nearest_neighbor(test[..., neurons].reshape(t * n_tok, -1), gallery)
    return d.reshape(t, n_tok).max(dim=1).values.numpy()


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(image_metrics(labels, scores)["auroc"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    realdata.add_options(ap)
    ap.add_argument("--layers", default="400,426,591")
    ap.add_argument("--shots", default="1,4,16,all")
    ap.add_argument("--draws", type=int, default=3, help="draws of the shots (seeds 0..draws-1) below all")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    bb = load_backbone(f"onnx:{a.model}")
    blocks = [bb.resolve_layer(x) for x in a.layers.split(",")]
    shots = [None if s == "all" else int(s) for s in a.shots.split(",")]
    cats = load_dataset(a.data)
    rows = []  # (block, width, shots, rule, k, {cat: auroc})
    for cat in cats:
        cf = featcache.category_features(cat, bb, blocks)
        for b in blocks:
            width = cf.train[b].shape[-1]
            rules = {"share (before)": share_k(width), "default_k (now)": default_k(width), "all channels": width}
            for s in shots:
                for rule, k in rules.items():
                    vals = [auroc(cf.labels, lake_scores(cf.train[b][idx], cf.test[b], k))
                            for _, idx in featcache.draws(len(cf.train_paths), s, list(range(a.draws)))]
                    rows.append((b, width, "all" if s is None else s, rule, k, cat.name, float(np.mean(vals))))
    print(f"Image AUROC (%), LAKE visual score, MobileNetV2 int8 ({a.model}); {a.draws} draws below all shots "
          f"(seeds 0..{a.draws - 1}, as lakead.data.select_shots), one with all; load average "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}; {time.time() - t0:.0f} s.\n")
    names = [c.name for c in cats]
    print("| tensor (width) | shots | rule | k | mean | " + " | ".join(names) + " |")
    print("|---|---|---|---:|---:|" + "---:|" * len(names))
    keys = list(dict.fromkeys((r[0], r[1], r[2], r[3], r[4]) for r in rows))
    for key in keys:
        per = {r[5]: r[6] for r in rows if r[:5] == key}
        print(f"| {key[0]} ({key[1]}) | {key[2]} | {key[3]} | {key[4]} | {100 * np.mean(list(per.values())):.1f} | "
              + " | ".join(f"{100 * per[n]:.1f}" for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
