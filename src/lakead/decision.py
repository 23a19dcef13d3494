"""Decisions from normal images alone: thresholds with a false-alarm budget, defect regions.

A threshold is chosen from scores of normal images (the support images scored leave-one-out)
so that a new normal image exceeds it with probability at most ``alpha``, the false-alarm
budget:

- ``conformal`` (split-conformal order statistic): with ``n`` exchangeable normal scores, the
  ``ceil((n + 1) (1 - alpha))``-th smallest. A new normal image from the same distribution is
  above it with probability at most ``alpha``, for any distribution and any ``n`` (a
  finite-sample guarantee; Vovk et al. 2005, Angelopoulos & Bates 2021). It needs
  ``alpha >= 1 / (n + 1)``: with fewer scores no order statistic is high enough.
- ``exponential`` (a fitted tail, peaks over the median): the ``k`` scores above their median
  ``u`` exceed it by ``e_i``, modelled as exponential (the generalized Pareto with shape 0) of
  unknown scale. A new excess ``e`` over the observed mean ``S / k`` (``S`` the sum) then follows
  an F(2, 2k) distribution, so ``P(e > x) = (1 + x / S) ** -k`` whatever the scale, and the level
  is ``u + S * ((alpha / p_u) ** (-1 / k) - 1)``, ``p_u = k / n`` (a prediction bound: with few
  scores it lies above the plug-in quantile ``u + mean(e) * ln(p_u / alpha)``, which it
  approaches as ``k`` grows). Approximate (the tail is a model); ``auto`` uses it where the
  budget is below ``1 / (n + 1)``, and never below the largest normal score (the conformal level
  at ``1 / (n + 1)``), so that a smaller budget never lowers the threshold. Chosen over the
  Gaussian tail and the plug-in exponential quantile because, on the real images' leave-one-out
  scores split in two, its false alarms are the closest to the budget, down to 5 support images
  (``benchmarks/tails.py``, docs/DECISIONS.md).
- ``gaussian`` (a fitted tail): ``median + z(1 - alpha) * 1.4826 * MAD``, the upper ``alpha``
  quantile of a normal distribution fitted with robust statistics (too light a tail for
  distances: kept to compare).
- ``sigmas``: ``median + s * 1.4826 * MAD`` for a given ``s`` (lakead before the budget; about
  0.1 % false alarms for s = 3 if the scores were Gaussian).

``auto`` takes ``conformal`` when it is defined and ``exponential`` otherwise, and says which.
Every method derives all its decision levels (image, visual seed, pixel, scope) from its
support images' leave-one-out scores with one function, :func:`derive_thresholds`.

Regions: the connected areas of an anomaly map above a pixel threshold that reach a seed
level (hysteresis), with their bounding box, area, peak and mean (:func:`find_regions`); an
image the decision calls anomalous shows at least the area around its peak
(:func:`decision_regions`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

RULES = ("auto", "conformal", "exponential", "gaussian", "sigmas")


def _finite(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("no finite normal scores to derive a threshold from")
    return s


def check_budget(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"the false-alarm rate must be a number in (0, 1), got {alpha!r}")
    return float(alpha)


def conformal_threshold(scores: Sequence[float] | np.ndarray, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest score; ``inf`` when ``alpha < 1 / (n + 1)``.

    >>> conformal_threshold([5, 1, 4, 2, 3, 9, 8, 7, 6], 0.2)  # n = 9: the 8th smallest
    8.0
    >>> conformal_threshold([1, 2, 3], 0.1)  # 1 / (n + 1) = 0.25 > 0.1
    inf
    """
    s = np.sort(_finite(scores))
    k = math.ceil((s.size + 1) * (1 - check_budget(alpha)) - 1e-9)
    return float(s[k - 1]) if k <= s.size else math.inf


