"""The options of the memory-bank methods (PatchCore, AnomalyDINO) and of the subspace method, without torch: the
command line builds its options from these classes (``lakead --help`` does not import torch);
the detectors are in :mod:`lakead.methods.bank`, :mod:`lakead.methods.patchcore` and :mod:`lakead.methods.anomalydino`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError
from ..fields import IndexKind, Layer, LayerSpec, Options, ThresholdRule, as_blocks, option, shared_option


def _number(name: str, v: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > high \
            or (v <= low if open_low else v < low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ConfigError(f"{name} must be a number in {bound}, got {v!r}")


@dataclass
class BankConfig(Options):
    """The options every memory-bank method has (decision options as LAKE's)."""

    backbone: str = shared_option("backbone")
    layer: Optional[LayerSpec] = option(
        None, "Block(s) read: 1-based block numbers or ONNX tensor names, several as 12,18 or a+b "
        "(default: the method's; ONNX models need them given).")
    image_size: Optional[int] = shared_option("image_size")
    blur_sigma: float = option(4.0, "Gaussian smoothing of the maps, in pixels of the model input (both papers: 4; 0: off).")
    seed: int = option(0, "Seed of the coreset's first vector.")
    false_alarm_rate: float = shared_option("false_alarm_rate")  # the decision options: lakead.fields.SHARED_OPTIONS
    threshold_rule: ThresholdRule = shared_option("threshold_rule")
    threshold: Optional[float] = shared_option("threshold")
    threshold_sigmas: float = shared_option("threshold_sigmas")
    index: IndexKind = shared_option("index")
    hnsw_ef_search: int = shared_option("hnsw_ef_search")

    @property
    def blocks(self) -> tuple[Layer | None, ...]:
        return (None,) if self.layer is None else as_blocks(self.layer)

    def validate(self) -> "BankConfig":
        super().validate()
        self.check_shared()  # backbone, image_size, the decision and index options
        self.blocks  # noqa: B018 - raises on an empty or repeated list
        _number("blur_sigma", self.blur_sigma, 0.0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        return self


@dataclass
class PatchCoreConfig(BankConfig):
    """Every option of a :class:`PatchCoreDetector`; saved as JSON with the model."""

    coreset: float = option(0.1, "Share of the support patch features kept in the memory bank by greedy coreset "
                                 "subsampling, in (0, 1] (1: all; the paper: 0.1, 0.01).")
    width: Optional[int] = option(None, "Channels of the patch features: each block is projected to this width by "
                                        "adaptive average pooling (default: the paper's 1024, or the blocks' summed "
                                        "width when that is smaller).")
    neighbourhood: int = option(3, "Side of the square neighbourhood each patch feature averages (the paper's p = 3; 1: none).")
    neighbours: int = option(9, "Bank vectors near the nearest one that the image score's reweighting compares "
                                "(Eq. 7; the b of the paper, 9 in common implementations; 1: no reweighting, the max).")

    def validate(self) -> "PatchCoreConfig":
        super().validate()
        c = self.coreset
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            raise ConfigError(f"coreset must be a share in (0, 1], got {c!r}")
        for name in ("neighbourhood", "neighbours", "width"):
            v = getattr(self, name)
            if v is None and name == "width":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.neighbourhood % 2 == 0:
            raise ConfigError(f"neighbourhood must be odd (a patch and its neighbours on each side), got {self.neighbourhood}")
        return self


@dataclass
class AnomalyDinoConfig(BankConfig):
    """Every option of an :class:`AnomalyDinoDetector`; saved as JSON with the model."""

    top_percent: float = option(1.0, "Image score: the mean of the top percent of the patch scores (the paper: 1).")
    mask_background: bool = option(False, "Zero-shot background masking from the first principal component of "
                                          "the support patches (for objects on a plain background).")
    mask_threshold: float = option(0.0, "With mask_background: the projection on the first principal component, in "
                                        "standard deviations, above which a patch is foreground (0: the mean).")
    rotations: bool = option(False, "Add the support images rotated by 90, 180 and 270 degrees to the memory bank.")

    def validate(self) -> "AnomalyDinoConfig":
        super().validate()
        p = self.top_percent
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
            raise ConfigError(f"top_percent must be a number in (0, 100], got {p!r}")
        t = self.mask_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ConfigError(f"mask_threshold must be a finite number, got {t!r}")
        for name in ("mask_background", "rotations"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        return self


@dataclass
class SubspaceConfig(Options):
    """Every option of a :class:`~lakead.methods.subspace.SubspaceDetector`; saved as JSON with the model."""

    backbone: str = shared_option("backbone")
    layer: Optional[LayerSpec] = option(
        None, "Block(s) read: 1-based block numbers or ONNX tensor names, several as 12,18 or a+b, concatenated on "
        "the coarsest grid (default: the last block; ONNX models need them given).")
    image_size: Optional[int] = shared_option("image_size")
    variance_kept: float = option(0.99, "Share of the normal patch features' variance the principal subspace explains, "
                                        "in (0, 1): the fewest top directions that reach it (SubspaceAD: 0.99).")
    top_percent: float = option(1.0, "Image score: the mean of the top percent of the patch scores (1: AnomalyDINO's).")
    blur_sigma: float = option(4.0, "Gaussian smoothing of the maps, in pixels of the model input (0: off).")
    false_alarm_rate: float = shared_option("false_alarm_rate")  # the decision options: lakead.fields.SHARED_OPTIONS
    threshold_rule: ThresholdRule = shared_option("threshold_rule")
    threshold: Optional[float] = shared_option("threshold")
    threshold_sigmas: float = shared_option("threshold_sigmas")

    @property
    def blocks(self) -> tuple[Layer | None, ...]:
        return (None,) if self.layer is None else as_blocks(self.layer)

    def validate(self) -> "SubspaceConfig":
        super().validate()
        self.check_shared()  # backbone, image_size and the decision options
        self.blocks  # noqa: B018 - raises on an empty or repeated list
        _number("variance_kept", self.variance_kept, 0.0, open_low=True)
        if self.variance_kept >= 1:
            raise ConfigError(f"variance_kept must be below 1 (at 1 no residual is left), got {self.variance_kept!r}")
        _number("top_percent", self.top_percent, 0.0, 100.0, open_low=True)
        _number("blur_sigma", self.blur_sigma, 0.0)
        return self
