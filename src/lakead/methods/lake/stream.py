"""LAKE's fit over many support images in bounded memory (issue 16).

The support images are read and run through the backbone one batch at a time, never all at
once. What each batch gives is described by a :class:`Job` and computed by :func:`run_job`,
in this process or on a Ray worker (:mod:`lakead.distributed`): the channel moments of its
tokens (merged exactly, :class:`lakead.ops.Moments`), each image's text-probe score, and the
tokens the pass asks for.

Two ways to fit, chosen at the first batch from ``memory`` (``--fit-memory``):

- **one pass**: the full-width tokens of every support image fit in half the budget: they are
  kept, as the fit always did, and the steps of :mod:`.fit` run on them;
- **two passes**: otherwise. Pass 1 accumulates the channel moments; the neurons are chosen;
  pass 2 runs the images again and keeps each token only in the ``K`` chosen channels (the
  gallery), the full-width tokens of the scope gallery's rows and of the leave-one-out images
  (at most :data:`~.fit.MAX_LOO_IMAGES`). ``docs/SCALE.md`` says why a second forward pass
  was kept over spilling the full-width tokens to a float16 file.

The gallery is built by :class:`GalleryBuilder`: every token (the paper), or at most
``gallery_size`` tokens chosen by a greedy coreset (:mod:`lakead.coreset`) merged and reduced
block by block, so that its memory and the cost of predict stop growing with the support set.
Both ways give the same gallery for the same images.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...coreset import greedy_coreset
from ...errors import ConfigError, ImageLoadError
from ...images import ImageInput, expand_inputs, source_name
from ...index import resolve as resolve_index
from ...index import tree_bytes
from ...ops import Moments, pool_scores
from ...progress import steps as steps_of
from .score import visual_tokens

log = logging.getLogger("lakead")

#: The default bound on what the fit holds (``--fit-memory``).
DEFAULT_FIT_MEMORY = 256 << 20
#: The coreset works on blocks of ``REDUCE_FACTOR * gallery_size`` vectors (kept + new), reduced
#: to ``gallery_size``: fewer, larger steps than reducing after every block of ``gallery_size``.
REDUCE_FACTOR = 4

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "t": 1000**4, "tb": 1000**4}


def parse_memory(text: str | int) -> int:
    """A memory size in bytes from ``"1GiB"``, ``"512MiB"``, ``"2G"``, ``"800mb"`` or a number of bytes.

    >>> parse_memory("1GiB"), parse_memory("512 MiB"), parse_memory("2G"), parse_memory(4096)
    (1073741824, 536870912, 2000000000, 4096)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"fit memory must be a size such as 1GiB, 512MiB or 2G, got {text!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1 << 10:
        raise ConfigError(f"fit memory must be at least 1KiB, got {text!r}")
    return value


@dataclass(frozen=True)
class Context:
    """What every batch of a fit shares (shipped once to each Ray worker)."""

    blocks: tuple
    semantic_layer: object
    image_size: int
    text: torch.Tensor | None  # (2, E) normalised prompt embeddings; None: probe off


@dataclass
class Job:
    """One batch of support images and what the pass asks of it."""

    inputs: list  # paths, PIL images or arrays
    names: list[str]
    stats: bool = True  # channel moments and the text probe's scores
    full: bool = False  # every image's full-width tokens (one-pass fit)
    neurons: torch.Tensor | None = None  # (K,): every image's tokens in these channels
    keep: tuple[int, ...] = ()  # positions in the batch whose full-width tokens are wanted
    rows: tuple[tuple[int, int], ...] = ()  # (position, token) full-width rows wanted


@dataclass
class Done:
    """What one batch gave (positions count the batch's readable images only)."""

    read: list[int]  # positions in the job's inputs that were read
    errors: list[tuple[str, str]]  # (source, problem) of those that were not
    grid: tuple[int, int] = (0, 0)
    width: int = 0
    n_tok: int = 0
    moments: Moments | None = None
    semantic: np.ndarray | None = None  # (B,) float64
    full: torch.Tensor | None = None  # (B, N, D)
    selected: torch.Tensor | None = None  # (B, N, K)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> (N, D)
    rows: torch.Tensor | None = None  # (R, D)


