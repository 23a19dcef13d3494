"""Backbone adapters: one per model family behind the small protocol in :mod:`.base`.

:func:`~.registry.load_backbone` turns what a user gives (a hub id, a local directory,
``onnx:PATH``, or a built :class:`Backbone`) into a backbone; :mod:`.cache` keeps block
outputs for grids that read the same images many times.
"""

from __future__ import annotations

from .base import Backbone, BackboneInfo, Features, Layer, LayerSpec, Preprocessing, WindowFeatures, as_blocks, parse_layer
from .clip import DEFAULT_CLIP, CLIPBackbone
from .registry import load_backbone

__all__ = [
    "Backbone",
    "BackboneInfo",
    "CLIPBackbone",
    "DEFAULT_CLIP",
    "Features",
    "Layer",
    "LayerSpec",
    "Preprocessing",
    "WindowFeatures",
    "as_blocks",
    "load_backbone",
    "parse_layer",
]
