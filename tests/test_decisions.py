"""Decisions from normal images alone: the threshold rules, defect regions, the scope check,
and the command line's --masks and --false-alarm-rate."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from typer.testing import CliRunner

from conftest import texture, with_defect
from lakead import LakeDetector
from lakead.cli import app
from lakead.decision import budget_threshold, conformal_threshold, exponential_threshold, find_regions, gaussian_threshold

OPTS = dict(k=8, layer=2, image_size=64, batch_size=8)


def test_conformal_threshold_is_the_order_statistic():
    s = np.arange(1.0, 20.0)  # n = 19: 1/(n+1) = 0.05
    assert conformal_threshold(s, 0.05) == 19.0  # ceil(20 * 0.95) = 19th smallest
    assert conformal_threshold(s, 0.1) == 18.0  # ceil(20 * 0.9) = 18
    assert conformal_threshold(s, 0.5) == 10.0
    assert math.isinf(conformal_threshold(s, 0.04))


def test_conformal_false_alarms_stay_within_the_budget():
    """Over many draws, a new normal score exceeds the threshold of n earlier ones at most alpha of the time."""
    rng = np.random.default_rng(0)
    for alpha in (0.05, 0.2):
        hits = [rng.gamma(2.0) > conformal_threshold(rng.gamma(2.0, size=39), alpha) for _ in range(4000)]
        assert np.mean(hits) <= alpha + 0.01


def test_gaussian_tail_matches_scipy_on_normal_data():
    x = np.random.default_rng(1).normal(3.0, 2.0, 1_000_000)
    for alpha in (0.01, 0.001):
        assert gaussian_threshold(x, alpha) == pytest.approx(stats.norm.ppf(1 - alpha, 3.0, 2.0), rel=3e-3)


def test_exponential_tail_by_hand_and_against_scipy():
    # median 3, excesses (1, 3): S = 4, k = 2, 2 of 5 above: 3 + 4 ((0.05 / 0.4) ** -0.5 - 1)
    assert exponential_threshold([1.0, 2.0, 3.0, 4.0, 6.0], 0.05) == pytest.approx(3.0 + 4.0 * (8.0 ** 0.5 - 1.0))
    assert exponential_threshold([1.0, 2.0, 3.0, 4.0, 6.0], 0.5) == np.quantile([1, 2, 3, 4, 6], 0.5)  # no tail: the quantile
    rng = np.random.default_rng(2)
    x = rng.exponential(2.0, 1_000_000) + 1.0
    for alpha in (0.01, 0.001):  # many exponential scores: the true quantile
        assert exponential_threshold(x, alpha) == pytest.approx(stats.expon.ppf(1 - alpha, 1.0, 2.0), rel=3e-3)
    y = rng.gamma(3.0, size=30)  # few: u + the excesses' mean x the F(2, 2k) quantile, as scipy computes it
    u = np.median(y)
    e = y[y > u] - u
    beta = 0.002 / (e.size / y.size)
    assert exponential_threshold(y, 0.002) == pytest.approx(u + e.mean() * stats.f.ppf(1 - beta, 2, 2 * e.size), rel=1e-9)
    assert exponential_threshold(y, 0.002) > u + e.mean() * math.log(1 / beta)  # above the plug-in quantile


def test_exponential_tail_false_alarms_near_the_budget_below_one_over_n():
    """Exponential-tailed scores, 9 of them, budgets 0.02 and 0.05 < 1/10: auto's exponential tail keeps
    a new normal score's exceedance near the budget (within 1.5 points over 4,000 draws), where the
    largest score alone gives 1/10."""
    rng = np.random.default_rng(3)
    for alpha in (0.02, 0.05):
        hits = [rng.exponential() > budget_threshold(rng.exponential(size=9), alpha)[0] for _ in range(4000)]
        assert abs(np.mean(hits) - alpha) <= 0.015
    assert np.mean([rng.exponential() > rng.exponential(size=9).max() for _ in range(4000)]) > 0.08


def test_auto_takes_conformal_when_defined_and_says_which():
    assert budget_threshold(np.arange(40.0), 0.05) == (38.0, "conformal")
    t, rule = budget_threshold(np.arange(10.0), 0.05)
    assert rule == "exponential" and t == pytest.approx(max(9.0, exponential_threshold(np.arange(10.0), 0.05)))
    s = np.r_[np.zeros(7), 1.0, 1.0, 50.0]  # a tail below the largest score: floored there
    assert budget_threshold(s, 0.05) == (50.0, "exponential") and exponential_threshold(s, 0.05) < 50.0
    assert budget_threshold(s, 0.05, "gaussian") == (gaussian_threshold(s, 0.05), "gaussian")  # no floor when asked for
    assert budget_threshold(np.arange(10.0), 0.05, "sigmas", 3.0)[1] == "sigmas"
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        budget_threshold(np.arange(10.0), 1.5)


def test_regions_geometry_and_seed():
    m = np.zeros((20, 30), np.float32)
    m[2:6, 3:9] = 1.0  # reaches the seed
    m[10:12, 20:25] = 0.6  # above the pixel level only: no region
    m[15, 0] = 2.0  # one pixel
    mask, regions = find_regions(m, 0.5, seed=0.9)
    assert [(r.top, r.left, r.bottom, r.right, r.area) for r in regions] == [(15, 0, 16, 1, 1), (2, 3, 6, 9, 24)]
    assert int(mask.sum()) == 25 and not mask[10:12, 20:25].any()
    assert regions[1].peak == 1.0 and regions[1].mean == pytest.approx(1.0)


@pytest.fixture(scope="module")
def fitted(tiny_backbone):
    rng = np.random.default_rng(20)
    return LakeDetector(tiny_backbone, **OPTS).fit([texture(rng) for _ in range(24)], "tile")


def test_budget_at_predict_is_derived_from_the_saved_scores(fitted, tmp_path):
    assert fitted.threshold_rule_ == "conformal" and fitted.false_alarm_rate_ == 0.05  # 24 images: 0.045 >= 1/25
    strict, loose = fitted.thresholds(0.01), fitted.thresholds(0.3)
    assert strict.image > fitted.threshold_ > loose.image and loose.pixel <= loose.seed
    want = budget_threshold(fitted.loo_scores_, 0.3 * 0.9)[0]  # the scope check takes 10 % of the budget
    assert loose.image == pytest.approx(want)
    rng = np.random.default_rng(21)
    imgs = [texture(rng), with_defect(texture(rng), 20, 20, 16)]
    assert fitted.predict(imgs, false_alarm_rate=0.3).threshold == loose.image
    loaded = LakeDetector.load(fitted.save(tmp_path / "m"))
    assert loaded.thresholds(0.3) == loose and loaded.thresholds() == fitted.thresholds()


def test_a_defect_has_a_region_and_another_product_is_out_of_scope(fitted):
    """A local defect leaves most tokens normal (median token score low): a region, in scope.
    An image unlike the support images all over is out of scope, and shows where too."""
    rng = np.random.default_rng(22)
    other = with_defect(texture(rng), 0, 0, 64)  # nothing of the texture left: another product
    pred = fitted.predict([with_defect(texture(rng), 20, 20, 20), other])
    mask, regions = pred.regions(0)
    assert pred.anomalous[0] and regions and mask[20:40, 20:40].mean() > 0.3
    assert pred.out_of_scope[1] and pred.anomalous[1] and not pred.out_of_scope[0]
    assert pred.regions(1)[1]  # not this product: anomalous, so it shows where (at least around its peak)


def test_regions_follow_the_decision():
    """Called normal: no region, even above the seed. Called anomalous by anything (here the scope
    check, the map below the seed): at least the area around the peak above the pixel level; a peak
    below the pixel level: the area above half-way between the map's median and its peak."""
    from lakead.api import Prediction

    m = np.zeros((10, 12), np.float32)
    m[2:5, 3:6] = 0.8  # above the pixel level 0.5, below the seed 1.0
    m[3, 4] = 0.9
    m[8, 10] = 0.6  # another area above the pixel level, away from the peak
    low = np.zeros((10, 12), np.float32)
    low[6:8, 1:3] = 0.3  # the whole map under the pixel level
    high = m.copy()
    high[3, 4] = 2.0  # reaches the seed
    n = 4
    pred = Prediction(scores=np.zeros(n, np.float32), visual=np.zeros(n, np.float32), semantic=np.zeros(n, np.float32),
                      anomalous=np.array([False, True, True, True]), maps=(high, m, low, np.zeros((10, 12), np.float32)),
                      threshold=1.0, out_of_scope=np.array([False, True, True, True]), pixel_threshold=0.5, seed_threshold=1.0)
    assert pred.regions(0)[1] == [] and not pred.regions(0)[0].any()  # normal: none, whatever its map
    mask, regions = pred.regions(1)
    assert [(r.top, r.left, r.bottom, r.right, r.area) for r in regions] == [(2, 3, 5, 6, 9)] and int(mask.sum()) == 9
    assert regions[0].peak == pytest.approx(0.9)
    mask, regions = pred.regions(2)  # level (median 0 + peak 0.3) / 2
    assert [(r.top, r.left, r.bottom, r.right) for r in regions] == [(6, 1, 8, 3)]
    assert pred.regions(3)[1] == []  # a flat map has no peak to show
    flagged = Prediction(scores=np.zeros(1, np.float32), visual=np.zeros(1, np.float32), semantic=np.zeros(1, np.float32),
                         anomalous=np.array([True]), maps=(high,), threshold=1.0, pixel_threshold=0.5, seed_threshold=1.0)
    assert [(r.top, r.left, r.bottom, r.right) for r in flagged.regions(0)[1]] == [(2, 3, 5, 6)]  # the seeded area only


