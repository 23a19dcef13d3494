"""Turning paths, PIL images and numpy arrays into RGB arrays, with clear errors.

Every image that enters lakead goes through :func:`load_image` and comes out as a
``(H, W, 3)`` uint8 RGB array, whatever it was:

- grey (``L``, ``1``), palette (``P``, ``PA``), ``LA``, ``RGBA``, ``CMYK``, ``YCbCr``, ``LAB``
  and ``HSV`` images are converted to RGB; an alpha channel is dropped (the colour under it is
  kept, as ``PIL.Image.convert("RGB")`` does);
- 16-bit and 32-bit integer images (``I;16``, ``I``) are scaled from their type's full range
  to 0..255 (65535 -> 255), the same mapping for every image so that intensities stay
  comparable; float images (``F``) are taken as 0..1;
- EXIF orientation is honoured (a photo taken upright is scored upright);
- for files with several frames (TIFF stacks, GIF) the first frame is used;
- only raster formats are opened (:data:`RASTER_FORMATS`, whatever the file's name): an EPS or
  PostScript file is "not an image", so Ghostscript is never run on an input;
- DICOM files and NIfTI slices (``.dcm``, ``.nii``, ``.nii.gz``, ``scan.nii.gz#z=42``, a file
  with the DICOM preamble whatever its name) are read by :mod:`lakead.medical` with a
  :class:`~lakead.medical.ReadRule` (intensity window, slices); :func:`expand_inputs` turns a
  volume or a multi-frame file into its images.

numpy arrays may be ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``, of dtype uint8,
uint16, bool or float (values in 0..1).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CONTROL_CHARACTERS, ImageLoadError, LakeadError, printable  # noqa: F401 - re-exported
from .limits import check_image
from .medical.rule import MEDICAL_SUFFIXES

if TYPE_CHECKING:
    from .medical import ReadRule

#: What a user may pass wherever lakead takes an image.
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

log = logging.getLogger("lakead")

#: File endings read when a directory is listed (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")

#: The Pillow formats a file may be opened as (``Image.open(..., formats=...)``): raster formats
#: decoded by Pillow itself. EPS/PostScript (which runs Ghostscript), PDF, WMF/EMF and the
#: scientific and stub formats are left out, so such a file is "not an image".
RASTER_FORMATS = (
    "PNG", "JPEG", "MPO", "BMP", "DIB", "TIFF", "WEBP", "GIF", "PPM", "TGA", "ICO", "CUR", "PCX", "SGI",
    "JPEG2000", "QOI", "IM", "DDS", "PSD", "XBM", "XPM", "SUN", "MSP", "DCX", "FLI", "BLP", "ICNS", "AVIF",
)
_open_formats: tuple[str, ...] | None = None


def raster_formats() -> tuple[str, ...]:
    """:data:`RASTER_FORMATS` that this Pillow can read, in Pillow's own order of trying them."""
    global _open_formats
    if _open_formats is None:
        Image.init()
        _open_formats = tuple(f for f in Image.ID if f in RASTER_FORMATS)
    return _open_formats


def open_image(path: str | os.PathLike) -> Image.Image:
    """``Image.open`` restricted to :func:`raster_formats` (``UnidentifiedImageError`` for any
    other format, e.g. EPS, whatever the file is called). Use it as a context manager."""
    return Image.open(path, formats=raster_formats())


_measure_lock = threading.Lock()