def exponential_threshold(scores: Sequence[float] | np.ndarray, alpha: float) -> float:
    """``u + S * ((alpha / p_u) ** (-1 / k) - 1)``: the level a new score exceeds with probability
    ``alpha`` when the ``k`` scores above the median ``u`` exceed it by exponential amounts of an
    unknown scale (``S``: the sum of those excesses, ``p_u = k / n``); the empirical
    ``1 - alpha`` quantile where ``alpha >= p_u`` (no tail to extrapolate).

    >>> round(exponential_threshold([1.0, 2.0, 3.0, 4.0, 6.0], 0.05), 4)  # u = 3, S = 1 + 3, k = 2, p_u = 0.4
    10.3137
    """
    s = _finite(scores)
    u = float(np.median(s))
    excess = s[s > u] - u
    p_u = excess.size / s.size
    if check_budget(alpha) >= p_u:
        return float(np.quantile(s, 1 - alpha))
    return u + float(excess.sum()) * ((alpha / p_u) ** (-1.0 / excess.size) - 1.0)


def gaussian_threshold(scores: Sequence[float] | np.ndarray, alpha: float) -> float:
    """``median + z(1 - alpha) * 1.4826 * MAD`` (the standard deviation when the MAD is 0).

    >>> round(gaussian_threshold([1.0, 2.0, 3.0, 4.0, 100.0], 0.05), 4)
    5.4387
    """
    from scipy.stats import norm

    return sigmas_threshold(scores, float(norm.ppf(1 - check_budget(alpha))))


def sigmas_threshold(scores: Sequence[float] | np.ndarray, sigmas: float) -> float:
    """``median + sigmas * 1.4826 * MAD`` (the standard deviation when the MAD is 0):
    :func:`lakead.ops.robust_threshold`, the rule lakead had before the budget.

    >>> round(sigmas_threshold([1.0, 2.0, 3.0, 4.0, 100.0], 3.0), 4)
    7.4478
    """
    from .ops import robust_threshold

    return robust_threshold(_finite(scores), sigmas)


def budget_threshold(scores: Sequence[float] | np.ndarray, alpha: float, rule: str = "auto",
                     sigmas: float = 3.0) -> tuple[float, str]:
    """The threshold for a false-alarm budget ``alpha`` and the rule actually used.

    >>> budget_threshold(list(range(1, 40)), 0.05)
    (38.0, 'conformal')
    >>> budget_threshold(list(range(1, 10)), 0.05)[1]
    'exponential'
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    n = _finite(scores).size
    if rule == "sigmas":
        return sigmas_threshold(scores, sigmas), "sigmas"
    if rule == "conformal" or (rule == "auto" and check_budget(alpha) >= 1.0 / (n + 1)):
        return conformal_threshold(scores, alpha), "conformal"
    if rule == "gaussian":
        return gaussian_threshold(scores, alpha), "gaussian"
    t = exponential_threshold(scores, alpha)
    if rule == "auto":  # below 1/(n+1): never under the largest score (the conformal level at 1/(n+1))
        t = max(t, float(_finite(scores).max()))
    return t, "exponential"


def describe_rule(rule: str, alpha: float, n: int, sigmas: float = 3.0, scope_on: bool = False) -> str:
    """One line saying how a threshold was derived (for ``lakead info``, reports, the page);
    ``scope_on``: a scope check took its share of the budget (:func:`defect_budget`)."""
    a = defect_budget(alpha, scope_on)  # what the image threshold was derived for
    if rule == "conformal":
        return (f"false-alarm budget {alpha:g}: split-conformal order statistic of {n} leave-one-out normal scores "
                f"(P(normal image flagged) <= {alpha:g})")
    if rule == "exponential":
        share = f", {a:g} of it for the defect score beside the scope check" if scope_on else ""
        below = (f": {a:g} is below 1/(n+1); {math.ceil(1 / a - 1 - 1e-9)} support images or more give the "
                 f"split-conformal guarantee") if a < 1.0 / (n + 1) else ""
        return (f"false-alarm budget {alpha:g}{share}: exponential tail fitted to the leave-one-out normal scores above "
                f"the median of {n} (a prediction bound; approximate{below})")
    if rule == "gaussian":
        return (f"false-alarm budget {alpha:g}: Gaussian tail fitted to {n} leave-one-out normal scores "
                f"(median + {_z(alpha):.2f} x 1.4826 x MAD; approximate)")
    if rule == "sigmas":
        return f"median + {sigmas:g} x 1.4826 x MAD of {n} leave-one-out normal scores"
    return rule


def _z(alpha: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha))


#: Share of the false-alarm budget given to the scope check ("not this product") when it is on;
#: the defect decision gets the rest, so that together they stay within the budget (union bound).
SCOPE_SHARE = 0.1


def defect_budget(alpha: float, scope_on: bool, scope_share: float = SCOPE_SHARE) -> float:
    """The defect decision's part of the budget ``alpha``: all of it, or what the scope check leaves."""
    return alpha * (1 - scope_share) if scope_on else alpha


