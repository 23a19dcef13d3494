"""The registry of methods: name -> how its detector is built, and which score it reports.

A method is a :class:`~lakead.api.Detector` class (usually a :class:`lakead.base.BaseDetector`
with its config and state classes), plus the options it fixes (the baselines of ``lakead
baselines`` are LAKE with some options fixed). A new method is one module with its detector
and one line in :data:`METHODS` (and one in :data:`DETECTORS` when it saves models under a new
name): see docs/ARCHITECTURE.md.

>>> sorted(METHODS)
['all', 'bottom', 'lake', 'random', 'text', 'visual']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from .api import Detector, Runtime, read_model_meta
from .errors import ConfigError, ModelFormatError

if TYPE_CHECKING:
    from .backbones import Backbone

#: LAKE's detector, named rather than imported: the registry (and ``lakead --help``, which
#: lists the methods) does not import torch until a detector is built or loaded.
LakeDetector = "lakead.lake.detector:LakeDetector"

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

    @property
    def detector_class(self) -> type:
        """The detector class (imported here when it was given by name)."""
        return detector_class(self.detector)

    @property
    def config_class(self) -> type:
        """The dataclass of the method's options (its fields make the command-line options)."""
        return self.detector_class.config_class

    def configure(self, config: Any) -> Any:
        """``config`` with this method's fixed options applied, validated."""
        return dataclasses.replace(config, **self.overrides).validate()

    def build(self, config: Any, backbone: Backbone | None = None, runtime: Runtime | None = None) -> Detector:
        """An unfitted detector of this method."""
        return self.detector_class.from_config(self.configure(config), backbone=backbone, runtime=runtime)


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
    )
}

#: The ``method`` recorded in a saved model -> the class that loads it (or its "module:Class").
DETECTORS: dict[str, Any] = {"lake": LakeDetector}


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
    ``precision`` say how to run it; see :meth:`LakeDetector.load` for ``backbone``)."""
    name = read_model_meta(path)["method"]
    if name not in DETECTORS:
        raise ModelFormatError(f"{path}: a {name!r} model; this lakead loads {sorted(DETECTORS)}: update lakead or fit again")
    return detector_class(DETECTORS[name]).load(path, backbone=backbone, device=device, batch_size=batch_size, precision=precision)
