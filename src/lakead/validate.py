"""What lakead reads back from disk, checked once: a saved model's ``lakead.json``, its learned
state, and an export's ``lakead-export.json``.

A damaged or tampered file is refused with one :class:`~lakead.errors.ModelFormatError` line
naming the file and the field, never a traceback, a hang, a huge allocation or a silent NaN:

- :func:`load_json`: strict JSON. Every number is finite (``NaN``, ``Infinity`` and ``1e999``
  are refused, with the path of the value), integers have at most :data:`MAX_DIGITS` digits,
  nesting is at most :data:`MAX_DEPTH` deep, and a key appears once per object.
- :class:`Fields`: typed checks of single fields (a number in a range, an integer, a list of
  numbers...), each naming the field.
- :func:`check_export_meta`: every field of ``lakead-export.json`` that the runtime reads.
- :func:`check_state`: the rules every method's learned state keeps, field by field (tensors
  finite, neuron indices whole, distinct and in range, sizes and grids in range, decision
  levels finite); a method's own ``check`` adds how its fields agree with each other.

numpy only (the torch-free runtime reads exports through it); tensors are read through
``.numpy()`` when given as torch tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any, NoReturn

import numpy as np

from .errors import ConfigError, ModelFormatError
from .fields import as_blocks
from .limits import MAX_IMAGE_SIZE

#: Deepest nesting of lists and objects a model file may have (lakead writes 4).
MAX_DEPTH = 32
#: Most digits of an integer in a model file.
MAX_DIGITS = 30
#: Largest fixed batch of an exported graph.
MAX_EXPORT_BATCH = 4096
#: The outputs of an exported graph the runtime reads (lakead.export.graph.OUTPUTS).
EXPORT_OUTPUTS = ("token_scores", "visual", "semantic", "score", "scope")
#: PIL resampling filters (Image.Resampling: NEAREST 0 .. LANCZOS 1, BILINEAR 2, BICUBIC 3, BOX 4, HAMMING 5).
RESAMPLE_FILTERS = (0, 1, 2, 3, 4, 5)


# -- strict JSON -----------------------------------------------------------------------------------


class _NotFinite(float):
    """A NaN or infinite number met while parsing, remembered with its text (refused afterwards,
    with its path)."""

    text: str

    def __new__(cls, value: float, text: str) -> "_NotFinite":
        obj = super().__new__(cls, value)
        obj.text = text
        return obj


class _Refused(ValueError):
    pass


def _parse_float(text: str) -> float:
    v = float(text)
    return v if math.isfinite(v) else _NotFinite(v, text)


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_DIGITS})")
    return int(text)


def _parse_constant(text: str) -> float:
    return _NotFinite(float(text), text)


def _pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in items:
        if k in out:
            raise _Refused(f"the key {k!r} appears twice in one object")
        out[k] = v
    return out


def _walk(value: Any, path: str, depth: int) -> Iterator[tuple[str, Any, int]]:
    yield path, value, depth
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k), depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]", depth + 1)


def load_json(file: str | PurePath, text: str | None = None) -> Any:
    """Parse ``file`` (or ``text``, named as ``file``) as strict JSON (see the module docstring);
    a :class:`ModelFormatError` naming the file, and the value's path, when it is not."""
    try:
        if text is None:
            text = Path(file).read_text(encoding="utf-8")
        value = json.loads(text, parse_float=_parse_float, parse_int=_parse_int, parse_constant=_parse_constant,
                           object_pairs_hook=_pairs)
    except FileNotFoundError:
        raise
    except RecursionError:
        raise ModelFormatError(f"{file}: cannot be parsed (nested deeper than Python can read)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError and _Refused are ValueErrors
        raise ModelFormatError(f"{file}: cannot be parsed ({exc})") from None
    for path, v, depth in _walk(value, "", 0):
        if depth > MAX_DEPTH:
            raise ModelFormatError(f"{file}: nested more than {MAX_DEPTH} deep (at {path}): not a file lakead wrote")
        if isinstance(v, _NotFinite):
            raise ModelFormatError(f"{file}: {path or 'the document'} is {v.text}: every number lakead writes is finite")
    return value


# -- single fields ---------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Fields:
    """Checks of the fields of one file; each failure is a :class:`ModelFormatError`
    ``"<where>: <field> <problem>"``."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, name: str, problem: str) -> NoReturn:
        raise ModelFormatError(f"{self.where}: {name} {problem}")

    def mapping(self, value: Any, name: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(name, f"must be an object, got {_show(value)}")
        return value

    def text(self, value: Any, name: str, *, none: bool = False, choices: Sequence[str] | None = None) -> str | None:
        if value is None and none:
            return None
        if not isinstance(value, str):
            self.fail(name, f"must be text, got {_show(value)}")
        if choices is not None and value not in choices:
            self.fail(name, f"must be one of {list(choices)}, got {value!r}")
        return value

    def number(self, value: Any, name: str, *, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
               hi_open: bool = False, none: bool = False) -> float | None:
        """A finite number in ``[lo, hi]`` (``lo_open``/``hi_open``: that end excluded); None when ``none``."""
        if value is None and none:
            return None
        if not _is_number(value) or not math.isfinite(value):
            self.fail(name, f"must be a finite number, got {_show(value)}")
        if value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
            self.fail(name, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, got {value!r}")
        return float(value)

    def integer(self, value: Any, name: str, *, lo: int, hi: int, none: bool = False) -> int | None:
        """A whole number in ``[lo, hi]`` (a float such as 3.0 is not one); None when ``none``."""
        if value is None and none:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"must be a whole number, got {_show(value)}")
        if not lo <= value <= hi:
            self.fail(name, f"must be in [{lo}, {hi}], got {value}")
        return value

    def numbers(self, value: Any, name: str, n: int, **bounds: Any) -> list[float]:
        """A list of ``n`` numbers, each checked as :meth:`number`."""
        if not isinstance(value, list) or len(value) != n:
            self.fail(name, f"must be a list of {n} numbers, got {_show(value)}")
        return [self.number(v, f"{name}[{i}]", **bounds) for i, v in enumerate(value)]  # type: ignore[misc]

    def integers(self, value: Any, name: str, n: int, *, lo: int, hi: int) -> list[int]:
        if not isinstance(value, list) or len(value) != n:
            self.fail(name, f"must be a list of {n} whole numbers, got {_show(value)}")
        return [self.integer(v, f"{name}[{i}]", lo=lo, hi=hi) for i, v in enumerate(value)]  # type: ignore[misc]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- lakead-export.json ----------------------------------------------------------------------------


def check_export_meta(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """Every field of ``lakead-export.json`` the runtime reads, in range (engine, precision,
    format and version are checked by :func:`lakead.runtime.read_export_meta`). Returns ``meta``."""
    f = Fields(where)
    file = f.text(meta["file"], "file")
    if not file or PurePath(file).name != file or file in (".", "..") or "\\" in file:
        f.fail("file", f"must be a file name inside the export's directory, got {file!r}")
    head = meta.get("head")  # a second graph, the head in float32 after the backbone's (lakead.export.split)
    if head is not None:
        h = f.mapping(head, "head")
        name = f.text(h.get("file"), "head.file")
        if not name or PurePath(name).name != name or name in (".", "..", file) or "\\" in name:
            f.fail("head.file", f"must be a file name inside the export's directory, not the backbone's, got {name!r}")
        cut = h.get("inputs")
        if not isinstance(cut, list) or not cut or not all(isinstance(c, str) and c for c in cut) or len(set(cut)) != len(cut):
            f.fail("head.inputs", f"must list the head graph's inputs once each, got {_show(cut)}")
    f.integer(meta["batch"], "batch", lo=1, hi=MAX_EXPORT_BATCH, none=True)
    f.text(meta["input"], "input")
    outputs = meta["outputs"]
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs) or len(set(outputs)) != len(outputs) \
            or not set(EXPORT_OUTPUTS) <= set(outputs):
        f.fail("outputs", f"must list the graph's outputs {list(EXPORT_OUTPUTS)} once each, got {_show(outputs)}")
    source = f.mapping(meta["source"], "source")
    for key in ("method", "fingerprint"):
        f.text(source.get(key), f"source.{key}")
    f.text(f.mapping(source.get("backbone"), "source.backbone").get("source"), "source.backbone.source")
    f.mapping(source.get("meta"), "source.meta")
    p = f.mapping(meta["preprocessing"], "preprocessing")
    patch = f.integer(p.get("patch_size"), "preprocessing.patch_size", lo=1, hi=MAX_IMAGE_SIZE)
    size = f.integer(p.get("image_size"), "preprocessing.image_size", lo=patch, hi=MAX_IMAGE_SIZE)  # type: ignore[arg-type]
    # pixels are 0..255, times rescale, less mean, over std: bounds that keep them far from float32's range
    f.numbers(p.get("mean"), "preprocessing.mean", 3, lo=-1e4, hi=1e4)
    f.numbers(p.get("std"), "preprocessing.std", 3, lo=1e-4, hi=1e4)
    f.integer(p.get("resample"), "preprocessing.resample", lo=min(RESAMPLE_FILTERS), hi=max(RESAMPLE_FILTERS))
    f.number(p.get("rescale"), "preprocessing.rescale", lo=1e-6, hi=1e4)
    for key in ("grid", "map_grid"):
        f.integers(meta[key], key, 2, lo=1, hi=size)  # type: ignore[arg-type]
    lo, hi = f.numbers(meta["map_range"], "map_range", 2)
    if lo > hi:
        f.fail("map_range", f"must go from low to high, got {meta['map_range']}")
    f.number(meta["sigma"], "sigma", lo=0.0, hi=float(size))  # type: ignore[arg-type]  # a blur wider than the input is no map
    f.number(meta["lam"], "lam", lo=0.0)
    d = f.mapping(meta["decision"], "decision")
    missing = [k for k in ("threshold", "threshold_rule", "false_alarm_rate", "seed_threshold", "pixel_threshold",
                           "scope_threshold") if k not in d]
    if missing:
        f.fail("decision", f"has no {', '.join(missing)}")
    f.number(d["threshold"], "decision.threshold", none=True)
    f.text(d["threshold_rule"], "decision.threshold_rule")
    f.number(d["false_alarm_rate"], "decision.false_alarm_rate", lo=0.0, hi=1.0, lo_open=True, hi_open=True, none=True)
    for key in ("seed_threshold", "pixel_threshold", "scope_threshold"):
        f.number(d[key], f"decision.{key}", none=True)
    f.text(meta["class_name"], "class_name")
    f.text(meta["fitted_at"], "fitted_at")
    return meta


# -- a method's learned state ----------------------------------------------------------------------


def _array(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def check_state(state: Any, where: str) -> None:
    """The rules every method's learned state (:class:`lakead.base.LearnedState`) keeps:

    - float arrays are finite; the leave-one-out arrays (``loo_*``) may hold NaN (an image not
      scored) but no infinity;
    - index arrays (``neurons``, ``*_image``, ``*_scale`` of window memories) are whole numbers
      >= 0; ``neurons`` are distinct and below ``width``;
    - ``image_size`` a whole number in [1, :data:`MAX_IMAGE_SIZE`], ``grid`` two in [1, image_size],
      ``width`` a positive whole number;
    - ``threshold`` a number (infinite: none derived, saved as null), the other decision levels
      finite or None, ``map_range`` two finite numbers, ``false_alarm_rate`` in (0, 1) or None.
    """
    import dataclasses

    f = Fields(f"{where}: saved model")
    names = {fld.name: fld.metadata.get("kind") for fld in dataclasses.fields(state)}
    for name, kind in names.items():
        value = getattr(state, name)
        if kind != "tensor" or value is None or name == "gallery_index":
            continue
        a = _array(value)
        if np.issubdtype(a.dtype, np.floating):
            if name == "neurons":
                f.fail("tensor neurons", f"must hold whole numbers (channel indices), got {a.dtype}")
            if name.startswith("loo_"):
                if np.isinf(a).any():
                    f.fail(f"tensor {name}", "holds infinite values")
            elif not np.isfinite(a).all():
                f.fail(f"tensor {name}", f"holds {'NaN' if np.isnan(a).any() else 'infinite'} values")
        elif np.issubdtype(a.dtype, np.integer) and a.size and int(a.min()) < 0:
            f.fail(f"tensor {name}", "holds negative indices")
    for name in names:  # an index array lists one entry per row of the array it indexes
        for suffix in ("_image", "_scale"):
            base = name[: -len(suffix)] if name.endswith(suffix) else None
            if base in names and getattr(state, name) is not None and getattr(state, base) is not None:
                n_index, n_rows = len(_array(getattr(state, name))), len(_array(getattr(state, base)))
                if n_index != n_rows:
                    f.fail(f"tensor {name}", f"has {n_index} entries for the {n_rows} rows of {base}")
    size = None
    if "image_size" in names:
        size = f.integer(state.image_size, "image_size", lo=1, hi=MAX_IMAGE_SIZE)
    if "grid" in names:
        f.integers(list(state.grid), "grid", 2, lo=1, hi=size or MAX_IMAGE_SIZE)
    if "window_sizes" in names:
        sizes = state.window_sizes
        if not isinstance(sizes, list) or not sizes:
            f.fail("window_sizes", f"must be a list of window sides, got {_show(sizes)}")
        for i, v in enumerate(sizes):
            f.integer(v, f"window_sizes[{i}]", lo=1, hi=min(state.grid))
    width = f.integer(state.width, "width", lo=1, hi=2**31) if "width" in names else None
    neurons = getattr(state, "neurons", None)
    if neurons is not None:
        n = _array(neurons).reshape(-1)
        if len(np.unique(n)) != n.size:
            f.fail("tensor neurons", "names a channel twice")
        if width is not None and n.size and int(n.max()) >= width:
            f.fail("tensor neurons", f"names channel {int(n.max())} of a {width}-channel block")
    if "threshold" in names and (not _is_number(state.threshold) or math.isnan(state.threshold)):
        f.fail("threshold", f"must be a number or null, got {state.threshold!r}")
    for name in ("seed_threshold", "pixel_threshold", "scope_threshold", "visual_scale", "logit_scale", "pca_scale",
                 "pca_sign"):
        if name in names:
            f.number(getattr(state, name), name, none=True)
    if "false_alarm_rate" in names:
        f.number(state.false_alarm_rate, "false_alarm_rate", lo=0.0, hi=1.0, lo_open=True, hi_open=True, none=True)
    if "map_range" in names:
        f.numbers(list(state.map_range), "map_range", 2)


def check_state_backbone(state: Any, backbone: Any, config: Any, where: str) -> None:
    """What a loaded state must agree with in its backbone: every block it names exists
    (``layer``, ``semantic_layer``, ``patch_layer``, ``lake_layer``), ``image_size`` is a
    multiple of the patch size, and the text embeddings have the width of the backbone's joint
    space (when the text probe runs on this backbone)."""
    f = Fields(f"{where}: saved model")
    for name in ("layer", "lake_layer", "patch_layer", "semantic_layer"):
        value = getattr(state, name, None)
        if name == "semantic_layer" and getattr(config, "text_backbone", None) is not None:
            continue  # a block of the text probe's own model (checked when that model is loaded), not of this backbone
        if value is None:
            if name == "layer" and hasattr(state, "layer"):
                f.fail("layer", "is missing: the block(s) the model reads")
            continue
        try:
            for block in as_blocks(value):
                if not isinstance(block, (int, str)) or isinstance(block, bool):
                    raise ConfigError(f"block {block!r} is neither a number nor a name")
                backbone.resolve_layer(block, semantic=name == "semantic_layer")
        except ConfigError as exc:
            f.fail(name, f"{_show(value)} does not fit the backbone ({exc})")
    size = getattr(state, "image_size", None)
    if size is not None:
        try:
            backbone.check_image_size(size)
        except ConfigError as exc:
            f.fail("image_size", f"does not fit the backbone ({exc})")
        grid = getattr(state, "grid", None)
        if grid is not None and backbone.info.num_layers > 0 and tuple(grid) != tuple(backbone.grid_size(size)):
            f.fail("grid", f"{list(grid)} is not the backbone's token grid {list(backbone.grid_size(size))} at image_size {size}")
    text = getattr(state, "text_embeddings", None)
    joint = getattr(backbone.info, "joint_dim", None)
    if text is not None and getattr(config, "text_backbone", None) is None and joint:
        shape = tuple(text.shape)
        if len(shape) != 2 or shape[0] != 2 or shape[1] != joint:
            f.fail("tensor text_embeddings", f"has shape {shape}, the backbone's joint space (2, {joint})")


def check_backbone_meta(info: Any, where: str) -> dict[str, Any]:
    """The ``backbone`` object of ``lakead.json`` (:class:`lakead.backbones.BackboneInfo`'s fields), typed."""
    f = Fields(where)
    info = f.mapping(info, "backbone")
    for key in ("kind", "source", "fingerprint"):
        f.text(info.get(key), f"backbone.{key}")
    f.integer(info.get("num_layers"), "backbone.num_layers", lo=0, hi=10_000)
    f.integer(info.get("patch_size"), "backbone.patch_size", lo=1, hi=MAX_IMAGE_SIZE)
    f.integer(info.get("image_size"), "backbone.image_size", lo=1, hi=MAX_IMAGE_SIZE)
    f.integer(info.get("joint_dim"), "backbone.joint_dim", lo=1, hi=2**20, none=True)
    return info
