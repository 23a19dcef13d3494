"""``add_normals``: teach a fitted model that some images are normal, without a refit.

The images' tokens join the model's gallery (or memory bank), the leave-one-out scores of the
support images and the decision levels are computed again, incrementally where that is exact:
:mod:`.lake_update` for LAKE, :mod:`.bank_update` for the memory-bank methods (PatchCore, AnomalyDINO). What each method
gets exactly and what it does not is said in those modules and in docs/LINE.md, and every
update returns the list (``Update.inexact``). :func:`update_model` does it to a model directory
and writes the result as a new version (:mod:`.versions`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..images import ImageInput


@dataclass
class Update:
    """What one update did."""

    method: str
    added: list[str]  # names of the images added, in order
    support_before: int
    support_after: int
    threshold_before: float
    threshold_after: float
    seconds: dict[str, float]  # by step; "total" too
    inexact: list[str] = field(default_factory=list)  # what differs from a refit on all the images (besides rounding)

    def to_dict(self) -> dict[str, Any]:
        from ..api import finite_or_none

        return {"method": self.method, "added": list(self.added), "support_before": self.support_before,
                "support_after": self.support_after, "threshold_before": finite_or_none(self.threshold_before),
                "threshold_after": finite_or_none(self.threshold_after),
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()}, "inexact": list(self.inexact)}


def add_normals(det: Any, images: Sequence[ImageInput] | ImageInput, names: Sequence[str] | None = None,
                on_progress: Callable[[int], None] | None = None) -> Update:
    """Add normal ``images`` to the fitted detector ``det`` in place (its ``state_`` is replaced,
    never edited). Raises :class:`~lakead.errors.ImageLoadError` for the first unreadable image
    and :class:`~lakead.errors.ConfigError` for a method or model that cannot be updated; the
    detector is then unchanged."""
    from ..methods.bank import BankDetector
    from ..methods.lake.detector import LakeDetector

    det.check_fitted()
    t0 = time.perf_counter()
    before = len(det.state_.support)
    if isinstance(det, LakeDetector):
        from .lake_update import update_lake

        r = update_lake(det, images, names, on_progress)
    elif isinstance(det, BankDetector):
        from .bank_update import update_bank

        r = update_bank(det, images, names, on_progress)
    else:
        raise ConfigError(f"method {det.method!r} keeps no gallery of normal images to add to: fit it again instead")
    seconds = {**r.seconds, "total": time.perf_counter() - t0}
    return Update(det.method, r.added, before, len(det.state_.support), r.threshold_before, r.threshold_after,
                  seconds, r.inexact)


def update_model(model_dir: str | Path, images: Sequence[ImageInput], *, names: Sequence[str] | None = None,
                 by: str | None = None, device: str | None = None, batch_size: int | None = None,
                 precision: str | None = None, on_progress: Callable[[int], None] | None = None) -> tuple[Update, int]:
    """Load the model in ``model_dir``, add ``images`` as normal, and write the result as the
    model's new version (:func:`lakead.line.versions.write_version`; the directory is replaced
    atomically, the earlier versions kept). ``by``: who asked (recorded in the history).
    Returns the update and the new version's number."""
    from ..methods import load_detector
    from .versions import write_version

    det = load_detector(model_dir, device=device, batch_size=batch_size, precision=precision)
    upd = add_normals(det, images, names, on_progress)
    t0 = time.perf_counter()
    version = write_version(model_dir, det, action="update", added=upd.added, by=by,
                            threshold_before=upd.threshold_before, threshold_after=upd.threshold_after)
    upd.seconds["write"] = time.perf_counter() - t0
    return upd, version
