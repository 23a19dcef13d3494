"""What every detector offers, and all that batch, distributed, serve, evaluate and explain use.

- :class:`Detector`: the protocol of a fitted anomaly detector (LAKE today; every method of
  :mod:`lakead.methods`). Configured in ``__init__``; ``fit(images, class_name) -> self``;
  ``predict(images) -> Prediction``; ``save(dir)`` / ``load(dir)``; ``summary()``;
  ``fingerprint()``. Higher score = more anomalous, everywhere.
- :class:`Prediction`: the one frozen result of ``predict`` on every input path.
- :class:`Runtime`: how a run is carried out (device, batch size, precision). These are
  arguments of the run, never saved with a model: a model fitted on a GPU loads on a CPU.
- The model directory: ``lakead.json`` (format name and version, the method, its options,
  the backbone's identity, the learned facts) beside ``tensors.safetensors``, written
  atomically (:func:`write_model_dir`) and checked when read (:func:`read_model_meta`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from ._version import __version__
from .errors import ConfigError, LakeadError, ModelFormatError
from .fileio import recover_directory
from .outputs import MODEL, OutputRefused, output_directory
from .validate import load_json

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .images import ImageInput, LoadedImages

FORMAT_NAME = "lakead-model"
#: 2: options and learned state per method (``method``); device, batch size and precision are
#: no longer saved. Format 1 (lakead 0.1.0 before the change) is read and converted.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "lakead.json"
TENSORS_FILE = "tensors.safetensors"

Precision = Literal["float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16")
#: Keys of a format-1 configuration that were settings of the run, not of the model.
RUNTIME_KEYS = ("device", "batch_size", "precision")


@dataclass(frozen=True)
class Prediction:
    """The result of ``predict``, the same type on every input path.

    Every array has one entry per input image, in input order. Higher = more anomalous.
    """

    scores: np.ndarray  # (B,) float32: the image score (LAKE: visual + lam * semantic)
    visual: np.ndarray  # (B,) float32: the visual part (LAKE: max over tokens of the distance to the gallery)
    semantic: np.ndarray  # (B,) float32: the text part (LAKE: pooled P(anomalous) of the text probe); 0 when off
    anomalous: np.ndarray  # (B,) bool: scores > threshold, or out of scope
    maps: tuple[np.ndarray, ...]  # B float32 maps, each at its image's own (H, W)
    threshold: float  # the decision threshold used
    out_of_scope: np.ndarray | None = None  # (B,) bool: not the product fitted on (counted as anomalous); all False when not checked
    scope: np.ndarray | None = None  # (B,) float32: the scope distance (0 when not checked)
    pixel_threshold: float | None = None  # map level of defect regions (lakead.decision.decision_regions); None: no regions
    seed_threshold: float | None = None  # map level a region must reach somewhere

    def __post_init__(self) -> None:
        import numpy as np  # here, not at the top: the command line reads Runtime without numpy

        n = self.scores.shape[0]
        if self.out_of_scope is None:
            object.__setattr__(self, "out_of_scope", np.zeros(n, dtype=bool))
        if self.scope is None:
            object.__setattr__(self, "scope", np.zeros(n, dtype=np.float32))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def regions(self, i: int) -> "tuple[np.ndarray, list]":
        """Image ``i``'s defect mask ``(H, W)`` bool and its regions (:func:`lakead.decision.decision_regions`):
        none when the image is called normal (so regions on normal images stay within the
        false-alarm budget) or the model has no pixel level; when it is called anomalous, the
        connected areas of its map above ``pixel_threshold`` that reach ``seed_threshold``, and at
        least the area around the map's peak, whatever flagged the image (its score, the text
        probe, the scope check)."""
        import numpy as np

        from .decision import decision_regions

        amap = self.maps[i]
        if self.pixel_threshold is None or not bool(self.anomalous[i]):
            return np.zeros(amap.shape, dtype=bool), []
        return decision_regions(amap, self.pixel_threshold, self.seed_threshold)


@dataclass(frozen=True)
class Runtime:
    """How a run is carried out; not part of a model.

    >>> Runtime(batch_size=4).validate().batch_size
    4
    """

    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    batch_size: int = 8  # images per forward pass
    precision: str = "float32"  # backbone arithmetic: "float32" (the reference) or "bfloat16" (torch.autocast)

    def validate(self) -> "Runtime":
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.torch_device()
        return self

    def replace(self, *, device: str | None = None, batch_size: int | None = None, precision: str | None = None) -> "Runtime":
        """A copy with the given settings replaced (None keeps the current one), validated."""
        return Runtime(
            device=self.device if device is None else device,
            batch_size=self.batch_size if batch_size is None else batch_size,
            precision=self.precision if precision is None else precision,
        ).validate()

    def torch_device(self) -> "torch.device":
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"unknown device {self.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for, but CUDA is not available on this machine")
        return dev


@runtime_checkable
class Detector(Protocol):
    """A few-shot anomaly detector: what the rest of lakead relies on.

    Learned state ends in ``_`` and exists after :meth:`fit` or :meth:`load`.
    """

    method: str  # its name in lakead.methods
    runtime: Runtime
    threshold_: float
    map_range_: tuple[float, float]  # the fixed colour scale of its maps
    class_name_: str
    support_: list[str]
    skipped_: list[str]
    fitted_at_: str

    @property
    def is_fitted(self) -> bool: ...

    def check_fitted(self) -> None: ...

    def read_image(self, image: "ImageInput", name: str | None = None) -> np.ndarray: ...

    def read_images(
        self, images: "Sequence[ImageInput] | ImageInput", names: Sequence[str] | None = None, *, strict: bool = True
    ) -> "LoadedImages": ...

    def fit(
        self,
        images: "Sequence[ImageInput]",
        class_name: str,
        *,
        names: Sequence[str] | None = None,
        support_rule: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> "Detector": ...

    def predict(
        self,
        images: "Sequence[ImageInput]",
        *,
        names: Sequence[str] | None = None,
        threshold: float | None = None,
        false_alarm_rate: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Prediction: ...

    def predict_arrays(
        self,
        arrays: Sequence[np.ndarray],
        *,
        threshold: float | None = None,
        false_alarm_rate: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Prediction: ...

    def thresholds(self, false_alarm_rate: float | None = None) -> Any:
        """The decision levels (:class:`lakead.decision.Thresholds`): the fitted ones, or for a budget."""
        ...

    def save(self, path: str | Path) -> Path: ...

    def summary(self) -> dict[str, Any]: ...

    def fingerprint(self) -> str: ...


# -- the model directory ------------------------------------------------------------------------


def tensor_fingerprint(tensors: Mapping[str, Any], facts: Mapping[str, Any]) -> str:
    """sha256 of what decides a fitted model's outputs: every learned tensor (by name) and
    the learned facts given. The same whether the tensors come from a detector in memory or
    from its ``tensors.safetensors`` (``lakead predict --resume`` compares it)."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        arr = t.detach().cpu().contiguous().numpy() if hasattr(t, "detach") else np.ascontiguousarray(t)
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(arr.tobytes())
    h.update(json.dumps(dict(facts), sort_keys=True, default=str).encode())
    return h.hexdigest()