def run_job(det, job: Job, ctx: Context) -> Done:
    """Read a batch, run it through the backbone and answer ``job`` (here or on a Ray worker)."""
    arrays, read, errors = [], [], []
    for i, (img, name) in enumerate(zip(job.inputs, job.names)):
        try:
            arrays.append(det.read_image(img, name))
            read.append(i)
        except ImageLoadError as exc:
            errors.append((exc.source, exc.problem))
    done = Done(read, errors)
    if not arrays:
        return done
    cfg = det.config
    parts, sems = [], []
    for _, f in det.iter_features(arrays, ctx.blocks, ctx.semantic_layer if job.stats else None, ctx.image_size):
        tokens, grid = visual_tokens(f, ctx.blocks, cfg.block_grid)  # (b, N, D)
        parts.append(tokens.cpu())
        if job.stats:
            if ctx.text is not None and f.joint is not None:
                sem = det.text_model.text_probability(f.joint, ctx.text.to(f.joint.device)).cpu()  # (b, Nj)
            else:
                sem = torch.zeros((tokens.shape[0], f.joint.shape[1] if f.joint is not None else tokens.shape[1]))
            sems.append(pool_scores(sem.float(), cfg.semantic_agg).numpy().astype(np.float64))
    tokens = parts[0] if len(parts) == 1 else torch.cat(parts)  # (B, N, D)
    b, n_tok, width = tokens.shape
    done.grid, done.width, done.n_tok = tuple(grid), int(width), int(n_tok)
    if job.stats:
        done.moments = Moments.of(tokens.reshape(b * n_tok, width))
        done.semantic = np.concatenate(sems)
    if job.full:
        done.full = tokens
    if job.neurons is not None:
        done.selected = tokens[:, :, job.neurons].contiguous()
    done.kept = {p: tokens[p].clone() for p in job.keep}
    if job.rows:
        pos = torch.tensor([p for p, _ in job.rows]), torch.tensor([t for _, t in job.rows])
        done.rows = tokens[pos].contiguous()  # (R, D)
    return done


Runner = Callable[[Iterable[Job]], Iterator[Done]]


def local_runner(det, ctx: Context) -> Runner:
    """Jobs run one after another in this process."""
    return lambda jobs: (run_job(det, job, ctx) for job in jobs)


