"""One figure per category (matplotlib, imported only when a figure is drawn)."""

from __future__ import annotations

import io

from .results import CategoryResult, format_percent


def category_figure(r: CategoryResult) -> bytes:
    """ROC curves (image and pixel) and a few example maps next to their masks, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from sklearn.metrics import roc_curve

    from ..viz import overlay

    n = len(r.examples)
    fig = plt.figure(figsize=(3.6 + 2.3 * max(n, 1), 4.8), dpi=100)
    grid = fig.add_gridspec(2, 1 + max(n, 1), width_ratios=[1.6] + [1] * max(n, 1))
    ax = fig.add_subplot(grid[:, 0])
    if 0 < r.labels.sum() < r.labels.size:
        fpr, tpr, _ = roc_curve(r.labels, r.scores)
        ax.plot(fpr, tpr, label=f"image ({format_percent(r.image['auroc'])})")
    if r.pixel_roc is not None:
        ax.plot(*r.pixel_roc, label=f"pixel ({format_percent(r.pixel['auroc'])})")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{r.name}: ROC (AUROC %)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    vmin, vmax = r.map_range
    for i, ex in enumerate(r.examples):
        top, bottom = fig.add_subplot(grid[0, 1 + i]), fig.add_subplot(grid[1, 1 + i])
        top.imshow(ex.image)
        if ex.mask.any():
            top.contour(ex.mask, levels=[0.5], colors="lime", linewidths=0.8)
        top.set_title(f"{ex.defect}\n{ex.name}", fontsize=8)
        bottom.imshow(overlay(ex.image, ex.amap, vmin, vmax))
        if ex.mask.any():
            bottom.contour(ex.mask, levels=[0.5], colors="white", linewidths=0.6)
        bottom.set_title(f"score {ex.score:.3g}", fontsize=8)
        for a in (top, bottom):
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
