"""``lakead watch``: score what a folder, a video, a stream or a camera brings, as it comes.

One thread reads the source (:mod:`.sources`) into a bounded queue; this thread takes items from
it, scores each with the model's current version, writes the result to scores.csv
(:mod:`.record`) and hands it to the sinks (:mod:`.sinks`). When scoring falls behind and the
queue is full, ``when_behind`` says what happens: ``block`` (the reader waits: every item is
scored, late) or ``drop-oldest`` (the oldest waiting item is dropped, listed in dropped.csv, so
the results stay current). Each result carries its latency: from the file complete (or the frame
grabbed) to its row written.

Before each item the model directory is looked at (one ``stat``): when ``lakead update`` or
``rollback`` made another version current, that version's files (which never change) are loaded
and used from the next item on, so an item is scored by one version, whole, and its result says
which. A full output disk pauses the watch (said on stderr, tried again every few seconds); the
item in hand is kept.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ImageLoadError
from .record import DROPPED, ERRORS, DiskFull, Record
from .sinks import Sink, SinkWorker
from .sources import FolderSource, Item, VideoSource, is_video_source

log = logging.getLogger("lakead")

WHEN_BEHIND = ("block", "drop-oldest")
#: Seconds between two tries to write when the output disk is full.
DISK_RETRY = 5.0


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


class CurrentModel:
    """The model directory's current version, loaded, and loaded again when another is current."""

    def __init__(self, model_dir: str | os.PathLike, *, device: str | None = None, batch_size: int | None = None,
                 precision: str | None = None) -> None:
        self.dir = Path(model_dir)
        self.run = dict(device=device, batch_size=batch_size, precision=precision)
        self.det: Any = None
        self.version = 0
        self.sig: tuple | None = None
        self.refresh()

    def _signature(self) -> tuple | None:
        try:
            st = os.stat(self.dir / "lakead.json")
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self) -> bool:
        """Load the current version if it is not the one loaded; whether it changed."""
        from ..methods import load_detector
        from .versions import current

        sig = self._signature()
        if self.det is not None and (sig is None or sig == self.sig):
            return False
        version, where = current(self.dir)  # changed: an update, a rollback, or a model fitted again in its place
        backbone = None if self.det is None else self.det.backbone
        try:
            det = load_detector(where, backbone=backbone, **self.run)
        except Exception as exc:  # noqa: BLE001 - a version that cannot be loaded: keep the one in use
            if self.det is None:
                raise
            log.warning("%s: version %d cannot be loaded (%s); still scoring with version %d", self.dir, version, exc,
                        self.version)
            self.sig = sig
            return False
        if self.det is not None:
            log.warning("%s: now scoring with version %d (was %d)", self.dir, version, self.version)
        self.det, self.version, self.sig = det, version, sig
        return True


def result_dict(item: Item, pred: Any, scored: float, version: int) -> dict[str, Any]:
    """The result of one item, as every sink gets it."""
    _, regions = pred.regions(0)
    return {
        "item": item.key, "ready": _iso(item.ready), "scored": _iso(scored),
        "score": float(pred.scores[0]), "visual": float(pred.visual[0]), "semantic": float(pred.semantic[0]),
        "anomalous": bool(pred.anomalous[0]), "out_of_scope": bool(pred.out_of_scope[0]),
        "regions": [{k: round(float(v), 6) for k, v in r.to_dict().items()} for r in regions],
        "latency_s": round(scored - item.ready, 6), "model_version": version,
    }


@dataclass
class WatchSummary:
    scored: int = 0
    anomalous: int = 0
    dropped: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    undelivered: dict[str, int] = field(default_factory=dict)  # sink -> rows it had not confirmed at the end

    def latency(self, q: float) -> float | None:
        return float(np.quantile(self.latencies, q)) if self.latencies else None


def make_source(spec: str, out_dir: Path, record: Record, *, every: int = 1, fps: float | None = None,
                settle: float = 1.0, poll: float = 0.2) -> FolderSource | VideoSource:
    """A folder or video source for ``spec``, going on after what ``record`` already holds."""
    if is_video_source(spec):
        vs = VideoSource(spec, every=every, fps=fps)
        vs.after = record.last_frame.get(vs.name, -1)
        return vs
    if every != 1 or fps is not None:
        raise ConfigError("--every and --fps sample the frames of a video source; a folder's files are each scored")
    return FolderSource(spec, settle=settle, poll=poll, skip=set(record.keys), exclude=(out_dir,))