def raster_size(path: str | os.PathLike, formats: Sequence[str] | None = None) -> tuple[int, int] | None:
    """``(width, height)`` of a raster file from its header, without decoding it; None when
    Pillow cannot tell. A file past Pillow's own decompression-bomb limit is measured too (its
    real size, with that check off for the moment of reading the header), so that it is
    reported with its size and refused by lakead's budget (:mod:`lakead.limits`)."""
    formats = tuple(formats) if formats is not None else raster_formats()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=formats) as im:
                return im.size
    except Image.DecompressionBombError:
        pass
    except Exception:  # noqa: BLE001 - not an image Pillow reads: reading it names the problem
        return None
    with _measure_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # header only: nothing is decoded here
        try:
            with Image.open(path, formats=formats) as im:
                return im.size
        except Exception:  # noqa: BLE001
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def source_name(image: ImageInput, index: int | None = None) -> str:
    """A short label for an input, used in errors and reports: the path, or ``<array 3>``."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    kind = "PIL image" if isinstance(image, Image.Image) else "array"
    return f"<{kind} {index}>" if index is not None else f"<{kind}>"


@dataclass
class LoadedImages:
    """Images that were read, with their labels, and the ones that could not be."""

    arrays: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    errors: list[ImageLoadError] = field(default_factory=list)


def read_all(
    images: Sequence[ImageInput] | ImageInput,
    names: Sequence[str] | None,
    read: Callable[[ImageInput, str], np.ndarray],
    *,
    strict: bool = True,
) -> LoadedImages:
    """Read inputs with ``read(image, label)``: ``strict`` raises on the first bad one, else
    they are collected in ``errors``. A single path, PIL image or array counts as one image;
    labels are ``names`` or the inputs' own names."""
    if isinstance(images, (str, Path, np.ndarray, Image.Image)) or not isinstance(images, Sequence):
        images = [images]  # type: ignore[list-item]
    if names is not None and len(names) != len(images):
        from .errors import ConfigError

        raise ConfigError(f"got {len(names)} names for {len(images)} images")
    out = LoadedImages()
    for i, img in enumerate(images):
        label = names[i] if names is not None else source_name(img, i)
        try:
            arr = read(img, label)
        except ImageLoadError as exc:
            if strict:
                raise
            out.errors.append(exc)
            continue
        out.arrays.append(arr)
        out.names.append(label)
    return out


class _Expanded(Sequence):
    """``base`` with some items replaced by several source names, indexed lazily: the items
    that were not expanded are read from ``base`` when asked for, never copied."""

    def __init__(self, base: Sequence[ImageInput], where: np.ndarray, extra: dict[int, str]) -> None:
        self.base, self.where, self.extra = base, where, extra

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, j):  # type: ignore[override]
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        j = range(len(self))[j]
        return self.extra[j] if j in self.extra else self.base[int(self.where[j])]


