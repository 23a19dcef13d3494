"""Adding normal images to a fitted LAKE model without a refit.

What a refit on the old and the new images together would compute, and what the update does
(n old images, m new ones, N tokens each; the gallery of every support token, the default):

- the new images run through the backbone (the only forwards: the old images' tokens in the
  sensitive neurons are the gallery's rows, and their leave-one-out token distances are saved);
- the gallery: the new images' tokens in the sensitive neurons are appended (unit vectors with
  ``distance="cosine"``), image by image after the old ones, as a refit orders them: **exact**;
- the leave-one-out token distances, for the images a refit scores
  (:func:`~lakead.methods.lake.fit.spread_subset` of the ``n + m``): an old image scored before
  keeps the minimum of its saved distance and its distance to the new rows only; an old image
  scored now and not before is searched against the other images' rows of the gallery (its own
  tokens are there); a new image against the whole gallery without its own rows: **exact**;
- the text probe's scores of the new images (the old ones are saved): **exact**;
- the scope gallery and the scope scores: **exact** while the old images' tokens are all in the
  scope gallery (at most :data:`~lakead.methods.lake.fit.MAX_SCOPE_TOKENS` old tokens); beyond,
  the rows a refit would keep are kept where known and the old images' scope scores stay as fitted;
- the visual scale, the fused scores, the decision levels and the maps' colour range: computed
  again from those scores by the fit's own function (:func:`~lakead.methods.lake.fit.decision`);
- **not** recomputed: the sensitive neurons (chosen at fit from the channel variance of the old
  images; a refit on all images may choose others) and the outlier filter (the operator's
  images are taken as normal). A model with ``gallery_size`` (a coreset gallery) is refused.

So the update equals a refit on all the images whenever the refit would choose the same neurons
(always with ``selection="all"``), up to float rounding of the saved scores.
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
from ..ops import nearest_neighbor

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
    """Read and run the new images as the fit does (:func:`lakead.methods.lake.stream.run_job`);
    the first unreadable one is an :class:`ImageLoadError` (nothing is changed). ``keep_full``:
    the new images (0-based) whose full-width tokens are kept; ``rows``: the full-width rows kept
    (flat indices ``image * N + token``, ascending), both for the scope check."""
    state = det.check_fitted()
    cfg = det.config
    device = det.runtime.torch_device()
    det.backbone.to(device)
    text = state.text_embeddings
    if text is not None and cfg.text_backbone is not None:
        det.text_model.to(device)
    ctx = stream.Context(as_blocks(state.layer), state.semantic_layer if text is not None else None, state.image_size, text)
    sel_rows, sems, full, picked = [], [], {}, []
    n_tok = state.grid[0] * state.grid[1]
    wanted = torch.as_tensor(list(rows), dtype=torch.int64)
    bs = det.runtime.batch_size
    for s in range(0, len(inputs), bs):
        done = stream.run_job(det, stream.Job(list(inputs[s : s + bs]), labels[s : s + bs], full=True), ctx)
        if done.errors:
            raise ImageLoadError(*done.errors[0])
        assert done.full is not None and done.semantic is not None
        if tuple(done.grid) != tuple(state.grid) or done.width != state.width:
            raise ConfigError(f"{labels[s]}: tokens on a {done.grid} grid of {done.width} channels, the model's are "
                              f"{tuple(state.grid)} x {state.width}")
        sel = done.full[:, :, state.neurons.cpu()]  # (b, N, K)
        if cfg.distance == "cosine":
            sel = steps.to_unit(sel)
        sel_rows.append(sel.reshape(-1, sel.shape[-1]))
        sems.append(done.semantic)
        b = done.full.shape[0]
        for p in range(b):
            if s + p in keep_full:
                full[s + p] = done.full[p].clone()
        here = wanted[(wanted >= s * n_tok) & (wanted < (s + b) * n_tok)] - s * n_tok
        if here.numel():
            picked.append(done.full.reshape(b * n_tok, -1)[here].clone())  # (r, D)
        if on_progress is not None:
            on_progress(b)
    scope_rows = torch.cat(picked) if picked else torch.zeros((0, state.width), dtype=torch.float32)
    return Added(list(labels), torch.cat(sel_rows).contiguous(), np.concatenate(sems), full, scope_rows)


def _distances(queries: torch.Tensor, gallery: torch.Tensor, qg: torch.Tensor | None = None, gg: torch.Tensor | None = None,
               cosine: bool = False) -> torch.Tensor:
    """Token scores in the model's distance: the exact nearest-neighbour distance (float32,
    as the fit's search measures it), ``d**2 / 2`` with ``distance="cosine"``."""
    d, _ = nearest_neighbor(queries, gallery, query_groups=qg, gallery_groups=gg, block_elements=steps.LOO_BLOCK_ELEMENTS)
    d = d.cpu()
    return d ** 2 / 2.0 if cosine else d


