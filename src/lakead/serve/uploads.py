"""Uploaded image files -> RGB arrays, within the service's limits.

Every upload goes through :func:`lakead.images.load_image` (the one image reader of lakead),
after a header-only look at its size: an image over the pixel limit is refused before it is
decoded, so a small file that would expand to gigabytes never does. All files of a request
are checked and every problem is reported at once, each naming its file.

This module knows nothing of HTTP: problems are raised as :class:`UploadRejected`, carrying
the status the web layer answers with (413 for a limit, 422 for a file that is no image).
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image

from ..errors import ConfigError, ImageLoadError, LakeadError
from ..images import load_image, raster_size
from ..medical import is_medical

if TYPE_CHECKING:
    from ..medical import ReadRule

MIB = 2**20


@dataclass(frozen=True)
class ServeLimits:
    """What one request, and the server as a whole, may use. Requests over a limit are
    refused with a message (413) naming it."""

    max_request_bytes: int = 256 * MIB  # size of the whole request body
    max_fit_images: int = 256  # normal images in one POST /models
    max_predict_images: int = 32  # images in one POST /models/{id}/predict
    max_image_pixels: int = 40_000_000  # width x height of any one image file (checked before decoding)
    max_decode_pixels: int = 4_000_000  # larger images are downscaled to this while they are decoded
    max_total_pixels: int = 200_000_000  # decoded pixels of all the images of one request
    max_server_pixels: int = 400_000_000  # decoded pixels held by all requests at once (others wait)
    max_image_size: int = 1024  # largest image_size (network input side) a client may choose
    max_queued: int = 16  # requests waiting for a worker, per model (and for fits); more get 503
    max_sigma: int = 16  # largest map blur (sigma, blur_sigma) in pixels of the model input (both papers: 4)
    max_ef_search: int = 1024  # largest hnsw_ef_search (candidates examined per query)
    max_neighbours: int = 64  # largest PatchCore neighbours (bank vectors compared per patch)
    max_work_memory_mb: int = 4096  # memory one fit or prediction may hold, estimated from its options before it starts
    max_seconds: int = 900  # longest one fit or prediction may run; past it, it stops at its next check (503)

    def validate(self) -> "ServeLimits":
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"limit {name} must be a positive integer, got {value!r}")
        if self.max_total_pixels > self.max_server_pixels:
            raise ConfigError(f"limit max_total_pixels ({self.max_total_pixels}) must not be larger than "
                              f"max_server_pixels ({self.max_server_pixels})")
        return self

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class UploadRejected(LakeadError):
    """Some uploads broke a limit (``status`` 413) or are not images (``status`` 422).

    ``problems`` holds ``(file name, problem)`` for every file at fault.
    """

    def __init__(self, status: int, message: str, problems: Sequence[tuple[str, str]] = ()) -> None:
        self.status = status
        self.problems = list(problems)
        super().__init__(message)


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def upload_name(filename: str | None, index: int) -> str:
    """A display name for an upload: the file's base name (no folders), printable, at most
    200 characters; ``image N`` when the client sent none."""
    name = PurePosixPath((filename or "").replace("\\", "/")).name
    name = _UNSAFE.sub("", name).strip()[:200]
    return name or f"image {index + 1}"


def check_count(n: int, limit: int, what: str, option: str) -> None:
    """Refuse a request with more than ``limit`` images before any of them is read."""
    if n > limit:
        raise UploadRejected(413, f"too many images: {n} {what}, at most {limit} per request ({option})")


def _openable() -> list[str]:
    """Every format Pillow reads but EPS (opening one may run Ghostscript)."""
    Image.init()
    return [f for f in Image.ID if f not in ("EPS",)]


def _header_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from the file header without decoding; None when Pillow cannot
    tell (``load_image`` then names the problem). A file over Pillow's own decompression-bomb
    limit is measured too, so that it is reported with its real size. A DICOM or NIfTI file
    counts all its images: ``(width, height * images)``."""
    from ..medical import header_size, looks_like_dicom

    if is_medical(path) or looks_like_dicom(path):
        dims = header_size(path)
        return None if dims is None else (dims[0], dims[1] * dims[2])
    return raster_size(path, _openable())  # a file past Pillow's bomb limit measured too, with its real size


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def reduction(width: int, height: int, max_pixels: int) -> int:
    """The smallest integer factor that brings ``width x height`` to at most ``max_pixels``."""
    factor = max(1, math.ceil(math.sqrt(width * height / max_pixels)))
    while math.ceil(width / factor) * math.ceil(height / factor) > max_pixels:
        factor += 1
    return factor