@dataclass(frozen=True)
class Thresholds:
    """Every decision level of a fitted model, derived from normal images only."""

    image: float  # the fused score above which an image is anomalous (inf: none could be derived)
    rule: str  # how `image` was derived: conformal, exponential, gaussian, sigmas, fixed (by the user) or none
    budget: float | None  # the false-alarm budget it was derived for (None: sigmas or fixed)
    seed: float | None  # the visual token score a defect region must reach: the visual decision level
    pixel: float | None  # the token score a region's pixels exceed
    scope: float | None  # the pooled-feature distance above which an image is out of scope (None: off)


def derive_thresholds(
    loo_scores: np.ndarray,
    loo_visual: np.ndarray,
    loo_tokens: np.ndarray | None,
    loo_scope: np.ndarray | None,
    options: Any,
    false_alarm_rate: float | None = None,
    scope_share: float = SCOPE_SHARE,
) -> Thresholds:
    """The decision levels for the leave-one-out scores of the support images: image scores
    ``(n,)``, visual scores ``(n,)`` (the seed level), token or map scores ``(T,)`` (the pixel
    level; None: none) and scope scores ``(n,)`` (None: no scope check), NaN where not scored.

    ``options`` carries the decision options (``false_alarm_rate``, ``threshold_rule``,
    ``threshold``, ``threshold_sigmas``: :func:`lakead.fields.decision_option`);
    ``false_alarm_rate`` replaces its budget (``predict --false-alarm-rate``). With a scope
    check (two scope scores or more) the budget is split: ``scope_share`` of it for the scope
    check, the rest for the defect decision. The pixel level is the same rule over every token
    score, so a normal token exceeds it with probability about the budget (never above the seed
    level: a region must also reach the seed level somewhere). A fixed ``threshold`` replaces
    the image level only. Raises ValueError for a budget outside (0, 1).

    >>> from types import SimpleNamespace as NS
    >>> o = NS(false_alarm_rate=0.25, threshold_rule="auto", threshold=None, threshold_sigmas=3.0)
    >>> s = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    >>> derive_thresholds(s, s, None, None, o)
    Thresholds(image=6.0, rule='conformal', budget=0.25, seed=6.0, pixel=None, scope=None)
    """
    alpha = check_budget(options.false_alarm_rate if false_alarm_rate is None else false_alarm_rate)
    rule, sigmas, fixed = options.threshold_rule, options.threshold_sigmas, options.threshold
    scope_on = loo_scope is not None and np.isfinite(loo_scope).sum() >= 2
    a_image = defect_budget(alpha, scope_on, scope_share)
    finite = loo_scores[np.isfinite(loo_scores)]
    if finite.size == 0:
        return Thresholds(math.inf if fixed is None else float(fixed), "none" if fixed is None else "fixed",
                          None, None, None, None)
    if finite.size >= 2 and float(np.ptp(finite)) <= 1e-6 * max(1.0, float(np.abs(finite).max())):
        logging.getLogger("lakead").warning(
            "the %d support images score alike when each is left out (all %.4g): they are copies of one another, or "
            "show no variation, so the threshold says nothing about how far a normal image may differ; fit on varied "
            "normal images", finite.size, float(finite[0]))
    image, used = budget_threshold(finite, a_image, rule, sigmas)
    if fixed is not None:
        image, used = float(fixed), "fixed"
    seed, _ = budget_threshold(loo_visual[np.isfinite(loo_visual)], a_image, rule, sigmas)
    pixel = None
    if loo_tokens is not None and loo_tokens.size:
        pixel, _ = budget_threshold(loo_tokens, alpha, "auto" if rule == "sigmas" else rule, sigmas)
        pixel = min(pixel, seed)
    scope = None
    if scope_on:
        scope, _ = budget_threshold(loo_scope[np.isfinite(loo_scope)], alpha * scope_share, "auto" if rule == "sigmas" else rule)
    return Thresholds(float(image), used, None if used in ("sigmas", "fixed") else alpha, float(seed),
                      None if pixel is None else float(pixel), None if scope is None else float(scope))