def test_cli_predict_writes_masks_and_regions(fitted, tmp_path):
    model = fitted.save(tmp_path / "model")
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(23)
    Image.fromarray(with_defect(texture(rng), 10, 30, 18)).save(src / "bad.png")
    Image.fromarray(texture(rng)).save(src / "good.png")
    r = CliRunner().invoke(app, ["predict", str(model), str(src), "--out", str(tmp_path / "out"), "--masks",
                                 "--false-alarm-rate", "0.2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    mask = np.asarray(Image.open(out / "masks" / "bad.png.png"))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255} and mask[10:28, 30:48].any()
    regions = list(csv.DictReader((out / "regions.csv").open()))
    assert regions and {row["path"] for row in regions} == {str(src / "bad.png")}
    assert int(regions[0]["area"]) == int((mask > 0).sum()) or len(regions) > 1
    rows = {row["path"]: row for row in csv.DictReader((out / "scores.csv").open())}
    assert rows[str(src / "bad.png")]["anomalous"] == "true" and rows[str(src / "bad.png")]["out_of_scope"] == "false"
    r = CliRunner().invoke(app, ["predict", str(model), str(src), "--out", str(tmp_path / "o2"), "--false-alarm-rate", "2"])
    assert r.exit_code == 2 and "in (0, 1)" in r.output
