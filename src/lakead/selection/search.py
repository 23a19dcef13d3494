"""Choosing a configuration from normal images alone (``lakead tune``, docs/SELECTION.md).

1. The support images are split into ``folds`` groups (image ``i`` in group ``i % folds``);
   each group in turn is held out and the others are the support of the candidates.
2. Every held-out image gets synthetic defects (:mod:`lakead.synthetic`, the kinds taken in
   turn so that every kind is used; seeded by ``seed`` and the image's index):
   ``defects_per_image``, by default 2 and more on few images so that there are at least
   :data:`MIN_DEFECTS` in all (an AUROC from 8 defects moves in steps of 1/32 and ties at 1.0).
   With one support image there is nothing to hold out: the held-out normals are ``views``
   (8) mildly jittered copies of it (a crop of 90-97 % of its area, resized back, its
   brightness scaled by 0.95-1.05), and the defects are made on those.
3. The network runs once per image (support and synthetic) at every candidate block; each
   candidate (:mod:`lakead.selection.candidates`) scores every fold from those features: image
   AUROC of the synthetic defects against the held-out normals; their separation (Cohen's d of
   the log image scores: how far apart the two groups are, which still tells candidates apart
   when several reach an AUROC of 1); and pixel AUROC of its patch scores against the defect
   masks (a patch is defective when the mask covers at least 30 % of its cell, normal when it
   covers none), each averaged over the folds (one split alone picked unreliably in the
   feasibility run of issue 30).
4. The candidates are ranked by the mean image AUROC (to 3 decimals), ties broken by the
   separation; the best is fitted on every support image and returned with the table of all.

The candidates are scored in the order given until ``budget_seconds`` is spent (the first
always); those left are listed as not scored.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import Backbone, Layer
from ..backbones.cache import FeatureCache
from ..errors import ConfigError
from ..synthetic import KINDS, make_defect, placement_mask
from .candidates import Candidate, Tokens, score_tokens

log = logging.getLogger("lakead")

#: A patch counts as defective when the defect mask covers at least this share of its cell.
PATCH_COVER = 0.3
#: Fewest synthetic defects in all (the default number per image grows on few images).
MIN_DEFECTS = 32
#: Jittered views of a single support image that stand for held-out normals.
VIEWS = 8


@dataclass(frozen=True)
class Queries:
    """The held-out images of every fold: ``image`` (index into :attr:`arrays`), which support
    image they come from (``origin``), ``label`` (1: synthetic defect) and masks."""

    arrays: list[np.ndarray]  # the synthetic images and (one support image) the jittered views
    origin: list[int]  # the support image each comes from
    label: list[int]  # 0: a normal view, 1: a synthetic defect
    masks: list[np.ndarray]  # (H, W) bool; all False for a normal view
    kinds: list[str]  # the defect kind ("normal" for a view)


@dataclass
class Scored:
    """One candidate's synthetic scores."""

    candidate: Candidate
    image_auroc: float = math.nan
    separation: float = math.nan
    pixel_auroc: float = math.nan
    folds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    scored: bool = False
    #: (fold, label, image score) of every held-out image (for benchmarks; not written by tune)
    samples: list[tuple[int, int, float]] = field(default_factory=list, repr=False)

    def key(self) -> tuple[float, float]:
        return (round(self.image_auroc, 3), self.separation if math.isfinite(self.separation) else -math.inf)

    def row(self) -> dict[str, Any]:
        return {"candidate": self.candidate.label, "method": self.candidate.method, "options": self.candidate.options,
                "synthetic_image_auroc": self.image_auroc, "synthetic_separation": self.separation,
                "synthetic_pixel_auroc": self.pixel_auroc, "folds": self.folds, "seconds": round(self.seconds, 3),
                "scored": self.scored}


def fold_of(n: int, folds: int) -> list[int]:
    """The fold of each of ``n`` support images: ``i % folds`` (at most ``n`` folds).

    >>> fold_of(5, 4), fold_of(3, 4)
    ([0, 1, 2, 3, 0], [0, 1, 2])
    """
    return [i % min(folds, n) for i in range(n)]


def jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mildly changed view of a normal image: a crop of 90-97 % of its area at a random place,
    resized back to its size, brightness scaled by 0.95-1.05."""
    from PIL import Image

    h, w = image.shape[:2]
    s = math.sqrt(rng.uniform(0.90, 0.97))
    ch, cw = max(1, int(h * s)), max(1, int(w * s))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(image[top : top + ch, left : left + cw]).resize((w, h), Image.BILINEAR)
    return np.clip(np.asarray(crop).astype(np.float32) * rng.uniform(0.95, 1.05), 0, 255).astype(np.uint8)


def defects_for(images: int, defects_per_image: int | None = None) -> int:
    """Defects per held-out image: as given, or 2 and more on few images, so that there are at
    least :data:`MIN_DEFECTS` in all.

    >>> defects_for(64), defects_for(4), defects_for(8), defects_for(4, 1)
    (2, 8, 4, 1)
    """
    if defects_per_image is not None:
        return defects_per_image
    return max(2, math.ceil(MIN_DEFECTS / max(1, images)))


def make_queries(arrays: Sequence[np.ndarray], *, defects_per_image: int | None = None, views: int = VIEWS, seed: int = 0,
                 kinds: Sequence[str] = KINDS) -> Queries:
    """The synthetic defects of every support image (the held-out normals are the support images
    themselves), or, with one support image, ``views`` jittered views of it and defects on those
    (``defects_per_image``: :func:`defects_for`)."""
    n = len(arrays)
    out = Queries([], [], [], [], [])
    bases: list[tuple[int, np.ndarray]] = [(i, a) for i, a in enumerate(arrays)]
    if n == 1:
        rng = np.random.default_rng([seed, 1_000_003])
        bases = [(0, jitter(arrays[0], rng)) for _ in range(views)]
        for _, v in bases:
            out.arrays.append(v), out.origin.append(0), out.label.append(0)
            out.masks.append(np.zeros(v.shape[:2], bool)), out.kinds.append("normal")
    turn = 0
    defects_per_image = defects_for(len(bases), defects_per_image)
    for j, (i, base) in enumerate(bases):
        where = placement_mask(base)
        source = arrays[(i + 1) % n] if n > 1 else base[::-1, ::-1].copy()
        for d in range(defects_per_image):
            kind = kinds[turn % len(kinds)]
            turn += 1
            defect = make_defect(kind, base, np.random.default_rng([seed, j, d]), source=source, where=where)
            out.arrays.append(defect.image), out.origin.append(i), out.label.append(1)
            out.masks.append(defect.mask), out.kinds.append(kind)
    return out


def extract(backbone: Backbone, arrays: Sequence[np.ndarray], blocks: Sequence[Layer], size: int, batch: int = 16
            ) -> tuple[dict[Layer, torch.Tensor], dict[Layer, tuple[int, int]]]:
    """Each block's tokens ``(B, N, D)`` float32 (CPU) and grid, for ``(H, W, 3)`` uint8 images."""
    parts: dict[Layer, list[torch.Tensor]] = {b: [] for b in blocks}
    grids: dict[Layer, tuple[int, int]] = {}
    for s in range(0, len(arrays), batch):
        f = backbone.extract(backbone.preprocessing(list(arrays[s : s + batch]), size), list(blocks))
        for b in blocks:
            parts[b].append(f.blocks[b].float().cpu())
            grids[b] = tuple(f.grids[b])
    return {b: torch.cat(p) for b, p in parts.items()}, grids


