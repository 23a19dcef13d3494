"""The registry of methods: name -> how its detector is built, and which score it reports.

A method is a :class:`~lakead.api.Detector` class (usually a :class:`lakead.base.BaseDetector`
with its config and state classes), plus the options it fixes (the baselines of ``lakead
baselines`` are LAKE with some options fixed). A new method is one module with its detector
and one line in :data:`METHODS` (and one in :data:`DETECTORS` when it saves models under a new
name): see docs/ARCHITECTURE.md.

>>> sorted(METHODS)
['all', 'anomalydino', 'bottom', 'lake', 'patchcore', 'random', 'subspace', 'text', 'visual', 'winclip', 'winclip+', 'winclip+lake']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from ..api import Detector, Runtime, read_model_meta
from ..errors import ConfigError, ModelFormatError

if TYPE_CHECKING:
    from ..backbones import Backbone

#: LAKE's detector, named rather than imported: the registry (and ``lakead --help``, which
#: lists the methods) does not import torch until a detector is built or loaded.
LakeDetector = "lakead.methods.lake.detector:LakeDetector"
#: Config classes of detectors named by string, in modules without torch.
WinCLIPDetector = "lakead.methods.winclip.detector:WinCLIPDetector"
CONFIGS = {LakeDetector: "lakead.methods.lake.config:LakeConfig", WinCLIPDetector: "lakead.methods.winclip.config:WinCLIPConfig"}
PatchCoreDetector = "lakead.methods.patchcore:PatchCoreDetector"
AnomalyDinoDetector = "lakead.methods.anomalydino:AnomalyDinoDetector"
SubspaceDetector = "lakead.methods.subspace:SubspaceDetector"

#: Which number of a :class:`~lakead.api.Prediction` a method reports as its image score.
SCORE_FIELDS = ("scores", "visual", "semantic")


@dataclass(frozen=True)
class Method:
    """A way of scoring: a detector class, the options it fixes, and which number of the
    prediction is the image score."""

    name: str
    detector: Any  # the detector class, or "module:Class" imported on first use
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    score: str = "scores"  # one of SCORE_FIELDS
    needs_text: bool = False
    #: The config class as "module:Class" of a module without torch, so that the command line
    #: builds this method's options without importing it (None: the detector's own).
    config: Any = None
    backbone_kinds: tuple[str, ...] | None = None  # the backbone families it runs on (None: any)
    zero_shot: bool = False  # fits on a class name alone, without any image

    @property
    def detector_class(self) -> type:
        """The detector class (imported here when it was given by name)."""
        return detector_class(self.detector)

    @property
    def config_class(self) -> type:
        """The dataclass of the method's options (its fields make the command-line options)."""
        config = self.config if self.config is not None else CONFIGS.get(self.detector) if isinstance(self.detector, str) else None
        return detector_class(config) if config is not None else self.detector_class.config_class

    def configure(self, config: Any, options: dict[str, Any] | None = None) -> Any:
        """``config`` with this method's fixed options applied, validated.

        A configuration of another method (the command line's and the service's are LAKE's)
        gives the fields this method shares with it (backbone, layer, image size, seed, the
        decision options); ``options`` are values of this method's own fields (None or absent:
        the field's default; fields the method does not have are ignored)."""
        own = {f.name for f in dataclasses.fields(self.config_class)}
        given = {k: v for k, v in (options or {}).items() if k in own and v is not None}
        if isinstance(config, self.config_class):
            return dataclasses.replace(config, **given, **self.overrides).validate()
        shared = {k: v for k, v in config.to_dict().items() if k in own}
        return self.config_class(**{**shared, **given, **self.overrides}).validate()

    def unused(self, config: Any, options: dict[str, Any] | None = None) -> list[str]:
        """The options given that this method does not read: fields of ``config`` (another
        method's) changed from their default that this method lacks, and ``options`` it lacks."""
        own = {f.name for f in dataclasses.fields(self.config_class)}
        if isinstance(config, self.config_class):
            changed: list[str] = []
        else:
            default = type(config)()
            changed = [f.name for f in dataclasses.fields(config) if f.name not in own and f.name != "backbone"
                       and getattr(config, f.name) != getattr(default, f.name)]
        return changed + [k for k, v in (options or {}).items() if v is not None and k not in own]

    def build(self, config: Any, backbone: Backbone | None = None, runtime: Runtime | None = None,
              options: dict[str, Any] | None = None) -> Detector:
        """An unfitted detector of this method (``options``: see :meth:`configure`)."""
        return self.detector_class.from_config(self.configure(config, options), backbone=backbone, runtime=runtime)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lake", LakeDetector, "LAKE as configured: top-k sensitive neurons + text probe, fused (Eq. 14)"),
        Method("visual", LakeDetector, "visual branch only: the configured neurons (top-k by default), nearest neighbour",
               {"use_text": False}, "visual"),
        Method("all", LakeDetector, "full-width nearest neighbour: every channel (PatchCore-like, no coreset)",
               {"selection": "all", "use_text": False}, "visual"),
        Method("random", LakeDetector, "k random channels, nearest neighbour", {"selection": "random", "use_text": False}, "visual"),
        Method("bottom", LakeDetector, "k lowest-variance channels, nearest neighbour", {"selection": "bottom", "use_text": False}, "visual"),
        Method("text", LakeDetector, "text probe only (zero-shot): per-token P(anomalous) of the two prompts; the shots are not used",
               {"map_source": "semantic", "use_text": True}, "semantic", needs_text=True),
        Method("winclip", WinCLIPDetector, "WinCLIP (zero-shot): prompt ensemble, windows, harmonic aggregation; "
               "normal images only calibrate the threshold", {"reference": "none"}, needs_text=True, backbone_kinds=("clip",),
               zero_shot=True),
        Method("winclip+", WinCLIPDetector, "WinCLIP+ (few-shot): WinCLIP fused with the reference association of "
               "windows and patches", {"reference": "winclip"}, needs_text=True, backbone_kinds=("clip",)),
        Method("winclip+lake", WinCLIPDetector, "WinCLIP+LAKE: WinCLIP's text maps fused with LAKE's sensitive-neuron "
               "distances (docs/METHODS.md)", {"reference": "lake"}, needs_text=True, backbone_kinds=("clip",)),
        Method("patchcore", PatchCoreDetector, "PatchCore (Roth et al. 2022): locally aware features of two blocks, "
               "coreset memory bank, reweighted nearest-neighbour image score", config="lakead.methods.bank_options:PatchCoreConfig"),
        Method("anomalydino", AnomalyDinoDetector, "AnomalyDINO's rule (Damm et al. 2025): cosine nearest neighbour, "
               "mean of the top 1 % patch scores", config="lakead.methods.bank_options:AnomalyDinoConfig"),
        Method("subspace", SubspaceDetector, "SubspaceAD's rule (Lendering et al. 2026): squared residual outside the "
               "principal subspace of the normal patches (99 % of their variance), mean of the top 1 % patch scores",
               config="lakead.methods.bank_options:SubspaceConfig"),
    )
}

