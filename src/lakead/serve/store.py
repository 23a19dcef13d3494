"""Models on disk for the service: create (fit + save), list, read, predict, delete.

Thread-safe and framework-free: the web layer calls these methods from worker threads.

- A model is a directory ``<models_dir>/<id>/`` written by the detector's ``save``, which
  builds it under a hidden temporary name and renames it into place: a model is listed only
  once complete, and a fit that fails (or a process killed mid-write) leaves no model behind.
  Any directory holding a saved model whose name is a valid id is served (a model written by
  ``lakead fit --out <models_dir>/screw`` appears as ``screw``).
- Each model has a readers-writer lock: predictions share it, deletion takes it alone, so a
  model is never removed under a running prediction. A deleted model is first renamed to a
  hidden name (it vanishes at once, whole), then removed.
- Loaded detectors are cached (least recently used first out), so a model is read from disk
  once; a model directory replaced on disk (``lakead fit --out`` over it) is seen by its
  fingerprint (inode, size and modification time of its two files) and read again, the new
  detector swapped in whole. Backbones are loaded once per source, always with their text
  tower (a later fit needs it), and shared by every model that uses them; a stored model
  loads only with a backbone this server offers.
- Fits run one at a time: they share the backbone's tokenizer, which is not safe to call from
  two threads at once, and each one keeps the processor busy anyway.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..api import CONFIG_FILE, COMMON_FACTS, TENSORS_FILE, Detector, Prediction, Runtime, describe_model, read_model_meta
from ..backbones import Backbone, BackboneInfo, load_backbone
from ..errors import ConfigError, LakeadError, ModelFormatError
from ..methods.lake import LakeConfig
from ..methods import get_method, load_detector
from ..options import method_option_specs
from ..runtime import EXPORT_FILE, ExportedDetector, is_exported, read_export_meta
from .budget import check_options
from .uploads import Cancelled, ServeLimits, UploadRejected

log = logging.getLogger("lakead.serve")

#: Model ids: a letter or digit, then letters, digits, '.', '_' or '-' (no path separators).
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ID = re.compile(ID_PATTERN)

#: Hidden leftovers of an interrupted save or delete older than this are removed at start.
STALE_SECONDS = 3600.0

#: Detector options a client may set when creating a model: every field of the configuration
#: but the backbone (chosen among the server's). How a run is carried out (device, batch size,
#: precision) is the server's setting, not a client's option.
FIT_OPTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LakeConfig) if f.name != "backbone")

#: The method of the models created through the service unless the client names another.
METHOD = "lake"
#: Options of the other methods (PatchCore's coreset, AnomalyDINO's top_percent...), beside FIT_OPTIONS.
METHOD_OPTIONS: tuple[str, ...] = tuple(method_option_specs())


class ModelNotFound(LakeadError):
    """No model with this id is stored."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        super().__init__(f"no model with id {model_id!r}")


class RWLock:
    """Many readers or one writer; a waiting writer goes before new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class _Entry:
    rw: RWLock
    loading: threading.Lock


#: C0 and C1 control characters (ESC starts terminal escape sequences), and DEL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean_class_name(text: str) -> str:
    """``text`` without control characters (a class name is printed by ``lakead info`` and
    shown on the page), spaces trimmed."""
    return _CONTROL.sub("", text).strip()


def fingerprint(path: Path) -> tuple:
    """What changes when a model directory is rewritten or replaced: the directory's inode,
    and inode, size and modification time of its two files."""
    out: list = [path.stat().st_ino]
    for name in (CONFIG_FILE, TENSORS_FILE, EXPORT_FILE):
        try:
            st = (path / name).stat()
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def slug(text: str, limit: int = 32) -> str:
    """Lower-case letters, digits and single dashes from ``text`` (for readable ids)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].strip("-") or "model"


