"""Where ``lakead watch`` takes its images from: a hot folder, a video file, a stream or a camera.

Each source yields :class:`Item` s in order, each with a key that names it for good (a file's path
relative to the folder; ``<video>#frame=<n>`` for a frame) and the time it became ready (the
file complete, the frame grabbed), from which the latency of its result is measured.

- :class:`FolderSource`: new image files in a folder (recursively), each once it has stopped
  growing: its size and modification time unchanged for ``settle`` seconds (a file written by a
  rename is complete at once, and waits as long). Polled every ``poll`` seconds: the same on every
  file system, network mounts included, with no extra package. Keys in ``skip`` (a resumed run's)
  are passed over.
- :class:`VideoSource`: frames through OpenCV's ``VideoCapture`` (``opencv-python-headless``, an
  optional package: a clear error names it when missing): a video file, an RTSP/HTTP stream or a
  local camera (``cam:0``). ``every`` keeps every n-th frame, ``fps`` a frame each ``1/fps`` seconds
  of the video (of the clock for a live source). A live source that fails or ends is opened again
  with a backoff (1, 2, 4 ... 30 s), said on stderr; a video file ends the watch at its end.
  ``after``: a resumed run's last frame (a file starts after it).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ImageLoadError
from ..images import IMAGE_SUFFIXES

log = logging.getLogger("lakead")

#: Longest wait between two attempts to open a live source again.
MAX_BACKOFF = 30.0


@dataclass
class Item:
    """One image to score: ``key`` names it for good, ``ready`` is when it became available
    (``time.time()``), ``read()`` gives its ``(H, W, 3)`` uint8 pixels."""

    key: str
    ready: float
    read: Callable[[], np.ndarray]
    frame: int | None = None  # the frame's index in its video


def _stopped(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


class FolderSource:
    """New image files of ``folder`` once complete (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, *, settle: float = 1.0, poll: float = 0.2, skip: set[str] | None = None,
                 exclude: tuple[Path, ...] = (), reader: Callable[[str], np.ndarray] | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"{self.folder}: no such folder to watch")
        self.settle, self.poll = float(settle), float(poll)
        self.skip = set(skip or ())
        self.exclude = tuple(p.resolve() for p in exclude)
        self.reader = reader
        self.seen: dict[str, tuple[int, int, float]] = {}  # key -> (size, mtime_ns, since when unchanged)
        self.quiet_since: float | None = None

    def describe(self) -> str:
        return f"folder {self.folder}"

    def _scan(self) -> Iterator[tuple[str, Path, os.stat_result]]:
        for root, dirs, files in os.walk(self.folder):
            r = Path(root)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not any(
                (r / d).resolve() == e for e in self.exclude))
            for f in sorted(files):
                if f.startswith(".") or Path(f).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                p = r / f
                try:
                    st = p.stat()
                except OSError:  # removed while listed
                    continue
                yield p.relative_to(self.folder).as_posix(), p, st

    def items(self, stop: threading.Event | None = None) -> Iterator[Item]:
        """Yield each complete new file once, oldest first, until ``stop`` is set. ``quiet_since``
        is the time (``time.monotonic()``) since which the folder has shown nothing new and
        nothing growing, or None while it does."""
        while not _stopped(stop):
            now = time.monotonic()
            ready: list[tuple[float, str, Path]] = []
            pending = False
            for key, path, st in self._scan():
                if key in self.skip:
                    continue
                sig = (st.st_size, st.st_mtime_ns)
                old = self.seen.get(key)
                if old is None or old[:2] != sig:
                    self.seen[key] = (*sig, now)
                    pending = True
                elif now - old[2] >= self.settle and st.st_size > 0:
                    ready.append((st.st_mtime, key, path))
                else:
                    pending = True
            if pending or ready:
                self.quiet_since = None
            elif self.quiet_since is None:
                self.quiet_since = now
            for _, key, path in sorted(ready):
                self.skip.add(key)
                self.seen.pop(key, None)
                yield Item(key, time.time(), self._reader(path, key))
            time.sleep(self.poll)

    def _reader(self, path: Path, key: str) -> Callable[[], np.ndarray]:
        if self.reader is not None:
            return lambda: self.reader(str(path))  # type: ignore[misc]
        from ..images import load_image

        return lambda: load_image(str(path), key)


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise ConfigError("video files, streams and cameras are read with OpenCV, which is not installed: "
                          "pip install opencv-python-headless") from None
    return cv2


