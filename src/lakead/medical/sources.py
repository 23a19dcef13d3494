"""Source names -> images: what fit, predict and eval read (see :mod:`lakead.medical`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import ImageLoadError
from ..limits import VOLUME_FACTOR, max_pixels
from .dicom import dicom_frames, read_dicom
from .nifti import nifti_volume
from .rule import (
    ReadRule,
    _cache,
    grey_to_rgb,
    is_medical,
    is_nifti,
    parse_window,
    split_source,
    to_uint8,
)

log = logging.getLogger("lakead")

# -- sources: what fit, predict and eval read -----------------------------------------------


def expand(path: str | os.PathLike, rule: ReadRule, label: str | None = None) -> list[str]:
    """The images in one medical file, by source name: a NIfTI volume's slices with signal
    (the others counted in a warning), a multi-frame DICOM's frames; a one-image file is its
    own path. Raises :class:`ImageLoadError` when the file cannot be read."""
    p = os.fspath(path)
    label = label or p
    if is_nifti(p):
        vol = nifti_volume(p, label, rule.slices)
        if vol.skipped:
            log.warning("%s: %d of %d %s slices have no signal and are skipped", label, vol.skipped,
                        vol.skipped + len(vol.indices), vol.plane)
        return vol.sources()
    n = dicom_frames(p, label)
    return [p] if n == 1 else [f"{p}#frame={k}" for k in range(1, n + 1)]


def expand_all(paths: Iterable[str | os.PathLike], rule: ReadRule,
               on_volume: Callable[[str, list[str]], None] | None = None) -> Iterator[str]:
    """Every input as its source names (:func:`expand` for medical files, a plain image as
    itself), lazily. A medical file that cannot be read is yielded as it is (reading it then
    reports the problem). ``on_volume(path, sources)`` is called for each NIfTI volume."""
    for item in paths:
        p = os.fspath(item)
        if not is_medical(p) or split_source(p) is not None:
            yield p
            continue
        try:
            sources = expand(p, rule)
        except ImageLoadError:
            yield p
            continue
        if on_volume is not None and is_nifti(p):
            on_volume(p, sources)
        yield from sources


@dataclass
class Read:
    """One image read from a medical source, and how."""

    image: np.ndarray  # (H, W, 3) uint8
    modality: str  # DICOM Modality ("CT", "MR"...); "" for NIfTI (it names none)
    window: str  # the window used, described


def read_source(source: str | os.PathLike, rule: ReadRule, label: str | None = None) -> Read:
    """Read one image from a DICOM file, a DICOM frame or a NIfTI slice (see the module
    docstring). A file holding several images must be named with its fragment
    (``#frame=N``, ``#z=K``): :func:`expand` lists them."""
    s = os.fspath(source)
    label = label or s
    window = parse_window(rule.window)
    parsed = split_source(s)
    path, key, index = parsed if parsed is not None else (s, "", -1)
    if not os.path.exists(path):
        raise ImageLoadError(label, "file not found")
    if os.path.isdir(path):
        raise ImageLoadError(label, "is a directory, not an image file")
    if is_nifti(path):
        vol = nifti_volume(path, label, rule.slices)
        if key == "frame":
            raise ImageLoadError(label, "a NIfTI volume has slices (#x=, #y=, #z=), not frames")
        if not key:
            if not vol.indices:
                raise ImageLoadError(label, f"no {vol.plane} slice with signal (every slice is one value)")
            if len(vol.indices) != 1:
                raise ImageLoadError(label, f"holds {len(vol.indices)} {vol.plane} slices with signal: name one "
                                            f"({path}#{vol.letter}=K), or give the file to fit/predict/eval, which read them all")
            key, index = vol.letter, vol.indices[0]
        vol = vol.with_axis(key)
        lo_hi, used = vol.bounds(window)
        return Read(grey_to_rgb(to_uint8(vol.display(vol.raw_slice(index)), *lo_hi)), "", used)  # NIfTI names no modality
    if key in ("x", "y", "z"):
        raise ImageLoadError(label, "a DICOM file has frames (#frame=N), not slices")
    dcm = _cache.get(path, ("dicom", window), lambda: read_dicom(path, label, window)) if key else read_dicom(path, label, window)
    if not key:
        if dcm.n_frames != 1:
            raise ImageLoadError(label, f"holds {dcm.n_frames} frames: name one ({path}#frame=N, 1-based), or give "
                                        "the file to fit/predict/eval, which read them all")
        index = 1
    if not 1 <= index <= dcm.n_frames:
        raise ImageLoadError(label, f"no frame {index}: the file has {dcm.n_frames} (numbered from 1)")
    return Read(np.ascontiguousarray(dcm.frames[index - 1]), dcm.modality, dcm.window)


def read_mask_source(source: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A mask from a DICOM file or a NIfTI slice (``seg.nii.gz#z=42``) as ``(H, W)`` bool,
    sliced as its image is; every non-zero voxel is defect."""
    s = os.fspath(source)
    parsed = split_source(s)
    path, key, index = parsed if parsed is not None else (s, "", -1)
    if is_nifti(path):
        vol = nifti_volume(path, s, "axial", mask=True)
        if not key:
            if vol.data.shape[vol.axis] != 1:
                raise ImageLoadError(s, f"mask volume has {vol.data.shape[vol.axis]} slices: name one ({path}#z=K)")
            key, index = vol.letter, 0
        vol = vol.with_axis(key)
        out = vol.display(vol.raw_slice(index)) != 0
    else:
        out = read_source(s, ReadRule(window="full"), s).image.max(axis=2) > 0
    if shape is not None and out.shape != tuple(shape):
        raise ImageLoadError(s, f"mask is {out.shape[1]}x{out.shape[0]} pixels, its image {shape[1]}x{shape[0]}")
    return out


def image_size(source: str | os.PathLike, rule: ReadRule | None = None) -> tuple[int, int]:
    """(width, height) of a medical image (as PIL's ``Image.size``)."""
    h, w = read_source(source, rule or ReadRule(window="full")).image.shape[:2]
    return w, h


def count_images(path: str | os.PathLike, rule: ReadRule) -> int:
    """About how many images :func:`expand` gives for a file, from its header only (for
    progress bars): a NIfTI volume's slices in the rule's range (empty ones counted), a
    DICOM file's frames; 1 for any other file or a file that cannot be read."""
    p = os.fspath(path)
    try:
        if is_nifti(p):
            from .nifti import slice_count

            return slice_count(p, rule.slices)
        if is_medical(p) and split_source(p) is None:
            return dicom_frames(p, p)
    except ImageLoadError:
        pass
    return 1


def header_size(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """``(width, height, images)`` of a DICOM file (frames) or a NIfTI volume (axial
    slices, x by y), from its header only; None when the header cannot be read."""
    p = os.fspath(path)
    try:
        if is_nifti(p):
            import nibabel

            shape = tuple(int(s) for s in nibabel.load(p).shape) + (1, 1)
            return shape[0], shape[1], int(np.prod(shape[2:]))
        from .dicom import dicom_header, dicom_shape

        cols, rows, frames, _ = dicom_shape(dicom_header(p, p), p)  # a deflated file is not inflated whole
        return cols, rows, frames
    except ImageLoadError as exc:
        if "expands past" in exc.problem:  # a deflated bomb: its size is what it would expand to
            return max_pixels() * VOLUME_FACTOR + 1, 1, 1
        return None
    except Exception:  # noqa: BLE001 - reading it names the problem
        return None
