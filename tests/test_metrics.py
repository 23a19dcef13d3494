"""Metrics against analytic values, scikit-learn, brute force and an exact PRO reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import label
from sklearn.metrics import average_precision_score, roc_auc_score

from lakead.metrics import PixelMetrics, image_metrics, pixel_metrics, pro_from_curve

# -- references, written independently of lakead.metrics ------------------------------------


def brute_force_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """F1 at every threshold "score >= t" for every distinct score t; the largest."""
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = int(np.sum(pred & (labels == 1)))
        fp = int(np.sum(pred & (labels == 0)))
        fn = int(np.sum(~pred & (labels == 1)))
        if tp:
            best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def exact_pro(masks, maps, limit: float = 0.3) -> float:
    """PRO from every distinct score (the MVTec-AD evaluation's way: sort all pixels)."""
    scores, fp_step, pro_step, n_regions = [], [], [], 0
    for mask, amap in zip(masks, maps):
        regions, n = label(mask != 0, structure=np.ones((3, 3), dtype=int))
        n_regions += n
        sizes = np.bincount(regions.ravel())
        w = np.where(regions > 0, 1.0 / sizes[regions], 0.0)
        scores.append(amap.ravel().astype(np.float32))
        fp_step.append((regions == 0).ravel().astype(np.float64))
        pro_step.append(w.ravel())
    s, f, p = (np.concatenate(x) for x in (scores, fp_step, pro_step))
    order = np.argsort(-s, kind="stable")
    s, f, p = s[order], np.cumsum(f[order]) / f.sum(), np.cumsum(p[order]) / n_regions
    last = np.append(np.diff(s) != 0, True)  # one point per distinct score
    fpr, pro = np.concatenate([[0.0], f[last]]), np.concatenate([[0.0], p[last]])
    keep = fpr <= limit
    area = np.trapezoid(pro[keep], fpr[keep])
    if fpr[keep][-1] < limit:
        y_lim = np.interp(limit, fpr, pro)
        area += 0.5 * (pro[keep][-1] + y_lim) * (limit - fpr[keep][-1])
    return float(area / limit)


def random_maps(rng: np.random.Generator, n: int = 6, quantize: float | None = None):
    """Masks with a few blobs and maps that are higher inside them, noisy; sizes differ."""
    masks, maps = [], []
    for i in range(n):
        h, w = 24 + 4 * i, 30 - 2 * i
        mask = np.zeros((h, w), np.uint8)
        if i % 3 != 2:  # some images have no defect
            for _ in range(1 + i % 2):
                y, x, r = rng.integers(2, h - 6), rng.integers(2, w - 6), rng.integers(1, 4)
                mask[y : y + r, x : x + r + 1] = 255
        amap = rng.normal(0.0, 1.0, (h, w)) + 1.5 * (mask > 0)
        if quantize:
            amap = np.round(amap / quantize) * quantize  # many exact ties
        masks.append(mask)
        maps.append(amap.astype(np.float32))
    return masks, maps


# -- image level ----------------------------------------------------------------------------


def test_image_metrics_agree_with_sklearn_and_brute_force(rng):
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(0, 1, 200) + labels, 1)  # with ties
    m = image_metrics(labels, scores)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert m["f1_max"] == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-12)


def test_image_metrics_perfect_and_one_class():
    assert image_metrics([0, 0, 1], [0.1, 0.2, 0.9]) == {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0}
    only_normal = image_metrics([0, 0], [0.1, 0.2])
    assert all(np.isnan(v) for v in only_normal.values())
    only_defect = image_metrics([True, True], [0.1, 0.2])
    assert np.isnan(only_defect["auroc"]) and only_defect["ap"] == 1.0


