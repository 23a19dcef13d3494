"""Which LAKE variant ranks best on real images: docs/DECISIONS.md ("Ranking").

For each category of a dataset in the MVTec layout (default ../shared/data), fit LAKE on every
training image with the MobileNetV2 of ../shared/models (one tensor, top-k neurons, no text
probe) once per token distance (``distance="euclidean"``, the paper, and ``"cosine"``), score
the test split, and pool each image's token scores three ways: the max (Eq. 8), and the mean
of the top 2 % and top 5 % of its tokens (``visual_top_percent``, AnomalyDINO's image score,
:func:`lakead.patchops.top_percent_mean`; its 1 % is the max on a 14 x 14 grid). The support
images' leave-one-out token scores (what the fit keeps), pooled the same way as the fit pools
them with ``visual_top_percent``, give the split-conformal threshold at the defect decision's share
of a 0.05 budget (the scope check is left out: it does not depend on the variant). Reports
image AUROC, false alarms on the good test images and recall on the defective ones.

    python benchmarks/ranking.py [--data ../shared/data] [--layer 400 --k 32]

Prints a markdown table; every number comes from this run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import realdata  # noqa: E402

from lakead import LakeDetector  # noqa: E402
from lakead.data import load_dataset  # noqa: E402
from lakead.decision import conformal_threshold  # noqa: E402
from lakead.decision import SCOPE_SHARE  # noqa: E402
from lakead.metrics import image_metrics  # noqa: E402
from lakead.patchops import top_percent_mean  # noqa: E402

POOLS = {"max": None, "top 2 %": 2.0, "top 5 %": 5.0}
BUDGET = 0.05


def pool(tokens: np.ndarray, percent: float | None) -> np.ndarray:
    """``(B, N)`` token scores -> ``(B,)``: the max, or the mean of the top ``percent`` % (as ``visual_top_percent``).

    >>> pool(np.arange(200.0).reshape(1, 200), None).tolist(), pool(np.arange(200.0).reshape(1, 200), 2.0).tolist()
    ([199.0], [197.5])
    """
    t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32))
    return (t.amax(dim=1) if percent is None else top_percent_mean(t, percent)).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    realdata.add_options(ap)
    args = ap.parse_args(argv)
    t0 = time.time()
    print(f"# ranking: MobileNetV2 tensor {args.layer}, top-{args.k}, every training image as support, budget {BUDGET} "
          f"(conformal, {1 - SCOPE_SHARE:g} of it for the score; no scope check)\n")
    print("| category | distance | image score | image AUROC | false alarms | recall |")
    print("|---|---|---|---:|---:|---:|")
    for cat in load_dataset(args.data):
        paths = [s.path for s in cat.test]
        labels = np.array([s.label for s in cat.test])
        for distance in ("euclidean", "cosine"):
            det = LakeDetector(f"onnx:{args.model}", layer=args.layer, k=args.k, use_text=False, batch_size=16,
                               distance=distance, scope_check=False)
            det.fit(cat.train, cat.class_name)
            arrays = det.read_images(paths).arrays
            test = torch.cat([b.distances.cpu() for b in det.iter_scored(arrays, text=False)]).numpy()  # (B, N)
            n_tok = test.shape[1]
            loo = det.loo_tokens_.reshape(-1, n_tok)  # (n, N): each scored support image's token scores
            for name, share in POOLS.items():
                s, ref = pool(test, share), pool(loo, share)
                t = conformal_threshold(ref, BUDGET * (1 - SCOPE_SHARE))
                flag = s > t
                print(f"| {cat.name} | {distance} | {name} | {100 * image_metrics(labels, s)['auroc']:.1f} | "
                      f"{100 * flag[labels == 0].mean():.1f} % | {100 * flag[labels == 1].mean():.1f} % |", flush=True)
    print(f"\n{time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
