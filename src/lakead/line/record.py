"""The output directory of ``lakead watch``: every result, once, on disk before anywhere else.

    scores.csv        one row per item scored (COLUMNS), appended, flushed and fsync-ed row by row
    errors.csv        item, error: items that could not be read or scored
    dropped.csv       item, time: items dropped unscored (--when-behind drop-oldest)
    .sinks/<name>     how many rows of scores.csv each other sink has delivered

A row in scores.csv is the result; the other sinks (MQTT, a webhook, stdout) deliver rows of it.
A sink's count moves after the sink confirms a row, so on ``--resume`` each sink is given the
rows it had not confirmed, and the watch goes on after the last item in scores.csv: nothing is
scored twice and nothing is skipped. A kill can leave a torn last line: ``--resume`` cuts it off
(that item is scored again). A sink that confirmed a row just before a kill and had no time to
write its count gets that row again (the same ``item`` key: a receiver can tell).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LakeadError
from ..fileio import atomic_write_text

COLUMNS = ("item", "ready", "scored", "score", "visual", "semantic", "anomalous", "out_of_scope", "regions",
           "latency_s", "model_version")
SCORES, ERRORS, DROPPED, SINKS = "scores.csv", "errors.csv", "dropped.csv", ".sinks"
_FRAME = re.compile(r"^(.*)#frame=(\d+)$")


class DiskFull(LakeadError):
    """The output disk is full (or over quota): the watch pauses and tries again."""


def _line(row: Sequence[Any]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(row)
    return buf.getvalue().encode("utf-8", "surrogateescape")


def row_of(result: dict[str, Any]) -> list[str]:
    """A result (``lakead.line.watch.result_dict``) as a row of scores.csv."""
    out = []
    for c in COLUMNS:
        v = result[c]
        out.append(json.dumps(v, separators=(",", ":")) if c == "regions" else
                   ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v))
    return out


def result_of(row: Sequence[str]) -> dict[str, Any]:
    """A row of scores.csv back as the result the sinks deliver."""
    r = dict(zip(COLUMNS, row))
    out: dict[str, Any] = {"item": r["item"], "ready": r["ready"], "scored": r["scored"]}
    for c in ("score", "visual", "semantic", "latency_s"):
        out[c] = float(r[c])
    out["anomalous"], out["out_of_scope"] = r["anomalous"] == "true", r["out_of_scope"] == "true"
    out["regions"] = json.loads(r["regions"])
    out["model_version"] = int(r["model_version"])
    return out


class Record:
    """scores.csv and the sinks' counts of an output directory (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike, *, resume: bool) -> None:
        self.dir = Path(out_dir)
        self.scores = self.dir / SCORES
        if self.scores.exists() and not resume:
            raise ConfigError(f"{self.scores}: exists: go on with that watch (--resume) or choose another --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keys: set[str] = set()
        self.last_frame: dict[str, int] = {}
        self.rows = 0
        if self.scores.exists():
            self._read_existing()
        else:
            self._append(self.scores, _line(COLUMNS))

    def _read_existing(self) -> None:
        data = self.scores.read_bytes()
        if data and not data.endswith(b"\n"):  # a torn last line: that item is scored again
            data = data[: data.rfind(b"\n") + 1]
            with open(self.scores, "r+b") as fh:
                fh.truncate(len(data))
                os.fsync(fh.fileno())
        lines = data.decode("utf-8", "surrogateescape").splitlines()
        if not lines or next(csv.reader([lines[0]])) != list(COLUMNS):
            raise ConfigError(f"cannot resume: {self.scores} is not the scores.csv of a lakead watch (columns {', '.join(COLUMNS)})")
        for line in lines[1:]:
            row = next(csv.reader([line]))
            self.keys.add(row[0])
            m = _FRAME.match(row[0])
            if m:
                self.last_frame[m.group(1)] = max(self.last_frame.get(m.group(1), -1), int(m.group(2)))
            self.rows += 1

    @staticmethod
    def _append(path: Path, data: bytes) -> None:
        try:
            with open(path, "ab") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"{path}: {os.strerror(exc.errno)}") from None
            raise

    def add(self, result: dict[str, Any]) -> None:
        """Append one result (durable when this returns); :class:`DiskFull` when the disk is full
        (nothing was written, or a torn line that the next append first cuts off)."""
        line = _line(row_of(result))
        size = self.scores.stat().st_size
        try:
            self._append(self.scores, line)
        except DiskFull:
            with open(self.scores, "r+b") as fh:  # never leave half a row behind
                fh.truncate(size)
            raise
        self.keys.add(result["item"])
        self.rows += 1

    def note(self, name: str, columns: tuple[str, ...], row: Sequence[Any]) -> None:
        """A row of errors.csv or dropped.csv (best effort: a full disk is said, not fatal)."""
        path = self.dir / name
        try:
            if not path.exists():
                self._append(path, _line(columns))
            self._append(path, _line(row))
        except (DiskFull, OSError):
            pass

    # -- the other sinks' progress ------------------------------------------------------------

    def delivered(self, sink: str) -> int:
        f = self.dir / SINKS / sink
        try:
            return int(f.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def set_delivered(self, sink: str, rows: int) -> None:
        (self.dir / SINKS).mkdir(exist_ok=True)
        atomic_write_text(self.dir / SINKS / sink, f"{rows}\n")

    def results_from(self, start: int) -> Iterator[dict[str, Any]]:
        """The results of rows ``start``, ``start + 1`` ... of scores.csv (0: the first after the header)."""
        with open(self.scores, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            reader = csv.reader(fh)
            next(reader, None)
            for i, row in enumerate(reader):
                if i >= start:
                    yield result_of(row)
