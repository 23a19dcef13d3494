"""The read rule of medical images (window, slices), source names and the shared helpers."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, ImageLoadError

log = logging.getLogger("lakead")

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MEDICAL_SUFFIXES = DICOM_SUFFIXES + NIFTI_SUFFIXES
#: The optional dependencies: ``pip install 'lakead[medical]'``.
EXTRA_HINT = "pip install 'lakead[medical]'"

#: Named windows, (centre, width) in Hounsfield units: for CT.
PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "soft-tissue": (50.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "liver": (30.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}
WINDOW_WORDS = ("auto", "file", "full")
#: The RAS axis (0 R, 1 A, 2 S) each plane's slices are taken along.
PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}
AXIS_LETTERS = "xyz"
CACHE_VOLUMES = 2

_SOURCE = re.compile(r"^(?P<path>.+)#(?P<key>frame|x|y|z)=(?P<index>\d+)$")


# -- the read rule --------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """An intensity window: ``kind`` is auto, file, full, or fixed (``center``, ``width``)."""

    kind: str
    center: float = 0.0
    width: float = 0.0
    name: str = ""

    @property
    def bounds(self) -> tuple[float, float]:
        """(lo, hi) of the DICOM linear VOI function: ``c - 0.5 -+ (w - 1) / 2``."""
        return self.center - 0.5 - (self.width - 1) / 2, self.center - 0.5 + (self.width - 1) / 2

    def describe(self) -> str:
        if self.kind != "fixed":
            return self.kind
        return f"{self.name + ' ' if self.name else ''}C{self.center:g}/W{self.width:g}"


def parse_window(text: str) -> Window:
    """``auto``, ``file``, ``full``, a preset name, or ``CENTER,WIDTH``.

    >>> parse_window("40,80").bounds, parse_window("lung").describe()
    ((0.0, 79.0), 'lung C-600/W1500')
    """
    t = str(text).strip().lower()
    if t in WINDOW_WORDS:
        return Window(t)
    if t in PRESETS:
        return Window("fixed", *PRESETS[t], name=t)
    parts = t.split(",")
    try:
        c, w = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"window must be CENTER,WIDTH (e.g. 40,80), one of {', '.join(PRESETS)}, "
                          f"or {', '.join(WINDOW_WORDS)}; got {text!r}") from None
    if not (np.isfinite(c) and np.isfinite(w)) or w < 1:
        raise ConfigError(f"window {text!r}: the width must be a finite number >= 1")
    return Window("fixed", c, w)


@dataclass(frozen=True)
class Slices:
    """Which slices of a volume: ``plane`` and Python slice bounds over the file's voxel index."""

    plane: str = "axial"
    start: int | None = None
    stop: int | None = None
    step: int = 1


_SLICES = re.compile(r"^(?P<plane>[a-z]+)(?::(?P<start>\d+)-(?P<stop>\d+))?(?:/(?P<step>\d+))?$")


def parse_slices(text: str) -> Slices:
    """``axial``, ``coronal`` or ``sagittal``, then optionally ``:FIRST-LAST`` (voxel indices
    of the file, both included) and ``/STEP`` (every STEP-th slice).

    >>> parse_slices("axial:10-80/2")
    Slices(plane='axial', start=10, stop=81, step=2)
    """
    m = _SLICES.match(str(text).strip().lower())
    if m is None or m["plane"] not in PLANES:
        raise ConfigError(f"slices must be axial, coronal or sagittal, optionally :FIRST-LAST and /STEP "
                          f"(axial:20-120, axial/2, axial:20-120/3); got {text!r}")
    step = int(m["step"]) if m["step"] else 1
    if step < 1 or (m["start"] is not None and int(m["stop"]) < int(m["start"])):
        raise ConfigError(f"slices {text!r}: STEP must be at least 1 and LAST not below FIRST")
    if m["start"] is None:
        return Slices(m["plane"], None, None, step)
    return Slices(m["plane"], int(m["start"]), int(m["stop"]) + 1, step)


@dataclass(frozen=True)
class ReadRule:
    """How DICOM and NIfTI files are read (the ``window`` and ``slices`` options)."""

    window: str = "auto"
    slices: str = "axial"

    def check(self) -> ReadRule:
        parse_window(self.window)
        parse_slices(self.slices)
        return self


# -- names ----------------------------------------------------------------------------------


def is_dicom(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(DICOM_SUFFIXES)


def is_nifti(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(NIFTI_SUFFIXES)


def is_medical(name: str | os.PathLike) -> bool:
    """Whether a file name (or a slice's source name) is a DICOM or NIfTI one."""
    parsed = split_source(str(name))
    return (parsed is not None and is_medical(parsed[0])) or str(name).lower().endswith(MEDICAL_SUFFIXES)


def stem(name: str) -> str:
    """The name without its ending, ``.nii.gz`` counting as one: ``case1.nii.gz`` -> ``case1``."""
    low = name.lower()
    for suffix in (".nii.gz", *MEDICAL_SUFFIXES):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def split_source(source: str) -> tuple[str, str, int] | None:
    """``"a.nii.gz#z=42"`` -> ``("a.nii.gz", "z", 42)``; None for a plain path (or a file that
    really has such a name)."""
    m = _SOURCE.match(source)
    if m is None or os.path.exists(source):
        return None
    return m["path"], m["key"], int(m["index"])


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """A DICOM Part-10 file, whatever its name: ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


# -- the optional libraries -----------------------------------------------------------------


def _pydicom(label: str) -> Any:
    try:
        import pydicom
        import pydicom.pixels
    except ImportError:
        raise ImageLoadError(label, f"reading DICOM files needs pydicom: {EXTRA_HINT}") from None
    return pydicom


def _nibabel(label: str) -> Any:
    try:
        import nibabel
    except ImportError:
        raise ImageLoadError(label, f"reading NIfTI files needs nibabel: {EXTRA_HINT}") from None
    return nibabel


# -- windows --------------------------------------------------------------------------------


def to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Intensities -> 0..255: linear from ``lo`` (0) to ``hi`` (255), clipped (a step at
    ``lo`` when ``hi == lo``)."""
    v = values.astype(np.float64, copy=False)
    unit = np.clip((v - lo) / (hi - lo), 0.0, 1.0) if hi > lo else (v > lo).astype(np.float64)
    return np.round(unit * 255.0).astype(np.uint8)


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 -> ``(H, W, 3)``."""
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


class _Cache:
    """The last few volumes decoded, by file identity and rule (thread-safe)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[tuple, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, path: str, extra: tuple, make: Callable[[], Any]) -> Any:
        try:
            st = os.stat(path)
            key: tuple = (os.path.realpath(path), st.st_mtime_ns, st.st_size, *extra)
        except OSError:
            return make()  # missing: make() says so
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


_cache = _Cache(CACHE_VOLUMES)


