"""Scoring a stream of image files into an output directory: bounded memory, resumable.

Layout of an output directory::

    scores.csv            path, score, visual, semantic, anomalous, out_of_scope (one row per scored image;
                          scores in full float32 precision)
    errors.csv            path, error (only when some inputs of this run could not be read)
    overlays/<name>.png   the heat map over the image, with the regions' outline, the score, the decision
                          and a colour bar                         (maps "png")
    maps/<name>.npy       the raw float32 map at the image's size  (maps "npy")
    maps/<volume>.nii.gz  a NIfTI input's slice maps as one volume with the input's affine (maps "nifti";
                          its slices' maps/<volume>#z=K.npy are written too)
    masks/<name>.png      the defect mask, 255 inside a region     (masks=True)
    regions.csv           path, region, top, left, bottom, right, area, peak, mean (masks=True)
    run.json              the model, threshold and precision that wrote scores.csv (checked on resume)

``<name>`` is the image's path relative to the common folder of the inputs (a folder given
counts itself, a file its folder), suffix kept, so that ``test/crack/000.png``,
``test/good/000.png`` and ``test/good/000.jpg`` do not overwrite each other
(``maps/test/good/000.jpg.npy``); names differing only in case get a suffix (:class:`OutputNames`).
Each image is listed once, even through symlink loops or inputs given twice
(:func:`lakead.images.iter_images`), and the run's own output never, even inside an input.

How a run streams. Folders are listed lazily (:func:`lakead.images.iter_images`); a pool of
threads reads and decodes the next images (Pillow releases the GIL) while the network scores
the current batch, at most ``2 * batch_size`` images ahead; overlays and maps are encoded in
the same pool. Nothing accumulates per image: memory is the same for a thousand images or
ten million (the only per-image state is 8 bytes per row already in ``scores.csv`` when
resuming; a single folder's file names are held while that folder is listed).

Crash safety. After each batch, its maps are written (each one atomically), then its rows
are appended to ``scores.csv`` in one write, flushed and ``fsync``-ed. A row in the file
therefore means its maps are complete. Ctrl-C or a kill loses at most the batch in flight.
A kill in the middle of the append can leave a torn last line; ``resume=True`` cuts it off
(that image is scored again) and skips every image whose path already has a row.
``errors.csv`` describes the current run: every image without a row is tried again on resume,
so it lists exactly the inputs that have no score.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from .api import Detector
from .errors import ConfigError, ImageLoadError, NotFittedError
from .fileio import atomic_write_bytes
from .images import iter_images
from .medical import ReadRule, expand_all, split_source, write_map_volume
from .outputs import check_inputs
from .rundir import (  # noqa: F401 - the output directory's names, re-exported for users of lakead.batch
    ERROR_COLUMNS,
    ERRORS_FILE,
    RUN_FILE,
    RUN_FORMAT,
    SCORE_COLUMNS,
    SCORES_FILE,
    OutputDir,
    OutputNames,
    Todo,
    check_target,
    output_name,
    output_root,
    own_output,
    path_key,
    run_info,
)
from .viz import annotate, npy_bytes, overlay, png_bytes, verdict_lines

log = logging.getLogger("lakead")

#: Map files of every image: "png" overlays in overlays/, raw "npy" maps in maps/.
MAP_KINDS = ("png", "npy")
#: Every map kind: also "nifti", the maps of a NIfTI input as a volume aligned with it.
ALL_MAP_KINDS = (*MAP_KINDS, "nifti")
#: What a run writes unless told otherwise: the overlays (raw maps are large: opt in with "png,npy").
DEFAULT_MAPS = ("png",)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatchSummary:
    """What a :func:`predict_to_dir` run did."""

    scored: int = 0  # images scored by this run
    anomalous: int = 0  # of those, above the threshold
    failed: int = 0  # inputs that could not be read (listed in errors.csv)
    skipped: int = 0  # inputs already in scores.csv (resume), not scored again
    threshold: float = float("nan")


# -- options and names ------------------------------------------------------------------------


def parse_maps(spec: str | Collection[str]) -> frozenset[str]:
    """Which map files to write: ``"none"``, or any of ``"png"``, ``"npy"``, ``"nifti"`` comma-separated.

    >>> sorted(parse_maps("npy,png")), sorted(parse_maps("none"))
    (['npy', 'png'], [])
    """
    parts = [p.strip().lower() for p in spec.split(",")] if isinstance(spec, str) else [str(p).lower() for p in spec]
    parts = [p for p in parts if p]
    if parts == ["none"]:
        return frozenset()
    bad = [p for p in parts if p not in ALL_MAP_KINDS]
    if bad or not parts:
        raise ConfigError(f"maps: {spec!r} is not one of none, png, npy or png,npy, optionally with nifti (png: "
                          "overlays/, npy: raw maps/, nifti: a NIfTI input's maps as one volume)")
    return frozenset(parts)


def record(summary: BatchSummary, rows: Sequence[Sequence[str]], errors: Sequence[tuple[str, str]]) -> None:
    """Count committed rows and errors into ``summary``."""
    summary.scored += len(rows)
    summary.anomalous += sum(r[4] == "true" for r in rows)
    summary.failed += len(errors)


# -- reading ahead ------------------------------------------------------------------------


def read_ahead(items: Iterable[T], read: Callable[[T], R], pool: Executor, depth: int) -> Iterator[tuple[T, R | ImageLoadError]]:
    """``(item, read(item))`` in input order, with up to ``depth`` reads running ahead in ``pool``.

    An :class:`~lakead.errors.ImageLoadError` is yielded in place of the result; any other
    exception is raised. Only ``depth`` items are pulled from ``items`` ahead of the consumer.
    """
    it = iter(items)
    pending: deque = deque()
    try:
        for item in it:
            pending.append((item, pool.submit(read, item)))
            if len(pending) >= depth:
                break
        while pending:
            item, fut = pending.popleft()
            try:
                result: R | ImageLoadError = fut.result()
            except ImageLoadError as exc:
                result = exc
            for nxt in it:
                pending.append((nxt, pool.submit(read, nxt)))
                break
            yield item, result
    finally:
        for _, fut in pending:
            fut.cancel()


# -- scoring one batch --------------------------------------------------------------------


def score_batch(
    detector: Detector,
    arrays: Sequence[np.ndarray],
    paths: Sequence[str],
    names: Sequence[str],
    out_dir: Path,
    maps: Collection[str],
    *,
    threshold: float | None = None,
    false_alarm_rate: float | None = None,
    masks: bool = False,
    pool: Executor | None = None,
) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Score decoded images, write their map (and mask) files, return their ``scores.csv``
    rows and, with ``masks``, their ``regions.csv`` rows.

    The one place rows and map files are made, shared by the single-process run and the
    Ray workers, so both write the same bytes.
    """
    budget = {} if false_alarm_rate is None else {"false_alarm_rate": false_alarm_rate}
    pred = detector.predict(list(arrays), names=list(paths), threshold=threshold, **budget)
    vmin, vmax = detector.map_range_
    found = [pred.regions(j) for j in range(len(arrays))] if (masks or "png" in maps) else []

    def write(j: int) -> None:
        if "png" in maps:
            text = verdict_lines(float(pred.scores[j]), pred.threshold, bool(pred.anomalous[j]), bool(pred.out_of_scope[j]))
            image = annotate(overlay(arrays[j], pred.maps[j], vmin, vmax), found[j][0], text, vmin, vmax,
                             anomalous=bool(pred.anomalous[j]))
            atomic_write_bytes(out_dir / "overlays" / f"{names[j]}.png", png_bytes(image))
        if "npy" in maps or ("nifti" in maps and is_nifti_slice(paths[j])):
            atomic_write_bytes(out_dir / "maps" / f"{names[j]}.npy", npy_bytes(pred.maps[j]))
        if masks:
            atomic_write_bytes(out_dir / "masks" / f"{names[j]}.png", png_bytes(found[j][0].astype(np.uint8) * 255))

    if maps or masks:
        for _ in (pool.map(write, range(len(arrays))) if pool is not None else map(write, range(len(arrays)))):
            pass
    rows = [
        (paths[j], number(pred.scores[j]), number(pred.visual[j]), number(pred.semantic[j]),
         str(bool(pred.anomalous[j])).lower(), str(bool(pred.out_of_scope[j])).lower())
        for j in range(len(arrays))
    ]
    regions = [
        (paths[j], str(k), *(str(v) for v in (r.top, r.left, r.bottom, r.right, r.area)), number(r.peak), number(r.mean))
        for j in range(len(arrays)) if masks for k, r in enumerate(found[j][1], start=1)
    ]
    return rows, regions


