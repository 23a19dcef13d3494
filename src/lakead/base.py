"""What every detector shares, so that a new method is its config, its state, fit and score.

:class:`BaseDetector` implements the parts of the :class:`~lakead.api.Detector` protocol that
do not depend on the method: options (validated by the method's config dataclass; a misspelled
one is an error), the run settings (:class:`~lakead.api.Runtime`), the backbone (loaded on
first use), the start of every fit (:meth:`~BaseDetector.start_fit`,
:meth:`~BaseDetector.read_support`), reading images, running the backbone in batches at the run's precision, the
learned state as ``det.<field>_`` attributes, the decision levels (:meth:`~BaseDetector.thresholds`:
from the leave-one-out scores a method names in :meth:`~BaseDetector.threshold_scores`), the
fingerprint, and saving and loading the model directory. :class:`LearnedState` is the base of a method's state: each field is declared
once as a :func:`tensor` or a :func:`fact`, and that list drives saving, loading and the
fingerprint.

A method subclasses both and sets ``method``, ``config_class`` and ``state_class``; it writes
``fit``, ``predict_arrays`` and ``summary`` (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .api import Prediction, Runtime, jsonable, read_model_meta, read_model_tensors, write_model_dir
from .backbones import DEFAULT_CLIP, Backbone, BackboneInfo, Features, Layer, load_backbone
from .decision import Thresholds, derive_thresholds, describe_rule
from .errors import ConfigError, ImageLoadError, ModelFormatError, NotFittedError
from .index import GalleryIndex
from .fields import SLICES_HELP, WINDOW_HELP, Options, _admits, field_types, literal_choices, option  # noqa: F401 - re-exported
from .images import ImageInput, LoadedImages, expand_inputs, load_image, read_all, source_name
from .medical import ReadRule, is_medical, read_source
from .state import DecisionRecord, LearnedState, SupportRecord, fact, tensor  # noqa: F401 - re-exported: a method's state is made of them
from .validate import check_backbone_meta, check_state_backbone

log = logging.getLogger("lakead")


def backbone_precision(precision: str, backbone: Backbone) -> contextlib.AbstractContextManager:
    """The context a backbone call runs in: nothing for ``"float32"``; for ``"bfloat16"``,
    ``torch.autocast`` (matrix products and attention in bfloat16, weights kept in float32,
    so a backbone shared by several detectors is never altered). Torch backbones only."""
    if precision == "float32":
        return contextlib.nullcontext()
    if not backbone.supports_autocast:
        raise ConfigError(f"precision {precision!r} needs a torch backbone; {backbone.info.kind} backbones run as exported")
    return torch.autocast(backbone.device.type, dtype=torch.bfloat16)


# -- the detector ------------------------------------------------------------------------------


def _learned(name: str) -> property:
    """The ``det.<name>_`` property: the learned state's field, or NotFittedError before a fit."""

    def get(self: "BaseDetector") -> Any:
        if self.state_ is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted: {name}_ exists after fit(...) or load(...)")
        return getattr(self.state_, name)

    def refuse(self: "BaseDetector", value: Any) -> None:
        raise AttributeError(f"{name}_ is learned state: set it on det.state_ ({name})")

    return property(get, refuse, doc=f"The learned ``{name}`` (see the method's state class).")