def expand_inputs(
    images: Sequence[ImageInput] | ImageInput, names: Sequence[str] | None, rule: ReadRule | None = None,
    *, label: bool = False,
) -> tuple[Sequence[ImageInput], list[str] | None]:
    """Inputs with each NIfTI volume and multi-frame DICOM file replaced by its images' source
    names (``scan.nii.gz#z=42``, ``cine.dcm#frame=3``; :func:`lakead.medical.expand`); their
    names, when given, get the same fragment. Other inputs are left as they are (a file that
    cannot be expanded too: reading it reports the problem).

    Nothing is copied or kept: without a volume among them, ``images`` itself comes back, and
    otherwise a lazy view of it, so that a sequence that makes its images when indexed (a
    dataset) is never held whole in memory. ``label=True``: the names come back for every
    input, :func:`source_name` where none was given (each input is looked at once here)."""
    from .medical import ReadRule, expand, is_medical, split_source

    if isinstance(images, (str, Path, np.ndarray, Image.Image)) or not isinstance(images, Sequence):
        images = [images]  # type: ignore[list-item]
    if names is not None and len(names) != len(images):
        from .errors import ConfigError

        raise ConfigError(f"got {len(names)} names for {len(images)} images")
    expanded: dict[int, list[str]] = {}
    labels: list[str] | None = [] if label and names is None else None
    for i in range(len(images)):
        img = images[i]
        if labels is not None:
            labels.append(source_name(img, i))
        if isinstance(img, (str, os.PathLike)) and is_medical(img) and split_source(os.fspath(img)) is None:
            try:
                sources = expand(img, rule or ReadRule(), names[i] if names is not None else None)
            except ImageLoadError:
                sources = []
            if sources and sources != [os.fspath(img)]:
                expanded[i] = sources
        del img
    if labels is not None:
        names = labels
    if not expanded:
        return images, (None if names is None else list(names))
    counts = np.ones(len(images), dtype=np.int64)
    for i, sources in expanded.items():
        counts[i] = len(sources)
    where = np.repeat(np.arange(len(images), dtype=np.int64), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    extra = {int(starts[i]) + k: s for i, sources in expanded.items() for k, s in enumerate(sources)}
    out_names: list[str] | None = None
    if names is not None:
        out_names = []
        for i in range(len(images)):
            if i in expanded:
                base = os.fspath(images[i])  # type: ignore[arg-type]
                out_names.extend(names[i] + s[len(base):] for s in expanded[i])
            else:
                out_names.append(names[i])
    view = _Expanded(images, where, extra)
    # a list's items are in memory already: a list of them costs only the references
    return (view[:] if isinstance(images, (list, tuple)) else view), out_names


def load_image(image: ImageInput, name: str | None = None, *, rule: ReadRule | None = None) -> np.ndarray:
    """Read one image into a ``(H, W, 3)`` uint8 RGB array.

    Raises :class:`~lakead.errors.ImageLoadError` naming the input and the problem when the
    file is missing, is not an image, is truncated or corrupt, or has an unsupported layout.
    DICOM files and NIfTI slices are read with ``rule`` (default: ``ReadRule()``, the file's
    own window or the full range; axial slices).
    """
    label = name or source_name(image)
    if isinstance(image, (str, os.PathLike)) and _medical(image):
        from .medical import ReadRule, read_source

        return read_source(image, rule or ReadRule(), label).image
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, label)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, label)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise ImageLoadError(label, "file not found")
        if path.is_dir():
            raise ImageLoadError(label, "is a directory, not an image file")
        try:
            with open_image(path) as im:
                check_image(label, *im.size)  # from the header: a file over the pixel budget is never decoded
                im.load()
                return _pil_to_rgb(im, label)
        except UnidentifiedImageError:
            from .medical import ReadRule, looks_like_dicom, read_source

            if looks_like_dicom(path):  # a DICOM file named otherwise (scanners often write no ending)
                return read_source(path, rule or ReadRule(), label).image
            raise ImageLoadError(label, "not an image, or an image format Pillow cannot read") from None
        except Image.DecompressionBombError as exc:
            size = raster_size(path)
            if size is not None:
                check_image(label, *size)  # past lakead's budget: said with its real size
            raise ImageLoadError(label, f"too many pixels to read safely ({exc})") from None
        except ImageLoadError:
            raise
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageLoadError(label, f"corrupt or truncated image ({exc})") from None
    raise ImageLoadError(label, f"unsupported input type {type(image).__name__}; give a path, a PIL image or a numpy array")


def _medical(image: str | os.PathLike) -> bool:
    from .medical import is_medical

    return is_medical(image)


def _pil_to_rgb(im: Image.Image, label: str) -> np.ndarray:
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im = ImageOps.exif_transpose(im) or im
    mode = im.mode
    if mode in ("RGB",):
        arr = np.asarray(im)
    elif mode.startswith("I;16") or mode == "I":
        raw = np.asarray(im)
        full = 65535.0 if mode.startswith("I;16") else float(np.iinfo(np.int32).max)
        if mode == "I" and raw.size and raw.max() <= 65535 and raw.min() >= 0:
            full = 65535.0  # 16-bit PNGs are often opened as mode "I"
        arr = _gray_to_rgb(np.clip(raw.astype(np.float64) / full, 0.0, 1.0))
    elif mode == "F":
        arr = _gray_to_rgb(_check_unit_range(np.asarray(im, dtype=np.float64), label))
    else:
        try:
            arr = np.asarray(im.convert("RGB"))
        except (ValueError, OSError) as exc:
            raise ImageLoadError(label, f"cannot convert image mode {mode!r} to RGB ({exc})") from None
    return _check_shape(arr, label)


def _array_to_rgb(a: np.ndarray, label: str) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        hint = " (channels first? use array.transpose(1, 2, 0))" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""
        raise ImageLoadError(label, f"array of shape {a.shape} is not (H, W), (H, W, 1), (H, W, 3) or (H, W, 4){hint}")
    if a.dtype == np.uint8:
        out = a
    elif a.dtype == np.bool_:
        out = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        out = np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        out = np.round(_check_unit_range(a.astype(np.float64), label) * 255.0).astype(np.uint8)
    else:
        raise ImageLoadError(label, f"unsupported array dtype {a.dtype}; use uint8, uint16, bool or float in 0..1")
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return _check_shape(np.ascontiguousarray(out), label)


