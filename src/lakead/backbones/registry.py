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
from .hub import hub_options


def _clip(source: str, need_text: bool) -> Backbone:
    from .clip import CLIPBackbone

    return CLIPBackbone.from_pretrained(source, need_text=need_text)


def _dinov2(source: str, need_text: bool) -> Backbone:
    from .dinov2 import DINOv2Backbone

    return DINOv2Backbone.from_pretrained(source, need_text=need_text)


def _dinov3(source: str, need_text: bool) -> Backbone:
    from .dinov2 import DINOv3Backbone

    return DINOv3Backbone.from_pretrained(source, need_text=need_text)


def _siglip(source: str, need_text: bool) -> Backbone:
    from .siglip import SigLIPBackbone

    return SigLIPBackbone.from_pretrained(source, need_text=need_text)


def _siglip2(source: str, need_text: bool) -> Backbone:
    from .siglip import SigLIP2Backbone

    return SigLIP2Backbone.from_pretrained(source, need_text=need_text)


def _onnx(path: str, need_text: bool) -> Backbone:
    from .onnx import ONNXBackbone

    return ONNXBackbone.from_file(path)


#: ``model_type`` of a transformers checkpoint -> loader(source, need_text).
CHECKPOINT_FAMILIES: dict[str, Callable[[str, bool], Backbone]] = {
    "clip": _clip,
    "dinov2": _dinov2,
    "dinov2_with_registers": _dinov2,
    "dinov3_vit": _dinov3,
    "siglip": _siglip,
    "siglip2": _siglip2,
}
#: What each ``model_type`` is, for messages (``lakead download-backbone``, unknown families).
FAMILY_NAMES: dict[str, str] = {
    "clip": "CLIP (OpenAI, LAION, MetaCLIP, ...: any CLIPModel checkpoint; text probe)",
    "dinov2": "DINOv2 (visual only)",
    "dinov2_with_registers": "DINOv2 with registers (visual only)",
    "dinov3_vit": "DINOv3 ViT (visual only)",
    "siglip": "SigLIP, and SigLIP 2 at a fixed resolution (text probe, sigmoid)",
    "siglip2": "SigLIP 2 NaFlex (text probe, sigmoid)",
}
#: The family tried for a hub id whose config cannot be read (it reports what it finds).
DEFAULT_FAMILY = "clip"
#: Spec prefix -> loader(rest of the spec, need_text).
PREFIX_FAMILIES: dict[str, Callable[[str, bool], Backbone]] = {
    "onnx:": _onnx,
}


def supported_families() -> str:
    """One line per checkpoint family and prefix, for messages."""
    lines = [f"  {t}: {FAMILY_NAMES.get(t, t)}" for t in CHECKPOINT_FAMILIES]
    lines += [f"  {p}PATH: any ONNX image model, read at named tensors (visual only)" for p in PREFIX_FAMILIES]
    return "\n".join(lines)


def _local_model_type(spec: str) -> str | None:
    """``model_type`` from a local directory's ``config.json`` or, for a hub id, from its
    ``config.json`` in the Hugging Face cache (fetched when there is network); None when it
    cannot be read."""
    local = Path(spec).expanduser()
    cfg = local / "config.json"
    if not local.exists():
        cfg = _hub_config(spec)  # type: ignore[assignment]
    if cfg is None or not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None  # the adapter reports the damaged file with its own message


def _hub_config(spec: str) -> Path | None:
    try:
        from transformers.utils import cached_file

        found = cached_file(spec, "config.json", _raise_exceptions_for_missing_entries=False, **hub_options(spec))
    except Exception:  # not a hub id, no network and not cached, ...: the adapter says why
        return None
    return Path(found) if found else None


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
    hub_options(spec)  # without network and not cached: one message now, not 30 s of retries
    family = _local_model_type(spec) or DEFAULT_FAMILY
    loader = CHECKPOINT_FAMILIES.get(family)
    if loader is None:
        raise ConfigError(f"{spec}: is a {family!r} model; lakead reads these families:\n{supported_families()}")
    return loader(spec, need_text)
