"""Are a category's good test images like its training images? docs/DECISIONS.md ("Normal test
images are not always like the normal training images").

A threshold derived from the training images' leave-one-out scores holds its false-alarm budget
on new normal images only as far as they are like the training images. For each category of a
dataset in the MVTec layout (default ../shared/data), fit LAKE with the MobileNetV2 of
../shared/models (tensor 400, top 32, no text probe, the scope check on) on every training image,
then compare the good test images with the training images in two ways:

- the scope distance (the median over an image's tokens of the distance to the nearest support
  token, every channel): each training image's leave-one-out value against each good test
  image's, both as robust z-scores on the training images' values (median, 1.4826 x MAD);
- the pooled feature (the mean of an image's tokens, every channel): each training image's
  distance to the nearest other training image against each good test image's distance to the
  nearest training image (medians).

    python benchmarks/shift.py [--data ../shared/data] [--layer 400 --k 32]

Prints a markdown table; every number comes from this run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import realdata  # noqa: E402
from lakead import LakeDetector  # noqa: E402
from lakead.data import load_dataset  # noqa: E402


def pooled(det: LakeDetector, paths: list) -> torch.Tensor:
    """Each image's mean token, every channel of the visual block, ``(n, D)`` float64."""
    arrays = det.read_images(paths).arrays
    return torch.cat([b.tokens.mean(dim=1) for b in det.iter_scored(arrays, text=False)]).double()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    realdata.add_options(ap)
    args = ap.parse_args(argv)
    print(f"# shift: MobileNetV2 tensor {args.layer}, top-{args.k}, every training image as support\n")
    print("| category | training images: highest scope z (leave-one-out) | good test images: highest scope z "
          "| good test images above every training image | pooled: training -> nearest other training "
          "| pooled: good test -> nearest training |")
    print("|---|---:|---:|---:|---:|---:|")
    for cat in load_dataset(args.data):
        det = LakeDetector(f"onnx:{args.model}", layer=args.layer, k=args.k, use_text=False, batch_size=16)
        det.fit(cat.train, cat.class_name)
        good = [s.path for s in cat.test if s.label == 0]
        loo = det.loo_scope_[np.isfinite(det.loo_scope_)]
        mid, spread = np.median(loo), 1.4826 * np.median(np.abs(loo - np.median(loo)))
        test = det.predict(good).scope.astype(np.float64)
        z_loo, z_test = (loo - mid) / spread, (test - mid) / spread
        train_f, test_f = pooled(det, list(cat.train)), pooled(det, good)
        between = torch.cdist(train_f, train_f)
        between.fill_diagonal_(float("inf"))
        print(f"| {cat.name} | {z_loo.max():.1f} | {z_test.max():.1f} | {int((test > loo.max()).sum())} of {len(test)} "
              f"| {between.min(dim=1).values.median():.3f} | {torch.cdist(test_f, train_f).min(dim=1).values.median():.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