class ModelStore:
    """The models of one service, in one directory."""

    def __init__(
        self,
        root: str | Path,
        *,
        default_backbone: str,
        allowed_backbones: Sequence[str] = (),
        device: str = "auto",
        batch_size: int = Runtime.batch_size,
        precision: str = Runtime.precision,
        max_cached: int = 8,
        max_image_size: int | None = None,
        limits: "ServeLimits | None" = None,
    ) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"models directory {self.root}: cannot be created ({exc.strerror or exc})") from None
        if not self.root.is_dir():
            raise ConfigError(f"models directory {self.root}: is not a directory")
        if max_cached < 1:
            raise ConfigError(f"max_cached must be at least 1, got {max_cached}")
        self.default_backbone = default_backbone
        self.allowed_backbones = tuple(dict.fromkeys([default_backbone, *allowed_backbones]))
        self.runtime = Runtime(device=device, batch_size=batch_size, precision=precision).validate()
        self.device = device
        self.max_cached = max_cached
        self.max_image_size = max_image_size
        self.limits = limits  # bounds of the options a stored model may have (lakead.serve.budget.BOUNDS)
        self._lock = threading.Lock()  # guards the dicts below
        self._entries: dict[str, _Entry] = {}
        self._cache: OrderedDict[str, tuple[tuple, Detector]] = OrderedDict()  # id -> (fingerprint, detector)
        self._backbones: dict[str, Backbone] = {}
        self._backbone_lock = threading.Lock()
        self._fit_lock = threading.Lock()
        self._remove_stale()

    # -- housekeeping ---------------------------------------------------------------------

    def _remove_stale(self) -> None:
        """Remove hidden leftovers (``.<id>.*.tmp``, ``.<id>.old-*``, ``.<id>.deleted-*``) of a
        save or delete that a crash interrupted, once they are old enough not to be in use."""
        now = time.time()
        for p in self.root.iterdir():
            if p.name.startswith(".") and p.is_dir() and re.search(r"(\.tmp|\.old-[0-9a-f]+|\.deleted-[0-9a-f]+)$", p.name):
                try:
                    if now - p.stat().st_mtime > STALE_SECONDS:
                        shutil.rmtree(p, ignore_errors=True)
                        log.info("removed the leftover %s of an interrupted write", p)
                except OSError:
                    pass

    def _entry(self, model_id: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None:
                entry = self._entries[model_id] = _Entry(RWLock(), threading.Lock())
            return entry

    def _path(self, model_id: str) -> Path:
        if not _ID.match(model_id):
            raise ModelNotFound(model_id)
        return self.root / model_id

    def exists(self, model_id: str) -> bool:
        return bool(_ID.match(model_id)) and _is_model(self.root / model_id)

    # -- backbones ------------------------------------------------------------------------

    def backbone(self, spec: str) -> Backbone:
        """The backbone for ``spec``, loaded once, with its text tower (so it can fit)."""
        with self._backbone_lock:
            bb = self._backbones.get(spec)
            if bb is None or getattr(bb, "has_text", True) is False:
                bb = load_backbone(spec, need_text=True)
                self._backbones[spec] = bb
            return bb

    def _same(self, spec: str, saved: dict) -> bool:
        """Whether an offered backbone already loaded is the model ``saved`` describes."""
        with self._backbone_lock:
            bb = self._backbones.get(spec)
        try:
            return bb is not None and bb.info.same_model(BackboneInfo(**saved))
        except TypeError:
            return False

    def resolve_backbone(self, spec: str | None) -> str:
        """The backbone a creation asks for (None: the server's), if this server offers it."""
        spec = spec or self.default_backbone
        if spec not in self.allowed_backbones:
            raise ConfigError(f"backbone {spec!r} is not offered by this server; choose one of {list(self.allowed_backbones)}")
        return spec

    def _backbone_for(self, model_id: str, saved: BackboneInfo) -> Backbone:
        """The backbone of a stored model: one this server offers (``--backbone``,
        ``--allow-backbone``) that is the same model as ``saved``. A model on any other
        backbone is refused (:class:`BackboneNotAllowed`): the server never loads a
        backbone a client or a hand-placed directory names."""
        with self._backbone_lock:
            loaded = [bb for spec, bb in self._backbones.items() if spec in self.allowed_backbones]
        for bb in loaded:
            if bb.info.same_model(saved):
                return bb
        if saved.source in self.allowed_backbones:
            return self.backbone(saved.source)
        raise BackboneNotAllowed(f"stored model {model_id!r} needs the backbone {saved.source!r}, which this server does "
                                 f"not offer (lakead serve --backbone / --allow-backbone: {list(self.allowed_backbones)})")

    # -- reading --------------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        """Every stored model, newest first. Directories that are not valid models are skipped
        (with a warning in the log)."""
        return self.scan()[0]

    def scan(self) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """``(models, damaged)``: every stored model that can be read, newest first, and
        ``(id, problem)`` for each directory with a ``lakead.json`` that cannot."""
        out, damaged = [], []
        for p in self.root.iterdir():
            if p.name.startswith(".") or not p.is_dir() or not _ID.match(p.name):
                continue
            try:
                out.append(model_info(p.name, stored_meta(p)))
            except (ModelFormatError, KeyError, TypeError, ValueError, AttributeError) as exc:
                if p.exists():  # else deleted while listing
                    log.warning("not serving %s: %s", p, exc)
                    if _is_model(p):
                        damaged.append((p.name, _problem(exc)))
        out.sort(key=lambda m: (str(m["fitted_at"] or ""), m["id"]), reverse=True)
        return out, sorted(damaged)

    def info(self, model_id: str) -> dict[str, Any]:
        path = self._path(model_id)
        if not _is_model(path):
            raise ModelNotFound(model_id)
        try:
            return model_info(model_id, stored_meta(path))
        except ModelFormatError:
            if not _is_model(path):
                raise ModelNotFound(model_id) from None  # deleted meanwhile
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelFormatError(f"stored model {model_id!r} is damaged ({_problem(exc)})") from None

    def detector(self, model_id: str) -> Detector:
        """The loaded detector (from the cache, or read from disk once). Call under the
        model's read lock."""
        path = self._path(model_id)
        try:
            now = fingerprint(path)
        except FileNotFoundError:
            raise ModelNotFound(model_id) from None
        with self._lock:
            cached = self._cache.get(model_id)
            if cached is not None and cached[0] == now:
                self._cache.move_to_end(model_id)
                return cached[1]
        entry = self._entry(model_id)
        with entry.loading:  # one thread loads; the others wait and take it from the cache
            with self._lock:
                cached = self._cache.get(model_id)
            if cached is not None and cached[0] == now:
                return cached[1]
            if cached is not None:
                log.info("model %s changed on disk: reading it again", model_id)
            if is_exported(path):  # its graph holds the backbone: nothing to check against the offered ones
                if self.limits is not None:
                    exp = read_export_meta(path)
                    check_options(SimpleNamespace(sigma=exp["sigma"], image_size=exp["preprocessing"]["image_size"]),
                                  self.limits, model_id)
                det = ExportedDetector.load(path, batch_size=self.runtime.batch_size)
                self._remember(model_id, det, now)  # type: ignore[arg-type]
                return det  # type: ignore[return-value]
            meta = read_model_meta(path)  # ModelFormatError when missing or damaged
            try:
                saved = BackboneInfo(**meta["backbone"])
                size = meta["image_size"]
            except (KeyError, TypeError) as exc:
                raise ModelFormatError(f"stored model {model_id!r} is damaged ({exc})") from None
            if self.limits is not None and isinstance(meta.get("config"), dict):
                check_options(SimpleNamespace(**{k: v for k, v in meta["config"].items() if k != "image_size"}),
                              self.limits, model_id)  # image_size: below, with the backbone's checks
            if self.max_image_size is not None and isinstance(size, int) and size > self.max_image_size:
                raise BackboneNotAllowed(f"stored model {model_id!r} runs at image_size {size}, larger than this server "
                                         f"allows ({self.max_image_size}, lakead serve --max-image-size)")
            text = meta.get("text_backbone")
            if isinstance(text, dict) and not any(spec == text.get("source") or self._same(spec, text) for spec in self.allowed_backbones):
                raise BackboneNotAllowed(f"stored model {model_id!r} takes its text probe from {text.get('source')!r}, which this "
                                         f"server does not offer (lakead serve --allow-backbone: {list(self.allowed_backbones)})")
            rt = self.runtime
            det = load_detector(path, backbone=self._backbone_for(model_id, saved), device=rt.device,
                                batch_size=rt.batch_size, precision=rt.precision)
            self._remember(model_id, det, now)  # swapped in whole: a running call keeps the one it has
            return det

    def _remember(self, model_id: str, det: Detector, stamp: tuple | None = None) -> None:
        if stamp is None:
            stamp = fingerprint(self.root / model_id)
        with self._lock:
            self._cache[model_id] = (stamp, det)
            self._cache.move_to_end(model_id)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)

    # -- writing --------------------------------------------------------------------------

    def new_id(self, class_name: str) -> str:
        while True:
            model_id = f"{slug(class_name)}-{uuid.uuid4().hex[:8]}"
            if not (self.root / model_id).exists():
                return model_id

    def create(
        self,
        images: Sequence[np.ndarray],
        names: Sequence[str],
        class_name: str,
        options: dict[str, Any],
        backbone: str | None = None,
        cancel: threading.Event | None = None,
        method: str = METHOD,
    ) -> dict[str, Any]:
        """Fit a detector on normal images, save it under a new id, and return its info.

        ``method``: a name of :data:`lakead.methods.METHODS`. ``options`` are
        :class:`~lakead.methods.lake.LakeConfig` fields from :data:`FIT_OPTIONS` (those the method shares
        with LAKE are used) and the other methods' fields from :data:`METHOD_OPTIONS`;
        ``backbone`` must be one of :attr:`allowed_backbones` (default: the server's).
        Raises :class:`ConfigError` on a bad option, :class:`UploadRejected` (422) when an
        image is smaller than one patch of the backbone. Nothing is written on failure.
        """
        unknown = sorted(set(options) - set(FIT_OPTIONS) - set(METHOD_OPTIONS))
        if unknown:
            raise ConfigError(f"unknown detector option(s) {unknown}; known: {list(FIT_OPTIONS) + list(METHOD_OPTIONS)}")
        m = get_method(method)
        method_options = {k: v for k, v in options.items() if k in METHOD_OPTIONS}
        options = {k: v for k, v in options.items() if k in FIT_OPTIONS}
        if isinstance(class_name, str):
            class_name = clean_class_name(class_name)
        if not isinstance(class_name, str) or not class_name:
            raise ConfigError("class_name must be a non-empty string (it fills the text prompts)")
        spec = self.resolve_backbone(backbone)
        if options.get("text_backbone") is not None:  # a model of the text probe: one this server offers, too
            options = {**options, "text_backbone": self.resolve_backbone(options["text_backbone"])}
        config = LakeConfig.from_options(backbone=spec, **options)  # validated: a bad option fails before any work
        config = m.configure(config, method_options)
        with self._fit_lock:
            bb = self.backbone(spec)
            det = m.build(config, bb, self.runtime)
            arrays = _check_patch(det, images, names)
            det.fit(arrays, class_name, names=list(names), support_rule=f"{len(arrays)} images uploaded to the service",
                    on_progress=_stop_when(cancel))
            model_id = self.new_id(class_name)
            with self._entry(model_id).rw.write():
                try:
                    det.save(self.root / model_id)  # atomic: complete or absent
                except LakeadError as exc:  # the server's disk, not the client's input: 500
                    raise StorageError(f"the model cannot be stored: {exc}") from exc
                self._remember(model_id, det)
        for problem in det.skipped_:
            log.warning("model %s: skipped %s", model_id, problem)
        return self.info(model_id)

    def delete(self, model_id: str) -> None:
        """Remove a stored model; waits for the predictions running on it to finish."""
        path = self._path(model_id)
        entry = self._entry(model_id)
        with entry.rw.write():
            if not _is_model(path):
                raise ModelNotFound(model_id)
            trash = self.root / f".{model_id}.deleted-{uuid.uuid4().hex[:8]}"
            path.rename(trash)  # the model disappears whole, at once
            with self._lock:
                self._cache.pop(model_id, None)
                self._entries.pop(model_id, None)
        shutil.rmtree(trash, ignore_errors=True)

    # -- predicting -----------------------------------------------------------------------

    def predict(
        self, model_id: str, images: Sequence[np.ndarray], names: Sequence[str], threshold: float | None = None,
        cancel: threading.Event | None = None, false_alarm_rate: float | None = None,
    ) -> tuple[Prediction, tuple[float, float]]:
        """Score images with a stored model. Returns the prediction and the model's map
        colour range ``(vmin, vmax)`` (see :mod:`lakead.viz`)."""
        path = self._path(model_id)
        with self._entry(model_id).rw.read():
            if not _is_model(path):
                raise ModelNotFound(model_id)
            det = self.detector(model_id)
            arrays = _check_patch(det, images, names)
            budget = {} if false_alarm_rate is None else {"false_alarm_rate": false_alarm_rate}
            pred = det.predict(arrays, names=list(names), threshold=threshold, on_progress=_stop_when(cancel), **budget)
            return pred, tuple(det.map_range_)  # type: ignore[return-value]