def decode_reduced(path: Path, name: str, max_pixels: int) -> np.ndarray:
    """Decode an image with more than ``max_pixels`` pixels straight to a smaller size: a JPEG
    at 1/2, 1/4 or 1/8 scale from its DCT (``Image.draft``: the full image never exists in
    memory), then a box filter by an integer factor (``Image.reduce``). The result has at
    most ``max_pixels`` pixels, is upright (EXIF orientation) and is read as
    :func:`lakead.images.load_image` reads any image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=_openable()) as im:
                transpose = _TRANSPOSE.get(im.getexif().get(0x0112, 1))
                w, h = im.size
                if im.format == "JPEG":
                    f = reduction(w, h, max_pixels)
                    im.draft(im.mode if im.mode in ("L", "RGB") else "RGB", (math.ceil(w / f), math.ceil(h / f)))
                im.load()
                factor = reduction(*im.size, max_pixels)
                try:
                    small = im.reduce(factor) if factor > 1 else im.copy()
                except (ValueError, NotImplementedError):  # a mode reduce() does not take: through RGB
                    small = Image.fromarray(load_image(im, name)).reduce(factor)
                    transpose = None  # load_image has already turned it upright
                if transpose is not None:
                    small = small.transpose(transpose)
                small.info.pop("exif", None)
                return load_image(small, name)
    except ImageLoadError:
        raise
    except Exception:  # noqa: BLE001 - diagnosed by the one image reader, as for any image
        return load_image(path, name)


class Uploads:
    """The files of one request on disk under names of the service's choosing, their sizes
    read from the headers and checked against the limits before anything is decoded.

    ``pixels`` is what decoding them will hold (after downscaling), for a server-wide
    :class:`~lakead.serve.scheduling.PixelBudget`; :meth:`decode` reads them. Use it as a
    context manager (the files are removed on exit). Raises :class:`UploadRejected` (413)
    when an image or the request has more pixels than the limits allow, every file at fault
    named with its real size.
    """

    def __init__(self, files: Sequence[tuple[str, BinaryIO]], limits: ServeLimits) -> None:
        self.limits = limits
        self.names = [name for name, _ in files]
        self.tmp = Path(tempfile.mkdtemp(prefix="lakead-upload-"))
        self.paths: list[Path] = []
        self.sizes: list[tuple[int, int] | None] = []
        try:
            self._scan(files)
        except BaseException:
            self.close()
            raise

    def _scan(self, files: Sequence[tuple[str, BinaryIO]]) -> None:
        limits = self.limits
        too_large: list[tuple[str, str]] = []
        total = largest = 0
        for i, (name, fh) in enumerate(files):
            suffix = Path(name).suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", Path(name).suffix) else ""
            if name.lower().endswith(".nii.gz"):
                suffix = ".nii.gz"  # NIfTI is read by its ending
            path = self.tmp / f"{i}{suffix}"  # our own name on disk: the client's name is only a label
            with path.open("wb") as out:
                fh.seek(0)
                shutil.copyfileobj(fh, out, 1 * MIB)
            size = _header_size(path)
            self.paths.append(path)
            self.sizes.append(size)
            if size is None:
                continue
            pixels = size[0] * size[1]
            if pixels > limits.max_image_pixels:
                too_large.append((name, f"{size[0]}x{size[1]} pixels ({pixels / 1e6:.1f} MP) is more than the "
                                        f"limit of {limits.max_image_pixels / 1e6:.1f} MP per image (--max-megapixels)"))
                continue
            if is_medical(path) and pixels > limits.max_decode_pixels:  # decoded whole: no downscaling
                too_large.append((name, f"{pixels / 1e6:.1f} MP in all its images is more than the {limits.max_decode_pixels / 1e6:.1f} "
                                        "MP a DICOM or NIfTI upload may decode to"))
                continue
            decoded = self.decoded_pixels(size)
            if decoded < pixels:
                largest = max(largest, pixels)
            total += decoded
            if total > limits.max_total_pixels:
                too_large.append((name, f"the images up to this one hold {total / 1e6:.1f} MP once decoded, more than the "
                                        f"limit of {limits.max_total_pixels / 1e6:.1f} MP per request (--max-total-megapixels)"))
        if too_large:
            raise UploadRejected(413, summarize_problems("too large", too_large), too_large)
        # while one large image is decoded its full size exists for a moment (not for JPEG)
        self.pixels = min(total + largest, limits.max_server_pixels)

    def decoded_pixels(self, size: tuple[int, int]) -> int:
        w, h = size
        if w * h <= self.limits.max_decode_pixels:
            return w * h
        f = reduction(w, h, self.limits.max_decode_pixels)
        return math.ceil(w / f) * math.ceil(h / f)

    def decode(self, check: "Callable[[np.ndarray, str], str | None] | None" = None,
               cancelled: "Callable[[], bool] | None" = None, rule: "ReadRule | None" = None) -> list[np.ndarray]:
        """The images as ``(H, W, 3)`` uint8 arrays, in order; those with more than
        ``max_decode_pixels`` pixels downscaled while decoded. ``check(array, name)`` returns
        a problem with a readable image (as: smaller than one patch) or None. Raises
        :class:`UploadRejected` (422) naming every file that is not a readable image or that
        ``check`` refuses. DICOM files and one-slice NIfTI files are read with ``rule`` (the
        model's window; :class:`lakead.medical.ReadRule`); a file holding several images is refused."""
        readable, unreadable = self.decode_each(check, cancelled, rule)
        if unreadable:
            raise UploadRejected(422, summarize_problems("not readable as images", unreadable), unreadable)
        return [arr for _, arr in readable]

    def decode_each(self, check: "Callable[[np.ndarray, str], str | None] | None" = None,
                    cancelled: "Callable[[], bool] | None" = None, rule: "ReadRule | None" = None,
                    ) -> tuple[list[tuple[int, np.ndarray]], list[tuple[str, str]]]:
        """As :meth:`decode`, file by file: ``(index, array)`` of each readable image, in
        order, and ``(name, problem)`` of each file that is not (nothing is raised for them)."""
        unreadable: list[tuple[str, str]] = []
        arrays: list[tuple[int, np.ndarray]] = []
        for index, (name, path, size) in enumerate(zip(self.names, self.paths, self.sizes)):
            if cancelled is not None and cancelled():
                raise Cancelled()
            try:
                if size is not None and size[0] * size[1] > self.limits.max_decode_pixels and not is_medical(path):
                    arr = decode_reduced(path, name, self.limits.max_decode_pixels)
                else:
                    arr = load_image(path, name, rule=rule)
                problem = check(arr, name) if check is not None else None
                if problem is not None:
                    unreadable.append((name, problem))
                else:
                    arrays.append((index, arr))
            except ImageLoadError as exc:
                unreadable.append((name, _for_client(exc.problem, path, name)))
            finally:
                path.unlink(missing_ok=True)  # free the disk now, not only at the end of a large request
        return arrays, unreadable

    def original_size(self, index: int, array: np.ndarray) -> tuple[int, int]:
        """``(width, height)`` of upload ``index`` as sent (upright), for an image decoded as ``array``."""
        h, w = array.shape[:2]
        size = self.sizes[index]
        if size is None or size[0] * size[1] <= self.limits.max_decode_pixels:
            return w, h
        return (size[0], size[1]) if (w >= h) == (size[0] >= size[1]) else (size[1], size[0])

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "Uploads":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _for_client(problem: str, path: Path, name: str) -> str:
    """A reader's problem as a client can read and act on it: the server's temporary path
    replaced by the file's own name, and the command-line advice for a file holding several
    images (name one as FILE#z=K, or give the whole file to predict) replaced by what the
    service takes: one image per file."""
    problem = problem.replace(str(path), name).replace(str(path.parent), "")
    m = re.match(r"holds (\d+) (.*?) ?(slices with signal|frames): ", problem)
    if m:
        what = "slices" if "slices" in m.group(3) else "frames"
        return (f"holds {m.group(1)} {m.group(2) + ' ' if m.group(2) else ''}{what}: the service scores one image per "
                f"file; send one {what[:-1]} (a one-{what[:-1]} file, or the {what[:-1]} as a PNG)")
    return problem


class Cancelled(LakeadError):
    """The client went away: the work for it was stopped."""


def read_uploads(files: Sequence[tuple[str, BinaryIO]], limits: ServeLimits) -> list[np.ndarray]:
    """Read ``(name, file object)`` uploads into ``(H, W, 3)`` uint8 arrays, in order (see
    :class:`Uploads`)."""
    with Uploads(files, limits) as uploads:
        return uploads.decode()


def summarize_problems(what: str, problems: Sequence[tuple[str, str]]) -> str:
    first = "; ".join(f"{name}: {problem}" for name, problem in problems[:3])
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    return f"{len(problems)} file(s) {what}: {first}{more}"
