"""What a fitted LAKE detector has learned, declared once.

:class:`LakeState` lists every learned tensor and fact. Saving, loading, the fingerprint
that ``predict --resume`` compares, and the detector's ``name_`` attributes all come from
this one list: a new piece of state is one new field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..api import finite_or_none, tensor_fingerprint
from ..backbones.base import Layer, LayerSpec
from ..errors import ModelFormatError


def tensor(doc: str, *, optional: bool = False) -> Any:
    """A learned array, saved in ``tensors.safetensors``."""
    return field(metadata={"kind": "tensor", "doc": doc, "optional": optional})


def fact(doc: str) -> Any:
    """A learned fact, saved in ``lakead.json``."""
    return field(metadata={"kind": "fact", "doc": doc})


@dataclass
class LakeState:
    """Everything :meth:`LakeDetector.fit` learns (shapes: n support images, N tokens each,
    D channels of the visual block(s), K sensitive neurons, M = n * N gallery vectors)."""

    # -- arrays (tensors.safetensors) --
    neurons: torch.Tensor = tensor("(K,) int64: the sensitive neurons, channel indices of the visual tokens")
    channel_variance: torch.Tensor = tensor("(D,) float64: variance of each channel over all support tokens (Eq. 3)")
    gallery: torch.Tensor = tensor("(M, K) float32: every support token in the sensitive subspace (Eq. 5-6)")
    gallery_image: torch.Tensor = tensor("(M,) int32: which support image each gallery vector comes from")
    loo_visual: np.ndarray = tensor("(n,) float32: leave-one-out visual scores of the support images (NaN: not scored)")
    loo_semantic: np.ndarray = tensor("(n,) float32: text-probe scores of the support images")
    loo_scores: np.ndarray = tensor("(n,) float32: leave-one-out fused scores (what the threshold is derived from)")
    text_embeddings: torch.Tensor | None = tensor("(2, E) float32: normalised normal / anomalous prompt embeddings", optional=True)
    # -- facts (lakead.json) --
    layer: LayerSpec = fact("the visual block(s) read, in the backbone's canonical form")
    semantic_layer: Layer | None = fact("the text probe's block; None when the probe is off")
    image_size: int = fact("square input size in pixels")
    grid: tuple[int, int] = fact("(gh, gw) token grid of the visual tokens")
    width: int = fact("D, channels of the visual tokens")
    visual_scale: float = fact("what visual distances are divided by (score_norm)")
    threshold: float = fact("the decision threshold (inf: none could be derived)")
    map_range: tuple[float, float] = fact("(typical normal patch, visual decision level): the maps' colour scale")
    class_name: str = fact("what the images show")
    prompts: list[str] | None = fact("the normal and anomalous prompts; None when the probe is off")
    logit_scale: float | None = fact("CLIP's logit scale; None when the probe is off")
    support: list[str] = fact("names of the support images kept")
    support_rule: str = fact("how the support images were chosen")
    skipped: list[str] = fact("support images that could not be read, with the reason")
    outliers: list[str] = fact("support images dropped by filter_outliers")
    fitted_at: str = fact("UTC time of the fit")

    @classmethod
    def names(cls, kind: str | None = None) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if kind is None or f.metadata["kind"] == kind)

    # -- files ------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """The arrays as CPU tensors, by name (absent optional ones left out)."""
        out = {}
        for name in self.names("tensor"):
            v = getattr(self, name)
            if v is not None:
                out[name] = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu()
        return out

    def facts(self) -> dict[str, Any]:
        """The facts as JSON values."""
        out = {name: getattr(self, name) for name in self.names("fact")}
        out["grid"] = list(self.grid)
        out["map_range"] = list(self.map_range)
        out["threshold"] = finite_or_none(self.threshold)
        return out

    @classmethod
    def from_files(cls, facts: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> "LakeState":
        """From a saved model's ``lakead.json`` (as a dict) and tensors; checks that they fit together."""
        values: dict[str, Any] = {}
        try:
            for f in dataclasses.fields(cls):
                if f.metadata["kind"] == "tensor":
                    t = tensors.get(f.name)
                    if t is None and not f.metadata["optional"]:
                        raise KeyError(f"tensor {f.name!r}")
                    values[f.name] = t.numpy() if (t is not None and f.name.startswith("loo_")) else t
                elif f.name == "outliers":
                    values[f.name] = list(facts.get("outliers", []))  # absent from models saved before the filter existed
                else:
                    values[f.name] = facts[f.name]
            values["grid"] = tuple(int(v) for v in values["grid"])
            values["map_range"] = tuple(float(v) for v in values["map_range"])
            values["threshold"] = math.inf if values["threshold"] is None else float(values["threshold"])
            values["image_size"] = int(values["image_size"])
            values["width"] = int(values["width"])
            values["visual_scale"] = float(values["visual_scale"])
            for name in ("support", "skipped"):
                values[name] = list(values[name])
            values["support_rule"] = str(values["support_rule"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{where}: saved model is incomplete or damaged (missing or bad {exc})") from None
        state = cls(**values)
        state.check(where)
        return state

    def check(self, where: str) -> None:
        """Raise :class:`ModelFormatError` when the arrays and facts do not agree."""
        k = self.neurons.numel()
        problems = []
        if self.gallery.ndim != 2 or self.gallery.shape[1] != k or self.gallery.shape[0] == 0:
            problems.append(f"gallery {tuple(self.gallery.shape)} for {k} neurons")
        if self.channel_variance.numel() != self.width:
            problems.append(f"{self.channel_variance.numel()} channel variances for width {self.width}")
        if k and (int(self.neurons.min()) < 0 or int(self.neurons.max()) >= self.width):
            problems.append(f"neuron indices outside 0..{self.width - 1}")
        if not math.isfinite(self.visual_scale) or self.visual_scale <= 0:
            problems.append(f"visual_scale {self.visual_scale}")
        if math.isnan(self.threshold):
            problems.append("threshold NaN")
        if problems:
            raise ModelFormatError(f"{where}: tensors and facts do not agree with each other ({'; '.join(problems)})")

    def fingerprint(self) -> str:
        """sha256 of every learned array and the fit time (see :func:`lakead.api.tensor_fingerprint`)."""
        return tensor_fingerprint(self.tensors(), {"fitted_at": self.fitted_at})
