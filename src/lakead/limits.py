"""How much one input file may hold before lakead decodes it: the pixel budget.

Every file lakead reads is measured from its header first, and refused (an
:class:`~lakead.errors.ImageLoadError` naming it and the limit) when it holds more than:

- :func:`max_pixels` pixels for an image (width x height; default :data:`DEFAULT_MAX_PIXELS`,
  the service's per-file limit too; ``lakead fit/predict/eval --max-pixels`` changes it for a run);
- :data:`VOLUME_FACTOR` times as many in all the frames of a DICOM file or all the voxels of a
  NIfTI volume (a volume holds many images; each of its images is within the image limit).

So a small file that expands to gigabytes (a blank 12000 x 12000 PNG, a DICOM header claiming
10^8 frames, a gzip-compressed NIfTI of a billion voxels) is refused before any of it is
decoded. The budget is a process-wide setting (the reading threads of a run share it).
"""

from __future__ import annotations

from .errors import ConfigError, ImageLoadError

#: Pixels of one image file, by default (40 MP: a 7300 x 5500 photograph).
DEFAULT_MAX_PIXELS = 40_000_000
#: A DICOM file (all its frames) or a NIfTI volume (all its voxels) may hold this many times
#: the image budget (320 M voxels by default: a 512 x 512 CT of 1200 slices).
VOLUME_FACTOR = 8

#: Largest network input side (``image_size``) lakead runs: past it the tokens' attention alone
#: needs tens of gigabytes per image (the option's bound, and a saved model's).
MAX_IMAGE_SIZE = 4096

_max_pixels = DEFAULT_MAX_PIXELS


def max_pixels() -> int:
    """The image budget in force (pixels of one image file)."""
    return _max_pixels


def set_max_pixels(pixels: int | float | None) -> None:
    """Set the image budget (None: back to :data:`DEFAULT_MAX_PIXELS`)."""
    global _max_pixels
    if pixels is None:
        _max_pixels = DEFAULT_MAX_PIXELS
        return
    if isinstance(pixels, bool) or not isinstance(pixels, (int, float)) or not 1 <= pixels < 2**62:
        raise ConfigError(f"max_pixels must be a positive number of pixels, got {pixels!r}")
    _max_pixels = int(pixels)


def check_image(label: str, width: int, height: int, limit: int | None = None) -> None:
    """Refuse an image of ``width x height`` pixels over the budget (``limit``: another than
    :func:`max_pixels`), before it is decoded."""
    limit = max_pixels() if limit is None else limit
    if width * height > limit:
        raise ImageLoadError(label, f"{width}x{height} pixels ({width * height / 1e6:.1f} MP) is more than the limit of "
                                    f"{limit / 1e6:g} MP per image (--max-pixels)")


def check_volume(label: str, width: int, height: int, count: int, what: str, limit: int | None = None) -> None:
    """Refuse a DICOM file or NIfTI volume of ``count`` images (``what``: frames, slices) of
    ``width x height`` over the budget, before it is decoded."""
    limit = max_pixels() if limit is None else limit
    check_image(label, width, height, limit)
    total = width * height * count
    if total > limit * VOLUME_FACTOR:
        raise ImageLoadError(label, f"{count} {what} of {width}x{height} pixels ({total / 1e6:.1f} M in all) is more than the "
                                    f"limit of {limit * VOLUME_FACTOR / 1e6:g} M per file ({VOLUME_FACTOR} x --max-pixels)")