def is_nifti_slice(source: str) -> bool:
    """Whether a source is a slice of a NIfTI volume (``scan.nii.gz#z=42``)."""
    parsed = split_source(source)
    return parsed is not None and parsed[1] != "frame"


class VolumeMaps:
    """The NIfTI volumes of a run (maps "nifti"): each is written as ``maps/<volume>.nii.gz``
    once every one of its slices has a row (this run's or an earlier one's) or failed, from
    the slices' ``maps/*.npy`` (so that a resumed run writes the whole volume)."""

    def __init__(self, out: Path, root: Path, results: OutputDir) -> None:
        self.out, self.root, self.results = out, root, results
        self.pending: dict[str, list[str]] = {}
        self.settled: set[str] = set()

    def add(self, volume: str, sources: list[str]) -> None:
        self.pending[volume] = sources

    def settle(self, sources: Iterable[str]) -> None:
        if self.pending:
            self.settled.update(sources)
        for volume, parts in list(self.pending.items()):
            if all(s in self.settled or self.results.done(s) for s in parts):
                del self.pending[volume]
                self.settled.difference_update(parts)
                self.write(volume, parts)

    def write(self, volume: str, parts: list[str]) -> None:
        sources, maps = [], []
        for s in parts:
            f = self.out / "maps" / f"{output_name(s, self.root)}.npy"
            if f.is_file():
                sources.append(s)
                maps.append(np.load(f))
        name = output_name(volume, self.root)
        try:
            write_map_volume(volume, sources, maps, str(self.out / "maps" / f"{name}.nii.gz"))
        except (ImageLoadError, ValueError) as exc:
            log.warning("%s: the map volume could not be written (%s)", volume, exc)


