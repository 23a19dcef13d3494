"""Uploaded image files -> RGB arrays, within the service's limits.

Every upload goes through :func:`lakead.images.load_image` (the one image reader of lakead),
after a header-only look at its size: an image over the pixel limit is refused before it is
decoded, so a small file that would expand to gigabytes never does. All files of a request
are checked and every problem is reported at once, each naming its file.

This module knows nothing of HTTP: problems are raised as :class:`UploadRejected`, carrying
the status the web layer answers with (413 for a limit, 422 for a file that is no image).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
from PIL import Image

from ..errors import ConfigError, ImageLoadError, LakeadError
from ..images import load_image

MIB = 2**20


@dataclass(frozen=True)
class ServeLimits:
    """What one request may send. Requests over a limit are refused with a message (413)."""

    max_request_bytes: int = 256 * MIB  # size of the whole request body
    max_fit_images: int = 256  # normal images in one POST /models
    max_predict_images: int = 32  # images in one POST /models/{id}/predict
    max_image_pixels: int = 40_000_000  # width x height of any one image (checked before decoding)
    max_total_pixels: int = 400_000_000  # summed over the images of one request (bounds memory)

    def validate(self) -> "ServeLimits":
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"limit {name} must be a positive integer, got {value!r}")
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


def _header_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from the file header without decoding; None when Pillow cannot
    tell (``load_image`` then names the problem)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except Image.DecompressionBombError:
        return (Image.MAX_IMAGE_PIXELS or 0) * 2 + 1, 1  # over any sane limit: reported below
    except Exception:  # noqa: BLE001 - any failure is diagnosed by load_image
        return None


def read_uploads(files: Sequence[tuple[str, BinaryIO]], limits: ServeLimits) -> list[np.ndarray]:
    """Read ``(name, file object)`` uploads into ``(H, W, 3)`` uint8 arrays, in order.

    Raises :class:`UploadRejected`: 413 when an image or the request has more pixels than
    the limits allow, else 422 when some files are not readable images. Every file at
    fault is listed, not only the first.
    """
    too_large: list[tuple[str, str]] = []
    unreadable: list[tuple[str, str]] = []
    arrays: list[np.ndarray] = []
    total = 0
    tmp = Path(tempfile.mkdtemp(prefix="lakead-upload-"))
    try:
        for i, (name, fh) in enumerate(files):
            suffix = Path(name).suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", Path(name).suffix) else ""
            path = tmp / f"{i}{suffix}"  # our own name on disk: the client's name is only a label
            with path.open("wb") as out:
                fh.seek(0)
                shutil.copyfileobj(fh, out, 1 * MIB)
            try:
                size = _header_size(path)
                if size is not None:
                    pixels = size[0] * size[1]
                    if pixels > limits.max_image_pixels:
                        too_large.append((name, f"{size[0]}x{size[1]} pixels ({pixels / 1e6:.1f} MP) is more than the "
                                                f"limit of {limits.max_image_pixels / 1e6:.1f} MP per image (--max-megapixels)"))
                        continue
                    total += pixels
                    if total > limits.max_total_pixels:
                        too_large.append((name, f"the images up to this one hold {total / 1e6:.1f} MP, more than the "
                                                f"limit of {limits.max_total_pixels / 1e6:.1f} MP per request (--max-total-megapixels)"))
                        continue
                if not too_large:  # else the request is refused anyway: decode nothing more
                    arrays.append(load_image(path, name))
            except ImageLoadError as exc:
                unreadable.append((name, exc.problem))
            finally:
                os.unlink(path)  # free the disk now, not only at the end of a large request
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if too_large:
        raise UploadRejected(413, _summary("too large", too_large), too_large + unreadable)
    if unreadable:
        raise UploadRejected(422, _summary("not readable as images", unreadable), unreadable)
    return arrays


def _summary(what: str, problems: Sequence[tuple[str, str]]) -> str:
    first = "; ".join(f"{name}: {problem}" for name, problem in problems[:3])
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    return f"{len(problems)} file(s) {what}: {first}{more}"