class BaseDetector(ABC):
    """The method-independent half of a detector (see the module docstring).

    ``backbone`` is a hub id, a local directory, ``"onnx:PATH"`` or a built
    :class:`~lakead.backbones.Backbone`; ``options`` are the fields of ``config_class`` (a
    misspelled one is an error), or pass ``config=``. ``device``, ``batch_size`` and
    ``precision`` say how to run (:class:`~lakead.api.Runtime`); they are not saved.
    """

    method: ClassVar[str]
    config_class: ClassVar[type]
    state_class: ClassVar[type[LearnedState]]
    #: Whether ``fit`` takes ``memory=`` (a bound on what it holds, a second pass beyond it) and
    #: runs its forwards on Ray (``lakead fit --fit-memory``, ``--ray``): LAKE's streaming fit.
    streaming_fit: ClassVar[bool] = False

    def __init__(
        self,
        backbone: str | Backbone = DEFAULT_CLIP,
        *,
        config: Any = None,
        device: str = "auto",
        batch_size: int = 8,
        precision: str = "float32",
        **options: Any,
    ) -> None:
        self._backbone_obj = backbone if isinstance(backbone, Backbone) else None
        source = backbone.info.source if isinstance(backbone, Backbone) else backbone
        if config is not None and options:
            raise ConfigError("give either config= or options, not both")
        if config is not None:
            self.config = self.config_class.from_dict({**config.to_dict(), "backbone": source}).validate()
        else:
            self.config = self.config_class.from_options(backbone=source, **options)
        self.runtime = Runtime(device=device, batch_size=batch_size, precision=precision).validate()
        self.state_: Any = None
        #: How the medical images read by fit were read (modalities, windows): saved as ``read``.
        self.read_record: dict[str, list[str]] = {"modalities": [], "windows": []}
        self._read_lock = threading.Lock()
        self._warned: set = set()
        self._index: Any = None

    @classmethod
    def from_config(cls, config: Any, backbone: Backbone | None = None, runtime: Runtime | None = None) -> "BaseDetector":
        """A detector from its config (and optionally a built backbone and a runtime)."""
        rt = runtime or Runtime()
        return cls(backbone if backbone is not None else config.backbone, config=config,
                   device=rt.device, batch_size=rt.batch_size, precision=rt.precision)

    # -- state ----------------------------------------------------------------------------

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give each subclass a read-only ``det.<field>_`` property for every field of its
        learned state (properties, not ``__getattr__``: an error raised inside another
        attribute, loading a backbone say, is never masked as a missing attribute)."""
        super().__init_subclass__(**kwargs)
        state_class = cls.__dict__.get("state_class")
        if state_class is None:
            return
        for name in state_class.names():
            if not hasattr(cls, f"{name}_"):
                setattr(cls, f"{name}_", _learned(name))

    @property
    def is_fitted(self) -> bool:
        return self.state_ is not None

    def check_fitted(self) -> Any:
        """The learned state; raises :class:`NotFittedError` unless the detector was fitted or loaded."""
        if self.state_ is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted: call fit(...) or {type(self).__name__}.load(...) first")
        return self.state_

    def fingerprint(self) -> str:
        """sha256 of what decides this model's outputs (see :meth:`LearnedState.fingerprint`)."""
        return self.check_fitted().fingerprint()

    @property
    def backbone(self) -> Backbone:
        """The backbone, loaded on first use."""
        if self._backbone_obj is None:
            self._backbone_obj = load_backbone(self.config.backbone, need_text=not self.is_fitted)
        return self._backbone_obj

    # -- fit ------------------------------------------------------------------------------

    @abstractmethod
    def fit(self, images: Sequence[ImageInput] | ImageInput, class_name: str, *, names: Sequence[str] | None = None,
            support_rule: str | None = None, on_progress: Callable[[int], None] | None = None) -> "BaseDetector":
        """Learn from normal images (``names``: how to call them; ``support_rule``: how they were
        chosen, saved with the model; ``on_progress``: called with the images done). Returns self."""

    def start_fit(self, class_name: str, *, purpose: str | None = None) -> tuple[Backbone, torch.device]:
        """What every ``fit`` does first: check ``class_name`` (``purpose``: what it is for, said
        in the error), load the backbone and move it to the run's device. Returns both."""
        if not isinstance(class_name, str) or not class_name.strip():
            raise ConfigError("class_name must be a non-empty string" + (f" ({purpose})" if purpose else ""))
        backbone = self.backbone
        device = self.runtime.torch_device()
        backbone.to(device)
        return backbone, device

    def read_support(self, images: Sequence[ImageInput] | ImageInput, names: Sequence[str] | None = None) -> LoadedImages:
        """Read the support images as ``fit`` does: each unreadable one is skipped with a warning
        (and kept in ``errors``); a :class:`ConfigError` when none can be read."""
        loaded = self.read_images(images, names, strict=False)
        for e in loaded.errors:
            log.warning("skipping support image %s", e)
        if not loaded.arrays:
            raise ConfigError(f"no readable support image among the {len(loaded.errors)} given" + (
                f" (first problem: {loaded.errors[0]})" if loaded.errors else ""))
        return loaded

    # -- images and features --------------------------------------------------------------

    def read_image(self, image: ImageInput, name: str | None = None) -> np.ndarray:
        """Read one input into a ``(H, W, 3)`` uint8 array, as ``fit`` and ``predict`` do.

        Raises :class:`~lakead.errors.ImageLoadError` when it cannot be read or is smaller
        than one patch of the backbone.
        """
        label = name or source_name(image)
        if isinstance(image, (str, os.PathLike)) and is_medical(image):
            read = read_source(image, self.read_rule, label)
            self._note_read(label, read.modality, read.window)
            arr = read.image
        else:
            arr = load_image(image, label)
            if isinstance(image, (str, os.PathLike)) and self.is_fitted and self.read_record.get("modalities"):
                self._warn_once(("raster",), "%s: a plain image given to a model fitted on medical images (%s, window %s): "
                                "its pixels are taken as they are", label, ", ".join(self.read_record["modalities"]),
                                ", ".join(self.read_record.get("windows", [])))
        patch = self.backbone.info.patch_size
        h, w = arr.shape[:2]
        if h < patch or w < patch:
            raise ImageLoadError(label, f"image is {w}x{h} pixels, smaller than one {patch}x{patch} patch")
        return arr

    def read_images(
        self, images: Sequence[ImageInput] | ImageInput, names: Sequence[str] | None = None, *, strict: bool = True
    ) -> LoadedImages:
        """Read inputs as ``fit`` (``strict=False``: unreadable ones are collected in
        ``errors``) and ``predict`` (``strict=True``: the first one raises) read them."""
        images, names = expand_inputs(images, names, self.read_rule)
        return read_all(images, names, self.read_image, strict=strict)

    @property
    def read_rule(self) -> ReadRule:
        """How DICOM and NIfTI inputs are read: the model's ``window`` and ``slices`` options."""
        return ReadRule(getattr(self.config, "window", "auto"), getattr(self.config, "slices", "axial"))

    def _note_read(self, label: str, modality: str, window: str) -> None:
        """Record (while fitting) or check (once fitted) how a medical image was read: another
        modality than the fit's is an error, another window a warning (once per window)."""
        rec = self.read_record
        key = window.split(" ")[0] if window.startswith("full") else window  # a full range differs per volume
        if not self.is_fitted:
            with self._read_lock:
                for name, value in (("modalities", modality), ("windows", key)):
                    if value and value not in rec[name]:
                        rec[name].append(value)
            return
        if modality and rec["modalities"] and modality not in rec["modalities"]:
            raise ImageLoadError(label, f"is a {modality} image, but the model was fitted on {', '.join(rec['modalities'])} "
                                        f"images: fit a model on {modality} images")
        if rec["windows"] and key not in rec["windows"]:
            self._warn_once(("window", key), "%s: read with window %s, but the model's images were read with %s: scores "
                            "compare only under one window (fix it with the window option at fit, e.g. --window 40,80)",
                            label, key, ", ".join(rec["windows"]))

    def _warn_once(self, key: tuple, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def iter_features(
        self, arrays: Sequence[np.ndarray], blocks: Sequence[Layer], joint_block: Layer | None, image_size: int
    ) -> Iterator[tuple[int, Features]]:
        """Yield ``(start, Features)`` for consecutive batches of ``(H, W, 3)`` uint8 images, run
        with this detector's batch size and precision; ``start`` is the batch's first index."""
        bs = self.runtime.batch_size
        for start in range(0, len(arrays), bs):
            pixels = self.backbone.preprocessing(arrays[start : start + bs], image_size)
            with backbone_precision(self.runtime.precision, self.backbone):
                feats = self.backbone.extract(pixels, blocks, joint_block)
            yield start, feats  # outside the autocast region: what follows stays float32

    # -- predict, save, load --------------------------------------------------------------

    def predict(
        self,
        images: Sequence[ImageInput],
        *,
        names: Sequence[str] | None = None,
        threshold: float | None = None,
        false_alarm_rate: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Prediction:
        """Score images. Raises :class:`~lakead.errors.ImageLoadError` on the first bad one.

        ``threshold`` overrides the fitted decision threshold for this call;
        ``false_alarm_rate`` derives the decision levels again for that budget (methods that
        keep their normal images' leave-one-out scores).
        """
        self.check_fitted()
        loaded = self.read_images(images, names, strict=True)
        return self.predict_arrays(loaded.arrays, threshold=threshold, false_alarm_rate=false_alarm_rate, on_progress=on_progress)

    # -- the nearest-neighbour index (methods with an ``index`` option) ------------------------

    def index_vectors(self, state: Any) -> torch.Tensor:
        """The normal vectors ``(M, D)`` predict searches (LAKE: its gallery; memory banks: the
        bank). Only methods with an ``index`` option search through :meth:`gallery_index`."""
        raise ConfigError(f"the {self.method} method keeps no gallery to index")

    def gallery_index(self) -> GalleryIndex:
        """The fitted vectors (:meth:`index_vectors`) ready to be searched as the ``index`` option
        says (:mod:`lakead.index`): built on first use, or read from the model (HNSW:
        ``state.gallery_index``), and kept until the state or the option changes."""
        state = self.check_fitted()
        vectors = self.index_vectors(state)
        key = (id(state), id(vectors), self.config.index)
        cached = self._index
        if cached is None or cached[0] != key:
            try:
                cached = (key, GalleryIndex(vectors, self.config.index, serialized=state.gallery_index))
            except (RuntimeError, ValueError) as exc:  # faiss on a damaged graph; a graph of another size
                if state.gallery_index is None:
                    raise
                raise ModelFormatError(f"the model's saved HNSW graph (tensor gallery_index) is damaged or of another "
                                       f"gallery ({' '.join(str(exc).split())[:200]}): fit again, or predict with "
                                       "--index exact") from None
            self._index = cached
        cached[1].ef_search = self.config.hnsw_ef_search
        return cached[1]

    def keep_index(self) -> None:
        """Put the HNSW graph into the state (``gallery_index``, saved with the model) when the
        ``index`` option asks for one and the state has none: at the end of a fit, and at
        :meth:`save` for an index chosen after the fit. The exact kinds are built when first needed."""
        state = self.check_fitted()
        if getattr(self.config, "index", None) == "hnsw" and state.gallery_index is None:
            state.gallery_index = self.gallery_index().serialize()

    # -- decision levels (methods whose state keeps its support images' leave-one-out scores) ------

    def threshold_scores(self, state: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The leave-one-out scores of the support images the decision levels come from: image
        scores ``(n,)``, visual scores ``(n,)``, token or map scores ``(T,)`` (or None) and
        scope scores ``(n,)`` (None: no scope check), NaN where not scored.

        The default, for a state with a :class:`~lakead.state.DecisionRecord`: its ``loo_scores``
        as both image and visual scores, its ``loo_tokens``, no scope check. A method whose
        state keeps no leave-one-out scores sets no false-alarm budget (a :class:`ConfigError`)."""
        if not isinstance(state, DecisionRecord):
            raise ConfigError(f"the {self.method} method keeps no leave-one-out scores of its normal images, so a "
                              "false-alarm budget cannot be set after the fit: give a threshold instead")
        return state.loo_scores, state.loo_scores, state.loo_tokens, None

    def derive_thresholds(self, state: Any, false_alarm_rate: float | None = None) -> Thresholds:
        """The decision levels from :meth:`threshold_scores` and the decision options
        (:func:`lakead.decision.derive_thresholds`; ``false_alarm_rate`` replaces the configured
        budget). A budget outside (0, 1) is a :class:`ConfigError`."""
        try:
            return derive_thresholds(*self.threshold_scores(state), self.config, false_alarm_rate)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def thresholds(self, false_alarm_rate: float | None = None) -> Thresholds:
        """The decision levels: the fitted ones, or derived again from the saved leave-one-out
        scores for another false-alarm budget (no refit)."""
        state = self.check_fitted()
        if false_alarm_rate is None and not isinstance(state, DecisionRecord):
            return Thresholds(float(getattr(state, "threshold", math.inf)), "fixed", None, None, None, None)
        if false_alarm_rate is None:
            return Thresholds(state.threshold, state.threshold_rule, state.false_alarm_rate, state.seed_threshold,
                              state.pixel_threshold, getattr(state, "scope_threshold", None))
        return self.derive_thresholds(state, false_alarm_rate)

    def fit_levels(self, state: Any) -> None:
        """Derive the decision levels from the state's leave-one-out scores and the decision
        options, and write them into its facts: the end of a fit (:meth:`store_thresholds`)."""
        self.store_thresholds(state, self.derive_thresholds(state))

    def decide(self, scores: Sequence[float] | np.ndarray, maps: Sequence[np.ndarray], *, threshold: float | None = None,
               false_alarm_rate: float | None = None, visual: np.ndarray | None = None,
               semantic: np.ndarray | None = None) -> Prediction:
        """The :class:`~lakead.api.Prediction` of image scores ``(B,)`` and maps (each at its
        image's own size), decided at this model's levels: the fitted ones, those of
        ``false_alarm_rate`` (:meth:`thresholds`), or ``threshold`` for the image level. The pixel
        and seed levels come with it, so ``predict --masks`` finds the defect regions."""
        levels = self.thresholds(false_alarm_rate)
        thr = levels.image if threshold is None else float(threshold)
        s = np.asarray(scores, dtype=np.float32)
        return Prediction(scores=s, visual=s if visual is None else np.asarray(visual, np.float32),
                          semantic=np.zeros_like(s) if semantic is None else np.asarray(semantic, np.float32),
                          anomalous=s > thr, maps=tuple(maps), threshold=thr,
                          pixel_threshold=levels.pixel, seed_threshold=levels.seed)

    @staticmethod
    def store_thresholds(state: Any, levels: Thresholds) -> None:
        """Write the levels into the state's facts (``threshold``, ``threshold_rule``, ...)."""
        state.threshold, state.threshold_rule, state.false_alarm_rate = levels.image, levels.rule, levels.budget
        state.seed_threshold, state.pixel_threshold = levels.seed, levels.pixel
        if hasattr(state, "scope_threshold"):
            state.scope_threshold = levels.scope

    def describe_thresholds(self, state: Any) -> str:
        """How the fitted threshold was derived, in words (``summary()["threshold_rule"]``)."""
        n = int(np.isfinite(state.loo_scores).sum())
        if state.threshold_rule == "fixed":
            return "fixed by the user"
        if not n:
            return "none (one support image)"
        scope_on = getattr(state, "scope_threshold", None) is not None
        return describe_rule(state.threshold_rule, state.false_alarm_rate or 0.0, n, self.config.threshold_sigmas, scope_on)

    @abstractmethod
    def predict_arrays(
        self, arrays: Sequence[np.ndarray], *, threshold: float | None = None, false_alarm_rate: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Prediction:
        """:meth:`predict` for images already read (``(H, W, 3)`` uint8 arrays). ``threshold``
        replaces the image decision level for this call; ``false_alarm_rate`` derives the levels
        again for that budget (:meth:`thresholds`)."""

    def save(self, path: str | Path) -> Path:
        """Write the fitted model to a directory: ``lakead.json`` (method, options, backbone,
        learned facts, format version) and ``tensors.safetensors``. Atomic: the directory
        appears complete or not at all; an existing ``path`` is replaced only when it holds a lakead
        model and nothing else (:mod:`lakead.outputs`). Returns the directory. An HNSW index chosen after the fit
        (``config.index = "hnsw"``) is built here if no search built it, and saved with the model."""
        self.keep_index()
        return write_model_dir(path, self.model_meta(), self.check_fitted().tensors())

    def model_meta(self) -> dict[str, Any]:
        """What :meth:`save` writes to ``lakead.json`` (less the format name and version)."""
        state = self.check_fitted()
        return {
            "method": self.method,
            "config": self.config.to_dict(),
            "backbone": self.backbone.info.to_dict(),
            **state.facts(),
            **self.extra_facts(),
            **({"read": self.read_record} if any(self.read_record.values()) else {}),
            "summary": jsonable(self.summary()),  # what the method says of itself: lakead info, the service
        }

    def extra_facts(self) -> dict[str, Any]:
        """Facts of the method's own written beside the state (what its load needs besides the
        state; the description for ``lakead info`` is its :meth:`summary`, saved as ``summary``)."""
        return {}

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """The facts of a fitted model worth printing or reporting, in the method's own words
        (saved with the model: ``lakead info`` and the service show them)."""

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        backbone: str | Backbone | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        precision: str | None = None,
    ) -> "BaseDetector":
        """Load a model written by :meth:`save`.

        ``backbone`` replaces where the weights are read from (for a model moved to another
        machine); it must be the same model (checked by architecture and a fingerprint of
        the weights). ``device``, ``batch_size`` and ``precision`` say how to run it.
        """
        meta = read_model_meta(path)
        if meta["method"] != cls.method:
            raise ModelFormatError(f"{path}: is a {meta['method']!r} model, not a {cls.method!r} one: "
                                   "load it with lakead.methods.load_detector")
        try:
            config = cls.config_class.from_dict(meta["config"]).validate()
            saved_info = BackboneInfo(**check_backbone_meta(meta.get("backbone"), f"{path}: lakead.json"))
        except (TypeError, KeyError, ModelFormatError, ConfigError) as exc:
            raise ModelFormatError(f"{path}: lakead.json is damaged ({exc})") from None
        runtime = Runtime().replace(device=device, batch_size=batch_size, precision=precision)
        bb = load_backbone(saved_info.source if backbone is None else backbone, need_text=False)
        if not bb.info.same_model(saved_info):
            raise ModelFormatError(
                f"{path}: the model was fitted with backbone {saved_info.source!r} ({saved_info.kind}, "
                f"{saved_info.num_layers} blocks, patch {saved_info.patch_size}, weights {saved_info.fingerprint[:12]}), "
                f"but the backbone given is {bb.info.source!r} ({bb.info.kind}, {bb.info.num_layers} blocks, "
                f"patch {bb.info.patch_size}, weights {bb.info.fingerprint[:12]}): use the same model"
            )
        state = cls.state_class.from_files(meta, read_model_tensors(path), str(path))
        check_state_backbone(state, bb, config, str(path))  # its blocks, input size and text width fit the backbone
        det = cls.from_config(config, backbone=bb, runtime=runtime)
        dev = runtime.torch_device()
        bb.to(dev)
        state.to(dev)
        det.state_ = state
        read = meta.get("read")
        if isinstance(read, dict):
            det.read_record = {k: [str(v) for v in read.get(k, [])] for k in ("modalities", "windows")}
        return det