def number(value: float) -> str:
    """A float32 score in full: the shortest text that reads back as the same float32
    (``1.2345679``, not ``1.23457``), so that ties are not made by rounding.

    >>> number(np.float32(1.23456789)), number(2.0), number(float("inf"))
    ('1.2345679', '2.0', 'inf')
    """
    return str(np.float32(value))


def _is_number(value: object) -> bool:
    """A real number that is not NaN (a threshold may be infinite: nothing, or everything, is anomalous)."""
    if isinstance(value, bool):
        return False
    try:
        return not math.isnan(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def default_read_threads() -> int:
    """Threads that read images ahead: 4, or fewer on a smaller machine."""
    return max(1, min(4, os.cpu_count() or 1))


# -- the single-process run ---------------------------------------------------------------


def predict_to_dir(
    detector: Detector,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    threshold: float | None = None,
    false_alarm_rate: float | None = None,
    maps: str | Collection[str] = DEFAULT_MAPS,
    masks: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    read_threads: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> BatchSummary:
    """Score every image of ``inputs`` (files, or folders searched recursively) into ``out_dir``.

    The layout, the streaming and the crash safety are described in the module docstring.
    ``maps``: which map files to write (see :func:`parse_maps`); ``masks``: also the defect
    masks (``masks/<name>.png``) and ``regions.csv`` (one row per region); ``false_alarm_rate``:
    the decisions for that budget instead of the model's. ``resume``: keep the rows of
    an earlier run into the same ``out_dir`` and score only the images without one;
    ``overwrite``: remove an earlier run's results first (without either, a directory holding
    them is refused).
    Unreadable inputs are reported through ``on_error(path, problem)``, listed in
    ``errors.csv`` and skipped; the others are still scored. ``on_progress(n)`` is called as
    ``n`` more inputs are done (scored, failed or skipped).
    """
    if not detector.is_fitted:
        raise NotFittedError("predict_to_dir needs a fitted detector: call fit(...) or load a saved model first")
    maps = parse_maps(maps) if isinstance(maps, str) else parse_maps(list(maps) or "none")
    threads = default_read_threads() if read_threads is None else int(read_threads)
    if threads < 1:
        raise ConfigError(f"read_threads must be at least 1, got {read_threads}")
    if threshold is not None and not _is_number(threshold):
        raise ConfigError(f"threshold must be a number, not {threshold!r}")
    out = Path(out_dir)
    check_inputs(out, inputs, inside=False, holds=False)  # results inside the image folder are fine, in it are not
    check_target(out, resume=resume, overwrite=overwrite)  # before the work, not after it
    listed = iter_images(inputs, exclude=own_output(out, inputs))  # checks the inputs now, lists them while consumed
    volumes: list[VolumeMaps] = []  # maps "nifti": set once the output directory is open
    paths = expand_all(listed, getattr(detector, "read_rule", ReadRule()),  # volumes and multi-frame files: their images
                       on_volume=(lambda v, s: volumes[0].add(v, s)) if "nifti" in maps else None)
    root = output_root(inputs)
    bs = detector.runtime.batch_size
    if threshold is None and false_alarm_rate is not None:
        threshold_used = detector.thresholds(false_alarm_rate).image
    else:
        threshold_used = detector.threshold_ if threshold is None else float(threshold)
    summary = BatchSummary(threshold=threshold_used)

    info = run_info(detector.class_name_, detector.fitted_at_, detector.fingerprint(), summary.threshold,
                    detector.runtime.precision, maps)
    with OutputDir(out, info, resume=resume, overwrite=overwrite) as results, \
            ThreadPoolExecutor(threads, thread_name_prefix="lakead-read") as pool:
        todo = Todo(paths, results, OutputNames(root))
        volumes.append(VolumeMaps(out, root, results))
        arrays: list[np.ndarray] = []
        kept: list[str] = []
        errors: list[tuple[str, str]] = []

        def flush() -> None:
            rows, regions = score_batch(detector, arrays, kept, [todo.take_name(p) for p in kept], out, maps,
                                        threshold=threshold, false_alarm_rate=false_alarm_rate, masks=masks,
                                        pool=pool) if arrays else ([], [])
            results.commit(rows, errors, regions)
            record(summary, rows, errors)
            if "nifti" in maps:
                volumes[0].settle([*kept, *(e[0] for e in errors)])
            done = todo.take_skipped() + len(arrays) + len(errors)
            if on_progress is not None and done:
                on_progress(done)
            arrays.clear()
            kept.clear()
            errors.clear()

        try:
            for path, result in read_ahead(todo, lambda s: detector.read_image(s, s), pool, depth=2 * bs):
                if isinstance(result, ImageLoadError):
                    todo.take_name(path)
                    errors.append((path, result.problem))
                    if on_error is not None:
                        on_error(path, result.problem)
                else:
                    arrays.append(result)
                    kept.append(path)
                if len(arrays) >= bs or len(errors) >= 4 * bs:
                    flush()
            flush()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        summary.skipped = todo.skipped
    return summary
