"""DICOM files: rescale, window, MONOCHROME1, frames (see :mod:`lakead.medical`)."""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ImageLoadError
from ..limits import VOLUME_FACTOR, check_volume, max_pixels
from .rule import Window, _pydicom, is_dicom, looks_like_dicom, to_uint8

# -- DICOM --------------------------------------------------------------------------------


@dataclass
class DicomImage:
    """A DICOM file decoded: ``frames`` ``(F, H, W, 3)`` uint8, and what was applied."""

    frames: np.ndarray
    modality: str
    window: str  # the window used, described

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])


def _functional(ds: Any, sequence: str, name: str) -> Any:
    """A tag at the top level, or in the shared functional groups of an enhanced file."""
    if name in ds:
        return ds[name].value
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0] and shared[0][sequence].value and name in shared[0][sequence][0]:
        return shared[0][sequence][0][name].value
    return None


def _first(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value[0]) if not isinstance(value, (str, bytes, int, float)) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def read_dicom(path: str | os.PathLike, label: str, window: Window) -> DicomImage:
    """Decode a DICOM file with ``window`` (see the module docstring); refused from its header
    when it holds more pixels than the budget (:mod:`lakead.limits`)."""
    pydicom = _pydicom(label)
    cols, rows, frames, _ = dicom_shape(dicom_header(path, label), label)
    check_volume(label, cols, rows, frames, "frames")
    try:
        ds = pydicom.dcmread(os.fspath(path), force=not is_dicom(path) and looks_like_dicom(path))
    except FileNotFoundError:
        raise ImageLoadError(label, "file not found") from None
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise ImageLoadError(label, f"not a readable DICOM file ({exc})") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = ds.get("Modality", "") or ds.get("SOPClassUID", "")
        raise ImageLoadError(label, f"DICOM file without pixel data ({kind or 'no image'}: a report, structured report "
                                    "or presentation state?)")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        raw = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        name = f"{syntax.name} ({syntax})" if syntax is not None else "unknown"
        raise ImageLoadError(label, f"unsupported transfer syntax {name}: its pixel data cannot be decoded here "
                                    f"({str(exc).splitlines()[0][:160]}); install its decoder (pylibjpeg, "
                                    "python-gdcm) or convert the file") from None
    except (ValueError, AttributeError, KeyError, TypeError, OSError) as exc:
        raise ImageLoadError(label, f"corrupt DICOM pixel data ({str(exc).splitlines()[0][:200]})") from None
    frames = dicom_shape(ds, label)[2]
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    modality = str(ds.get("Modality", "") or "")
    arr = np.asarray(raw)
    if frames == 1:
        arr = arr[None]  # (1, H, W[, 3])
    if samples == 3:
        out = arr if arr.dtype == np.uint8 else to_uint8(arr, 0, 2 ** int(ds.get("BitsStored", 8)) - 1)
        return DicomImage(np.ascontiguousarray(out), modality, "colour, no window")
    if samples != 1 or arr.ndim != 3:
        raise ImageLoadError(label, f"unsupported DICOM layout ({samples} samples per pixel, {photometric}, shape {raw.shape})")
    if photometric == "PALETTE COLOR":
        rgb = pydicom.pixels.apply_color_lut(arr, ds)
        return DicomImage(np.ascontiguousarray(to_uint8(rgb, 0, 65535) if rgb.dtype != np.uint8 else rgb), modality, "palette")
    values, lo_hi, used = _dicom_window(ds, arr, window, label)
    grey = to_uint8(values, *lo_hi)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return DicomImage(np.repeat(grey[..., None], 3, axis=3), modality, used)


