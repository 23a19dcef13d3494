"""Scoring a stream of image files into an output directory: bounded memory, resumable.

Layout of an output directory::

    scores.csv            path, score, visual, semantic, anomalous (one row per scored image)
    errors.csv            path, error (only when some inputs of this run could not be read)
    overlays/<name>.png   the heat map over the image              (maps "png")
    maps/<name>.npy       the raw float32 map at the image's size  (maps "npy")
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

import csv
import hashlib
import io
import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ._version import __version__
from .api import Detector
from .errors import ConfigError, ImageLoadError, LakeadError, NotFittedError
from .fileio import atomic_write_bytes, atomic_write_text
from .images import iter_images
from .viz import npy_bytes, overlay, png_bytes

log = logging.getLogger("lakead")

SCORES_FILE = "scores.csv"
ERRORS_FILE = "errors.csv"
RUN_FILE = "run.json"
SCORE_COLUMNS = ("path", "score", "visual", "semantic", "anomalous")
ERROR_COLUMNS = ("path", "error")
RUN_FORMAT = "lakead-predict-run"

#: Map files a run can write: "png" overlays in overlays/, raw "npy" maps in maps/.
MAP_KINDS = ("png", "npy")

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
    """Which map files to write: ``"none"``, ``"png"``, ``"npy"`` or ``"png,npy"`` (any order).

    >>> sorted(parse_maps("npy,png")), sorted(parse_maps("none"))
    (['npy', 'png'], [])
    """
    parts = [p.strip().lower() for p in spec.split(",")] if isinstance(spec, str) else [str(p).lower() for p in spec]
    parts = [p for p in parts if p]
    if parts == ["none"]:
        return frozenset()
    bad = [p for p in parts if p not in MAP_KINDS]
    if bad or not parts:
        raise ConfigError(f"maps: {spec!r} is not one of none, png, npy or png,npy (png: overlays/, npy: raw maps/)")
    return frozenset(parts)


def output_root(inputs: Sequence[str | os.PathLike]) -> Path:
    """The folder output names are relative to: the common folder of the inputs, where a folder
    given counts itself and a file its parent. Purely lexical (no symlink is resolved)."""
    folders = []
    for item in inputs:
        p = os.path.abspath(item)
        folders.append(p if os.path.isdir(p) else os.path.dirname(p))
    if not folders:
        return Path(os.getcwd())
    try:
        return Path(os.path.commonpath(folders))
    except ValueError:  # paths on different drives (Windows): no common folder
        return Path(os.path.abspath(os.sep))


def output_name(path: str | os.PathLike, root: Path) -> str:
    """The name of an image's output files: its path relative to ``root``, suffix kept
    (``a.png`` -> ``overlays/a.png.png``, ``maps/a.png.npy``)."""
    return os.path.relpath(os.path.abspath(path), root)


class OutputNames:
    """The output names of one run's images, called in listing order: :func:`output_name`,
    and where two names in one folder differ only in case (``A.png``, ``a.png``), the later
    one with ``~`` and 8 hex digits of its path added, so that a case-insensitive file system
    keeps both. The same inputs get the same names on every run (``resume``), as long as every
    path is named, scored or not. Only the names of the folders on the current path are held.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._folders: dict[str, set[str]] = {}  # case-folded folder -> case-folded names in it

    def __call__(self, path: str | os.PathLike) -> str:
        name = output_name(path, self.root)
        folder, leaf = os.path.split(name)
        key = folder.casefold()
        for k in [k for k in self._folders if k and k != key and not key.startswith(k + os.sep)]:
            del self._folders[k]  # a folder the listing has left
        taken = self._folders.setdefault(key, set())
        if leaf.casefold() in taken:
            tag = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
            leaf = f"{leaf}~{tag}"
            name = os.path.join(folder, leaf)
        taken.add(leaf.casefold())
        return name