def watch(model_dir: str | os.PathLike, source: str, out_dir: str | os.PathLike, *, resume: bool = False,
          when_behind: str = "block", queue_size: int = 16, sinks: Sequence[Sink] = (), every: int = 1,
          fps: float | None = None, settle: float = 1.0, poll: float = 0.2, idle_exit: float | None = None,
          max_items: int | None = None, device: str | None = None, batch_size: int | None = None,
          precision: str | None = None, stop: threading.Event | None = None, drain_timeout: float = 30.0,
          on_result: Callable[[dict[str, Any]], None] | None = None,
          make_sinks: Callable[[Record], Sequence[Sink]] | None = None) -> WatchSummary:
    """Watch ``source`` and score each item into ``out_dir`` (the module docstring says how).
    Ends when the source ends (a video file; a folder idle for ``idle_exit`` seconds), after
    ``max_items`` items, or when ``stop`` is set (SIGTERM sets it; Ctrl-C too)."""
    if when_behind not in WHEN_BEHIND:
        raise ConfigError(f"--when-behind must be one of {', '.join(WHEN_BEHIND)}, got {when_behind!r}")
    if queue_size < 1:
        raise ConfigError(f"--queue must be at least 1, got {queue_size}")
    out = Path(out_dir)
    record = Record(out, resume=resume)
    src = make_source(source, out, record, every=every, fps=fps, settle=settle, poll=poll)
    model = CurrentModel(model_dir, device=device, batch_size=batch_size, precision=precision)
    stop = stop or threading.Event()
    all_sinks = list(sinks) + list(make_sinks(record) if make_sinks else [])
    workers = [SinkWorker(s, record) for s in all_sinks if s.name != "stdout"]
    direct = [s for s in all_sinks if s.name == "stdout"]
    for w in workers:
        w.start()
    summary = WatchSummary()
    q: queue.Queue[Item | None] = queue.Queue(maxsize=queue_size)
    reader_error: list[BaseException] = []
    holding = [False]  # the reader has an item not yet in the queue

    def read() -> None:
        try:
            for item in src.items(stop):
                holding[0] = True
                if when_behind == "block":
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                else:
                    while True:
                        try:
                            q.put_nowait(item)
                            break
                        except queue.Full:
                            try:
                                old = q.get_nowait()
                            except queue.Empty:
                                continue
                            if old is not None:
                                summary.dropped += 1
                                record.note(DROPPED, ("item", "time"), (old.key, _iso(time.time())))
                                if summary.dropped in (1, 10, 100) or summary.dropped % 1000 == 0:
                                    log.warning("scoring is behind the source: %d item(s) dropped so far "
                                                "(--when-behind drop-oldest; listed in %s)", summary.dropped, out / DROPPED)
                holding[0] = False
                if stop.is_set():
                    break
        except BaseException as exc:  # noqa: BLE001 - said by the scoring thread
            reader_error.append(exc)
        finally:
            while True:
                try:
                    q.put(None, timeout=0.2)
                    break
                except queue.Full:
                    if stop.is_set():
                        try:
                            q.get_nowait()
                        except queue.Empty:
                            pass

    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, lambda *a: stop.set())
    reader = threading.Thread(target=read, name="lakead-watch-reader", daemon=True)
    reader.start()
    log.info("watching %s with %s version %d; results in %s", src.describe(), model.dir, model.version, out)
    last_busy = time.monotonic()
    try:
        while not stop.is_set():
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                quiet = getattr(src, "quiet_since", None)
                if idle_exit is not None and quiet is not None and not holding[0] and q.empty() and \
                        time.monotonic() - max(quiet, last_busy) >= idle_exit:
                    break  # a folder with nothing new for idle_exit seconds
                continue
            if item is None:
                break
            model.refresh()
            try:
                arr = item.read()
                pred = model.det.predict_arrays([arr])
            except ImageLoadError as exc:
                last_busy = time.monotonic()
                summary.failed += 1
                log.warning("cannot score %s: %s", item.key, exc.problem)
                record.note(ERRORS, ("item", "error"), (item.key, exc.problem))
                continue
            result = result_dict(item, pred, time.time(), model.version)
            _write(record, result, stop)
            if item.key not in record.keys:
                break  # stopped while the disk was full: not written
            summary.scored += 1
            summary.anomalous += int(result["anomalous"])
            summary.latencies.append(result["latency_s"])
            for s in direct:
                s.send(result)
            for w in workers:
                w.push(record.rows - 1, result)
            if on_result is not None:
                on_result(result)
            last_busy = time.monotonic()
            if max_items is not None and summary.scored >= max_items:
                break
    except KeyboardInterrupt:
        log.warning("interrupted: every result written is in %s; go on with --resume", record.scores)
    finally:
        stop.set()
        reader.join(5.0)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        for w in workers:
            if not w.finish(drain_timeout):
                summary.undelivered[w.sink.name] = w.total - w.next_row
                log.warning("%s: %d result(s) not delivered yet: they are sent on --resume", w.sink.name,
                            w.total - w.next_row)
    if reader_error:
        raise reader_error[0]
    return summary


def _write(record: Record, result: dict[str, Any], stop: threading.Event) -> None:
    """Append the result; while the disk is full, say so and try again until it fits or ``stop``."""
    said = False
    while True:
        try:
            record.add(result)
            if said:
                log.warning("%s: writing again", record.scores)
            return
        except DiskFull as exc:
            if not said:
                log.warning("output disk full (%s): paused, trying again every %.0f s", exc, DISK_RETRY)
                said = True
            if stop.wait(DISK_RETRY):
                return