class GalleryBuilder:
    """The gallery, fed with every support token in the ``K`` chosen channels, image by image.

    ``cap=None`` keeps every token (``(n * N, K)``, the paper). Otherwise at most ``cap``: the
    tokens are taken in blocks of exactly ``(REDUCE_FACTOR - 1) * cap`` whatever the batch
    size, each block is joined to the tokens kept so far and the whole reduced to ``cap`` by
    :func:`lakead.coreset.greedy_coreset` (merge and reduce), so memory stays at a few times
    ``cap`` vectors and the result depends only on the tokens, their order, ``cap`` and ``seed``.
    """

    def __init__(self, cap: int | None, seed: int = 0) -> None:
        self.cap, self.seed = cap, seed
        self.kept: torch.Tensor | None = None  # (M, K)
        self.kept_image = torch.zeros(0, dtype=torch.int32)
        self.pending: list[torch.Tensor] = []
        self.pending_image: list[torch.Tensor] = []
        self.reductions = 0

    def add(self, tokens: torch.Tensor, first_image: int) -> None:
        """Tokens ``(B, N, K)`` of support images ``first_image, first_image + 1, ...``."""
        b, n_tok, k = tokens.shape
        self.pending.append(tokens.reshape(b * n_tok, k))
        self.pending_image.append(torch.arange(first_image, first_image + b, dtype=torch.int32).repeat_interleave(n_tok))
        if self.cap is None:
            return
        block = (REDUCE_FACTOR - 1) * self.cap
        while sum(p.shape[0] for p in self.pending) >= block:
            rows, image = torch.cat(self.pending), torch.cat(self.pending_image)
            self._merge(rows[:block], image[:block])
            self.pending, self.pending_image = [rows[block:]], [image[block:]]

    def _merge(self, rows: torch.Tensor, image: torch.Tensor) -> None:
        cand = rows if self.kept is None else torch.cat([self.kept, rows])
        cand_image = torch.cat([self.kept_image, image])
        if self.cap is not None and cand.shape[0] > self.cap:
            keep = greedy_coreset(cand, self.cap, seed=self.seed).sort().values
            cand, cand_image = cand[keep].contiguous(), cand_image[keep]
            self.reductions += 1
        self.kept, self.kept_image = cand, cand_image

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gallery ``(M, K)`` float32 and which support image each vector is from ``(M,)`` int32."""
        if self.pending:
            rows, image = torch.cat(self.pending), torch.cat(self.pending_image)
            self.pending, self.pending_image = [], []
            if rows.shape[0] or self.kept is None:
                self._merge(rows, image)
        assert self.kept is not None
        return self.kept, self.kept_image

    @staticmethod
    def describe(cap: int | None, total: int, kept: int) -> str:
        if cap is None or total <= cap:
            return f"every support token ({total:,} vectors)"
        return (f"greedy coreset: {kept:,} of {total:,} support tokens (gallery_size {cap:,}; k-center greedy "
                f"of lakead.coreset, merged and reduced in blocks of {(REDUCE_FACTOR - 1) * cap:,})")


@dataclass
class FirstPass:
    """What pass 1 learns: the images read, their moments, text-probe scores and shapes."""

    index: list[int]  # positions in the inputs of the images read
    names: list[str]
    errors: list[ImageLoadError]
    moments: Moments
    semantic: np.ndarray  # (n,) float64
    grid: tuple[int, int]
    width: int
    n_tok: int
    feats: torch.Tensor | None  # (n, N, D) when the one-pass fit holds them


def _jobs(inputs: Sequence[ImageInput], names: Sequence[str], index: Sequence[int], batch: int,
          make: Callable[[int, int], dict] | None = None) -> Iterator[Job]:
    for s in range(0, len(index), batch):
        idx = index[s : s + batch]
        yield Job([inputs[i] for i in idx], [names[i] for i in idx], **(make(s, len(idx)) if make else {}))


def first_pass(inputs: Sequence[ImageInput], names: Sequence[str] | None, index: Sequence[int], runner: Runner,
               batch: int, memory: int, on_progress: Callable[[float], None] | None) -> tuple[FirstPass, int]:
    """Pass 1 over ``inputs[index]``: moments, text-probe scores, and the full-width tokens when
    all of them fit in half of ``memory`` (decided at the first batch). Returns it and the
    number of passes the fit will make (1 or 2), for the progress shown."""
    labels = list(names) if names is not None else [source_name(img, i) for i, img in enumerate(inputs)]
    keep_all: list[bool | None] = [None]  # decided at the first batch; jobs made before that keep everything

    def make(start: int, size: int) -> dict:
        return {"full": keep_all[0] is not False}

    out = FirstPass([], [], [], None, np.zeros(0), (0, 0), 0, 0, None)  # type: ignore[arg-type]
    feats: torch.Tensor | None = None
    sems: list[np.ndarray] = []
    passes, filled, pos = 1, 0, 0
    for done in runner(_jobs(inputs, labels, index, batch, make)):
        batch_idx = index[pos : pos + len(done.read) + len(done.errors)]
        pos += len(batch_idx)
        out.errors += [ImageLoadError(s, p) for s, p in done.errors]
        if done.moments is None:
            continue
        if out.width == 0:
            out.grid, out.width, out.n_tok = done.grid, done.width, done.n_tok
            whole = len(index) * done.n_tok * done.width * 4
            keep_all[0] = whole <= memory // 2
            passes = 1 if keep_all[0] else 2
            if keep_all[0]:
                feats = torch.empty((len(index), done.n_tok, done.width), dtype=torch.float32)
            else:
                log.info("streaming fit: the full-width tokens of %d images (%.0f MiB) exceed half of the fit memory "
                         "(%.0f MiB): two passes, the gallery kept in the chosen channels", len(index), whole / 2**20,
                         memory / 2**20)
        out.moments = done.moments if out.moments is None else out.moments.merge(done.moments)
        out.index += [batch_idx[p] for p in done.read]
        out.names += [labels[batch_idx[p]] for p in done.read]
        sems.append(done.semantic)  # type: ignore[arg-type]
        if feats is not None and done.full is not None:
            feats[filled : filled + done.full.shape[0]] = done.full
            filled += done.full.shape[0]
        if on_progress is not None:
            on_progress((len(done.read) + len(done.errors)) / passes)
    out.semantic = np.concatenate(sems) if sems else np.zeros(0)
    out.feats = None if feats is None else feats[:filled]
    return out, passes


@dataclass
class SecondPass:
    """What pass 2 keeps: the gallery, the scope rows and the leave-one-out images' tokens."""

    gallery: torch.Tensor  # (M, K)
    gallery_image: torch.Tensor  # (M,) int32
    gallery_total: int  # support tokens seen (n * N)
    selected: torch.Tensor | None  # (n, N, K) every token, when asked (the outlier filter)
    loo: dict[int, torch.Tensor]  # support image -> (N, D) full width (scope check) or (N, K)
    scope_rows: torch.Tensor | None  # (G, D)


