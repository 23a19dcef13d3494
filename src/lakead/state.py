"""What a fitted model has learned, declared once per field.

:class:`LearnedState` is the base of a method's state: each field is a :func:`tensor` (saved in
``tensors.safetensors``) or a :func:`fact` (saved in ``lakead.json``), and that one list drives
saving, loading, the fingerprint ``predict --resume`` compares and the detector's ``det.<field>_``
attributes. The facts several methods share are declared here once, as parts a method's state
is made of: :class:`SupportRecord` (which images it was fitted on) and :class:`DecisionRecord`
(the decision levels and the leave-one-out scores they come from).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from .api import finite_or_none, tensor_fingerprint
from .errors import ModelFormatError
from .validate import check_state


def tensor(doc: str, *, optional: bool = False, numpy: bool = False, device: bool = False,
           initial: Any = dataclasses.MISSING) -> Any:
    """A learned array, saved in ``tensors.safetensors``. ``numpy``: held as a numpy array;
    ``device``: moved to the run's device when loaded (what the search reads); ``initial``: as
    for :func:`fact`."""
    return field(default=initial, metadata={"kind": "tensor", "doc": doc, "optional": optional, "numpy": numpy,
                                            "device": device})


def fact(doc: str, *, default: Any = dataclasses.MISSING, initial: Any = dataclasses.MISSING) -> Any:
    """A learned fact, saved in ``lakead.json`` (``default``: what older files without it mean;
    ``initial``: its value until the fit sets it, so a state can be made without it: a
    keyword-only state's field)."""
    return field(default=initial, metadata={"kind": "fact", "doc": doc, "default": default})


class LearnedState:
    """Base of a method's learned state (a dataclass of :func:`tensor` and :func:`fact` fields)."""

    @classmethod
    def names(cls, kind: str | None = None) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if kind is None or f.metadata["kind"] == kind)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The arrays as CPU tensors, by name (absent optional ones left out)."""
        out = {}
        for name in self.names("tensor"):
            v = getattr(self, name)
            if v is not None:
                out[name] = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu()
        return out

    def facts(self) -> dict[str, Any]:
        """The facts as JSON values (tuples as lists, an infinite float as null)."""
        out = {}
        for name in self.names("fact"):
            v = getattr(self, name)
            out[name] = list(v) if isinstance(v, tuple) else finite_or_none(v) if isinstance(v, float) else v
        return out

    @classmethod
    def from_files(cls, facts: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> "LearnedState":
        """From a saved model's ``lakead.json`` (as a dict) and tensors, converted by
        :meth:`convert` and checked by :meth:`check`."""
        values: dict[str, Any] = {}
        try:
            for f in dataclasses.fields(cls):
                if f.metadata["kind"] == "tensor":
                    t = tensors.get(f.name)
                    if t is None and not f.metadata["optional"]:
                        raise KeyError(f"tensor {f.name!r}")
                    values[f.name] = t.numpy() if (t is not None and f.metadata["numpy"]) else t
                elif f.name in facts:
                    values[f.name] = facts[f.name]
                elif f.metadata["default"] is not dataclasses.MISSING:
                    values[f.name] = f.metadata["default"]
                else:
                    raise KeyError(f.name)
            state = cls(**cls.convert(values))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ModelFormatError(f"{where}: saved model is incomplete or damaged (missing or bad {exc})") from None
        check_state(state, where)  # the rules of every field (finite, in range: lakead.validate)
        state.check(where)  # how this method's fields agree with each other
        return state

    @classmethod
    def convert(cls, values: dict[str, Any]) -> dict[str, Any]:
        """JSON values -> field values (tuples, floats...); raise ValueError/TypeError when bad.
        The facts every method's state has (``grid``, ``map_range``, ``threshold``: null is
        infinite) are converted here; a subclass converts its own after calling this."""
        names = cls.names("fact")
        if "grid" in names:
            values["grid"] = tuple(int(v) for v in values["grid"])
        if "map_range" in names:
            values["map_range"] = tuple(float(v) for v in values["map_range"])
        if "threshold" in names:
            values["threshold"] = math.inf if values["threshold"] is None else float(values["threshold"])
        return values

    def check(self, where: str) -> None:
        """Raise :class:`ModelFormatError` when the arrays and facts do not agree."""

    def to(self, device: torch.device) -> None:
        """Move the arrays the search reads (``tensor(device=True)``) to ``device``."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if f.metadata["kind"] == "tensor" and f.metadata["device"] and v is not None:
                setattr(self, f.name, v.to(device))

    def fingerprint(self) -> str:
        """sha256 of every learned array and the fit time (see :func:`lakead.api.tensor_fingerprint`)."""
        return tensor_fingerprint(self.tensors(), {"fitted_at": getattr(self, "fitted_at", None)})


@dataclass(kw_only=True)
class SupportRecord(LearnedState):
    """The facts of the support images every method keeps (part of a method's state)."""

    class_name: str = fact("what the images show")
    support: list[str] = fact("names of the support images kept")
    support_rule: str = fact("how the support images were chosen")
    skipped: list[str] = fact("support images that could not be read, with the reason")
    fitted_at: str = fact("UTC time of the fit")


@dataclass(kw_only=True)
class DecisionRecord(LearnedState):
    """The decision levels and the normal scores they come from (part of a method's state):
    the support images scored leave-one-out, from which :func:`lakead.decision.derive_thresholds`
    derives the levels for any false-alarm budget, again at predict without a refit
    (:meth:`lakead.base.BaseDetector.thresholds`)."""

    loo_scores: np.ndarray = tensor("(n,) float32: leave-one-out image scores of the support images (NaN: not scored)",
                                    numpy=True)
    loo_tokens: Optional[np.ndarray] = tensor("(T,) float32: leave-one-out token or map scores of the support images "
                                              "(the pixel level)", optional=True, numpy=True, initial=None)
    # the levels: set by BaseDetector.fit_levels at the end of a fit (initial values until then)
    threshold: float = fact("the decision threshold (inf: none could be derived)", initial=math.inf)
    threshold_rule: str = fact("how it was derived: conformal, exponential, gaussian, sigmas, fixed, none, or "
                               "uncalibrated (zero-shot, no normal image)", default="sigmas", initial="none")
    false_alarm_rate: Optional[float] = fact("the false-alarm budget it was derived for (None: sigmas or fixed)",
                                             default=None, initial=None)
    seed_threshold: Optional[float] = fact("the score a defect region must reach", default=None, initial=None)
    pixel_threshold: Optional[float] = fact("the score a defect region's pixels exceed", default=None, initial=None)
    map_range: tuple[float, float] = fact("(typical normal patch, decision level): the maps' colour scale",
                                          initial=(0.0, 1.0))
