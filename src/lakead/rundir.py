"""The output directory of a predict run: its files, the output names of images, and the
crash-safe, resumable appending of rows (see :mod:`lakead.batch` for the layout and how a run
streams into it)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .errors import LakeadError
from .fileio import atomic_write_text
from .outputs import RESULTS, OutputRefused, owned_by, refuse_foreign_results

log = logging.getLogger("lakead")

SCORES_FILE = "scores.csv"
ERRORS_FILE = "errors.csv"
RUN_FILE = "run.json"
SCORE_COLUMNS = ("path", "score", "visual", "semantic", "anomalous", "out_of_scope")
#: The columns of lakead 0.1.0 before out_of_scope (a run of it cannot be resumed).
OLD_SCORE_COLUMNS = ("path", "score", "visual", "semantic", "anomalous")
REGIONS_FILE = "regions.csv"
REGION_COLUMNS = ("path", "region", "top", "left", "bottom", "right", "area", "peak", "mean")
ERROR_COLUMNS = ("path", "error")
RUN_FORMAT = "lakead-predict-run"


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


#: Most bytes of an image's output name in its folder: the file system's 255, less what the
#: output files add (``.png``, ``.npy``) and the atomic write's temporary name (``.NAME.xxxxxxxx.tmp``).
MAX_LEAF_BYTES = 200


def short_leaf(leaf: str, full: str) -> str:
    """``leaf`` when it fits :data:`MAX_LEAF_BYTES`; else its start, ``~`` and 8 hex digits of
    the full name (so two long names stay apart), and its own suffix: a legal 255-byte file
    name gets output files the file system can hold."""
    raw = leaf.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_LEAF_BYTES:
        return leaf
    stem, suffix = os.path.splitext(leaf)
    suffix = suffix if len(suffix.encode("utf-8", "surrogateescape")) <= 16 else ""
    tag = "~" + hashlib.blake2b(full.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
    room = MAX_LEAF_BYTES - len(tag) - len(suffix.encode("utf-8", "surrogateescape"))
    head = stem.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")  # cut at a character boundary
    return head + tag + suffix


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
        leaf = short_leaf(leaf, name)
        name = os.path.join(folder, leaf)
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


#: What a run writes into its output directory; ``overwrite`` removes all of it first.
RESULT_DIRS = ("overlays", "maps", "masks")


def check_target(out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an output directory that holds an earlier run's results (its ``scores.csv`` or
    ``run.json``) unless ``resume`` (go on with that run) or ``overwrite`` (replace it); refuse
    one holding another kind of lakead output (a model, an export), and, with ``overwrite``, one
    holding entries named like results that no run wrote (:func:`lakead.outputs.refuse_foreign_results`)."""
    if resume and overwrite:
        raise LakeadError("--resume and --overwrite: choose one (go on with the earlier run, or replace its results)")
    out = Path(out_dir)
    if not out.is_dir():
        return
    other = owned_by(out)
    if other is not None and other is not RESULTS:
        raise OutputRefused(f"--out {out}: holds {other.what}; give another folder for the results")
    if overwrite:
        refuse_foreign_results(out)
    if resume or overwrite:
        return
    found = [name for name in (SCORES_FILE, RUN_FILE) if (out / name).exists()]
    if found:
        raise LakeadError(f"--out {out}: holds the results of an earlier run ({found[0]}); give --resume to go on "
                          "with it (only the images without a row are scored), or --overwrite to replace them")


def clear_results(out_dir: str | os.PathLike) -> None:
    """Remove what a run writes (``scores.csv`` first, then the map folders and the other
    files); anything else in the directory is left alone."""
    import shutil

    out = Path(out_dir)
    for name in (SCORES_FILE, *RESULT_DIRS, ERRORS_FILE, REGIONS_FILE, RUN_FILE):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


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
        "format_version": 2,
        "model": {"class_name": class_name, "fitted_at": fitted_at, "fingerprint": fingerprint},
        "threshold": threshold if math.isfinite(threshold) else None,
        "precision": precision,
        "maps": sorted(maps),
        "lakead_version": __version__,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }



class OutputDir:
    """``scores.csv`` and ``errors.csv`` of one run, appended a batch at a time.

    Opened fresh, the directory must hold no earlier run's results (:func:`check_target`);
    with ``overwrite=True`` they are removed first (:func:`clear_results`). Opened with ``resume=True``, an
    existing ``scores.csv`` is checked (header, ``run.json`` written by the same model and
    threshold), a torn last line left by a kill is cut off, and the paths of its rows are
    kept as 64-bit keys so that :meth:`done` can skip them. Use as a context manager.
    """

    def __init__(self, out_dir: str | os.PathLike, info: dict[str, Any], *, resume: bool = False,
                 overwrite: bool = False) -> None:
        self.dir = Path(out_dir)
        self.info = info
        self.resume = resume
        self.overwrite = overwrite
        self._done = np.zeros(0, dtype=np.uint64)  # sorted keys of those rows
        self._scores: io.BufferedWriter | None = None
        self._errors: io.BufferedWriter | None = None
        self._regions: io.BufferedWriter | None = None
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
        check_target(self.dir, resume=self.resume, overwrite=self.overwrite)  # again, now under the lock
        if self.overwrite:
            clear_results(self.dir)
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
        regions = self.dir / REGIONS_FILE
        if keep and regions.exists():  # keep the regions of the images already scored (and only those)
            kept = [line for line in regions.read_bytes().splitlines(keepends=True)[1:]
                    if line.endswith(b"\n") and self.done(next(csv.reader([line.decode("utf-8", "surrogateescape")]), [""])[0])]
            atomic_write_text(regions, (_csv_line(REGION_COLUMNS) + b"".join(kept)).decode("utf-8", "surrogateescape"))
            self._regions = regions.open("ab")
        else:
            regions.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        for fh in (self._scores, self._errors, self._regions):
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
        if _precision(old.get("precision", "float32")) != _precision(self.info["precision"]):
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
                if first == _csv_line(OLD_SCORE_COLUMNS):
                    raise LakeadError(f"cannot resume: {path} was written by an earlier lakead (without the out_of_scope "
                                      "column); drop --resume to score again, or use a new --out")
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

    def commit(self, rows: Sequence[Sequence[str]], errors: Sequence[tuple[str, str]] = (),
               regions: Sequence[Sequence[str]] = ()) -> None:
        """Append score rows, error rows and region rows, each file in one write, flushed to
        disk; regions first, so that a score row means its image's regions are complete."""
        if regions:
            if self._regions is None:
                self._regions = (self.dir / REGIONS_FILE).open("wb")
                self._regions.write(_csv_line(REGION_COLUMNS))
            self._append(self._regions, [_csv_line(r) for r in regions])
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


def _precision(name: str) -> str:
    """One name per arithmetic: an export's ``fp32`` is the torch model's ``float32`` (the same
    scores: an fp32 export keeps its source's fingerprint)."""
    return {"fp32": "float32"}.get(name, name)
