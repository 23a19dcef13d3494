"""What options are made of, without torch: configuration fields with their help
(:func:`option`, :class:`Options`) and the names of backbone blocks (:data:`Layer`,
:func:`parse_layer`).

The command line builds its options from these (``lakead --help`` must not import torch),
so this module imports nothing heavier than the standard library.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import field
from typing import Any, Literal, Union

from .errors import ConfigError, ModelFormatError
from .limits import MAX_IMAGE_SIZE

#: The default backbone: OpenAI's CLIP ViT-L/14 at 336 px, as in the paper.
DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"

#: The paper's K: 100 sensitive neurons (of ViT-L/14's 1024 channels), the count its ablation
#: found best (fewer and more both lose).
PAPER_K, PAPER_WIDTH = 100, 1024
#: How :func:`default_k` chooses; shown by ``lakead info`` and the explain report.
DEFAULT_K_RULE = "default: the paper's 100 per 1024 channels, at least 100 (every channel of a narrower block)"


def default_k(width: int) -> int:
    """Sensitive neurons kept by default for a block of ``width`` channels: the paper's share of
    the channels (100 per 1024) on wide blocks, never fewer than the paper's 100 neurons, and
    every channel of a block narrower than that: ``min(width, max(100, round(100 * width / 1024)))``.

    The share alone gives 6 of the 64 channels of a small CNN's block, where the paper's
    ablation found fewer than 100 neurons worse and the measurement of docs/SELECTION.md found
    all channels better at every shot count (``python benchmarks/defaults.py``).

    >>> default_k(1024), default_k(1536), default_k(768), default_k(576), default_k(64), default_k(32)
    (100, 150, 100, 100, 64, 32)
    """
    if width < 1:
        raise ConfigError(f"a block needs at least one channel, got width {width}")
    return min(width, max(PAPER_K, round(PAPER_K * width / PAPER_WIDTH)))


#: A block of the network: a 1-based block number for transformers, a tensor name for ONNX.
Layer = Union[int, str]
#: What a detector reads: one block, or several whose tokens are concatenated (a list).
LayerSpec = Union[Layer, list]
#: Separators of several blocks in one option value: ``12,18`` or ``12+18``.
BLOCK_SEPARATORS = (",", "+")


def parse_layer(value: str | None) -> LayerSpec | None:
    """A layer as typed by a user (command line, form field): block numbers become integers,
    ONNX tensor names stay strings; several blocks (``12,18`` or ``365_quantized+426_quantized``)
    become a list.

    >>> parse_layer("18"), parse_layer("426_quantized"), parse_layer("12,18"), parse_layer("a+b")
    (18, '426_quantized', [12, 18], ['a', 'b'])
    """
    if value is None:
        return None
    v = value.strip()
    parts = [p.strip() for p in v.replace("+", ",").split(",")]
    if len(parts) > 1:
        return [_one_layer(p) for p in parts if p]
    return _one_layer(v)


def _one_layer(v: str) -> Layer:
    return int(v) if v.lstrip("-").isdigit() else v


def as_blocks(layer: LayerSpec) -> tuple[Layer, ...]:
    """One block or a list of blocks -> a tuple of blocks (duplicates refused)."""
    blocks = tuple(layer) if isinstance(layer, (list, tuple)) else (layer,)
    if not blocks:
        raise ConfigError("layer: no block given")
    if len(set(map(str, blocks))) != len(blocks):
        raise ConfigError(f"layer: a block is given twice in {list(blocks)}")
    return blocks


# -- options -------------------------------------------------------------------------------------


def option(default: Any, help: str, **extra: Any) -> Any:
    """A configuration field with its help text (shown by ``--help`` and the API docs)."""
    return field(default=default, metadata={"help": help, **extra})


#: Help of the read rule's options (every method has them: how DICOM and NIfTI files are read).
WINDOW_HELP = ("DICOM/NIfTI intensity window: CENTER,WIDTH (40,80), a preset (brain, subdural, stroke, soft-tissue, "
               "mediastinum, liver, lung, bone), file (the file's own VOI LUT / Window Center-Width), full (the full "
               "range), or auto: the file's own window, else the full range (docs/MEDICAL.md).")
SLICES_HELP = ("NIfTI slices: axial, coronal or sagittal, optionally :FIRST-LAST (the file's voxel indices, both "
               "included) and /STEP (every STEP-th): axial:20-120, axial/2; slices with no signal are skipped.")


#: How a threshold is derived from the normal images' scores (:data:`lakead.decision.RULES`).
ThresholdRule = Literal["auto", "conformal", "exponential", "gaussian", "sigmas"]

#: How predict searches the normal vectors (:func:`lakead.index.resolve`).
IndexKind = Literal["auto", "exact", "kdtree", "hnsw"]

#: The options every method has with one meaning: name -> (default, help), declared once here so
#: that one command line and one form serve every method. A method's config declares each that it
#: has with :func:`shared_option` where it stands among its own options (that order is the order
#: of ``--help`` and of the saved JSON) and LAKE's type (a test checks both), and its
#: ``validate`` calls :meth:`Options.check_shared`.
SHARED_OPTIONS: dict[str, tuple[Any, str]] = {
    "backbone": (DEFAULT_CLIP, "Hub id, local save_pretrained directory, or onnx:PATH."),
    "image_size": (None, "Square input size in pixels, a multiple of the patch size (default: the model's own)."),
    "false_alarm_rate": (0.05, "False-alarm budget: the share of normal images the decision may flag. The threshold is "
                               "derived from the support images' leave-one-out scores for it (docs/DECISIONS.md)."),
    "threshold_rule": ("auto", "How the threshold is derived: auto (conformal when the budget is at least 1/(n+1) for "
                               "n support images, else an exponential tail), conformal, exponential, gaussian, or sigmas (median + "
                               "threshold_sigmas robust SDs)."),
    "threshold": (None, "Fixed decision threshold (default: derived from the normal images)."),
    "threshold_sigmas": (3.0, "With threshold_rule sigmas: robust standard deviations above the typical normal score."),
    "index": ("auto", "How predict finds each patch's nearest normal vector (LAKE's gallery, a memory bank): exact "
                      "(matrix products over all of them), kdtree (exact too, much faster on many vectors of few "
                      "channels), hnsw (approximate: cost nearly flat in their number, needs lakead[index]), or auto: "
                      "kdtree from 100,000 vectors of at most 16 channels on the CPU, else exact (docs/SCALE.md)."),
    "hnsw_ef_search": (128, "With index hnsw: candidates examined per query; higher is closer to the exact search and "
                            "slower (docs/SCALE.md: 128 kept the exact search's decisions with 32 neurons, 64 did not)."),
}


def shared_option(name: str) -> Any:
    """The field of the shared option ``name`` (:data:`SHARED_OPTIONS`): its default and help."""
    default, help = SHARED_OPTIONS[name]
    return option(default, help)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass
class Options:
    """Base of a method's options (a dataclass of :func:`option` fields, saved with the model).

    Every method has the read rule of medical images (``window``, ``slices``:
    :class:`lakead.medical.ReadRule`). Fields typed with a ``Literal`` are checked by
    :meth:`validate`; a method adds its own checks.
    """

    window: str = option("auto", WINDOW_HELP, panel="Reading options")
    slices: str = option("axial", SLICES_HELP, panel="Reading options")

    @property
    def read_rule(self) -> Any:
        """How DICOM and NIfTI inputs are read (:class:`lakead.medical.ReadRule`; imported on use,
        so that building options stays free of numpy)."""
        from .medical import ReadRule

        return ReadRule(self.window, self.slices)

    def validate(self) -> "Options":
        if not isinstance(self.window, str) or not isinstance(self.slices, str):
            raise ConfigError(f"window and slices must be text, got {self.window!r} and {self.slices!r}")
        self.read_rule.check()
        for name, hint in field_types(type(self)).items():  # options that are one of a few words
            choices = literal_choices(hint)
            if choices and not _admits(hint, (int, float, str)) and getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        return self

    def check_shared(self) -> None:
        """Check the options of :data:`SHARED_OPTIONS` this config has (``threshold_rule`` and
        ``index``, Literals, are checked by :meth:`validate`); a :class:`ConfigError` names the first bad one."""
        v = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in SHARED_OPTIONS}
        if "backbone" in v and (not isinstance(v["backbone"], str) or not v["backbone"].strip()):
            raise ConfigError(f"backbone must be a hub id, a local directory or onnx:PATH, got {v['backbone']!r}")
        size = v.get("image_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"image_size must be a positive integer, got {size!r}")
        if size is not None and size > MAX_IMAGE_SIZE:
            raise ConfigError(f"image_size {size} is larger than lakead runs ({MAX_IMAGE_SIZE}: past it the network's "
                              "attention alone needs tens of gigabytes per image)")
        if "false_alarm_rate" in v and not (_is_number(v["false_alarm_rate"]) and 0 < v["false_alarm_rate"] < 1):
            raise ConfigError(f"false_alarm_rate must be a number in (0, 1), got {v['false_alarm_rate']!r}")
        if "threshold_sigmas" in v and not (_is_number(v["threshold_sigmas"]) and math.isfinite(v["threshold_sigmas"])
                                            and v["threshold_sigmas"] >= 0):
            raise ConfigError(f"threshold_sigmas must be a finite number >= 0, got {v['threshold_sigmas']!r}")
        threshold = v.get("threshold")
        if threshold is not None and not (_is_number(threshold) and not math.isnan(threshold)):
            raise ConfigError(f"threshold must be a number, not {threshold!r}")
        e = v.get("hnsw_ef_search", 1)
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ConfigError(f"hnsw_ef_search must be a positive integer, got {e!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Options":
        """From a saved model's ``config``; unknown keys are a :class:`ModelFormatError`."""
        unknown = sorted(set(d) - set(field_types(cls)))
        if unknown:
            raise ModelFormatError(f"unknown configuration keys {unknown}")
        return cls(**d)

    @classmethod
    def from_options(cls, **options: Any) -> "Options":
        """From keyword options, validated; a misspelled option is a clear :class:`ConfigError`."""
        unknown = sorted(set(options) - set(field_types(cls)))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; the options are {sorted(field_types(cls))}")
        return cls(**options).validate()


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def literal_choices(hint: Any) -> tuple[Any, ...]:
    """The values of the ``Literal`` in a type (also inside a Union/Optional); () without one."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    out: tuple[Any, ...] = ()
    for arg in typing.get_args(hint):
        out += literal_choices(arg)
    return out


def _admits(hint: Any, kinds: type | tuple[type, ...]) -> bool:
    """Whether a type annotation admits plain values of ``kinds`` besides its Literal."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if hint in kinds:
        return True
    return any(_admits(a, kinds) for a in typing.get_args(hint) if typing.get_origin(a) is not Literal and a is not type(None))