def finite_or_none(value: float) -> float | None:
    """JSON has no infinity: an infinite threshold is saved as null."""
    return value if math.isfinite(value) else None


def write_model_dir(path: str | Path, meta: dict[str, Any], tensors: dict[str, Any]) -> Path:
    """Write ``lakead.json`` (``meta`` with the format name and version added) and
    ``tensors.safetensors`` atomically: the directory appears complete or not at all. An
    existing ``path`` is replaced only when it holds a lakead model and nothing else
    (:mod:`lakead.outputs`)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "lakead_version": __version__, **meta}
    try:
        with output_directory(path, MODEL) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_FILE),
                      metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
    except OutputRefused:  # a folder lakead must not replace: its own one-line refusal, as every command gives
        raise
    except (OSError, SafetensorError) as exc:  # a full disk, a read-only folder: the old model, if any, is kept
        problem = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:300]
        raise LakeadError(f"{path}: the model cannot be written ({problem}); nothing was replaced") from None
    return Path(path)


def read_model_tensors(path: str | Path) -> dict[str, "torch.Tensor"]:
    """The tensors of a saved model; a clear error when the file is missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = Path(path) / TENSORS_FILE
    try:
        return load_file(str(f))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelFormatError(f"{f}: cannot be read ({exc})") from None


