"""Adding normal images to a fitted LAKE model without a refit.

What a refit on the old and the new images together would compute, and what the update does
(n old images, m new ones, N tokens each; the gallery of every support token, the default):

- the new images run through the backbone (the only forwards: the old images' tokens in the
  sensitive neurons are the gallery's rows, and their leave-one-out token distances are saved);
- the gallery: the new images' tokens in the sensitive neurons are appended (unit vectors with
  ``distance="cosine"``), image by image after the old ones, as a refit orders them: **exact**;
- the leave-one-out token distances: an old image scored before keeps the minimum of its saved
  distances and its distances to the **new rows only**; a new image is searched against the whole
  gallery without its own rows (the old x new distances are computed once for both sides, and
  each pair of new images once: :mod:`.search`): **exact**, each image's scores those of a refit;
- which images are scored: every one up to :data:`~lakead.methods.lake.fit.MAX_LOO_IMAGES` (as a
  refit); beyond, a refit scores an evenly spaced 128 of all, the update either every image it
  scored before and every new one, or an evenly spaced share of each (in proportion to their
  numbers, 128 in all), whichever compares fewer tokens (:func:`scored_after`): each image's score
  is the refit's score of that image, the images are not the refit's;
- the text probe's scores of the new images (the old ones are saved): **exact**;
- the scope gallery: every support token, full width, while there are at most
  :data:`~lakead.methods.lake.fit.MAX_SCOPE_TOKENS` (**exact**); beyond, a random sample of that
  many, old and new tokens in their shares (a refit draws another sample); the scope scores of the
  images scored are computed again when their full-width tokens are known (the new images', and the
  old ones' while every old token is in the scope gallery), else kept as fitted;
- the visual scale, the fused scores, the decision levels and the maps' colour range: computed
  again from those scores by the fit's own function (:func:`~lakead.methods.lake.fit.decision`);
- **not** recomputed: the sensitive neurons (chosen at fit from the channel variance of the old
  images; a refit on all images may choose others) and the outlier filter (the operator's
  images are taken as normal). A model with ``gallery_size`` (a coreset gallery) is refused.

So with at most 128 images and 4,096 scope tokens the update equals a refit on all the images
whenever the refit would choose the same neurons (always with ``selection="all"``), up to float
rounding of the saved scores; what differs otherwise is listed in :attr:`LakeUpdate.inexact`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..backbones import as_blocks
from ..errors import ConfigError, ImageLoadError
from ..images import ImageInput, expand_inputs
from ..methods.lake import fit as steps
from ..methods.lake import stream
from ..methods.lake.detector import LakeDetector
from ..methods.lake.score import visual_tokens
from ..ops import distance_to, nearest_neighbor, pool_scores
from .search import BLOCK_ELEMENTS, cross_nearest, self_nearest

log = logging.getLogger("lakead")


@dataclass
class Added:
    """What the forwards of the new images give (``m`` images, ``N`` tokens, ``K`` neurons)."""

    names: list[str]
    rows: torch.Tensor  # (m * N, K): gallery rows, image by image (unit vectors with cosine)
    semantic: np.ndarray  # (m,) float64: the text probe's scores
    full: dict[int, torch.Tensor] = field(default_factory=dict)  # new image (0-based) -> (N, D), for the scope check
    scope_rows: torch.Tensor | None = None  # (R, D): full-width rows asked for, ascending flat index


def forward_new(det: LakeDetector, inputs: Sequence[ImageInput], labels: Sequence[str], keep_full: set[int],
                rows: Sequence[int] = (), on_progress: Callable[[int], None] | None = None) -> Added:
    """Read and run the new images as the fit does (the steps of
    :func:`lakead.methods.lake.stream.run_job`, without the channel moments an update does not
    use); the first unreadable one is an :class:`ImageLoadError` (nothing is changed).
    ``keep_full``: the new images (0-based) whose full-width tokens are kept; ``rows``: the
    full-width rows kept (flat indices ``image * N + token``, ascending), both for the scope check."""
    state = det.check_fitted()
    cfg = det.config
    device = det.runtime.torch_device()
    det.backbone.to(device)
    text = state.text_embeddings
    if text is not None and cfg.text_backbone is not None:
        det.text_model.to(device)
    blocks = as_blocks(state.layer)
    joint = state.semantic_layer if text is not None else None
    n_tok = state.grid[0] * state.grid[1]
    neurons = state.neurons.cpu()
    wanted = torch.as_tensor(list(rows), dtype=torch.int64)
    sel_rows, sems, full, picked = [], [], {}, []
    bs = det.runtime.batch_size
    for s in range(0, len(inputs), bs):
        arrays = []
        for img, name in zip(inputs[s : s + bs], labels[s : s + bs]):
            arrays.append(det.read_image(img, name))  # ImageLoadError: the update stops, the model unchanged
        for start, f in det.iter_features(arrays, blocks, joint, state.image_size):
            tokens, grid = visual_tokens(f, blocks, cfg.block_grid)  # (b, N, D)
            tokens = tokens.cpu()
            b = tokens.shape[0]
            first = s + start
            if tuple(grid) != tuple(state.grid) or tokens.shape[2] != state.width:
                raise ConfigError(f"{labels[first]}: tokens on a {tuple(grid)} grid of {tokens.shape[2]} channels, the "
                                  f"model's are {tuple(state.grid)} x {state.width}")
            if text is not None and f.joint is not None:
                sem = det.text_model.text_probability(f.joint, text.to(f.joint.device)).cpu()  # (b, Nj)
                sems.append(pool_scores(sem.float(), cfg.semantic_agg).numpy().astype(np.float64))
            else:
                sems.append(np.zeros(b))
            sel = tokens[:, :, neurons]  # (b, N, K)
            if cfg.distance == "cosine":
                sel = steps.to_unit(sel)
            sel_rows.append(sel.reshape(b * n_tok, -1))
            for p in range(b):
                if first + p in keep_full:
                    full[first + p] = tokens[p].clone()
            here = wanted[(wanted >= first * n_tok) & (wanted < (first + b) * n_tok)] - first * n_tok
            if here.numel():
                picked.append(tokens.reshape(b * n_tok, -1)[here].clone())  # (r, D)
            if on_progress is not None:
                on_progress(b)
    scope_rows = torch.cat(picked) if picked else torch.zeros((0, state.width), dtype=torch.float32)
    return Added(list(labels), torch.cat(sel_rows).contiguous(), np.concatenate(sems), full, scope_rows)


def scored_after(before: Sequence[int], n_old: int, m: int, cap: int) -> tuple[list[int], bool]:
    """The support images whose leave-one-out scores an update keeps or computes, ascending, and
    whether they are those a refit scores: every image up to ``cap`` (as a refit). Beyond, the
    cheaper in distance computations (:func:`search_cost`) of: every image scored ``before`` and
    every new one; or ``cap`` images, an evenly spaced share of those scored before (topped up,
    evenly spaced, with old images not scored before when too few were) and of the new images,
    in proportion to their numbers.

    >>> scored_after([0, 1, 2], 3, 2, 128)
    ([0, 1, 2, 3, 4], True)
    >>> scored_after(list(range(4)), 4, 4, 4)  # 4 x 4 old-new blocks and 6 new-new: every one
    ([0, 1, 2, 3, 4, 5, 6, 7], False)
    >>> chosen, _ = scored_after(list(range(0, 100, 2)), 100, 10, 50)  # shares: 45 old, 5 new
    >>> len(chosen), sum(i >= 100 for i in chosen)
    (50, 5)
    """
    n = n_old + m
    before = sorted(before)
    if n < 2:
        return [], True
    if n <= cap:
        return list(range(n)), True
    c_new = min(m, max(1, round(cap * m / n)))
    c_old = cap - c_new
    if len(before) >= c_old:
        old = [before[j] for j in steps.spread_subset(len(before), c_old)]
    else:
        rest = sorted(set(range(n_old)) - set(before))
        old = sorted(before + [rest[j] for j in steps.spread_subset(len(rest), c_old - len(before))])
    new = [n_old + j for j in steps.spread_subset(m, c_new)]
    if before and search_cost(n_old, m, len(before), m) <= search_cost(n_old, m, len(old), c_new) + \
            len(set(old) - set(before)) * n:
        return before + list(range(n_old, n)), False
    return old + new, False


def search_cost(n_old: int, m: int, old_scored: int, new_scored: int) -> int:
    """Image pairs an update compares (each ``N x N`` token distances): old scored x new and all
    old x new scored (one old x new block when that is fewer), and the new scored against the
    other new images (each pair once when every new image is scored)."""
    cross = min(n_old * m, old_scored * m + n_old * new_scored)
    inner = m * (m - 1) // 2 if new_scored == m else new_scored * m
    return cross + inner


@dataclass
class LakeUpdate:
    """What :func:`update_lake` did: the images added, the decision level before and after, the
    seconds of each step, and what is not as a refit (empty: the update equals a refit up to the neurons)."""

    added: list[str]
    threshold_before: float
    threshold_after: float
    seconds: dict[str, float]
    inexact: list[str]


def update_lake(det: LakeDetector, images: Sequence[ImageInput], names: Sequence[str] | None = None,
                on_progress: Callable[[int], None] | None = None) -> LakeUpdate:
    """Add ``images`` (normal) to a fitted LAKE model: ``det.state_`` is replaced by the grown one
    (the module docstring says how)."""
    state = det.check_fitted()
    cfg = det.config
    if cfg.gallery_size is not None:
        raise ConfigError(f"this model keeps a coreset gallery (gallery_size {cfg.gallery_size:,}): adding images to it "
                          "is not supported; fit again on all the images")
    t0 = time.perf_counter()
    n_old, n_tok = len(state.support), state.grid[0] * state.grid[1]
    if state.gallery.shape[0] != n_old * n_tok:
        raise ConfigError(f"the gallery holds {state.gallery.shape[0]:,} vectors, not every token of the {n_old} "
                          "support images: fit again on all the images")
    inputs, labels = expand_inputs(images, names, det.read_rule, label=True)
    assert labels is not None
    m = len(inputs)
    if m == 0:
        raise ConfigError("no image to add")
    n = n_old + m
    inexact: list[str] = []
    before = np.flatnonzero(np.isfinite(state.loo_visual))  # old images scored, ascending: the order of loo_tokens
    scored, as_refit = scored_after(before.tolist(), n_old, m, steps.MAX_LOO_IMAGES)
    if not as_refit:
        inexact.append(f"leave-one-out: {len(scored)} of {n} images scored, not the evenly spaced {steps.MAX_LOO_IMAGES} "
                       "of all a refit scores (each image's score is the refit's score of that image)")
    scope_was = state.scope_gallery is not None
    scope_plan = _scope_plan(n_old, m, n_tok, cfg.seed) if scope_was else None
    keep_full = {i - n_old for i in scored if i >= n_old} if scope_was else set()
    added = forward_new(det, inputs, labels, keep_full, scope_plan[1] if scope_plan else (), on_progress)
    t1 = time.perf_counter()

    # -- the gallery and the leave-one-out token scores ----------------------------------------
    dev = state.gallery.device
    new_rows = added.rows.to(dev)
    gallery = torch.cat([state.gallery, new_rows])  # (n * N, K)
    gallery_image = torch.cat([state.gallery_image.cpu(), torch.arange(n_old, n, dtype=torch.int32).repeat_interleave(n_tok)])
    tokens = _loo_tokens(state, gallery, gallery_image, new_rows, scored, before, n_old, n_tok, cfg.distance == "cosine")
    token_list = [tokens[i] for i in scored]
    loo_raw = np.full(n, np.nan)
    if token_list:
        if cfg.visual_top_percent is not None:
            pooled = steps.pool_visual(torch.from_numpy(np.stack(token_list).astype(np.float32)), cfg).numpy()
            loo_raw[scored] = pooled.astype(np.float64)
        else:
            loo_raw[scored] = [float(t.max()) for t in token_list]
    t2 = time.perf_counter()

    # -- the scope check ----------------------------------------------------------------------
    scope = scope_image = loo_scope = None
    if scope_plan is not None:
        scope, scope_image, loo_scope = _scope(state, added, scope_plan, n_old, n, n_tok, scored, inexact)
    elif cfg.scope_check and n >= 2:
        inexact.append("the scope check stays off: the model was fitted on one image, whose full-width tokens are not "
                       "kept (fit again on all the images to turn it on)")
    t3 = time.perf_counter()

    # -- the decision levels, by the fit's own function ---------------------------------------
    semantic = np.concatenate([state.loo_semantic.astype(np.float64), added.semantic])
    use_text = state.text_embeddings is not None
    scale, loo_scores, levels, map_range, norm_tokens = steps.decision(loo_raw, token_list, semantic, loo_scope, cfg, use_text)
    thr_before = state.threshold
    loo_rule = steps.describe_loo(len(scored), n) if as_refit else (
        f"{len(scored):,} of {n:,} support images: those of the fit and of each update "
        "(lakead.line.lake_update.scored_after)")
    det.state_ = dataclasses.replace(
        state,
        gallery=gallery,
        gallery_image=gallery_image,
        loo_visual=(loo_raw / scale).astype(np.float32),
        loo_semantic=semantic.astype(np.float32),
        loo_scores=loo_scores.astype(np.float32),
        loo_tokens=norm_tokens,
        scope_gallery=scope,
        scope_gallery_image=scope_image,
        loo_scope=loo_scope,
        gallery_index=None,
        visual_scale=scale,
        threshold=levels.image,
        threshold_rule=levels.rule,
        false_alarm_rate=levels.budget,
        seed_threshold=levels.seed,
        pixel_threshold=levels.pixel,
        scope_threshold=levels.scope,
        map_range=map_range,
        support=list(state.support) + added.names,
        support_rule=f"{state.support_rule}; {m} added as normal by lakead update",
        gallery_rule=stream.GalleryBuilder.describe(None, n * n_tok, n * n_tok),
        loo_rule=loo_rule,
    )
    det.keep_index()  # HNSW: built again on the grown gallery
    t4 = time.perf_counter()
    if cfg.filter_outliers:
        inexact.append("the outlier filter is not run on the added images (the operator says they are normal)")
    return LakeUpdate(added.names, thr_before, levels.image,
                      {"forward": t1 - t0, "leave_one_out": t2 - t1, "scope": t3 - t2, "decision": t4 - t3}, inexact)


def _loo_tokens(state, gallery: torch.Tensor, gallery_image: torch.Tensor, new_rows: torch.Tensor, scored: list[int],
                before: np.ndarray, n_old: int, n_tok: int, cosine: bool) -> dict[int, np.ndarray]:
    """Leave-one-out token scores ``(N,)`` of the images ``scored``, in the model's distance
    (``d**2 / 2`` with cosine), by image (the module docstring says how)."""
    dev = gallery.device
    old_rows = state.gallery  # (n_old * N, K)
    saved: dict[int, np.ndarray] = {}
    if before.size:
        raw = state.loo_tokens.reshape(before.size, n_tok).astype(np.float64) * state.visual_scale
        saved = {int(i): raw[j].astype(np.float32) for j, i in enumerate(before)}
    again = [i for i in scored if i < n_old and i in saved]
    fresh = [i for i in scored if i < n_old and i not in saved]
    new = [i - n_old for i in scored if i >= n_old]
    m = new_rows.shape[0] // n_tok

    def measure(q: torch.Tensor, g: torch.Tensor, idx: torch.Tensor) -> np.ndarray:
        d = distance_to(q, g, idx).cpu()
        return (d ** 2 / 2.0 if cosine else d).numpy()

    def flat(images: list[int]) -> torch.Tensor:  # rows of these images, image by image
        return (torch.tensor(images, dtype=torch.int64)[:, None] * n_tok + torch.arange(n_tok)).reshape(-1).to(dev)

    out: dict[int, np.ndarray] = {}
    q_again = old_rows[flat(again)] if again else None
    q_new = new_rows[flat(new)] if new else None
    # old x new, once for both sides: all of it when that is cheaper than the rows and columns wanted
    if n_old * m <= len(again) * m + n_old * len(new):
        xd2, xi, yd2, yi = cross_nearest(old_rows, new_rows)
        to_new = xi[flat(again)] if again else None
        to_old = (yd2[flat(new)], yi[flat(new)]) if new else None
    else:  # the rows and the columns wanted, each searched one way
        to_new = _one_way(q_again, new_rows)[1] if again else None
        to_old = _one_way(q_new, old_rows) if new else None
    if again:
        d = measure(q_again, new_rows, to_new).reshape(len(again), n_tok)
        for j, i in enumerate(again):
            out[i] = np.minimum(saved[i], d[j])
    if new:
        if len(new) == m:  # every new image scored: each pair of new images once
            sd2, si = self_nearest(new_rows, n_tok)
        else:
            own = torch.tensor(new, dtype=torch.int32).repeat_interleave(n_tok).to(dev)
            d, si = nearest_neighbor(q_new, new_rows, query_groups=own, block_elements=steps.LOO_BLOCK_ELEMENTS,
                                     gallery_groups=torch.arange(m, dtype=torch.int32).repeat_interleave(n_tok).to(dev))
            sd2 = d.square()
        od2, oi = to_old
        take_new = (sd2 < od2) & (si >= 0)
        idx = torch.where(take_new, si + n_old * n_tok, oi)  # into the whole gallery
        d = measure(q_new, gallery, idx).reshape(len(new), n_tok)
        for j, i in enumerate(new):
            out[n_old + i] = d[j]
    if fresh:  # old images not scored before (a model of one image; a share topped up): the whole search
        qg = torch.tensor(fresh, dtype=torch.int32).repeat_interleave(n_tok).to(dev)
        d, _ = nearest_neighbor(old_rows[flat(fresh)], gallery, query_groups=qg, gallery_groups=gallery_image.to(dev),
                                block_elements=steps.LOO_BLOCK_ELEMENTS)
        d = d.cpu()
        d = (d ** 2 / 2.0 if cosine else d).numpy().reshape(len(fresh), n_tok)
        for j, i in enumerate(fresh):
            out[i] = d[j]
    return out


def _one_way(q: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's nearest row of ``g``: squared distance and index (the fit's search)."""
    d, i = nearest_neighbor(q, g, block_elements=steps.LOO_BLOCK_ELEMENTS)
    return d.square(), i


