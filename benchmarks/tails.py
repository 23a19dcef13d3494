"""Which tail should ``threshold_rule="auto"`` extrapolate below 1/(n+1)? docs/DECISIONS.md.

Where the false-alarm budget is below ``1 / (n + 1)`` for ``n`` support images (a budget of 0.05
with fewer than 19 images, 0.01 with fewer than 99, and the scope check's tenth of the budget),
no order statistic of the leave-one-out scores is high enough and a fitted tail must
extrapolate. This measures the tails on the training images alone, without the test split:
for each category of a dataset in the MVTec layout (default ../shared/data), fit LAKE with the
MobileNetV2 of ../shared/models (tensor 400, top 32, no text probe, the scope check on) on
every training image; then, over random splits of its leave-one-out scores (the image scores,
and the scope distances), derive a level from ``n_fit`` of them and count the share of the
others above it. A rule that honours its budget gives a share near the budget.

Rules: ``gaussian`` (median + z x 1.4826 x MAD), ``gaussian, floored`` (never under the largest
score: lakead's ``auto`` below 1/(n+1) before the exponential tail), ``plug-in exponential,
floored`` (the exponential tail above the median with its scale taken as known: ``u + mean(e) x
ln(p_u / alpha)``; ``auto`` at commit ead45b5), ``exponential`` and ``exponential, floored``
(``lakead.decision.exponential_threshold``, the prediction bound that accounts for the scale's
uncertainty; floored: ``auto`` now), ``largest`` (the largest score alone: the conformal level at
1/(n+1), whose share is about 1/(n_fit + 1)).

The leave-one-out scores were each computed against all the other training images, not
against the ``n_fit`` of a split: the splits test how well each tail extrapolates the
distribution of these scores, not a refit on fewer images.

    python benchmarks/tails.py [--data ../shared/data] [--layer 400 --k 32] [--splits 2000]

Prints a markdown table; every number comes from this run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import realdata  # noqa: E402
from lakead import LakeDetector  # noqa: E402
from lakead.data import load_dataset  # noqa: E402
from lakead.decision import exponential_threshold, gaussian_threshold  # noqa: E402

def plug_in_exponential(s: np.ndarray, alpha: float) -> float:
    """``u + mean(e) * ln(p_u / alpha)``: the exponential tail's quantile with the fitted scale taken as known."""
    u = float(np.median(s))
    e = s[s > u] - u
    p_u = e.size / s.size
    return float(np.quantile(s, 1 - alpha)) if alpha >= p_u else u + float(e.mean()) * np.log(p_u / alpha)


RULES = {
    "gaussian": gaussian_threshold,
    "gaussian, floored": lambda s, a: max(gaussian_threshold(s, a), float(s.max())),
    "plug-in exponential, floored": lambda s, a: max(plug_in_exponential(s, a), float(s.max())),
    "exponential": exponential_threshold,
    "exponential, floored": lambda s, a: max(exponential_threshold(s, a), float(s.max())),
    "largest": lambda s, a: float(s.max()),
}


def exceedance(scores: np.ndarray, n_fit: int, alpha: float, splits: int, rng: np.random.Generator) -> dict[str, float]:
    """Mean share of the held-out scores above each rule's level from ``n_fit`` of them."""
    hits: dict[str, list[float]] = {name: [] for name in RULES}
    for _ in range(splits):
        order = rng.permutation(scores.size)
        fit, held = scores[order[:n_fit]], scores[order[n_fit:]]
        for name, rule in RULES.items():
            hits[name].append(float(np.mean(held > rule(fit, alpha))))
    return {name: float(np.mean(v)) for name, v in hits.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    realdata.add_options(ap)
    ap.add_argument("--n-fit", default="5,10,20", help="scores each level is derived from (comma-separated)")
    ap.add_argument("--budgets", default="0.01,0.02,0.04,0.05,0.1", help="budgets (comma-separated; those below 1/(n_fit+1) are used)")
    ap.add_argument("--splits", type=int, default=2000)
    args = ap.parse_args(argv)
    n_fits = [int(v) for v in args.n_fit.split(",")]
    budgets = [float(v) for v in args.budgets.split(",")]
    rng = np.random.default_rng(0)
    gaps: dict[str, list[float]] = {name: [] for name in RULES}
    print(f"# tails: MobileNetV2 tensor {args.layer}, top-{args.k}, leave-one-out scores of every training image, "
          f"{args.splits} random splits\n")
    print("Share of held-out normal scores above the level derived from n_fit others (the budget is what it should be):\n")
    print("| category | scores | n_fit | budget | " + " | ".join(RULES) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(RULES))
    for cat in load_dataset(args.data):
        det = LakeDetector(f"onnx:{args.model}", layer=args.layer, k=args.k, use_text=False, batch_size=16)
        det.fit(cat.train, cat.class_name)
        for what, raw in (("image", det.loo_scores_), ("scope", det.loo_scope_)):
            scores = np.asarray(raw, np.float64)
            scores = scores[np.isfinite(scores)]
            for n_fit in n_fits:
                for alpha in budgets:
                    if alpha >= 1.0 / (n_fit + 1) or n_fit >= scores.size:
                        continue
                    share = exceedance(scores, n_fit, alpha, args.splits, rng)
                    for name in RULES:
                        gaps[name].append(abs(share[name] - alpha))
                    print(f"| {cat.name} | {what} | {n_fit} | {alpha:g} | "
                          + " | ".join(f"{100 * share[name]:.1f} %" for name in RULES) + " |")
    print("| **mean distance to the budget** | | | | " + " | ".join(f"**{100 * np.mean(v):.1f}**" for v in gaps.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
