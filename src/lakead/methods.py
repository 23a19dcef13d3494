"""The registry of scoring methods: name -> how a detector is built and which score it reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .detector import LakeConfig
from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    """A way of scoring: options that override the detector configuration, and which
    number of the prediction is the image score."""

    name: str
    overrides: dict[str, Any]
    score: str  # one of SCORE_FIELDS
    description: str
    needs_text: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lake", {}, "scores", "LAKE as configured: top-k sensitive neurons + text probe, fused (Eq. 14)"),
        Method("visual", {"use_text": False}, "visual", "visual branch only: the configured neurons (top-k by default), nearest neighbour"),
        Method("all", {"selection": "all", "use_text": False}, "visual",
               "full-width nearest neighbour: every channel (PatchCore-like, no coreset)"),
        Method("random", {"selection": "random", "use_text": False}, "visual", "k random channels, nearest neighbour"),
        Method("bottom", {"selection": "bottom", "use_text": False}, "visual", "k lowest-variance channels, nearest neighbour"),
        Method("text", {"map_source": "semantic", "use_text": True}, "semantic",
               "text probe only (zero-shot): per-token P(anomalous) of the two prompts; the shots are not used", True),
    )
}


def method_config(config: LakeConfig, method: str) -> tuple[LakeConfig, Method]:
    """The configuration a method runs with."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    m = METHODS[method]
    return dataclasses.replace(config, **m.overrides).validate(), m