_CAMERA = re.compile(r"cam(?:era)?:(\d+)$")


def is_video_source(spec: str) -> bool:
    """Whether ``spec`` names a video source rather than a folder: a camera (``cam:0``), a URL, or a file."""
    return bool(_CAMERA.match(spec)) or "://" in spec or Path(spec).is_file()


class VideoSource:
    """Frames of a video file, stream or camera (see the module docstring)."""

    def __init__(self, spec: str, *, every: int = 1, fps: float | None = None, after: int = -1) -> None:
        if every < 1:
            raise ConfigError(f"--every must be at least 1, got {every}")
        if fps is not None and not fps > 0:
            raise ConfigError(f"--fps must be positive, got {fps}")
        self.cv2 = _cv2()
        self.spec = spec
        cam = _CAMERA.match(spec)
        self.target: Any = int(cam.group(1)) if cam else spec
        self.live = bool(cam) or ("://" in spec and not spec.startswith("file://"))
        if not self.live and not Path(spec).is_file():
            raise ConfigError(f"{spec}: no such video file")
        self.every, self.fps, self.after = every, fps, after
        self.name = f"cam{cam.group(1)}" if cam else (spec if self.live else Path(spec).name)

    def describe(self) -> str:
        return ("camera " if isinstance(self.target, int) else "stream " if self.live else "video ") + self.spec

    def _open(self) -> Any:
        cap = self.cv2.VideoCapture(self.target)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def items(self, stop: threading.Event | None = None) -> Iterator[Item]:
        cv2 = self.cv2
        backoff = 1.0
        index = -1  # index of the last frame read (file) or grabbed (live), over reconnections
        last_kept_t: float | None = None
        while not _stopped(stop):
            cap = self._open()
            if cap is None:
                if not self.live:
                    raise ImageLoadError(self.spec, "cannot be opened as a video (OpenCV)")
                log.warning("%s: cannot be opened; trying again in %.0f s", self.describe(), backoff)
                if stop is not None and stop.wait(backoff):
                    return
                time.sleep(0 if stop is not None else backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                continue
            if backoff > 1.0:
                log.warning("%s: connected again", self.describe())
            backoff = 1.0
            src_fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
            if not self.live and self.after >= 0 and index < self.after:  # resume: start after the last frame scored
                if cap.set(cv2.CAP_PROP_POS_FRAMES, self.after + 1) and int(cap.get(cv2.CAP_PROP_POS_FRAMES)) == self.after + 1:
                    index = self.after
                else:
                    while index < self.after and cap.grab():
                        index += 1
            try:
                while not _stopped(stop):
                    ok, frame = cap.read()
                    if not ok:
                        break
                    index += 1
                    now = time.time()
                    if not self._keep(index, src_fps, now, last_kept_t):
                        continue
                    last_kept_t = now
                    rgb = np.ascontiguousarray(frame[:, :, ::-1]) if frame.ndim == 3 else np.repeat(frame[:, :, None], 3, 2)
                    yield Item(f"{self.name}#frame={index}", now, (lambda a=rgb: a), frame=index)
            finally:
                cap.release()
            if not self.live:
                return
            log.warning("%s: the source stopped sending; connecting again in %.0f s", self.describe(), backoff)
            if stop is not None and stop.wait(backoff):
                return
            backoff = min(MAX_BACKOFF, backoff * 2)

    def _keep(self, index: int, src_fps: float, now: float, last: float | None) -> bool:
        if index % self.every:
            return False
        if self.fps is None:
            return True
        if not self.live and src_fps > 0:  # by the video's own time: frames at multiples of 1/fps
            return int(index * self.fps / src_fps) != int((index - 1) * self.fps / src_fps) or index == 0
        return last is None or now - last >= 1.0 / self.fps
