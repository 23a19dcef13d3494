"""The FastAPI application: models as resources, predictions, the page.

    POST   /models                 fit on uploaded normal images; 201 with the model
    GET    /models                 every stored model
    GET    /models/{id}            one model
    DELETE /models/{id}            remove it (204)
    POST   /models/{id}/predict    score uploaded images: scores, decisions, overlays
    GET    /info                   limits, backbones and option defaults of this server
    GET    /healthz                liveness (never needs the token)
    GET    /                       the web page; /docs, /redoc and /openapi.json describe the API (no CDN)

Fitting and predicting run the network for seconds to minutes: they run in worker threads
(at most one fit and ``workers`` predictions at a time, the others wait their turn without
blocking the event loop; models take turns, see :mod:`lakead.serve.scheduling`), and stop
when their client disconnects. Decoded pixels are bounded per image (larger images are
downscaled while decoded), per request and for the whole server. Every error answer is JSON ``{"detail": message, "errors": [...]}``
where ``errors`` lists ``{"name": file or field, "problem": ...}`` when there are several.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import inspect
import math
import threading
import typing
from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from fastapi import FastAPI, File, Form, Path as PathParam, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..api import Runtime
from ..errors import BackboneUnavailableError, ConfigError, LakeadError, ModelFormatError
from ..methods.lake import LakeConfig
from ..methods import METHODS, get_method
from ..options import method_option_specs, option_specs
from ..viz import overlay, png_bytes
from . import normals
from .docs import add_docs
from .guard import Guard
from .budget import OverLimit, check_options, fit_memory, predict_memory, refuse_over
from .scheduling import Busy, FairSlots, PixelBudget, TimedOut, run_for_client
from ..medical import ReadRule
from .store import FIT_OPTIONS, ID_PATTERN, METHOD_OPTIONS, BackboneNotAllowed, ModelNotFound, ModelStore, StorageError, clean_class_name
from .uploads import Cancelled, ServeLimits, UploadRejected, Uploads, check_count, summarize_problems, upload_name

STATIC = files("lakead.serve") / "static"


# -- schemas ------------------------------------------------------------------------------

class Problem(BaseModel):
    name: str = Field(description="The file or field at fault.")
    problem: str


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong, in one message.")
    errors: list[Problem] = Field(default_factory=list, description="Each file or field at fault, when there are several.")


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    auth_required: bool = Field(description="Whether the other endpoints need 'Authorization: Bearer <token>'.")


class ServerInfo(BaseModel):
    version: str
    default_backbone: str = Field(description="Backbone of models created without a 'backbone' field.")
    backbones: list[str] = Field(description="Backbones a client may choose when creating a model.")
    device: str
    batch_size: int = Field(description="Images per forward pass (a setting of the server).")
    precision: str = Field(description="Backbone arithmetic (a setting of the server).")
    limits: dict[str, int]
    fit_options: dict[str, Any] = Field(description="Detector options of POST /models with their defaults.")
    option_choices: dict[str, list[str]] = Field(description="The allowed values of the options that take one of a few words.")
    option_help: dict[str, str] = Field(description="What each detector option of POST /models does.")
    methods: list[str] = Field(default_factory=list, description="The values of POST /models 'method'.")
    method_options: dict[str, Any] = Field(default_factory=dict, description="Options of the methods other than LAKE "
                                           "(POST /models with 'method'), with their defaults; their help names the methods.")
    options_by_method: dict[str, list[str]] = Field(default_factory=dict, description="Each method's own options among "
                                                    "fit_options and method_options: the form of a method shows these only.")


class ModelInfo(BaseModel):
    id: str
    method: str = Field(description="How the model scores (a name of lakead.methods).")
    class_name: str
    backbone: str
    fitted_at: str
    lakead_version: str
    support_images: int
    support: list[str] = Field(description="Names of the normal images the model was fitted on.")
    support_rule: str
    outliers: list[str] = Field(description="Normal images dropped by filter_outliers.")
    threshold: Optional[float] = Field(description="Decision threshold; null when none could be derived (one image).")
    false_alarm_rate: Optional[float] = Field(None, description="The false-alarm budget the threshold was derived for (null: fixed or the old sigmas rule).")
    threshold_rule: str = Field("sigmas", description="How the threshold was derived: conformal, exponential, gaussian, sigmas, fixed or none.")
    threshold_description: Optional[str] = Field(None, description="How the threshold was derived, in words.")
    image_size: Optional[int] = None
    description: dict[str, Any] = Field(default_factory=dict, description="What the method says of itself (its summary: "
                                        "LAKE's blocks, neurons and text probe; a memory bank's size; ...). No method is "
                                        "described with another's keys.")
    map_range: list[float] = Field(description="Map values from uncoloured (typical normal) to red (decision level).")
    config: dict[str, Any]
    warnings: list[str]


class ModelList(BaseModel):
    models: list[ModelInfo]
    damaged: list[Problem] = Field(default_factory=list, description="Stored models that cannot be read, each named with its problem.")


class Region(BaseModel):
    top: int
    left: int
    bottom: int = Field(description="Exclusive.")
    right: int = Field(description="Exclusive.")
    area: int = Field(description="Pixels.")
    peak: float = Field(description="Highest map value inside.")
    mean: float = Field(description="Mean map value inside.")


class ImageResult(BaseModel):
    name: str
    width: int = Field(description="Width of the image as sent.")
    height: int
    scored_width: int = Field(description="Width the image was scored (and its overlay drawn) at: smaller than width "
                                          "when a large image was downscaled while decoded (limit max_decode_pixels).")
    scored_height: int
    score: float = Field(description="Fused score visual + lam * semantic; higher is more anomalous.")
    visual: float = Field(description="Largest distance of a patch to the normal gallery (normalised).")
    semantic: float = Field(description="P(anomalous) of the text probe, pooled over patches; 0 when off.")
    anomalous: bool = Field(description="score > threshold, or out of scope")
    out_of_scope: bool = Field(False, description="Not the product the model was fitted on (most of the image unlike its normal images).")
    regions: list[Region] = Field(default_factory=list, description="Defect regions in pixels of the scored image, largest peak first.")
    threshold: Optional[float] = Field(description="The threshold used; null means none (every image normal).")
    map_max: float = Field(description="Largest value of the anomaly map.")
    overlay_png: Optional[str] = Field(description="The map over the image as a PNG data URL (null with overlay=false).")


class PredictResponse(BaseModel):
    model: str
    threshold: Optional[float]
    map_range: list[float]
    results: list[ImageResult] = Field(description="The images scored, in the order sent.")
    failed: list[Problem] = Field(default_factory=list, description="The files not scored (not readable as an image, "
                                  "or smaller than one patch), each with its problem; the others are scored all the same.")


ModelId = Annotated[str, PathParam(pattern=ID_PATTERN, description="A model id from GET /models.")]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in codes}


# -- model options as form fields ----------------------------------------------------------

#: The detector options of POST /models (every configuration field but the backbone), each
#: with its type, choices, default and help from :class:`~lakead.methods.lake.LakeConfig`.
OPTION_SPECS = {name: spec for name, spec in option_specs(LakeConfig).items() if name in FIT_OPTIONS}
#: The options of the other methods (the ``method`` form field), with the methods that read each.
METHOD_OPTION_SPECS = {name: dataclasses.replace(spec, help=f"{spec.help} [{', '.join(methods)}]")
                       for name, (spec, methods) in method_option_specs().items()}
#: Every option form field of POST /models.
FORM_SPECS = {**OPTION_SPECS, **METHOD_OPTION_SPECS}
#: The configuration's default backbone: the server's when none is given.
DEFAULT_BACKBONE: str = option_specs(LakeConfig)["backbone"].default


def with_option_fields(endpoint: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``endpoint`` with one optional form field per detector option (:data:`OPTION_SPECS`)
    in place of its ``options`` parameter. Each field has the option's type (its ``Literal``
    words as an enum), and its help as description; FastAPI reads them from the returned
    function's ``__signature__``. The endpoint receives the options sent, read (blocks
    parsed), as ``options=``: those not sent keep the configuration's default."""
    sig = inspect.signature(endpoint)
    hints = typing.get_type_hints(endpoint, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values() if p.name != "options"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Annotated[Optional[spec.form_type], Form(description=spec.help)])
        for name, spec in FORM_SPECS.items()
    ]

    @functools.wraps(endpoint)
    async def wrapper(**kwargs: Any) -> Any:
        options = {}
        for name, spec in FORM_SPECS.items():
            value = kwargs.pop(name, None)
            if value is None:
                continue
            try:
                options[name] = spec.parse(value)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        return await endpoint(options=options, **kwargs)

    params = own + added
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    if "return" in hints:
        wrapper.__annotations__["return"] = hints["return"]
    return wrapper