def second_pass(inputs: Sequence[ImageInput], labels: Sequence[str], index: Sequence[int], runner: Runner, batch: int,
                neurons: torch.Tensor, n_tok: int, builder: GalleryBuilder, loo_images: Sequence[int],
                scope_flat: torch.Tensor | None, loo_later: bool, keep_selected: bool,
                on_progress: Callable[[float], None] | None) -> SecondPass:
    """Pass 2 over the ``n`` images read (``inputs[index]``): the gallery through ``builder``,
    the full-width rows ``scope_flat`` (flat indices ``image * N + token``) and the tokens of
    ``loo_images`` (full width when there are scope rows, unless ``loo_later``; else in the
    chosen channels)."""
    loo_set = set(loo_images)
    rows_by_image: dict[int, list[int]] = {}
    if scope_flat is not None:
        for r in scope_flat.tolist():
            rows_by_image.setdefault(r // n_tok, []).append(r % n_tok)
    full_loo = scope_flat is not None and not loo_later

    def make(start: int, size: int) -> dict:
        imgs = range(start, start + size)
        return {"stats": False, "neurons": neurons,
                "keep": tuple(i - start for i in imgs if i in loo_set) if full_loo else (),
                "rows": tuple((i - start, t) for i in imgs for t in rows_by_image.get(i, ()))}

    selected: list[torch.Tensor] = []
    loo: dict[int, torch.Tensor] = {}
    scope: list[torch.Tensor] = []
    start = 0
    for done in runner(_jobs(inputs, labels, index, batch, make)):
        if done.errors:
            src, problem = done.errors[0]
            raise ImageLoadError(src, f"could be read on the first pass of the fit but not on the second: {problem}")
        assert done.selected is not None
        builder.add(done.selected, start)
        if keep_selected:
            selected.append(done.selected)
        for p, t in done.kept.items():
            loo[start + p] = t
        if scope_flat is None:
            for p in range(done.selected.shape[0]):
                if start + p in loo_set:
                    loo[start + p] = done.selected[p].clone()
        if done.rows is not None:
            scope.append(done.rows)
        start += done.selected.shape[0]
        if on_progress is not None:
            on_progress(done.selected.shape[0] / 2)
    gallery, image = builder.result()
    return SecondPass(gallery, image, start * n_tok, torch.cat(selected) if keep_selected else None, loo,
                      torch.cat(scope) if scope else None)


@dataclass
class Support:
    """Everything the fit learns from the support images before the decision levels."""

    names: list[str]
    errors: list[ImageLoadError]
    outliers: list[str]
    grid: tuple[int, int]
    width: int
    variance: torch.Tensor  # (D,) float64
    neurons: torch.Tensor  # (K,) int64
    gallery: torch.Tensor  # (M, K); unit vectors with distance="cosine"
    gallery_image: torch.Tensor  # (M,) int32
    gallery_rule: str
    semantic: np.ndarray  # (n,) float64
    loo_raw: np.ndarray  # (n,) float64, NaN where not scored; configured distance and pooling (leave_one_out)
    loo_tokens: list[np.ndarray]  # token scores of each image scored, configured distance
    loo_rule: str
    scope: torch.Tensor | None  # (G, D)
    scope_image: torch.Tensor | None  # (G,) int32
    loo_scope: np.ndarray | None  # (n,) float64
    passes: int  # forward passes over the support set


def gather(det, inputs: Sequence[ImageInput], names: Sequence[str] | None, runner: Runner, memory: int,
           device: torch.device, on_progress: Callable[[float], None] | None = None) -> Support:
    """The support set's neurons, gallery, leave-one-out scores (one search, with the configured
    distance and pooling: :func:`leave_one_out`) and scope data, in one pass when the full-width
    tokens fit in half of ``memory``, else in two (module docstring)."""
    from . import fit as steps

    cfg, bs = det.config, det.runtime.batch_size
    if names is not None and len(names) != len(inputs):
        raise ConfigError(f"got {len(names)} names for {len(inputs)} images")
    # volumes and multi-frame files: their images (a lazy view: nothing is read or copied here)
    inputs, labels = expand_inputs(inputs, names, det.read_rule, label=True)
    p1, passes = first_pass(inputs, labels, list(range(len(inputs))), runner, bs, memory, on_progress)
    for err in p1.errors:
        log.warning("skipping support image %s", err)
    if not p1.index:
        raise ConfigError(f"no readable support image among the {len(inputs)} given" + (
            f" (first problem: {p1.errors[0]})" if p1.errors else ""))
    if cfg.selection != "all" and cfg.k not in ("auto", None) and cfg.k > p1.width:
        raise ConfigError(f"k={cfg.k} is larger than the width of block {cfg.layer!r} ({p1.width} channels)")
    builder = GalleryBuilder(cfg.gallery_size, cfg.seed)
    outliers: list[str] = []
    if p1.feats is not None:
        return _one_pass(p1, builder, cfg, device, passes, memory)
    while True:  # two passes; again over the images kept when the outlier filter drops some
        n, n_tok, width = len(p1.index), p1.n_tok, p1.width
        variance = p1.moments.variance
        neurons = steps.choose_neurons(variance, cfg)
        loo_images = steps.spread_subset(n, steps.MAX_LOO_IMAGES) if n >= 2 else []
        scope_on = cfg.scope_check and n >= 2
        scope_flat = (steps.scope_rows(n, n_tok, cfg.seed) if scope_on else None)
        if scope_on and scope_flat is None:
            scope_flat = torch.arange(n * n_tok)
        filter_now = cfg.filter_outliers and not outliers and n >= 2
        keep_selected = filter_now and cfg.gallery_size is not None
        side = (len(loo_images) * n_tok * width + (scope_flat.numel() if scope_on else 0) * width) * 4
        loo_later = scope_on and side > memory // 4  # their full-width tokens: a pass of their own, after this one
        _check_memory(memory, n, n_tok, width, int(neurons.numel()), cfg.gallery_size, keep_selected)
        p2 = second_pass(inputs, labels, p1.index, runner, bs, neurons, n_tok, builder, loo_images,
                         scope_flat, loo_later, keep_selected, on_progress if not outliers else None)
        if filter_now:
            selected = p2.selected if keep_selected else p2.gallery.reshape(n, n_tok, -1)
            keep = steps.inliers_of_selected(selected, cfg)  # (n,) bool
            if not keep.all():
                outliers = [nm for nm, k in zip(p1.names, keep) if not k]
                for nm in outliers:
                    log.debug("filter_outliers: dropping support image %s (flagged by the Isolation Forest)", nm)
                index = [i for i, k in zip(p1.index, keep) if k]
                errors = p1.errors
                p1, _ = first_pass(inputs, labels, index, runner, bs, 0, None)  # moments without the outliers
                p1.errors = errors
                builder = GalleryBuilder(cfg.gallery_size, cfg.seed)
                passes += 2
                continue
        break
    scope = scope_image = loo_scope = None
    full = {i: t for i, t in p2.loo.items()}
    if scope_on and loo_later:
        full = loo_pass(inputs, labels, [p1.index[i] for i in loo_images], loo_images, runner, bs)
        passes += 1
    if scope_on:
        scope, scope_image = p2.scope_rows, (scope_flat // n_tok).to(torch.int32)
        loo_scope = np.full(n, np.nan)
        for i in steps_of(loo_images, "scope check"):
            loo_scope[i] = steps.scope_scores(full[i][None], scope, scope_image, image=i)[0]
        full = {i: t[:, neurons] for i, t in full.items()}
    gallery, loo_raw, loo_tokens = leave_one_out(cfg, p2.gallery, p2.gallery_image, full, n, n_tok, device, memory)
    return Support(p1.names, p1.errors, outliers, p1.grid, width, variance, neurons, gallery, p2.gallery_image,
                   GalleryBuilder.describe(cfg.gallery_size, p2.gallery_total, gallery.shape[0]), p1.semantic,
                   loo_raw, loo_tokens, steps.describe_loo(len(loo_images), n), scope, scope_image, loo_scope, passes)


def _one_pass(p1: FirstPass, builder: GalleryBuilder, cfg, device: torch.device, passes: int, memory: int) -> Support:
    """The fit on full-width tokens held in memory (the steps of :mod:`.fit` as they always ran)."""
    from . import fit as steps

    feats, names, semantic = p1.feats, list(p1.names), p1.semantic
    assert feats is not None
    variance, neurons = steps.select_neurons(feats, cfg)
    outliers: list[str] = []
    if cfg.filter_outliers:
        keep = steps.support_inliers(feats, neurons, cfg)  # (n,) bool
        outliers = [nm for nm, kept in zip(names, keep) if not kept]
        for nm in outliers:
            log.debug("filter_outliers: dropping support image %s (flagged by the Isolation Forest)", nm)
        if outliers:
            names = [nm for nm, kept in zip(names, keep) if kept]
            feats, semantic = feats[torch.from_numpy(keep)], semantic[keep]
            variance, neurons = steps.select_neurons(feats, cfg)  # chosen again without the outliers
    n, n_tok, width = feats.shape
    if cfg.gallery_size is None:
        gallery = feats.reshape(n * n_tok, width)[:, neurons].contiguous()  # (n*N, K)
        gallery_image = torch.arange(n, dtype=torch.int32).repeat_interleave(n_tok)
    else:
        builder.add(feats[:, :, neurons], 0)
        gallery, gallery_image = builder.result()
    scope, scope_image, loo_scope = None, None, None
    loo_images = steps.spread_subset(n, steps.MAX_LOO_IMAGES) if n >= 2 else []
    if cfg.scope_check and n >= 2:  # every channel, so that another product is seen even where the neurons agree
        scope, scope_image = steps.scope_gallery(feats, cfg.seed)
        loo_scope = np.full(n, np.nan)
        for i in steps_of(loo_images, "scope check"):
            loo_scope[i] = steps.scope_scores(feats[i : i + 1], scope, scope_image, image=i)[0]
    queries = {i: feats[i][:, neurons] for i in loo_images} if cfg.gallery_size is not None else {}
    gallery, loo_raw, loo_tokens = leave_one_out(cfg, gallery, gallery_image, queries, n, n_tok, device, memory)
    return Support(names, p1.errors, outliers, p1.grid, width, variance, neurons, gallery, gallery_image,
                   GalleryBuilder.describe(cfg.gallery_size, n * n_tok, gallery.shape[0]), semantic, loo_raw,
                   loo_tokens, steps.describe_loo(len(loo_images), n), scope, scope_image, loo_scope, passes)


def leave_one_out(cfg, gallery: torch.Tensor, gallery_image: torch.Tensor, queries: dict[int, torch.Tensor], n: int,
                  n_tok: int, device: torch.device, memory: int) -> tuple[torch.Tensor, np.ndarray, list[np.ndarray]]:
    """The gallery as the model keeps it and the leave-one-out scores with the configured
    ``distance`` and ``visual_top_percent``, from one search: the raw visual scores ``(n,)`` (NaN
    where not scored) and the token scores of each image scored (ascending image index).

    Every support token in ``gallery`` ``(n * N, K)``, image by image: :func:`.fit.leave_one_out`,
    or with ``distance="cosine"`` the same search on the gallery as unit vectors, in cosine
    distance (:func:`.fit.cosine_gallery`; the gallery returned is the unit one). A coreset
    (``gallery_size``, Euclidean only): ``queries`` (image -> its tokens ``(N, K)``) against the
    vectors of the other images (:func:`.fit.leave_one_out_of`). With ``visual_top_percent`` each
    image's score is pooled from its token scores (:func:`.fit.pool_visual`), not their max.
    The search goes through a k-d tree where ``index`` resolves to one and the tree takes at most a
    quarter of the fit ``memory`` (:func:`lakead.index.tree_bytes`; same distances), else exact."""
    from . import fit as steps

    kind = resolve_index(cfg.index, gallery.shape[0], gallery.shape[1], device)
    index = "kdtree" if kind == "kdtree" and tree_bytes(gallery.shape[0], gallery.shape[1]) <= memory // 4 else "exact"

    if cfg.gallery_size is not None:
        loo_raw, tokens = steps.leave_one_out_of(queries, gallery, gallery_image, n, device)
    elif cfg.distance == "cosine":
        gallery, loo_raw, tokens = steps.cosine_gallery(gallery, n, n_tok, device, index)
    else:
        loo_raw, tokens = steps.leave_one_out(gallery, n, n_tok, device, index)
    if cfg.visual_top_percent is not None and tokens:
        pooled = steps.pool_visual(torch.from_numpy(np.stack(tokens).astype(np.float32)), cfg)  # (scored,)
        scored = np.flatnonzero(np.isfinite(loo_raw))  # in the order of the token scores
        loo_raw = np.full_like(loo_raw, np.nan)
        loo_raw[scored] = pooled.numpy().astype(np.float64)
    return gallery, loo_raw, tokens


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def loo_pass(inputs: Sequence[ImageInput], labels: Sequence[str], index: Sequence[int], images: Sequence[int],
             runner: Runner, batch: int) -> dict[int, torch.Tensor]:
    """The full-width tokens ``(N, D)`` of the leave-one-out images (support images ``images``,
    at ``inputs[index]``): a pass over at most :data:`~.fit.MAX_LOO_IMAGES` images, when
    keeping them during pass 2 would take more than a quarter of the fit memory."""
    out: dict[int, torch.Tensor] = {}
    done_images = 0
    jobs = _jobs(inputs, labels, index, batch, lambda s, size: {"stats": False, "keep": tuple(range(size))})
    for done in runner(jobs):
        if done.errors:
            raise ImageLoadError(done.errors[0][0], f"could be read before but not now: {done.errors[0][1]}")
        for p in range(len(done.read)):
            out[images[done_images + p]] = done.kept[p]
        done_images += len(done.read)
    return out


def _check_memory(memory: int, n: int, n_tok: int, width: int, k: int, cap: int | None, keep_selected: bool) -> None:
    """Refuse a two-pass fit whose kept arrays would not fit in ``memory``, saying what to change."""
    every = n * n_tok * k * 4
    if cap is None and every > memory:
        raise ConfigError(f"the gallery of every support token ({n:,} images x {n_tok} tokens x {k} neurons) needs "
                          f"{_mib(every)}, more than the fit memory ({_mib(memory)}): set gallery_size "
                          "(--gallery-size) to keep a greedy coreset of that many vectors, or raise --fit-memory")
    if cap is not None and 2 * REDUCE_FACTOR * cap * k * 4 > memory // 2:
        raise ConfigError(f"gallery_size {cap:,} needs {_mib(2 * REDUCE_FACTOR * cap * k * 4)} while it is reduced, more "
                          f"than half of the fit memory ({_mib(memory)}): lower gallery_size or raise --fit-memory")
    if keep_selected and every > memory // 2:
        raise ConfigError(f"filter_outliers compares every support token with every other: {_mib(every)} for {n:,} "
                          f"images, more than half of the fit memory ({_mib(memory)}); raise --fit-memory or fit "
                          "without --filter-outliers")
