"""``POST /models/{id}/normals``: the operator's "this one is fine" (issue 29, docs/LINE.md).

The images join the model's gallery without a refit (:func:`lakead.line.update.add_normals`) and
the result is stored as the model's new version (:func:`lakead.line.versions.write_version`), under
the model's write lock: predictions running on it finish first, the next ones use the new version.
The web page's "mark as good" button on a result card sends that card's image here.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Optional

import numpy as np
from fastapi import FastAPI, File, Form, Path as PathParam, Request, UploadFile
from pydantic import BaseModel, Field

from ..errors import LakeadError
from .scheduling import FairSlots, PixelBudget, run_for_client
from .store import ID_PATTERN, ModelNotFound, ModelStore, StorageError, _check_patch, _is_model, _stop_when, clean_class_name
from .uploads import ServeLimits, Uploads, check_count, upload_name


class NormalsResponse(BaseModel):
    model: str
    version: int = Field(description="The model's new version (lakead history lists them).")
    method: str
    added: list[str] = Field(description="The images added as normal, in the order sent.")
    support_before: int
    support_after: int
    threshold_before: Optional[float] = Field(description="The decision threshold before (null: none).")
    threshold_after: Optional[float] = Field(description="The decision threshold now (null: none).")
    seconds: dict[str, float] = Field(description="Seconds of each step of the update.")
    inexact: list[str] = Field(description="What differs from a refit on all the images (docs/LINE.md); empty: nothing but rounding.")


def add_normals(store: ModelStore, model_id: str, images: Sequence[np.ndarray], names: Sequence[str], by: str | None = None,
                cancel: threading.Event | None = None) -> dict[str, Any]:
    """Add normal images to a stored model and store the result as its new version (see the module
    docstring). Returns what the update did and the version's number. Nothing changes on failure."""
    from ..line.update import add_normals as update
    from ..line.versions import write_version

    path = store._path(model_id)
    with store._entry(model_id).rw.write():
        if not _is_model(path):
            raise ModelNotFound(model_id)
        det = store.detector(model_id)
        arrays = _check_patch(det, images, names)
        before = det.state_
        upd = update(det, arrays, names=list(names), on_progress=_stop_when(cancel))
        try:
            version = write_version(path, det, action="update", added=upd.added, by=by,
                                    threshold_before=upd.threshold_before, threshold_after=upd.threshold_after)
        except LakeadError as exc:  # the server's disk, not the client's input: 500
            det.state_ = before
            raise StorageError(f"the updated model cannot be stored: {exc}") from exc
        except BaseException:
            det.state_ = before
            raise
        store._remember(model_id, det)
    return {**upd.to_dict(), "version": version}


def register(app: FastAPI, store: ModelStore, limits: ServeLimits, slots: FairSlots, pixels: PixelBudget,
             refuse_unknown: Callable[[Request, set[str]], Awaitable[None]], patch_check: Callable[[int], Any],
             responses: dict) -> None:
    """Add the endpoint to ``app`` (the service's store, limits, fit slots and pixel budget)."""

    @app.post("/models/{model_id}/normals", tags=["models"], responses=responses)
    async def add_normal_images(
        request: Request,
        model_id: Annotated[str, PathParam(pattern=ID_PATTERN, description="A model id from GET /models.")],
        images: Annotated[list[UploadFile], File(min_length=1, description="Images to learn as normal (an operator's 'this one is fine').")],
        by: Annotated[Optional[str], Form(max_length=200, description="Who says so, for the model's history (default: 'service').")] = None,
    ) -> NormalsResponse:
        """Add normal images to a model without a refit: their tokens join its gallery, its decision
        level is derived again, and the result is stored as the model's new version (the earlier ones
        are kept: ``lakead history``, ``lakead rollback``). The next prediction uses it.
        ``inexact`` says what differs from a refit on all the images (docs/LINE.md)."""
        await refuse_unknown(request, {"images", "by"})
        if not store.exists(model_id):
            raise ModelNotFound(model_id)
        check_count(len(images), limits.max_fit_images, "images given", "lakead serve --max-images")
        names = [upload_name(f.filename, i) for i, f in enumerate(images)]
        who = (clean_class_name(by) if by else "") or "service"

        def work(cancel: threading.Event) -> NormalsResponse:
            det = store.detector(model_id)
            check = patch_check(det.patch_size if hasattr(det, "patch_size") else det.backbone.info.patch_size)
            with Uploads([(n, f.file) for n, f in zip(names, images)], limits) as uploads:
                with pixels.hold(uploads.pixels, cancel.is_set):
                    arrays = uploads.decode(check, cancel.is_set, det.read_rule)
                    done = add_normals(store, model_id, arrays, names, by=who, cancel=cancel)
            return NormalsResponse(model=model_id, **done)

        return await run_for_client(request, slots, "fit", work, limits.max_seconds)