def read_model_meta(path: str | Path) -> dict[str, Any]:
    """Read and check ``lakead.json`` of a saved model (format name and version).

    A format-1 file is converted as it is read: its run settings (device, batch size,
    precision) are dropped from the options, and its method is ``"lake"``.
    """
    p = Path(path)
    if not p.exists() and not recover_directory(p):  # a replacement killed half-way is undone
        raise ModelFormatError(f"{p}: no such model directory")
    if not p.is_dir():
        raise ModelFormatError(f"{p}: is a file; a saved model is a directory")
    cfg_file = p / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelFormatError(f"{p}: not a lakead model directory (no {CONFIG_FILE})")
    try:
        meta = load_json(cfg_file)  # strict: finite numbers, bounded depth (lakead.validate)
    except FileNotFoundError:
        raise ModelFormatError(f"{p}: not a lakead model directory (no {CONFIG_FILE})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{cfg_file}: not a lakead model file")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelFormatError(
            f"{p}: written in model format version {version!r} (by lakead {meta.get('lakead_version', '?')}); "
            f"this lakead ({__version__}) reads format versions {', '.join(map(str, READABLE_VERSIONS))}: fit the model again"
        )
    if not isinstance(meta.get("config"), dict):
        raise ModelFormatError(f"{cfg_file}: has no 'config' object")
    if version == 1:
        meta["config"] = {k: v for k, v in meta["config"].items() if k not in RUNTIME_KEYS}
        meta["method"] = "lake"
        meta["format_version"] = FORMAT_VERSION
    if not isinstance(meta.get("method"), str):
        raise ModelFormatError(f"{cfg_file}: has no 'method'")
    return meta


#: The facts every saved model has, whatever its method: what ``lakead info`` and the service's
#: model list show first; the rest is what the method itself describes (its ``summary()``).
COMMON_FACTS = ("method", "class_name", "backbone", "support_images", "support_rule", "threshold",
                "false_alarm_budget", "threshold_rule", "fitted_at", "lakead_version")


def jsonable(value: Any) -> Any:
    """``value`` as JSON values: tuples as lists, infinite or NaN floats as null, numpy scalars
    as Python numbers, anything else unknown as its text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)  # numpy and torch scalars
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def describe_model(meta: dict[str, Any]) -> dict[str, Any]:
    """What ``lakead info`` and the service show of a saved model's ``lakead.json`` (read by
    :func:`read_model_meta`): the facts every model has (:data:`COMMON_FACTS`), then the
    method's own description (``summary``, saved with the model by
    :meth:`lakead.base.BaseDetector.save`). No method is described with another's keys. A
    KeyError or TypeError when a fact every model has is missing."""
    own = meta.get("summary")
    if not isinstance(own, dict):
        own = _older_summary(meta)
    common = {
        "method": meta["method"],
        "class_name": meta["class_name"],
        "backbone": meta["backbone"]["source"],
        "support_images": len(meta["support"]),
        "support_rule": meta.get("support_rule"),
        "threshold": meta["threshold"],
        "false_alarm_budget": meta.get("false_alarm_rate"),
        "threshold_rule": own.get("threshold_rule", meta.get("threshold_rule", "sigmas")),
        "fitted_at": meta.get("fitted_at"),
        "lakead_version": meta.get("lakead_version"),
    }
    return {**common, **{k: v for k, v in own.items() if k not in common}}


def _older_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The description of a model saved before models kept their method's summary: LAKE's
    facts for a LAKE model, the block and input size for the others."""
    out: dict[str, Any] = {"layer": meta.get("layer"), "image_size": meta.get("image_size")}
    if meta["method"] != "lake":  # the older memory-bank and WinCLIP files wrote LAKE's keys as stand-ins: not shown
        return out
    config = meta["config"]
    selection = config.get("selection")
    return {
        **out,
        "semantic_layer": meta.get("semantic_layer"),
        "k": meta.get("k", config.get("k")),
        "k_rule": "all channels" if selection == "all" else "auto (knee)" if config.get("k") == "auto" else (
            "default (100 per 1024 channels, at least 100)" if config.get("k") is None else "fixed"),
        "selection": selection,
        "outliers_dropped": len(meta.get("outliers") or []),
        **{k: meta[k] for k in ("gallery_rule", "loo_rule") if k in meta},
        "text_probe": meta.get("prompts") is not None,
        "scope_check": meta.get("scope_threshold") is not None,
    }