@dataclass
class LakeUpdate:
    """What :func:`update_lake` did: the images added, the decision level before and after, the
    seconds of each step, and what is not exact (empty: the update equals a refit up to the neurons)."""

    added: list[str]
    before: int
    threshold_before: float
    threshold_after: float
    seconds: dict[str, float]
    inexact: list[str]


def update_lake(det: LakeDetector, images: Sequence[ImageInput], names: Sequence[str] | None = None,
                on_progress: Callable[[int], None] | None = None) -> LakeUpdate:
    """Add ``images`` (normal) to a fitted LAKE model in place (the module docstring says how)."""
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
    scope_was = state.scope_gallery is not None
    scope_all_old = scope_was and n_old * n_tok <= steps.MAX_SCOPE_TOKENS  # every old token in the scope gallery
    inexact: list[str] = []
    inputs, labels = expand_inputs(images, names, det.read_rule, label=True)
    assert labels is not None
    m = len(inputs)
    if m == 0:
        raise ConfigError("no image to add")
    n = n_old + m
    scored = steps.spread_subset(n, steps.MAX_LOO_IMAGES) if n >= 2 else []
    keep_full: set[int] = set()
    want_new: list[int] = []
    if scope_was:
        keep_full = {i - n_old for i in scored if i >= n_old}
        want = steps.scope_rows(n, n_tok, cfg.seed)
        want_new = [r - n_old * n_tok for r in (range(n * n_tok) if want is None else want.tolist()) if r >= n_old * n_tok]
    added = forward_new(det, inputs, labels, keep_full, want_new, on_progress)
    t1 = time.perf_counter()

    dev = state.gallery.device
    cosine = cfg.distance == "cosine"
    new_rows = added.rows.to(dev)
    gallery = torch.cat([state.gallery, new_rows])  # (n * N, K)
    gallery_image = torch.cat([state.gallery_image.cpu(), torch.arange(n_old, n, dtype=torch.int32).repeat_interleave(n_tok)])
    groups = gallery_image.to(dev)

    # -- leave-one-out token scores of the images a refit scores ------------------------------
    before = np.flatnonzero(np.isfinite(state.loo_visual))  # old images scored, ascending: the order of loo_tokens
    saved: dict[int, np.ndarray] = {}
    if before.size:
        raw = state.loo_tokens.reshape(before.size, n_tok).astype(np.float64) * state.visual_scale
        saved = {int(i): raw[j].astype(np.float32) for j, i in enumerate(before)}
    tokens: dict[int, np.ndarray] = {}
    again = [i for i in scored if i < n_old and i in saved]
    fresh_old = [i for i in scored if i < n_old and i not in saved]
    new = [i for i in scored if i >= n_old]
    if again:
        q = torch.cat([state.gallery[i * n_tok : (i + 1) * n_tok] for i in again])
        d = _distances(q, new_rows, cosine=cosine).numpy().reshape(len(again), n_tok)
        for j, i in enumerate(again):
            tokens[i] = np.minimum(saved[i], d[j])
    for group in (fresh_old, new):
        if group:
            q = torch.cat([gallery[i * n_tok : (i + 1) * n_tok] for i in group])
            qg = torch.tensor(group, dtype=torch.int32).repeat_interleave(n_tok).to(dev)
            d = _distances(q, gallery, qg, groups, cosine=cosine).numpy().reshape(len(group), n_tok)
            for j, i in enumerate(group):
                tokens[i] = d[j]
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
    if scope_was:
        scope, scope_image, loo_scope = _scope(state, added, want_new, n_old, n, n_tok, scored, scope_all_old, cfg.seed, inexact)
    elif cfg.scope_check and n >= 2:
        inexact.append("the scope check stays off: the model was fitted on one image, whose full-width tokens are not "
                       "kept (fit again on all the images to turn it on)")
    t3 = time.perf_counter()

    # -- the decision levels, by the fit's own function ---------------------------------------
    semantic = np.concatenate([state.loo_semantic.astype(np.float64), added.semantic])
    use_text = state.text_embeddings is not None
    scale, loo_scores, levels, map_range, norm_tokens = steps.decision(loo_raw, token_list, semantic, loo_scope, cfg, use_text)
    thr_before = state.threshold
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
        loo_rule=steps.describe_loo(len(scored), n),
    )
    det.keep_index()  # HNSW: built again on the grown gallery
    t4 = time.perf_counter()
    if cfg.filter_outliers:
        inexact.append("the outlier filter is not run on the added images (the operator says they are normal)")
    return LakeUpdate(added.names, n_old, thr_before, levels.image,
                      {"forward": t1 - t0, "leave_one_out": t2 - t1, "scope": t3 - t2, "decision": t4 - t3}, inexact)


