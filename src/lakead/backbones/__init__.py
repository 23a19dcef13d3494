"""Backbone adapters: one per model family behind the small protocol in :mod:`.base`.

``load_backbone`` turns what a user gives (a hub id, a local directory, ``onnx:PATH``, or a
built :class:`Backbone`) into a backbone.
"""

from __future__ import annotations

from .base import Backbone, BackboneInfo, Features, Layer, Preprocessing, parse_layer
from .clip import DEFAULT_CLIP, CLIPBackbone

__all__ = [
    "Backbone",
    "BackboneInfo",
    "CLIPBackbone",
    "DEFAULT_CLIP",
    "Features",
    "Layer",
    "Preprocessing",
    "load_backbone",
    "parse_layer",
]

ONNX_PREFIX = "onnx:"


def load_backbone(spec: "str | Backbone", *, need_text: bool = True) -> Backbone:
    """A backbone from a spec: a :class:`Backbone` (returned as is), ``onnx:PATH``, a
    Hugging Face hub id or a local CLIP directory in the ``save_pretrained`` layout."""
    if isinstance(spec, Backbone):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        from ..errors import ConfigError

        raise ConfigError(
            f"backbone must be a hub id, a local directory, 'onnx:PATH' or a Backbone, got {spec!r}"
        )
    if spec.startswith(ONNX_PREFIX):
        from .onnx import ONNXBackbone

        return ONNXBackbone.from_file(spec[len(ONNX_PREFIX):])
    return CLIPBackbone.from_pretrained(spec, need_text=need_text)
