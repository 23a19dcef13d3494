"""Adding normal images to a fitted memory-bank model (PatchCore, AnomalyDINO) without a refit.

Through the method's own hooks (:class:`lakead.methods.bank.BankDetector`: ``support_arrays``,
``embed``, ``score``), only the new images run through the backbone; then:

- **AnomalyDINO** (every support patch in the bank, unit vectors): the new images' patches (and
  their rotations with ``rotations``) join the bank: **exact**, the bank of a refit (its rows in
  another order, which changes no distance). With ``mask_background`` the new patches are masked
  with the principal component fitted on the old images (a refit fits it on all: **not** exact).
- **PatchCore** (a greedy coreset of ``coreset`` of the patches): the bank grows by a coreset of the
  new images' patches at the same ratio, chosen among those alone (:mod:`lakead.coreset`); a refit
  chooses one coreset from all the patches, which covers the old and the new images together:
  **not** exact (the bank has the size a refit's would have).
- the leave-one-out scores, peaks and map values of the images scored (every one up to 128, as a
  refit; beyond, :func:`lakead.line.lake_update.scored_after`): a new image is scored against the
  grown bank without its own patches, as the fit scores it; an old image too when all its patches
  are in the bank (AnomalyDINO without the mask: its own rows are its patches), which costs what a
  refit's leave-one-out of that image costs; otherwise (a coreset, a mask) the old image keeps its
  fitted scores, computed against the old bank (a grown bank can only bring its nearest patch closer
  under AnomalyDINO; under PatchCore the reweighting changes too): **not** exact;
- the decision levels and the maps' colour range: derived again from those scores by the fit's rule.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.base import as_blocks
from ..coreset import coreset_count, greedy_coreset
from ..errors import ConfigError
from ..images import ImageInput
from ..methods.bank import BankDetector
from ..methods.lake.fit import MAX_LOO_IMAGES
from ..patchops import smooth_maps
from .lake_update import LakeUpdate, scored_after

log = logging.getLogger("lakead")


def update_bank(det: BankDetector, images: Sequence[ImageInput], names: Sequence[str] | None = None,
                on_progress: Callable[[int], None] | None = None) -> LakeUpdate:
    """Add ``images`` (normal) to a fitted memory-bank model: ``det.state_`` is replaced by the
    grown one (the module docstring says what is exact)."""
    st = det.check_fitted()
    cfg = det.config
    t0 = time.perf_counter()
    loaded = det.read_images(images, names, strict=True)  # the first unreadable image stops the update
    m = len(loaded.arrays)
    if m == 0:
        raise ConfigError("no image to add")
    n_old = len(st.support)
    n = n_old + m
    device = det.runtime.torch_device()
    det.backbone.to(device)
    blocks = as_blocks(st.layer)
    arrays, source = det.support_arrays(loaded.arrays)  # the images as given first, then their rotations
    parts = []
    for start, f in det.iter_features(arrays, blocks, None, st.image_size):
        t, grid = det.embed(f, blocks)
        if tuple(grid) != tuple(st.grid) or t.shape[-1] != st.width:
            raise ConfigError(f"patch features on a {tuple(grid)} grid of {t.shape[-1]} channels; the model's are "
                              f"{tuple(st.grid)} x {st.width}")
        parts.append(t.cpu())
        if on_progress is not None:
            on_progress(max(0, min(start + t.shape[0], m) - start))
    tokens = torch.cat(parts)  # (m', N, D)
    n_tok = tokens.shape[1]
    src = torch.tensor(source, dtype=torch.int32) + n_old
    inexact: list[str] = []
    rows, rows_image = _new_rows(det, st, tokens, src, inexact)
    t1 = time.perf_counter()

    new = dataclasses.replace(
        st, bank=torch.cat([st.bank, rows.to(st.bank.device)]).contiguous(),
        bank_image=torch.cat([st.bank_image.cpu(), rows_image]), bank_vectors=st.bank_vectors + tokens.shape[0] * n_tok,
        support=list(st.support) + list(loaded.names), support_rule=f"{st.support_rule}; {m} added as normal by lakead update",
        loo_scores=np.concatenate([st.loo_scores, np.full(m, np.nan, np.float32)]),
        loo_peaks=np.concatenate([st.loo_peaks, np.full(m, np.nan, np.float32)]), gallery_index=None)
    before = np.flatnonzero(np.isfinite(st.loo_scores))
    old_cells = {} if st.loo_tokens is None else {
        int(i): c for i, c in zip(before, st.loo_tokens.reshape(before.size, -1))}
    scored, as_refit = scored_after(before.tolist(), n_old, m, MAX_LOO_IMAGES)
    if not as_refit:
        inexact.append(f"leave-one-out: {len(scored)} of {n} images scored, not the evenly spaced {MAX_LOO_IMAGES} of all "
                       "a refit scores (each image's score is the refit's score of that image)")
    whole = det.method == "anomalydino" and not cfg.mask_background  # every patch of every image in the bank
    originals = {n_old + j: tokens[j] for j in range(m)}  # support_arrays puts the images as given first
    cells, kept = [], 0
    scores = np.full(n, np.nan, np.float32)
    peaks = np.full(n, np.nan, np.float32)
    for i in scored:
        if i < n_old and not whole:
            scores[i], peaks[i] = st.loo_scores[i], st.loo_peaks[i]
            cells.append(old_cells[i] if i in old_cells else np.full(n_tok, np.nan, np.float32))
            kept += 1
            continue
        q = originals[i] if i >= n_old else new.bank[(new.bank_image == i).nonzero().squeeze(1)[:n_tok].to(new.bank.device)]
        s = det.score(q[None].to(new.bank.device), new, exclude=i)
        smooth = smooth_maps(s.patches.reshape(1, *new.grid), new.image_size, cfg.blur_sigma)  # (1, S, S)
        scores[i], peaks[i] = float(s.images[0]), float(smooth.max())
        cells.append(F.adaptive_avg_pool2d(smooth[None], tuple(new.grid)).reshape(-1).cpu().numpy())
    if kept:
        inexact.append(f"leave-one-out: {kept} old image(s) keep their fitted scores (their patches are not all in the "
                       "bank); a refit scores them against the grown bank")
    new.loo_scores, new.loo_peaks = scores, peaks
    new.loo_tokens = np.concatenate(cells).astype(np.float32) if cells else None
    t2 = time.perf_counter()
    thr_before = st.threshold
    det.store_thresholds(new, det.derive_thresholds(new))
    if new.loo_tokens is not None:
        finite = new.loo_tokens[np.isfinite(new.loo_tokens)]
        lo, hi = float(np.median(finite)), new.seed_threshold or 1.0
        new.map_range = (lo, hi if hi > lo else lo + 1.0)
    det.state_ = new
    det.keep_index()
    t3 = time.perf_counter()
    return LakeUpdate(list(loaded.names), thr_before, new.threshold,
                      {"forward": t1 - t0, "leave_one_out": t2 - t1, "decision": t3 - t2}, inexact)


def _new_rows(det: BankDetector, st, tokens: torch.Tensor, src: torch.Tensor, inexact: list[str]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank rows of the new patches ``(m', N, D)`` and their support image (see the module docstring)."""
    cfg = det.config
    n_img, n_tok, width = tokens.shape
    flat, image = tokens.reshape(n_img * n_tok, width), src.repeat_interleave(n_tok)
    if det.method == "anomalydino":
        fg = det.foreground(tokens, st)  # the old images' component (None without the mask)
        if fg is not None:
            keep = fg.reshape(-1).cpu()
            flat, image = flat[keep], image[keep]
            inexact.append("background mask: the new patches are masked with the component fitted on the old images "
                           "(a refit fits it on all of them)")
        return flat.contiguous(), image.to(torch.int32)
    if det.method == "patchcore":
        count = coreset_count(flat.shape[0], float(cfg.coreset))
        if count < flat.shape[0]:
            keep = greedy_coreset(flat, count, seed=cfg.seed).sort().values
            flat, image = flat[keep], image[keep]
            inexact.append(f"coreset: {count:,} of the new images' {n_img * n_tok:,} patches join the bank, chosen among them "
                           "alone (a refit chooses one coreset from all the patches)")
        return flat.contiguous(), image.to(torch.int32)
    raise ConfigError(f"adding images to a {det.method!r} model is not supported: fit it again on all the images")