# -- the app ------------------------------------------------------------------------------

def options_by_method() -> dict[str, list[str]]:
    """Each registered method's own options among those POST /models takes (its config's fields)."""
    offered = [*OPTION_SPECS, *(n for n in METHOD_OPTION_SPECS if n not in OPTION_SPECS)]
    out = {}
    for m in METHODS.values():
        own = {f.name for f in dataclasses.fields(m.config_class)}
        out[m.name] = [n for n in offered if n in own]
    return out


def create_app(
    models_dir: str | Path,
    *,
    backbone: str = DEFAULT_BACKBONE,
    allowed_backbones: tuple[str, ...] = (),
    token: str | None = None,
    limits: ServeLimits | None = None,
    device: str = "auto",
    batch_size: int = Runtime.batch_size,
    precision: str = Runtime.precision,
    workers: int = 2,
    allowed_hosts: tuple[str, ...] | None = None,
    allow_ip_hosts: bool = False,
    max_cached: int = 8,
) -> FastAPI:
    """Build the service over the models in ``models_dir`` (created if missing).

    ``backbone`` is the default backbone of models created through the service;
    ``allowed_backbones`` the others a client may choose. With ``token``, every endpoint
    except the health check, the page and the API description needs
    ``Authorization: Bearer <token>``. ``workers`` predictions run at once (fits: one).
    ``allowed_hosts`` (host names without port) turns on the Host header check;
    ``allow_ip_hosts`` lets it pass any IP address typed as the host (no rebinding risk).
    ``device``, ``batch_size`` and ``precision`` say how every model runs (server settings,
    not options of a client).
    The backbone is loaded on first use: call ``app.state.store.backbone(backbone)`` to
    load it up front (the command line does, to fail early on a bad one).
    """
    limits = (limits or ServeLimits()).validate()
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if token is not None and not token.strip():
        raise ConfigError("the token must not be empty")
    Runtime(device=device, batch_size=batch_size, precision=precision).validate()
    store = ModelStore(models_dir, default_backbone=backbone, allowed_backbones=allowed_backbones, device=device,
                       batch_size=batch_size, precision=precision, max_cached=max_cached,
                       max_image_size=limits.max_image_size, limits=limits)
    fit_slots = FairSlots(1, limits.max_queued, "model creations")
    predict_slots = FairSlots(workers, limits.max_queued)
    pixels = PixelBudget(limits.max_server_pixels)

    app = FastAPI(
        title="lakead",
        version=__version__,
        summary="Training-free few-shot visual anomaly detection (LAKE) as a service.",
        description=(
            "Fit a detector on a few normal images, then score new images: a score, a decision and an anomaly "
            "map per image. Higher scores are more anomalous. With a token, send `Authorization: Bearer <token>`."
        ),
        docs_url=None,  # served by add_docs from local files, not from a CDN
        redoc_url=None,
    )
    app.state.store = store
    app.state.limits = limits
    app.state.pixels = pixels
    app.state.slots = predict_slots
    app.add_middleware(Guard, token=token, max_body_bytes=limits.max_request_bytes, allowed_hosts=allowed_hosts,
                       allow_ip_hosts=allow_ip_hosts)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    add_docs(app)
    _exception_handlers(app)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), headers={"cache-control": "no-cache"})

    @app.get("/healthz", tags=["service"])
    def healthz() -> Health:
        """Liveness check; never needs the token."""
        return Health(status="ok", version=__version__, auth_required=token is not None)

    @app.get("/info", tags=["service"], responses=_errors(401))
    def info() -> ServerInfo:
        """The limits, backbones and detector options (defaults, choices, help) of this server."""
        rt = store.runtime
        return ServerInfo(
            version=__version__, default_backbone=backbone, backbones=list(store.allowed_backbones), device=rt.device,
            batch_size=rt.batch_size, precision=rt.precision, limits=limits.to_dict(),
            fit_options={name: spec.default for name, spec in OPTION_SPECS.items()},
            option_choices={name: list(spec.choices) for name, spec in OPTION_SPECS.items() if spec.kind == "choice"},
            option_help={name: spec.help for name, spec in OPTION_SPECS.items()},
            methods=list(METHODS), method_options={name: spec.default for name, spec in METHOD_OPTION_SPECS.items()},
            options_by_method=options_by_method(),
        )

    @app.get("/models", tags=["models"], responses=_errors(401), response_model_exclude_unset=True)
    def list_models() -> ModelList:
        """Every stored model, newest first; stored models that cannot be read are named in
        ``damaged`` (the others are listed all the same)."""
        found, damaged = store.scan()
        models = []
        for m in found:
            try:
                models.append(ModelInfo(**m))
            except ValidationError as exc:
                damaged.append((m["id"], _field_problems(exc)))
        if not damaged:
            return ModelList(models=models)  # "damaged" left out
        return ModelList(models=models, damaged=[Problem(name=n, problem=p) for n, p in sorted(damaged)])

    @app.post("/models", status_code=201, tags=["models"], responses=_errors(400, 401, 413, 422, 503))
    @with_option_fields
    async def create_model(
        request: Request,
        response: Response,
        images: Annotated[list[UploadFile], File(min_length=1, description="Normal (defect-free) images: PNG, JPEG, BMP, TIFF, WebP.")],
        class_name: Annotated[str, Form(min_length=1, max_length=200, description="What the images show, e.g. 'screw'; fills the text prompts.")],
        backbone: Annotated[Optional[str], Form(description="One of GET /info 'backbones' (default: the server's).")] = None,
        method: Annotated[Optional[str], Form(description="How to score: " + ", ".join(METHODS) + " (default: lake).")] = None,
        *,
        options: dict[str, Any],
    ) -> ModelInfo:
        """Fit a model on normal images and store it. Slow: runs the network over every image.

        Every other form field is a detector option (GET /info lists them with their defaults);
        unknown form fields are refused (422), so a misspelled option never passes silently.
        """
        await _refuse_unknown_fields(request, {"images", "class_name", "backbone", "method", *FIT_OPTIONS, *METHOD_OPTIONS})
        m = get_method(method or "lake")
        cfg = m.configure(LakeConfig.from_options(**{k: v for k, v in options.items() if k in FIT_OPTIONS}),
                          {k: v for k, v in options.items() if k in METHOD_OPTIONS})  # a bad option is refused before any image is read
        check_options(cfg, limits)  # the options whose work grows with their value, within the server's bounds
        class_name = clean_class_name(class_name)
        if not class_name:
            raise ConfigError("class_name must be a non-empty string (it fills the text prompts)")
        spec = store.resolve_backbone(backbone)
        check_count(len(images), limits.max_fit_images, "normal images given", "lakead serve --max-images")
        names = [upload_name(f.filename, i) for i, f in enumerate(images)]

        def work(cancel: threading.Event) -> dict[str, Any]:
            bb = store.backbone(spec)
            refuse_over(fit_memory(m.name, cfg, bb, len(names), store.runtime.batch_size), limits, "fit")
            check = _patch_check(bb.info.patch_size)
            with Uploads([(n, f.file) for n, f in zip(names, images)], limits) as uploads:
                with pixels.hold(uploads.pixels, cancel.is_set):
                    rule = ReadRule(str(options.get("window") or "auto"), str(options.get("slices") or "axial"))
                    arrays = uploads.decode(check, cancel.is_set, rule)
                    return store.create(arrays, names, class_name, options, backbone=spec, cancel=cancel, method=m.name)

        result = await run_for_client(request, fit_slots, "fit", work, limits.max_seconds)
        response.headers["location"] = f"/models/{result['id']}"
        return _model(result)

    @app.get("/models/{model_id}", tags=["models"], responses=_errors(401, 404, 422))
    def get_model(model_id: ModelId) -> ModelInfo:
        """One stored model."""
        return _model(store.info(model_id))

    @app.delete("/models/{model_id}", status_code=204, tags=["models"], responses=_errors(401, 404, 422))
    def delete_model(model_id: ModelId) -> Response:
        """Remove a stored model (after the predictions running on it finish)."""
        store.delete(model_id)
        return Response(status_code=204)

    normals.register(app, store, limits, fit_slots, pixels, _refuse_unknown_fields, _patch_check,
                     _errors(400, 401, 404, 413, 422, 503))  # POST /models/{id}/normals: "mark as good"

    @app.post("/models/{model_id}/predict", tags=["models"], responses=_errors(400, 401, 404, 409, 413, 422, 503))
    async def predict(
        request: Request,
        model_id: ModelId,
        images: Annotated[list[UploadFile], File(min_length=1, description="Images to score.")],
        threshold: Annotated[Optional[float], Form(allow_inf_nan=False, description="Decision threshold for this call (default: the model's).")] = None,
        false_alarm_rate: Annotated[Optional[float], Form(gt=0, lt=1, description="False-alarm budget for this call: the decision levels are derived again from the model's normal scores (default: the model's budget).")] = None,
        overlay_png: Annotated[bool, Form(alias="overlay", description="Return each map as a PNG overlay (data URL).")] = True,
    ) -> PredictResponse:
        """Score images: per image the score, its parts, the decision and the map as an overlay.

        A file that is not a readable image is listed in ``failed`` with its problem and the
        others are scored (422 only when no file is readable; 413 when a limit is passed)."""
        await _refuse_unknown_fields(request, {"images", "threshold", "false_alarm_rate", "overlay"})
        if not store.exists(model_id):
            raise ModelNotFound(model_id)
        check_count(len(images), limits.max_predict_images, "images given", "lakead serve --max-predict-images")
        names = [upload_name(f.filename, i) for i, f in enumerate(images)]

        def work(cancel: threading.Event) -> PredictResponse:
            det = store.detector(model_id)
            check = _patch_check(det.patch_size if hasattr(det, "patch_size") else det.backbone.info.patch_size)
            with Uploads([(n, f.file) for n, f in zip(names, images)], limits) as uploads:
                refuse_over(predict_memory(det, len(names), uploads.pixels, store.runtime.batch_size), limits, "prediction")
                with pixels.hold(uploads.pixels, cancel.is_set):
                    readable, failed = uploads.decode_each(check, cancel.is_set, det.read_rule)
                    if not readable:
                        raise UploadRejected(422, summarize_problems("not readable as images", failed), failed)
                    index = [i for i, _ in readable]
                    arrays = [arr for _, arr in readable]
                    pred, (vmin, vmax) = store.predict(model_id, arrays, [names[i] for i in index], threshold,
                                                       cancel=cancel, false_alarm_rate=false_alarm_rate)
                    results = []
                    for j, (arr, name) in enumerate(zip(arrays, [names[i] for i in index])):
                        if cancel.is_set():
                            raise Cancelled("the client disconnected: its work was stopped")
                        png = None
                        if overlay_png:
                            png = "data:image/png;base64," + base64.b64encode(png_bytes(_overlay(arr, pred.maps[j], vmin, vmax))).decode("ascii")
                        width, height = uploads.original_size(index[j], arr)
                        results.append(ImageResult(
                            name=name, width=width, height=height, scored_width=int(arr.shape[1]),
                            scored_height=int(arr.shape[0]), score=float(pred.scores[j]), visual=float(pred.visual[j]),
                            semantic=float(pred.semantic[j]), anomalous=bool(pred.anomalous[j]),
                            out_of_scope=bool(pred.out_of_scope[j]),
                            regions=[Region(**r.to_dict()) for r in pred.regions(j)[1]],
                            threshold=_finite(pred.threshold), map_max=float(pred.maps[j].max()), overlay_png=png,
                        ))
            return PredictResponse(model=model_id, threshold=_finite(pred.threshold), map_range=[vmin, vmax], results=results,
                                   failed=[Problem(name=n, problem=p) for n, p in failed])

        return await run_for_client(request, predict_slots, model_id, work, limits.max_seconds)

    return app


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _model(info: dict[str, Any]) -> ModelInfo:
    try:
        return ModelInfo(**info)
    except ValidationError as exc:
        raise ModelFormatError(f"stored model {info.get('id')!r} is damaged ({_field_problems(exc)})") from None


