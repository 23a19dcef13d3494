"""Backbone adapters: one per model family behind the small protocol in :mod:`.base`.

:func:`~.registry.load_backbone` turns what a user gives (a hub id, a local directory,
``onnx:PATH``, or a built :class:`Backbone`) into a backbone; :mod:`.cache` keeps block
outputs for grids that read the same images many times.
"""

from __future__ import annotations

from ..fields import DEFAULT_CLIP, Layer, LayerSpec, as_blocks, parse_layer
from .._lazy import lazy_names

# The adapters pull in torch: imported on first use (PEP 562), so that the command line can
# check the hub (lakead.backbones.hub) before it pays for torch.
_LAZY = {
    "Backbone": ".base", "BackboneInfo": ".base", "Features": ".base", "Preprocessing": ".base", "WindowFeatures": ".base",
    "CLIPBackbone": ".clip", "load_backbone": ".registry",
}


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)


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