def _gray_to_rgb(unit: np.ndarray) -> np.ndarray:
    g = np.round(unit * 255.0).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def _check_unit_range(a: np.ndarray, label: str) -> np.ndarray:
    if a.size and not np.isfinite(a).all():
        raise ImageLoadError(label, "float image contains NaN or infinite values")
    if a.size and (a.min() < 0.0 or a.max() > 1.0):
        raise ImageLoadError(label, f"float image values must lie in 0..1, found {a.min():.3g}..{a.max():.3g}")
    return a


def _check_shape(arr: np.ndarray, label: str) -> np.ndarray:
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ImageLoadError(label, f"could not be converted to RGB (got {arr.shape}, {arr.dtype})")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(label, "image has no pixels")
    return arr


def _is_image_name(name: str) -> bool:
    low = name.lower()
    return (os.path.splitext(low)[1] in IMAGE_SUFFIXES or low.endswith(MEDICAL_SUFFIXES)) and not name.startswith(".")


class _Listing:
    """What one listing has seen: each real folder once, and the files given by name.

    Folders are known by ``(device, inode)``: a symlink to a folder already listed (a loop
    such as ``sub/up -> ..``, or one folder given twice) is skipped with a warning, so a
    listing always ends and never yields one file twice through its folders. Holds one
    entry per folder listed, never one per file.
    """

    def __init__(self, exclude: Collection[str | os.PathLike] = (), warn: bool = True) -> None:
        self.warn = warn
        self.folders: dict[object, Path] = {}
        self.excluded: set[object] = set()
        self.pending = [Path(e) for e in exclude]  # excluded folders not found yet (made during the run)
        self.given: dict[object, Path] = {}  # files given by name: listed there, not in their folder
        self.yielded: set[object] = set()  # of those, the ones already listed

    def is_excluded(self, key: object) -> bool:
        if self.pending:
            found = {p: _real_key(p) for p in self.pending}
            self.excluded.update(k for k in found.values() if k is not None)
            self.pending = [p for p, k in found.items() if k is None]
        return key in self.excluded

    def duplicate(self, path: Path, first: Path) -> None:
        if self.warn:
            log.warning("%s: already listed as %s (a symlink loop, or given twice); skipped", path, first)