def _scope(state, added: Added, new_flat: list[int], n_old: int, n: int, n_tok: int, scored: list[int], all_old: bool,
           seed: int, inexact: list[str]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The scope gallery ``(G, D)`` a refit would keep, which image each row is from ``(G,)``, and
    the scope scores ``(n,)`` of the images scored (see the module docstring for what is exact)."""
    dev = state.scope_gallery.device
    old_flat = steps.scope_rows(n_old, n_tok, seed)
    old_flat = torch.arange(n_old * n_tok) if old_flat is None else old_flat  # flat rows held, ascending
    want = steps.scope_rows(n, n_tok, seed)
    want = torch.arange(n * n_tok) if want is None else want
    held = dict(zip(old_flat.tolist(), range(old_flat.numel())))
    keep_old = [r for r in want.tolist() if r < n_old * n_tok and r in held]
    if len(keep_old) < int((want < n_old * n_tok).sum()):
        inexact.append(f"scope gallery: {len(keep_old):,} of the {int((want < n_old * n_tok).sum()):,} old-image rows a "
                       "refit would keep are known (the others were not kept at fit)")
    rows = [held[r] for r in keep_old]
    parts = [state.scope_gallery[torch.tensor(rows, dtype=torch.int64, device=dev)], added.scope_rows.to(dev)]
    scope = torch.cat(parts).contiguous()
    scope_image = torch.tensor([r // n_tok for r in keep_old] + [n_old + r // n_tok for r in new_flat], dtype=torch.int32)
    loo_scope = np.full(n, np.nan)
    old_scope = state.loo_scope if state.loo_scope is not None else np.full(n_old, np.nan)
    for i in scored:
        if i >= n_old:
            tok = added.full[i - n_old]
        elif all_old:
            tok = state.scope_gallery[i * n_tok : (i + 1) * n_tok]
        else:
            loo_scope[i] = old_scope[i]
            continue
        loo_scope[i] = steps.scope_scores(tok[None].to(dev), scope, scope_image, image=i)[0]
    if not all_old:
        inexact.append("scope scores of the old images: kept as fitted (their full-width tokens are not kept)")
    return scope, scope_image, loo_scope