def _dicom_window(ds: Any, arr: np.ndarray, window: Window, label: str) -> tuple[np.ndarray, tuple[float, float], str]:
    """The rescaled values, the (lo, hi) they are mapped with, and the window described."""
    slope = _first(_functional(ds, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first(_functional(ds, "PixelValueTransformationSequence", "RescaleIntercept"))
    for name, v in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
        if v is not None and not math.isfinite(v):
            raise ImageLoadError(label, f"{name} {v} is not a finite number: the pixel values cannot be rescaled")
    if slope == 0:
        raise ImageLoadError(label, "RescaleSlope 0 maps every pixel to one value")
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        values = apply_modality_lut(arr, ds).astype(np.float64)
    else:
        s, b = (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)
        values = arr.astype(np.float64) * s + b if (s, b) != (1.0, 0.0) else arr
    if window.kind == "fixed":
        return values, window.bounds, window.describe()
    if window.kind in ("auto", "file"):
        if "VOILUTSequence" in ds:
            from pydicom.pixels import apply_voi_lut

            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) or 16
            return apply_voi_lut(values, ds, prefer_lut=True), (0.0, 2.0 ** bits - 1), "file VOI LUT"
        c = _first(_functional(ds, "FrameVOILUTSequence", "WindowCenter"))
        w = _first(_functional(ds, "FrameVOILUTSequence", "WindowWidth"))
        if c is not None and w is not None and w >= 1:
            own = Window("fixed", c, w)
            return values, own.bounds, "file " + own.describe()
        if window.kind == "file":
            raise ImageLoadError(label, "has no window of its own (no VOI LUT, no Window Center/Width): "
                                        "give window C,W, a preset or full")
    if arr.dtype.kind == "f" or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        lo, hi = float(np.min(values)), float(np.max(values))
    else:
        bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        lo, hi = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0 ** bits - 1)
        s, b = (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)
        lo, hi = sorted((lo * s + b, hi * s + b))
    return values, (lo, hi), f"full {lo:g}..{hi:g}"


def dicom_frames(path: str | os.PathLike, label: str) -> int:
    """Frames in a DICOM file, from its header (pixel data not read); refused when the file
    holds more pixels than the budget (:mod:`lakead.limits`)."""
    cols, rows, frames, _ = dicom_shape(dicom_header(path, label), label)
    check_volume(label, cols, rows, frames, "frames")
    return frames


#: Bytes a deflated DICOM file may inflate to, per pixel of the budget (8: float64 grey, or
#: 16-bit colour with room for the other tags).
_INFLATED_BYTES_PER_PIXEL = 8


def dicom_header(path: str | os.PathLike, label: str) -> Any:
    """The dataset of a DICOM file without its pixel data. A deflated file (which pydicom
    inflates whole, even for its header) is first inflated in small pieces and counted,
    without keeping them, and refused when it would expand past what the pixel budget allows."""
    pydicom = _pydicom(label)
    force = looks_like_dicom(path)
    try:
        _check_inflated_size(path, label, pydicom)
        return pydicom.dcmread(os.fspath(path), stop_before_pixels=True, force=force)
    except FileNotFoundError:
        raise ImageLoadError(label, "file not found") from None
    except ImageLoadError:
        raise
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, zlib.error) as exc:
        raise ImageLoadError(label, f"not a readable DICOM file ({exc})") from None


def _check_inflated_size(path: str | os.PathLike, label: str, pydicom: Any) -> None:
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    with open(os.fspath(path), "rb") as f:
        read_preamble(f, True)
        meta = _read_file_meta_info(f)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        cap = max_pixels() * VOLUME_FACTOR * _INFLATED_BYTES_PER_PIXEL
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := f.read(16384):  # at most ~16 MB inflated per piece (deflate expands 1032:1 at most)
            total += len(inflate.decompress(chunk))
            if total > cap:
                raise ImageLoadError(label, f"deflated DICOM data expands past {cap / 2**20:.0f} MiB, more than the "
                                            f"pixel budget allows ({max_pixels() / 1e6:g} MP per image, --max-pixels)")


def dicom_shape(ds: Any, label: str) -> tuple[int, int, int, int]:
    """``(columns, rows, frames, samples per pixel)`` of a DICOM dataset, each a positive
    whole number (a header saying otherwise is an :class:`ImageLoadError`)."""
    out = []
    for name, default in (("Columns", None), ("Rows", None), ("NumberOfFrames", 1), ("SamplesPerPixel", 1)):
        raw = ds.get(name, default)
        value = _first(raw) if raw not in (None, "") else (default if default is not None else None)
        if value is None or not math.isfinite(value) or value != int(value) or value < 1:
            raise ImageLoadError(label, f"DICOM header: {name} {raw!r} is not a positive whole number")
        out.append(int(value))
    return out[0], out[1], out[2], out[3]