def patch_labels(masks: Sequence[np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """``(B, N)`` float: 1 where the mask covers at least :data:`PATCH_COVER` of a patch's cell,
    0 where it covers none, NaN between (left out of the pixel AUROC)."""
    cover = np.stack([F.adaptive_avg_pool2d(torch.from_numpy(mk.astype(np.float32))[None, None], grid).reshape(-1).numpy()
                      for mk in masks])  # (B, N): each mask at its own image's size
    return np.where(cover >= PATCH_COVER, 1.0, np.where(cover > 0, np.nan, 0.0))


def separation(labels: np.ndarray, scores: np.ndarray) -> float:
    """Cohen's d of the log scores of the defects (label 1) against the normals (label 0):
    the difference of their means over the pooled standard deviation (NaN with a group empty).

    >>> round(separation(np.array([0, 0, 1, 1]), np.exp(np.array([0.0, 1.0, 2.0, 3.0]))), 3)
    2.828
    """
    logs = np.log(np.maximum(scores.astype(np.float64), 1e-12))
    a, b = logs[labels == 1], logs[labels == 0]
    if a.size == 0 or b.size == 0:
        return math.nan
    pooled = math.sqrt((a.var(ddof=1 if a.size > 1 else 0) + b.var(ddof=1 if b.size > 1 else 0)) / 2)
    return float((a.mean() - b.mean()) / max(pooled, 1e-12))


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    keep = np.isfinite(labels)
    y, s = labels[keep], scores[keep]
    if y.size == 0 or y.min() == y.max():
        return math.nan
    return float(roc_auc_score(y, s))


def score_candidates(
    candidates: Sequence[Candidate],
    support: Tokens,
    queries: Queries,
    query_tokens: Tokens,
    grids: dict[Layer, tuple[int, int]],
    *,
    folds: int = 4,
    base: Any = None,
    budget_seconds: float | None = None,
    on_candidate: Callable[[Scored], None] | None = None,
) -> list[Scored]:
    """Every candidate's mean synthetic image and pixel AUROC over the folds (see the module)."""
    n = next(iter(support.values())).shape[0]
    fold = fold_of(n, folds)
    origin = np.asarray(queries.origin)
    labels = np.asarray(queries.label)
    start = time.perf_counter()
    out = []
    for c_i, cand in enumerate(candidates):
        res = Scored(cand)
        out.append(res)
        if c_i and budget_seconds is not None and time.perf_counter() - start > budget_seconds:
            continue
        t0 = time.perf_counter()
        aurocs, seps, pix_y, pix_s = [], [], [], []
        grid = None
        for f in sorted(set(fold)):
            held = [i for i in range(n) if fold[i] == f]
            train = [i for i in range(n) if fold[i] != f] or held  # one support image: it is the support
            q_idx = np.nonzero(np.isin(origin, held))[0]  # its defects (and views)
            sup = {b: t[train] for b, t in support.items()}
            normals = [i for i in held if n > 1]  # the held-out support images themselves
            qry = {b: torch.cat([support[b][normals], query_tokens[b][q_idx]]) for b in support}
            img, patches = score_tokens(cand, sup, qry, grids, base)
            y = np.concatenate([np.zeros(len(normals)), labels[q_idx]])
            aurocs.append(_auroc(y, img.numpy()))
            seps.append(separation(y, img.numpy()))
            res.samples += [(f, int(lab), float(v)) for lab, v in zip(y, img.numpy())]
            if grid is None:  # the candidate's blocks on their coarsest grid
                grid = min((grids[b] for b in cand.blocks), key=lambda g: g[0] * g[1])
            masks = [np.zeros(grid, bool)] * len(normals) + [queries.masks[i] for i in q_idx]
            pix_y.append(patch_labels(masks, grid).reshape(-1))
            pix_s.append(patches.numpy().reshape(-1))
        res.folds = [round(a, 6) for a in aurocs]
        finite = [a for a in aurocs if math.isfinite(a)]
        res.image_auroc = float(np.mean(finite)) if finite else math.nan
        finite = [v for v in seps if math.isfinite(v)]
        res.separation = float(np.mean(finite)) if finite else math.nan
        res.pixel_auroc = _auroc(np.concatenate(pix_y), np.concatenate(pix_s))
        res.seconds = time.perf_counter() - t0
        res.scored = True
        if on_candidate is not None:
            on_candidate(res)
    return out


def best(results: Sequence[Scored]) -> Scored:
    """The candidate with the highest mean synthetic image AUROC (3 decimals), then separation;
    the first of equals (the order given)."""
    scored = [r for r in results if r.scored and math.isfinite(r.image_auroc)]
    if not scored:
        raise ConfigError("no candidate could be scored on the synthetic defects")
    top = max(r.key() for r in scored)
    return next(r for r in scored if r.key() == top)


@dataclass
class TuneResult:
    """What :func:`tune` found: the fitted detector of the chosen candidate, every candidate's
    synthetic scores (:class:`Scored`, in the order given), how the defects were made, the times."""

    detector: Any
    chosen: Scored
    results: list[Scored]
    settings: dict[str, Any]
    seconds: dict[str, float]


def tune(
    images: Sequence[Any],
    class_name: str,
    candidates: Sequence[Candidate],
    base: Any,
    *,
    backbone: Backbone,
    runtime: Any = None,
    names: Sequence[str] | None = None,
    support_rule: str | None = None,
    folds: int = 4,
    defects_per_image: int | None = None,
    seed: int = 0,
    budget_seconds: float | None = None,
    on_candidate: Callable[[Scored], None] | None = None,
) -> TuneResult:
    """Score ``candidates`` on synthetic defects of ``images`` (normal images: paths, PIL images
    or arrays), fit the best on every image, return it with the table (see the module docstring).
    ``base``: the configuration the candidates take their shared fields from (backbone, image
    size, decision options)."""
    if not candidates:
        raise ConfigError("tune: no candidate configuration to score")
    t0 = time.perf_counter()
    cached = backbone if isinstance(backbone, FeatureCache) else FeatureCache(backbone)
    reader = candidates[0].build(base, cached, runtime)  # reads images as every detector does
    loaded = reader.read_support(images, names)
    arrays = list(loaded.arrays)
    blocks = list(dict.fromkeys(cached.resolve_layer(b) for c in candidates for b in c.blocks))
    candidates = [Candidate(c.method, {**c.options, "layer": _canonical(c.options["layer"], cached)}) for c in candidates]
    size = cached.check_image_size(getattr(base, "image_size", None) or cached.info.image_size)
    queries = make_queries(arrays, defects_per_image=defects_per_image, seed=seed)
    support, grids = extract(cached, arrays, blocks, size)
    query_tokens, _ = extract(cached, queries.arrays, blocks, size)
    t_features = time.perf_counter() - t0
    results = score_candidates(candidates, support, queries, query_tokens, grids, folds=folds, base=base,
                               budget_seconds=None if budget_seconds is None else max(0.0, budget_seconds - t_features),
                               on_candidate=on_candidate)
    t_scored = time.perf_counter() - t0
    chosen = best(results)
    det = chosen.candidate.build(base, cached, runtime)
    det.fit(arrays, class_name, names=list(loaded.names), support_rule=support_rule or f"{len(arrays)} images as given")
    t_fit = time.perf_counter() - t0 - t_scored
    settings = {"folds": min(folds, len(arrays)), "defects_per_image": defects_for(len(arrays) if len(arrays) > 1 else VIEWS,
                                                                                defects_per_image), "seed": seed,
                "kinds": sorted(set(queries.kinds) - {"normal"}), "synthetic_images": int(sum(queries.label)),
                "held_out_normals": len(arrays) if len(arrays) > 1 else len(queries.label) - int(sum(queries.label)),
                "support_images": len(arrays), "image_size": size, "budget_seconds": budget_seconds,
                "rule": "highest mean synthetic image AUROC over the folds (3 decimals), then separation"}
    seconds = {"features": round(t_features, 3), "scoring": round(t_scored - t_features, 3), "final_fit": round(t_fit, 3),
               "total": round(time.perf_counter() - t0, 3)}
    return TuneResult(det, chosen, results, settings, seconds)


def _canonical(layer: Any, backbone: Backbone) -> Any:
    if isinstance(layer, (list, tuple)):
        return [backbone.resolve_layer(b) for b in layer]
    return backbone.resolve_layer(layer)