def _scope_plan(n_old: int, m: int, n_tok: int, seed: int) -> tuple[list[int] | None, list[int]]:
    """Which scope rows the grown model keeps: the old scope gallery's rows (positions in it,
    ``None``: all) and the new images' rows (flat ``image * N + token``, ascending). Every token
    while there are at most ``MAX_SCOPE_TOKENS``; beyond, a seeded random sample of that many,
    old and new tokens in proportion (the old rows drawn from those the model holds)."""
    cap = steps.MAX_SCOPE_TOKENS
    n = n_old + m
    if n * n_tok <= cap:
        return None, list(range(m * n_tok))
    held = n_old * n_tok if n_old * n_tok <= cap else cap
    c_old = min(held, round(cap * n_old / n))
    g = torch.Generator().manual_seed(seed + n)
    old = None if c_old == held else torch.randperm(held, generator=g)[:c_old].sort().values.tolist()
    new = torch.randperm(m * n_tok, generator=g)[: cap - c_old].sort().values.tolist()
    return old, new


def _scope(state, added: Added, plan: tuple[list[int] | None, list[int]], n_old: int, n: int, n_tok: int,
           scored: list[int], inexact: list[str]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The grown scope gallery ``(G, D)``, which image each row is from ``(G,)``, and the scope
    scores ``(n,)`` of the images scored (see the module docstring for what is exact)."""
    dev = state.scope_gallery.device
    old_pos, new_flat = plan
    all_old = n_old * n_tok <= steps.MAX_SCOPE_TOKENS  # every old token is in the old scope gallery, in order
    old_g, old_img = state.scope_gallery, state.scope_gallery_image.cpu()
    if old_pos is not None:
        pick = torch.tensor(old_pos, dtype=torch.int64)
        old_g, old_img = old_g[pick.to(dev)], old_img[pick]
    scope = torch.cat([old_g, added.scope_rows.to(dev)]).contiguous()
    scope_image = torch.cat([old_img.to(torch.int32),
                             torch.tensor([n_old + r // n_tok for r in new_flat], dtype=torch.int32)])
    if n * n_tok > steps.MAX_SCOPE_TOKENS:
        inexact.append(f"scope gallery: a random sample of {scope.shape[0]:,} of the {n * n_tok:,} support tokens, old and "
                       "new in proportion (a refit draws another sample)")
    loo_scope = np.full(n, np.nan)
    old_scope = state.loo_scope if state.loo_scope is not None else np.full(n_old, np.nan)
    images, tokens = [], []
    for i in scored:
        if i >= n_old:
            images.append(i)
            tokens.append(added.full[i - n_old].to(dev))
        elif all_old:
            images.append(i)
            tokens.append(state.scope_gallery[i * n_tok : (i + 1) * n_tok])
        else:
            loo_scope[i] = old_scope[i]
    if len(images) < len(scored):
        inexact.append("scope scores of the old images: kept as fitted (their full-width tokens are not all kept)")
    if images:  # scope_scores of each image leaving itself out, in one search
        q = torch.cat(tokens)  # (c * N, D)
        own = torch.tensor(images, dtype=torch.int32).repeat_interleave(n_tok).to(dev)
        d, _ = nearest_neighbor(q, scope, query_groups=own, gallery_groups=scope_image.to(dev), block_elements=BLOCK_ELEMENTS)
        loo_scope[images] = d.reshape(len(images), n_tok).median(dim=1).values.cpu().numpy().astype(np.float64)
    return scope, scope_image, loo_scope
