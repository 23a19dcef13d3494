"""Which adapter reads which backbone: one line per family.

A backbone is given as a built :class:`~lakead.backbones.base.Backbone` (used as is), a
prefixed path (``onnx:model.onnx``), or a Hugging Face checkpoint (a hub id or a local
``save_pretrained`` directory), whose own ``model_type`` picks the adapter. A new family is
one adapter module plus one line in :data:`CHECKPOINT_FAMILIES` or :data:`PREFIX_FAMILIES`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from .base import Backbone


def _clip(source: str, need_text: bool) -> Backbone:
    from .clip import CLIPBackbone

    return CLIPBackbone.from_pretrained(source, need_text=need_text)


def _onnx(path: str, need_text: bool) -> Backbone:
    from .onnx import ONNXBackbone

    return ONNXBackbone.from_file(path)


#: ``model_type`` of a transformers checkpoint -> loader(source, need_text).
CHECKPOINT_FAMILIES: dict[str, Callable[[str, bool], Backbone]] = {
    "clip": _clip,
}
#: The family tried for a hub id whose config is not on this machine (it reports what it finds).
DEFAULT_FAMILY = "clip"
#: Spec prefix -> loader(rest of the spec, need_text).
PREFIX_FAMILIES: dict[str, Callable[[str, bool], Backbone]] = {
    "onnx:": _onnx,
}


def _local_model_type(spec: str) -> str | None:
    """``model_type`` from a local directory's ``config.json``; None when it is not one."""
    cfg = Path(spec).expanduser() / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None  # the adapter reports the damaged file with its own message


def load_backbone(spec: "str | Backbone", *, need_text: bool = True) -> Backbone:
    """A backbone from a spec: a :class:`Backbone` (returned as is), ``onnx:PATH``, a
    Hugging Face hub id or a local directory in the ``save_pretrained`` layout.

    ``need_text=False`` lets an adapter skip the text tower (a fitted model has its text
    embeddings already)."""
    if isinstance(spec, Backbone):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"backbone must be a hub id, a local directory, 'onnx:PATH' or a Backbone, got {spec!r}")
    for prefix, loader in PREFIX_FAMILIES.items():
        if spec.startswith(prefix):
            return loader(spec[len(prefix):], need_text)
    family = _local_model_type(spec) or DEFAULT_FAMILY
    loader = CHECKPOINT_FAMILIES.get(family)
    if loader is None:
        raise ConfigError(
            f"{spec}: is a {family!r} model; lakead reads the families {sorted(CHECKPOINT_FAMILIES)} "
            f"from transformers checkpoints, and any ONNX image model as {'/'.join(PREFIX_FAMILIES)}PATH"
        )
    return loader(spec, need_text)