@pytest.mark.parametrize(
    "labels, scores, problem",
    [([0, 1], [0.1], "2 labels but 1 scores"), ([0, 2], [0.1, 0.2], "0 (normal) or 1"), ([0, 1], [0.1, np.nan], "NaN")],
)
def test_image_metrics_bad_input(labels, scores, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        image_metrics(labels, scores)


# -- PRO: analytic values ---------------------------------------------------------------------


def test_map_equal_to_mask_is_perfect():
    mask = np.zeros((10, 12), np.uint8)
    mask[2:4, 2:5] = 255
    mask[7:9, 8:11] = 255
    m = pixel_metrics([mask, np.zeros((5, 5), np.uint8)], [mask.astype(np.float32), np.zeros((5, 5))])
    assert m == {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0, "pro": 1.0}


def test_constant_map_known_values():
    mask = np.zeros((8, 8), np.uint8)
    mask[:2, :4] = 1  # 8 of 64 pixels
    m = pixel_metrics([mask], [np.full((8, 8), 0.7)])
    prec = 8 / 64
    assert m["pro"] == pytest.approx(0.15, abs=1e-12)  # area 0.3**2 / 2 under the diagonal, / 0.3
    assert m["auroc"] == pytest.approx(0.5, abs=1e-12)
    assert m["ap"] == pytest.approx(prec, abs=1e-12)
    assert m["f1_max"] == pytest.approx(2 * prec / (prec + 1), abs=1e-12)
    acc = PixelMetrics()
    acc.update(mask, np.full((8, 8), 0.7))
    assert all(v == 0.0 for v in acc.error_bounds().values())  # exact ties: binning is exact


def two_region_toy():
    """Region A: 1 pixel (score 0.9). Region B: 3 pixels (0.8, 0.5, 0.2). 20 normal pixels:
    0.7, 0.6, 0.4, 0.4, and 16 at 0.0. A and B do not touch, even diagonally.

    Curve (FPR, per-region overlap) as the threshold falls:
    0.9 -> (0, 1/2); 0.8 -> (0, 2/3); 0.7 -> (0.05, 2/3); 0.6 -> (0.1, 2/3);
    0.5 -> (0.1, 5/6); 0.4 -> (0.2, 5/6); 0.2 -> (0.2, 1); 0.0 -> (1, 1).
    Area for FPR in [0, 0.3]: 0.1 * 2/3 + 0.1 * 5/6 + 0.1 * 1 = 0.25, so PRO = 0.25 / 0.3 = 5/6.
    (Weighting pixels instead of regions would give 0.05*.5+0.05*.5+0.1*.75+0.1 = 0.225 / 0.3 = 0.75.)
    """
    mask = np.zeros((4, 6), np.uint8)
    amap = np.zeros((4, 6), np.float32)
    mask[0, 0] = 1
    amap[0, 0] = 0.9
    mask[2:5, 3] = 1
    amap[2, 3], amap[3, 3] = 0.8, 0.5
    mask[3, 4] = 1
    amap[3, 4] = 0.2
    for (y, x), v in zip([(0, 5), (1, 5), (3, 0), (3, 1)], [0.7, 0.6, 0.4, 0.4]):
        amap[y, x] = v
    return mask, amap


def test_two_regions_of_different_size_hand_computed():
    mask, amap = two_region_toy()
    assert label(mask, structure=np.ones((3, 3)))[1] == 2 and mask.sum() == 4
    m = pixel_metrics([mask], [amap])
    assert m["pro"] == pytest.approx(5 / 6, abs=1e-12)
    assert m["pro"] == pytest.approx(exact_pro([mask], [amap]), abs=1e-12)
    # the same regions and normal scores split over two images of different sizes: same PRO
    mask1, map1 = np.zeros((2, 3), np.uint8), np.zeros((2, 3), np.float32)
    mask1[0, 0], map1[0, 0], map1[0, 2], map1[1, 2] = 1, 0.9, 0.7, 0.6  # A and 5 normal pixels
    mask2, map2 = np.zeros((3, 6), np.uint8), np.zeros((3, 6), np.float32)
    mask2[:, 4] = 1
    map2[:, 4] = (0.8, 0.5, 0.2)  # B and 15 normal pixels
    map2[0, 0], map2[2, 1] = 0.4, 0.4
    assert pixel_metrics([mask1, mask2], [map1, map2])["pro"] == pytest.approx(5 / 6, abs=1e-12)


def test_pro_from_curve_limits_and_does_not_rescale():
    # the curve reaches overlap 1 at FPR 0.1: area 0.1*0.5 (trapezoid) + 0.2*1 = 0.25 -> 0.8333
    assert pro_from_curve(np.array([0.0, 0.1, 1.0]), np.array([0.0, 1.0, 1.0])) == pytest.approx(0.25 / 0.3)
    # a point exactly at the limit
    assert pro_from_curve(np.array([0.0, 0.3, 1.0]), np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rise from 0"):
        pro_from_curve(np.array([0.1, 1.0]), np.array([0.0, 1.0]))


# -- binned pixel metrics against exact references --------------------------------------------


def exact_pixel_metrics(masks, maps):
    """Unbinned references: scikit-learn on every pixel, a brute-force F1 sweep, exact PRO."""
    y = np.concatenate([m.ravel() != 0 for m in masks]).astype(int)
    s = np.concatenate([a.ravel() for a in maps])
    return {
        "auroc": roc_auc_score(y, s),
        "ap": average_precision_score(y, s),
        "f1_max": brute_force_f1_max(y, s),
        "pro": exact_pro(masks, maps),
    }


@pytest.mark.parametrize("quantize", [None, 0.25])
def test_pixel_metrics_agree_with_exact_within_bound(rng, quantize):
    masks, maps = random_maps(rng, quantize=quantize)
    acc = PixelMetrics()
    for mask, amap in zip(masks, maps):
        acc.update(mask, amap)
    got, bound = acc.compute(), acc.error_bounds()
    exact = exact_pixel_metrics(masks, maps)
    for key in exact:
        assert bound[key] < 1e-3, key  # at the default resolution the bound is small...
        assert abs(got[key] - exact[key]) <= bound[key] + 1e-12, key  # ...and it holds
    assert got == pixel_metrics(masks, maps)  # the one-call function gives the same


def test_coarse_bins_error_stays_within_the_stated_bound(rng):
    """With very coarse bins (1 mantissa bit) binning visibly changes the metrics; the
    computed bound must still cover the difference."""
    masks, maps = random_maps(rng, n=9)
    maps = [np.abs(a) + 0.01 for a in maps]  # positive scores over a few binades
    acc = PixelMetrics(bits=10)
    for mask, amap in zip(masks, maps):
        acc.update(mask, amap)
    got, bound = acc.compute(), acc.error_bounds()
    exact = exact_pixel_metrics(masks, maps)
    assert any(abs(got[k] - exact[k]) > 1e-3 for k in exact)  # binning matters here
    for key in exact:
        assert abs(got[key] - exact[key]) <= bound[key] + 1e-12, key
    assert got["f1_max"] <= exact["f1_max"] + 1e-12  # bin thresholds are real thresholds


def test_negative_and_mixed_sign_scores_are_ordered(rng):
    masks, maps = random_maps(rng)
    shifted = [a - 1.0 for a in maps]  # about half of the scores negative
    assert pixel_metrics(masks, shifted) == pytest.approx(pixel_metrics(masks, maps), abs=1e-3)
    negated = pixel_metrics(masks, [-a for a in maps])
    assert negated["auroc"] == pytest.approx(1 - pixel_metrics(masks, maps)["auroc"], abs=1e-3)


def test_streaming_many_images_matches_one_batch(rng):
    """Images folded in over several buffer flushes give what one pass gives."""
    masks, maps = random_maps(rng, n=6)
    big_masks = masks * 60  # ~ 250k pixels: several thousand images' worth is the same path
    big_maps = maps * 60
    acc = PixelMetrics()
    for mask, amap in zip(big_masks, big_maps):
        acc.update(mask, amap)
    assert acc.images == 360 and acc.regions == 60 * sum(label(m, structure=np.ones((3, 3)))[1] for m in masks)
    # the same pixels repeated: every rate is unchanged
    assert acc.compute() == pytest.approx(pixel_metrics(masks, maps), abs=1e-12)


def test_no_defect_pixels_gives_nan():
    m = pixel_metrics([np.zeros((4, 4))], [np.ones((4, 4))])
    assert all(np.isnan(v) for v in m.values())


@pytest.mark.parametrize(
    "masks, maps, problem",
    [
        ([np.zeros((4, 4))], [np.zeros((4, 5))], "image 0: mask of size"),
        ([np.zeros((4, 4))], [np.full((4, 4), np.nan)], "NaN"),
        ([np.zeros((4, 4))] * 2, [np.zeros((4, 4))], "more masks than maps"),
        ([np.zeros(4)], [np.zeros(4)], "2-D"),
    ],
)
def test_pixel_metrics_bad_input(masks, maps, problem):
    with pytest.raises(ValueError, match=problem):
        pixel_metrics(masks, maps)
