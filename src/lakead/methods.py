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

from .api import Detector, Runtime, read_model_meta
from .backbones import Backbone
from .errors import ConfigError, ModelFormatError
from .lake import LakeDetector
from .runtime import ExportedDetector, is_exported

#: Which number of a :class:`~lakead.api.Prediction` a method reports as its image score.
SCORE_FIELDS = ("scores", "visual", "semantic")


@dataclass(frozen=True)
class Method:
    """A way of scoring: a detector class, the options it fixes, and which number of the
    prediction is the image score."""

    name: str
    detector: type
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    score: str = "scores"  # one of SCORE_FIELDS
    needs_text: bool = False

    @property
    def config_class(self) -> type:
        """The dataclass of the method's options (its fields make the command-line options)."""
        return self.detector.config_class

    def configure(self, config: Any) -> Any:
        """``config`` with this method's fixed options applied, validated."""
        return dataclasses.replace(config, **self.overrides).validate()

    def build(self, config: Any, backbone: Backbone | None = None, runtime: Runtime | None = None) -> Detector:
        """An unfitted detector of this method."""
        return self.detector.from_config(self.configure(config), backbone=backbone, runtime=runtime)


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

#: The ``method`` recorded in a saved model -> the class that loads it.
DETECTORS: dict[str, type] = {"lake": LakeDetector}


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
    if is_exported(path):
        if backbone is not None:
            raise ConfigError(f"{path}: an exported model holds its backbone in its graph; --backbone does not apply")
        return ExportedDetector.load(path, batch_size=batch_size)  # type: ignore[return-value]
    name = read_model_meta(path)["method"]
    cls = DETECTORS.get(name)
    if cls is None:
        raise ModelFormatError(f"{path}: a {name!r} model; this lakead loads {sorted(DETECTORS)}: update lakead or fit again")
    return cls.load(path, backbone=backbone, device=device, batch_size=batch_size, precision=precision)