def own_output(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """What a run into ``out_dir`` must not list as input: ``out_dir`` itself, or, when an input
    is ``out_dir`` or inside it, its ``overlays/`` (the only images a run writes)."""
    out = Path(out_dir)
    real = os.path.realpath(out)
    for item in inputs:
        r = os.path.realpath(item)
        if r == real or r.startswith(real.rstrip(os.sep) + os.sep):
            return [out / "overlays"]
    return [out, out / "overlays"]


def _csv_line(row: Sequence[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow(row)
    return buf.getvalue().encode("utf-8", "surrogateescape")


def path_key(path: str) -> int:
    """A 64-bit key of a path as written in ``scores.csv`` (to tell which images are done)."""
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


def run_info(
    class_name: str, fitted_at: str, fingerprint: str, threshold: float, precision: str, maps: Collection[str]
) -> dict[str, Any]:
    """What ``run.json`` records about a run; :class:`OutputDir` compares it on resume."""
    return {
        "format": RUN_FORMAT,
        "format_version": 1,
        "model": {"class_name": class_name, "fitted_at": fitted_at, "fingerprint": fingerprint},
        "threshold": threshold if math.isfinite(threshold) else None,
        "precision": precision,
        "maps": sorted(maps),
        "lakead_version": __version__,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# -- the output directory ------------------------------------------------------------------


class OutputDir:
    """``scores.csv`` and ``errors.csv`` of one run, appended a batch at a time.

    Opened fresh, ``scores.csv`` is replaced by a header. Opened with ``resume=True``, an
    existing ``scores.csv`` is checked (header, ``run.json`` written by the same model and
    threshold), a torn last line left by a kill is cut off, and the paths of its rows are
    kept as 64-bit keys so that :meth:`done` can skip them. Use as a context manager.
    """

    def __init__(self, out_dir: str | os.PathLike, info: dict[str, Any], *, resume: bool = False) -> None:
        self.dir = Path(out_dir)
        self.info = info
        self.resume = resume
        self._done = np.zeros(0, dtype=np.uint64)  # sorted keys of those rows
        self._scores: io.BufferedWriter | None = None
        self._errors: io.BufferedWriter | None = None
        self._dir_fd: int | None = None  # the directory, locked while the run writes

    # -- opening

    def __enter__(self) -> "OutputDir":
        if self.dir.exists() and not self.dir.is_dir():
            raise LakeadError(f"--out {self.dir}: exists and is not a directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._open()
        except BaseException:
            self.__exit__()  # release the lock: the with-block will not
            raise
        return self

    def _open(self) -> None:
        scores = self.dir / SCORES_FILE
        keep = 0
        if self.resume and scores.exists():
            self._check_run_file()
            keep = self._load_scores(scores)
        if not (keep and (self.dir / RUN_FILE).exists()):  # a resumed run keeps the first run's record
            atomic_write_text(self.dir / RUN_FILE, json.dumps(self.info, indent=2) + "\n")
        if keep:
            os.truncate(scores, keep)  # drops a torn last line, if any
            self._scores = scores.open("ab")
        else:
            self._scores = scores.open("wb")
            self._append(self._scores, [_csv_line(SCORE_COLUMNS)])
        (self.dir / ERRORS_FILE).unlink(missing_ok=True)  # every unscored image is tried again

    def __exit__(self, *exc: object) -> None:
        for fh in (self._scores, self._errors):
            if fh is not None:
                fh.close()
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # releases the lock
            self._dir_fd = None

    def _lock(self) -> None:
        """One run at a time per directory: an advisory lock on the directory itself, released
        by the system even when the process is killed (POSIX; not checked on Windows)."""
        try:
            import fcntl

            fd = os.open(self.dir, os.O_RDONLY)
        except (ImportError, OSError):  # no flock, or directories cannot be opened (Windows)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LakeadError(f"--out {self.dir}: another lakead predict is writing to this directory") from None
        self._dir_fd = fd

    def _check_run_file(self) -> None:
        path = self.dir / RUN_FILE
        if not path.exists():
            log.warning("%s: no %s, so the model that wrote %s cannot be checked; resuming anyway",
                        self.dir, RUN_FILE, SCORES_FILE)
            return
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            old_model, old_thr = old["model"]["fingerprint"], old["threshold"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LakeadError(f"{path}: cannot be read ({exc}); delete it to resume without the check") from None
        if old_model != self.info["model"]["fingerprint"]:
            raise LakeadError(
                f"cannot resume: {self.dir / SCORES_FILE} was written by another model "
                f"({old['model'].get('class_name')!r}, fitted at {old['model'].get('fitted_at')}); "
                "use a new --out, or drop --resume to replace it")
        if old_thr != self.info["threshold"]:
            raise LakeadError(
                f"cannot resume: {self.dir / SCORES_FILE} was written with threshold {old_thr}, this run uses "
                f"{self.info['threshold']}; give the same --threshold, or drop --resume to replace it")
        if old.get("precision", "float32") != self.info["precision"]:
            raise LakeadError(
                f"cannot resume: {self.dir / SCORES_FILE} was written with precision {old.get('precision', 'float32')}, "
                f"this run uses {self.info['precision']}; give the same --precision, or drop --resume to replace it")
        if old.get("maps") != self.info["maps"]:
            log.warning("resuming with maps %s where the earlier run wrote %s: images already scored keep what it wrote",
                        ",".join(self.info["maps"]) or "none", ",".join(old.get("maps") or []) or "none")

    def _load_scores(self, path: Path) -> int:
        """Read the keys of complete rows; return the byte length to keep (0: start over)."""
        header = _csv_line(SCORE_COLUMNS)
        keys: list[int] = []
        with path.open("rb") as fh:
            first = fh.readline()
            if first != header:
                if header.startswith(first):  # empty, or a torn header
                    return 0
                raise LakeadError(f"cannot resume: {path} is not a lakead scores file (first line {first[:80]!r})")
            keep = len(first)
            record = b""
            line_no = 1
            for line in fh:
                line_no += 1
                record += line
                # A record is complete at a newline outside quotes (quotes in a field are doubled).
                if not record.endswith(b"\n") or record.count(b'"') % 2:
                    continue
                row = next(csv.reader(io.StringIO(record.decode("utf-8", "surrogateescape"), newline="")), [])
                if len(row) != len(SCORE_COLUMNS):
                    raise LakeadError(f"cannot resume: {path}, line {line_no}: expected {len(SCORE_COLUMNS)} fields, "
                                      f"found {len(row)}; the file was changed by hand")
                keys.append(path_key(row[0]))
                keep += len(record)
                record = b""
        if record:
            log.warning("%s: cut off an incomplete last line (%d bytes) left by an interrupted run; "
                        "that image is scored again", path, len(record))
        self._done = np.sort(np.asarray(keys, dtype=np.uint64))
        return keep

    # -- use

    def done(self, path: str) -> bool:
        """Whether ``path`` (as written in the path column) already has a row from earlier runs."""
        if not self._done.size:
            return False
        key = np.uint64(path_key(path))
        i = int(np.searchsorted(self._done, key))
        return i < self._done.size and self._done[i] == key

    def commit(self, rows: Sequence[Sequence[str]], errors: Sequence[tuple[str, str]] = ()) -> None:
        """Append score rows and error rows, each file in one write, flushed to disk."""
        if errors:
            if self._errors is None:
                self._errors = (self.dir / ERRORS_FILE).open("wb")
                self._errors.write(_csv_line(ERROR_COLUMNS))
            self._append(self._errors, [_csv_line(e) for e in errors])
        if rows:
            assert self._scores is not None, "OutputDir used outside its with-block"
            self._append(self._scores, [_csv_line(r) for r in rows])

    @staticmethod
    def _append(fh: io.BufferedWriter, lines: list[bytes]) -> None:
        fh.write(b"".join(lines))
        fh.flush()
        os.fsync(fh.fileno())


class Todo:
    """The paths of a run that have no row yet in ``results`` (as strings), lazily.

    Paths already scored are passed over and counted; :meth:`take_skipped` returns how many
    since it was last called (for progress reports). With ``names`` (an :class:`OutputNames`),
    every path is named in listing order, skipped or not, and :meth:`take_name` returns the
    name of a path yielded.
    """

    def __init__(self, paths: Iterable[os.PathLike | str], results: OutputDir,
                 names: Callable[[str], str] | None = None) -> None:
        self.paths = paths
        self.results = results
        self.names = names
        self.skipped = 0
        self._reported = 0
        self._named: dict[str, str] = {}  # names of the paths yielded and not yet taken

    def __iter__(self) -> Iterator[str]:
        for p in self.paths:
            s = str(p)
            name = self.names(s) if self.names is not None else None
            if self.results.done(s):
                self.skipped += 1
                continue
            if name is not None:
                self._named[s] = name
            yield s

    def take_name(self, path: str) -> str:
        """The output name of ``path`` (once: it is then forgotten)."""
        return self._named.pop(path)

    def take_skipped(self) -> int:
        n, self._reported = self.skipped - self._reported, self.skipped
        return n


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
    pool: Executor | None = None,
) -> list[tuple[str, str, str, str, str]]:
    """Score decoded images, write their map files, return their ``scores.csv`` rows.

    The one place rows and map files are made, shared by the single-process run and the
    Ray workers, so both write the same bytes.
    """
    pred = detector.predict(list(arrays), names=list(paths), threshold=threshold)
    vmin, vmax = detector.map_range_

    def write(j: int) -> None:
        if "png" in maps:
            atomic_write_bytes(out_dir / "overlays" / f"{names[j]}.png", png_bytes(overlay(arrays[j], pred.maps[j], vmin, vmax)))
        if "npy" in maps:
            atomic_write_bytes(out_dir / "maps" / f"{names[j]}.npy", npy_bytes(pred.maps[j]))

    if maps:
        for _ in (pool.map(write, range(len(arrays))) if pool is not None else map(write, range(len(arrays)))):
            pass
    return [
        (paths[j], f"{pred.scores[j]:.6g}", f"{pred.visual[j]:.6g}", f"{pred.semantic[j]:.6g}",
         str(bool(pred.anomalous[j])).lower())
        for j in range(len(arrays))
    ]


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
    maps: str | Collection[str] = MAP_KINDS,
    resume: bool = False,
    read_threads: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> BatchSummary:
    """Score every image of ``inputs`` (files, or folders searched recursively) into ``out_dir``.

    The layout, the streaming and the crash safety are described in the module docstring.
    ``maps``: which map files to write (see :func:`parse_maps`). ``resume``: keep the rows of
    an earlier run into the same ``out_dir`` and score only the images without one.
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
    paths = iter_images(inputs, exclude=own_output(out, inputs))  # checks the inputs now, lists them while consumed
    root = output_root(inputs)
    bs = detector.runtime.batch_size
    summary = BatchSummary(threshold=detector.threshold_ if threshold is None else float(threshold))

    info = run_info(detector.class_name_, detector.fitted_at_, detector.fingerprint(), summary.threshold,
                    detector.runtime.precision, maps)
    with OutputDir(out, info, resume=resume) as results, \
            ThreadPoolExecutor(threads, thread_name_prefix="lakead-read") as pool:
        todo = Todo(paths, results, OutputNames(root))
        arrays: list[np.ndarray] = []
        kept: list[str] = []
        errors: list[tuple[str, str]] = []

        def flush() -> None:
            rows = score_batch(detector, arrays, kept, [todo.take_name(p) for p in kept], out, maps,
                               threshold=threshold, pool=pool) if arrays else []
            results.commit(rows, errors)
            record(summary, rows, errors)
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
