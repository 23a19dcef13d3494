"""Pure computations on sensitive neurons: no I/O, no models, no detector.

- :func:`knee_k` — the automatic ``k`` (``LakeConfig(k="auto")``): the knee of the support
  set's sorted channel-variance curve.
- :func:`support_image_features` and :func:`flag_outliers` — the support-set outlier filter
  (``LakeConfig(filter_outliers=True)``): an Isolation Forest over one vector per support
  image, computed in the sensitive subspace.
- :func:`patch_contributions`, :func:`jaccard_matrix`, :func:`neuron_fingerprints` and
  :func:`embed_2d` — the numbers behind ``lakead explain`` (:mod:`lakead.explain`).

Shapes: ``n`` support images, ``N`` tokens per image, ``D`` channels of the block, ``K``
sensitive neurons, ``C`` compared models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .ops import nearest_neighbor, robust_threshold

#: How the knee of the variance curve is found; written into saved models and reports.
KNEE_RULE = (
    "knee of the sorted variance curve: both axes scaled to 0..1, the point farthest below the "
    "straight line from the largest to the smallest variance (Kneedle, offline, no smoothing); "
    "k = the channels before it"
)

#: Trees of the Isolation Forest (more trees: a steadier score on a small support set).
OUTLIER_TREES = 256
#: Robust standard deviations above the median isolation score that flag an image (contamination "auto").
OUTLIER_SIGMAS = 3.0
#: The filter is skipped below this many support images (an isolation path needs company).
MIN_IMAGES_FOR_FILTER = 5


def knee_k(variance: Sequence[float] | np.ndarray) -> int:
    """Automatic number of sensitive neurons: the knee of the sorted variance curve.

    ``variance (D,)`` in any order. Sorted from largest to smallest as ``y_0 >= ... >=
    y_{D-1}``, both axes are scaled to 0..1 (``x_i = i / (D - 1)``, ``y`` by its range) and
    the knee is the point farthest *below* the chord from the first point to the last, that
    is ``argmax_i (1 - x_i - y_i)`` (the offline form of Kneedle, Satopaa et al. 2011, for a
    convex decreasing curve). The knee is the first channel of the flat part, so ``k`` is its
    index: the channels before the bend. The rule is invariant to the scale of the features.

    Without a convex bend (all variances equal, a straight or a concave curve, or fewer
    than three channels) no channel stands out and every channel is kept: ``k = D``.

    >>> knee_k([9.0, 8.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    2
    >>> knee_k([1.0, 1.0, 1.0])
    3
    """
    v = np.asarray(variance, dtype=np.float64).ravel()
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError("variance must be a non-empty vector of finite numbers")
    d = v.size
    y = np.sort(v)[::-1]
    span = y[0] - y[-1]
    if d < 3 or span <= 0:
        return d
    x = np.arange(d, dtype=np.float64) / (d - 1)
    below = 1.0 - x - (y - y[-1]) / span  # (D,) distance below the chord (up to a constant factor)
    i = int(np.argmax(below))
    if below[i] <= 1e-9:
        return d
    return max(1, i)


def support_image_features(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    """One vector per support image for the outlier filter: ``(n, N, K) -> (n, 4)``.

    Every token of an image is matched to its nearest token among the *other* support
    images in the sensitive subspace (the leave-one-out distance of Eq. 7); the image's
    vector is the maximum, 99th percentile, 90th percentile and median of those distances.
    A defect leaves a few tokens with no look-alike in the other images (a high maximum
    and upper percentiles over an ordinary median); an image unlike all others moves the
    whole profile. These are the distances the detector itself scores with, so an image
    the filter drops is one whose patches the gallery would otherwise learn as normal.
    """
    t = torch.as_tensor(tokens, dtype=torch.float32)
    if t.ndim != 3 or t.shape[0] < 2 or t.shape[1] == 0:
        raise ValueError(f"expected the tokens of at least two support images (n, N, K), got shape {tuple(t.shape)}")
    n, n_tok, k = t.shape
    flat = t.reshape(n * n_tok, k)  # (n*N, K)
    groups = torch.arange(n).repeat_interleave(n_tok)  # (n*N,)
    d, _ = nearest_neighbor(flat, flat, query_groups=groups, gallery_groups=groups)
    d = d.reshape(n, n_tok).double()  # (n, N)
    q = torch.quantile(d, torch.tensor([1.0, 0.99, 0.9, 0.5], dtype=torch.float64), dim=1)  # (4, n)
    return q.T.numpy().copy()  # (n, 4)


def flag_outliers(
    features: np.ndarray, contamination: float | str = "auto", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Isolation Forest over per-image features: ``(n, F) -> (flags (n,) bool, scores (n,))``.

    ``scores`` are the forest's anomaly scores (higher = more isolated, ``-score_samples``).
    ``contamination="auto"`` flags the images whose score is a robust outlier among the
    scores: above ``median + 3 x 1.4826 x MAD`` (:func:`lakead.ops.robust_threshold`, the
    rule of the detector's own threshold), so a clean support set usually loses nothing.
    A number in (0, 0.5] is scikit-learn's contamination: that fraction of the images is
    flagged, whatever they look like. At most half of the images are ever flagged (the most
    isolated ones): a support set that is mostly "outliers" is a different class, not
    contamination. Deterministic for a given ``seed``.
    """
    from sklearn.ensemble import IsolationForest

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected features (n, F), got shape {x.shape}")
    n = x.shape[0]
    forest = IsolationForest(n_estimators=OUTLIER_TREES, contamination=contamination, random_state=seed).fit(x)
    scores = -forest.score_samples(x)  # (n,) higher = more isolated
    if contamination == "auto":
        flags = scores > robust_threshold(scores, OUTLIER_SIGMAS)
    else:
        flags = forest.predict(x) == -1
    cap = n // 2
    if int(flags.sum()) > cap:
        keep_flagged = np.argsort(-scores, kind="stable")[:cap]
        flags = np.zeros(n, dtype=bool)
        flags[keep_flagged] = True
    return flags, scores


def patch_contributions(query: np.ndarray, neighbour: np.ndarray) -> np.ndarray:
    """Per-neuron squared difference between a token and its nearest gallery vector.

    ``query (K,)``, ``neighbour (K,)`` -> ``(K,)``; the entries sum to the squared distance
    of Eq. 7, so ``contribution / contribution.sum()`` is each neuron's share of it.

    >>> patch_contributions(np.array([1.0, 2.0]), np.array([0.0, 0.0])).tolist()
    [1.0, 4.0]
    """
    q, g = np.asarray(query, dtype=np.float64), np.asarray(neighbour, dtype=np.float64)
    if q.shape != g.shape or q.ndim != 1:
        raise ValueError(f"expected two (K,) vectors, got {q.shape} and {g.shape}")
    return np.square(q - g)


def top_contributors(contributions: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` largest contributions, largest first (ties: lower position)."""
    c = np.asarray(contributions, dtype=np.float64)
    return np.argsort(-c, kind="stable")[: max(0, min(n, c.size))]


def jaccard(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> float:
    """``|A & B| / |A | B|`` of two index sets (1.0 for two empty sets).

    >>> jaccard([1, 2, 3], [2, 3, 4])
    0.5
    """
    sa, sb = {int(v) for v in np.asarray(a).ravel()}, {int(v) for v in np.asarray(b).ravel()}
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def jaccard_matrix(sets: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
    """Pairwise Jaccard overlap of ``C`` index sets: ``(C, C)``, symmetric, ones on the diagonal."""
    c = len(sets)
    out = np.ones((c, c), dtype=np.float64)
    for i in range(c):
        for j in range(i + 1, c):
            out[i, j] = out[j, i] = jaccard(sets[i], sets[j])
    return out


def neuron_fingerprints(variances: np.ndarray) -> np.ndarray:
    """Fingerprint of every channel across ``C`` models: ``(C, D) -> (D, C)``.

    A channel's fingerprint holds, for each model (one category's support set), its
    standardised log-variance: ``(log v_cd - mean_d log v_cd) / std_d log v_cd``. It says how
    strongly that channel varies on normal images of each category compared with the other
    channels of the same block; channels with close fingerprints are sensitive to the same
    categories. Zero variances are floored at ``1e-12`` times the model's largest.
    """
    v = np.asarray(variances, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] == 0:
        raise ValueError(f"expected variances (C, D), got shape {v.shape}")
    floor = np.maximum(v.max(axis=1, keepdims=True), 1e-300) * 1e-12  # (C, 1)
    lv = np.log(np.maximum(v, floor))  # (C, D)
    sd = lv.std(axis=1, keepdims=True)
    z = (lv - lv.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0)
    return z.T.copy()  # (D, C)


def embed_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Principal-component embedding: ``(D, C) -> (coords (D, 2), explained (2,))``.

    The first two principal components of the centred points (a deterministic linear map:
    distances in the plot are distances between fingerprints, minus what the dropped
    components held). ``explained`` is the fraction of the variance each axis keeps; with a
    single column the second axis is zero.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"expected points (D, C), got shape {p.shape}")
    centred = p - p.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2]  # (<=2, C)
    # a fixed sign per axis (largest loading positive) so that reruns draw the same picture
    signs = np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    coords = np.zeros((p.shape[0], 2))
    coords[:, : comps.shape[0]] = centred @ comps.T
    total = float(np.square(s).sum())
    explained = np.zeros(2)
    if total > 0:
        explained[: comps.shape[0]] = np.square(s[:2]) / total
    return coords, explained