def _field_problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def _patch_check(patch: int) -> Callable[[Any, str], Optional[str]]:
    """A problem for an image smaller than one patch (the detector's own rule), checked with
    the other files of the request so that every bad file is named at once."""
    def check(arr: Any, name: str) -> Optional[str]:
        h, w = arr.shape[:2]
        return f"image is {w}x{h} pixels, smaller than one {patch}x{patch} patch" if h < patch or w < patch else None
    return check


def _overlay(image: Any, amap: Any, vmin: float, vmax: float, rows: int = 256) -> Any:
    """:func:`lakead.viz.overlay` band by band (it is per pixel): its float intermediates
    stay the size of a band, not of the image."""
    import numpy as np

    return np.concatenate([overlay(image[r:r + rows], amap[r:r + rows], vmin, vmax) for r in range(0, image.shape[0], rows)])


async def _refuse_unknown_fields(request: Request, known: set[str]) -> None:
    form = await request.form()  # already parsed by FastAPI: this reads its cache
    unknown = sorted(set(form.keys()) - known)
    if unknown:
        raise RequestValidationError([
            {"type": "extra_forbidden", "loc": ("body", name), "msg": f"unknown field; known: {sorted(known)}", "input": None}
            for name in unknown
        ])


def _json_error(status: int, detail: str, problems: list[tuple[str, str]] | None = None, headers: dict | None = None) -> JSONResponse:
    body = ErrorBody(detail=detail, errors=[Problem(name=n, problem=p) for n, p in (problems or [])])
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json_error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        by_field: dict[str, list[str]] = {}
        for e in exc.errors():
            loc = [p for p in e.get("loc", ()) if p not in ("body", "query", "path", "header")]
            name = str(loc[0]) if loc else "request"  # the form field (deeper parts name union branches)
            msg = str(e.get("msg", "invalid"))
            if msg not in by_field.setdefault(name, []):
                by_field[name].append(msg)
        problems = [(name, " or ".join(msgs)) for name, msgs in by_field.items()]
        detail = "invalid request: " + "; ".join(f"{n}: {p}" for n, p in problems)
        return _json_error(422, detail, problems)

    @app.exception_handler(UploadRejected)
    async def rejected(request: Request, exc: UploadRejected) -> JSONResponse:
        return _json_error(exc.status, str(exc), exc.problems)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        return _json_error(503, str(exc), headers={"retry-after": "5"})

    @app.exception_handler(TimedOut)
    async def timed_out(request: Request, exc: TimedOut) -> JSONResponse:
        return _json_error(503, str(exc))

    @app.exception_handler(OverLimit)
    async def over_limit(request: Request, exc: OverLimit) -> JSONResponse:
        return _json_error(409, str(exc))

    @app.exception_handler(Cancelled)
    async def cancelled(request: Request, exc: Cancelled) -> JSONResponse:
        return _json_error(499, str(exc) or "the client disconnected")  # nobody reads it

    @app.exception_handler(StorageError)
    async def not_stored(request: Request, exc: StorageError) -> JSONResponse:
        return _json_error(500, str(exc))

    @app.exception_handler(BackboneNotAllowed)
    async def not_offered(request: Request, exc: BackboneNotAllowed) -> JSONResponse:
        return _json_error(409, str(exc))

    @app.exception_handler(ModelNotFound)
    async def not_found(request: Request, exc: ModelNotFound) -> JSONResponse:
        return _json_error(404, str(exc))

    @app.exception_handler(BackboneUnavailableError)
    async def no_backbone(request: Request, exc: BackboneUnavailableError) -> JSONResponse:
        return _json_error(503, str(exc))

    @app.exception_handler(ModelFormatError)
    async def damaged(request: Request, exc: ModelFormatError) -> JSONResponse:
        return _json_error(500, f"stored model cannot be used: {exc}")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette still raises the exception afterwards, so the server logs its traceback.
        return _json_error(500, f"internal error: {type(exc).__name__}: {exc} (the traceback is in the server log)")

    @app.exception_handler(LakeadError)
    async def bad_input(request: Request, exc: LakeadError) -> JSONResponse:
        return _json_error(422, str(exc))  # ConfigError and the other errors a client's input causes