class StorageError(LakeadError):
    """The server cannot write a model (a full disk, a read-only folder): answered 500."""


class BackboneNotAllowed(LakeadError):
    """A stored model needs a backbone (or an input size) this server does not offer."""


def _problem(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ModelFormatError) else f"{type(exc).__name__}: {exc}"


def _stop_when(cancel: threading.Event | None):
    """An ``on_progress`` callback that stops the work (raises Cancelled) once ``cancel`` is set."""
    if cancel is None:
        return None

    def check(_n: int) -> None:
        if cancel.is_set():
            raise Cancelled("the client disconnected: its work was stopped")
    return check


def _is_model(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() or is_exported(path)


def stored_meta(path: Path) -> dict[str, Any]:
    """The ``lakead.json`` facts of a stored model; of an exported one (``lakead export``),
    those of the model it was exported from, as recorded in its ``lakead-export.json``."""
    if not is_exported(path):
        return read_model_meta(path)
    exp = read_export_meta(path)
    try:
        meta = dict(exp["source"]["meta"])
    except (KeyError, TypeError):
        raise ModelFormatError(f"{path / EXPORT_FILE}: damaged (no source.meta)") from None
    meta["exported"] = f"{exp['engine']} {exp['precision']}"
    ran = (exp.get("check") or {}).get("ran")
    if ran:  # what the engine ran when the export was checked (on the exporting machine)
        meta["exported"] += f"; ran at export's check: {ran}"
    return meta


def _check_patch(det: Detector, images: Sequence[np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
    """Every image through the detector's own reader (smaller than one patch is an error)."""
    loaded = det.read_images(images, names, strict=False)
    if loaded.errors:
        problems = [(exc.source, exc.problem) for exc in loaded.errors]
        raise UploadRejected(422, "; ".join(f"{n}: {p}" for n, p in problems), problems)
    return loaded.arrays


def model_info(model_id: str, meta: dict[str, Any]) -> dict[str, Any]:
    """What a client is told about a stored model, from its ``lakead.json``."""
    config = dict(meta["config"])
    warnings = []
    if meta["threshold"] is None:
        warnings.append("fitted on one image: no threshold could be derived, so every image is called normal "
                        "unless a threshold is given with the prediction")
    if meta.get("skipped"):
        warnings.append(f"{len(meta['skipped'])} support image(s) were skipped: {'; '.join(meta['skipped'][:3])}")
    if meta.get("exported"):
        warnings.append(f"an exported graph ({meta['exported']}), run without torch: it decides at the false-alarm "
                        "budget it was exported with, and creates no model")
    if meta.get("outliers"):
        warnings.append(f"{len(meta['outliers'])} support image(s) were dropped as outliers: {', '.join(meta['outliers'][:5])}")
    described = describe_model(meta)  # the facts every model has, then the method's own (no LAKE keys faked)
    return {
        "id": model_id,
        **described,
        "false_alarm_rate": meta.get("false_alarm_rate"),
        "threshold_rule": meta.get("threshold_rule", "sigmas"),
        "threshold_description": described["threshold_rule"],
        "support": list(meta["support"]),
        "outliers": list(meta.get("outliers") or []),
        "image_size": meta.get("image_size"),
        "map_range": list(meta["map_range"]),
        "config": config,
        "description": {k: v for k, v in described.items() if k not in COMMON_FACTS},
        "warnings": warnings,
    }