def _real_key(path: Path) -> object | None:
    """What tells one file or folder from another whatever the path to it: ``(device, inode)``,
    or the resolved path where the file system has no inode numbers; None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_ino:
        return (st.st_dev, st.st_ino)
    return os.path.normcase(os.path.realpath(path))


def iter_image_files(folder: Path, recursive: bool = True, *, exclude: Collection[str | os.PathLike] = (),
                     warn: bool = True) -> Iterator[Path]:
    """Image files under ``folder`` in sorted order (hidden files and other endings skipped).

    A generator over ``os.scandir``: only the names of one directory level are held at a
    time (as strings, about 80 bytes each), never the whole tree; files are told from
    folders without a ``stat`` call where the file system reports the entry type. Each real
    folder is listed once: symlinks that lead back to a folder already listed (loops) are
    skipped, with a warning unless ``warn`` is false. Folders in ``exclude`` are skipped.
    """
    return _walk(Path(folder), recursive, _Listing(exclude, warn))


def _walk(folder: Path, recursive: bool, seen: _Listing) -> Iterator[Path]:
    key = _real_key(folder)
    if key is not None:
        if seen.is_excluded(key):
            return
        if key in seen.folders:
            seen.duplicate(folder, seen.folders[key])
            return
        seen.folders[key] = folder
    names: list[str] = []
    dirs: set[str] = set()
    try:
        with os.scandir(folder) as it:
            for entry in it:
                name = entry.name
                if name.startswith("."):
                    continue
                try:
                    if entry.is_dir():
                        dirs.add(name)
                        names.append(name)
                    elif _is_image_name(name) and entry.is_file():
                        names.append(name)
                except OSError:
                    continue  # vanished or unreadable entry: skip it, as Path.is_dir() would
    except OSError as exc:
        raise LakeadError(f"{folder}: cannot list directory ({exc.strerror or exc})") from None
    names.sort()
    for name in names:
        if name in dirs:
            if recursive:
                yield from _walk(folder / name, recursive, seen)
        elif seen.given and (given := seen.given.get(_real_key(folder / name))) is not None:
            seen.duplicate(folder / name, given)  # listed where it was given by name
        else:
            yield folder / name


def iter_images(inputs: Sequence[str | os.PathLike] | str | os.PathLike, recursive: bool = True, *,
                exclude: Collection[str | os.PathLike] = (), warn: bool = True) -> Iterator[Path]:
    """Like :func:`list_images`, but lazily: paths are listed while they are consumed.

    The checks run at once, before the first path is returned: every input must exist and
    every directory must hold at least one image (the search stops at the first one found).
    Folders in ``exclude`` (e.g. the run's own output) are not listed. An input given twice,
    a folder reached twice (through a symlink, or given inside another input) and a file given
    by name that is also in a folder given are listed once, with a warning unless ``warn`` is
    false.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    items = [Path(item) for item in inputs]
    for p in items:
        if not p.exists():
            raise LakeadError(f"{p}: no such file or directory")
        if p.is_dir() and next(iter(iter_image_files(p, recursive, exclude=exclude, warn=False)), None) is None:
            raise LakeadError(f"{p}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}, .dcm, .nii, .nii.gz"
                              f"{' recursively' if recursive else ''})")
    seen = _Listing(exclude, warn)
    for p in items:
        if not p.is_dir() and (key := _real_key(p)) is not None:
            seen.given.setdefault(key, p)
    return _iter_inputs(items, recursive, seen)


def _iter_inputs(items: list[Path], recursive: bool, seen: _Listing) -> Iterator[Path]:
    for p in items:
        if p.is_dir():
            yield from _walk(p, recursive, seen)
            continue
        key = _real_key(p)
        if key is not None and key in seen.yielded:
            seen.duplicate(p, seen.given[key])
            continue
        seen.yielded.add(key)
        yield p


def list_images(inputs: Sequence[str | os.PathLike] | str | os.PathLike, recursive: bool = True, *,
                exclude: Collection[str | os.PathLike] = (), warn: bool = True) -> list[Path]:
    """Expand files and directories into a sorted list of image paths.

    A file is taken as given (even with an unusual ending: reading it will say if it is not
    an image). A directory is searched for files ending in one of :data:`IMAGE_SUFFIXES`,
    recursively by default; each real folder and each file is listed once (see
    :func:`iter_images`). A missing path, or a directory with no image in it, is an error
    that names it. For very many files, :func:`iter_images` lists them lazily.
    """
    return list(iter_images(inputs, recursive, exclude=exclude, warn=warn))


def preprocess(images: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float], resample: int,
               rescale: float = 1.0 / 255.0) -> np.ndarray:
    """``B`` uint8 ``(H, W, 3)`` arrays -> float32 ``(B, 3, size, size)`` model input.

    The whole image is resized to ``size x size`` with Pillow (``resample``: a
    ``PIL.Image.Resampling`` value; no centre crop, so every pixel is scored and the map is
    resized back to the image's own height and width), scaled by ``rescale``, then normalised
    with ``mean`` and ``std``. Shared by the torch backbones (:class:`lakead.backbones.base.Preprocessing`)
    and the torch-free :mod:`lakead.runtime`, so both feed a model the same numbers.

    >>> preprocess([np.full((4, 6, 3), 255, np.uint8)], 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 2).tolist()[0][0]
    [[1.0, 1.0], [1.0, 1.0]]
    """
    batch = np.empty((len(images), size, size, 3), dtype=np.float32)  # (B, S, S, 3)
    for i, arr in enumerate(images):
        im = Image.fromarray(arr)
        if im.size != (size, size):
            im = im.resize((size, size), resample=Image.Resampling(resample))
        batch[i] = np.asarray(im, dtype=np.float32)
    batch *= rescale
    batch -= np.asarray(mean, dtype=np.float32)
    batch /= np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))  # (B, 3, S, S)