#: The ``method`` recorded in a saved model -> the class that loads it (or its "module:Class").
DETECTORS: dict[str, Any] = {"lake": LakeDetector, "patchcore": PatchCoreDetector, "anomalydino": AnomalyDinoDetector, "subspace": SubspaceDetector,
                           "winclip": WinCLIPDetector}


def register(method: Method, *, saves_as: str | None = None) -> Method:
    """Add a method to the registry (its name must be new): the command line, the service, eval
    and ``load_detector`` then know it. ``saves_as``: the ``method`` its models are saved under,
    when it differs from the detector class's ``method`` (given by name, the detector is not
    imported here). Returns the method. The one line a new method adds (docs/ARCHITECTURE.md)."""
    if method.name in METHODS:
        raise ConfigError(f"a method named {method.name!r} is registered already")
    METHODS[method.name] = method
    name = saves_as or (method.detector.method if not isinstance(method.detector, str) else None)
    if name is None:
        raise ConfigError(f"method {method.name!r}: give saves_as= for a detector named by string")
    DETECTORS.setdefault(name, method.detector)
    return method


def unregister(name: str) -> None:
    """Remove a method added by :func:`register` (and the loader of its saved models when no
    other method saves under that name)."""
    method = METHODS.pop(name)
    saved = [k for k, v in DETECTORS.items() if v is method.detector]
    for k in saved:
        if not any(m.detector is method.detector for m in METHODS.values()):
            del DETECTORS[k]


def detector_class(detector: Any) -> type:
    """A detector class, or one named ``"module:Class"`` imported now."""
    if not isinstance(detector, str):
        return detector
    import importlib

    module, _, name = detector.partition(":")
    return getattr(importlib.import_module(module), name)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def method_config(config: Any, method: str) -> tuple[Any, Method]:
    """The configuration a method runs with, and the method."""
    m = get_method(method)
    return m.configure(config), m


def load_detector(
    path: str | Path,
    *,
    backbone: str | Backbone | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
) -> Detector:
    """Load any saved model, whatever its method (``device``, ``batch_size`` and
    ``precision`` say how to run it; see :meth:`LakeDetector.load` for ``backbone``). A
    directory written by ``lakead export`` is read by :class:`lakead.runtime.ExportedDetector`
    (its graph holds the backbone; it runs on the CPU at the precision it was exported with)."""
    from ..runtime import ExportedDetector, is_exported  # numpy and onnxruntime: only when a model is loaded

    if is_exported(path):
        if backbone is not None:
            raise ConfigError(f"{path}: an exported model holds its backbone in its graph; --backbone does not apply")
        return ExportedDetector.load(path, batch_size=batch_size)  # type: ignore[return-value]
    name = read_model_meta(path)["method"]
    if name not in DETECTORS:
        raise ModelFormatError(f"{path}: a {name!r} model; this lakead loads {sorted(DETECTORS)}: update lakead or fit again")
    return detector_class(DETECTORS[name]).load(path, backbone=backbone, device=device, batch_size=batch_size, precision=precision)