@dataclass(frozen=True)
class Region:
    """One connected area of a map above the pixel threshold (pixels of the image's own size)."""

    top: int
    left: int
    bottom: int  # exclusive
    right: int  # exclusive
    area: int  # pixels
    peak: float  # highest map value inside
    mean: float  # mean map value inside

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def find_regions(amap: np.ndarray, threshold: float, seed: float | None = None) -> tuple[np.ndarray, list[Region]]:
    """The mask ``(H, W)`` bool and the regions of ``amap``: connected areas (8-neighbourhood)
    where it is above ``threshold`` and that reach ``seed`` somewhere (every area when ``seed``
    is None). Largest peak first.

    >>> m = np.zeros((5, 6), np.float32); m[1:3, 1:3] = 2.0; m[4, 5] = 1.5
    >>> mask, regions = find_regions(m, 1.0, seed=1.8)
    >>> int(mask.sum()), [(r.top, r.left, r.bottom, r.right, r.area) for r in regions]
    (4, [(1, 1, 3, 3, 4)])
    """
    from scipy import ndimage

    above = np.asarray(amap) > threshold
    if not above.any():
        return np.zeros(above.shape, dtype=bool), []
    labels, count = ndimage.label(above, structure=np.ones((3, 3), dtype=bool))
    regions: list[Region] = []
    keep = np.zeros(count + 1, dtype=bool)
    peaks = ndimage.maximum(amap, labels, index=np.arange(1, count + 1))
    means = ndimage.mean(amap, labels, index=np.arange(1, count + 1))
    areas = ndimage.sum(above, labels, index=np.arange(1, count + 1))
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if seed is not None and peaks[i - 1] < seed:
            continue
        keep[i] = True
        regions.append(Region(int(sl[0].start), int(sl[1].start), int(sl[0].stop), int(sl[1].stop),
                              int(areas[i - 1]), float(peaks[i - 1]), float(means[i - 1])))
    regions.sort(key=lambda r: -r.peak)
    return keep[labels], regions


def peak_level(amap: np.ndarray, threshold: float) -> float:
    """The level that outlines the area around ``amap``'s peak: ``threshold`` when the peak is
    above it, else half-way between the map's median and its peak (the half-maximum width of
    the peak above the typical value of the map).

    >>> m = np.array([[0.0, 1.0, 4.0]], np.float32)
    >>> peak_level(m, 2.0), peak_level(m, 5.0)
    (2.0, 2.5)
    """
    peak = float(np.max(amap))
    if peak > threshold:
        return float(threshold)
    return (float(np.median(amap)) + peak) / 2.0


def decision_regions(amap: np.ndarray, threshold: float, seed: float | None = None) -> tuple[np.ndarray, list[Region]]:
    """The regions of an image the decision calls anomalous: :func:`find_regions` (the areas
    above ``threshold`` that reach ``seed``), and when none reaches ``seed`` (an image flagged by
    the fused score, the text probe or the scope check, whose visual tokens stay below the visual
    decision level) the connected area around the map's peak above :func:`peak_level`. So every
    image called anomalous shows where; a flat map (nothing above its median) is the one exception.

    >>> m = np.zeros((4, 6), np.float32); m[1:3, 1:3] = 1.2; m[1, 1] = 1.5; m[3, 5] = 1.1
    >>> [(r.top, r.left, r.bottom, r.right) for r in decision_regions(m, 1.0, seed=2.0)[1]]
    [(1, 1, 3, 3)]
    """
    mask, regions = find_regions(amap, threshold, seed)
    if regions:
        return mask, regions
    level = peak_level(amap, threshold)
    peak = float(np.max(amap))
    if not peak > level:
        return mask, regions
    return find_regions(amap, level, seed=peak)
