"""The options of the WinCLIP detectors (WinCLIP, WinCLIP+, WinCLIP+LAKE): saved with the model.

Options that LAKE also has (``backbone``, ``image_size``, ``k``, ``layer``, the decision
options) have the same name, type, default and meaning as in :class:`lakead.methods.lake.LakeConfig`,
so one command line or form serves every method (a test checks it); those every method has are
declared once in :data:`lakead.fields.SHARED_OPTIONS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

from ...fields import Layer, LayerSpec, Options, ThresholdRule, as_blocks, option, shared_option
from ...errors import ConfigError


@dataclass
class WinCLIPConfig(Options):
    """Every option of a :class:`~lakead.methods.winclip.detector.WinCLIPDetector`."""

    backbone: str = shared_option("backbone")
    reference: Literal["none", "winclip", "lake"] = option(
        "none", "Set by --method (winclip: none, winclip+: winclip, winclip+lake: lake). What the normal images "
        "add to WinCLIP's text maps: none (WinCLIP, zero-shot), winclip (WinCLIP+: "
        "reference association of windows and patches, full width) or lake (WinCLIP+LAKE: LAKE's sensitive-neuron "
        "gallery and distances).")
    window_sizes: str = option("2,3", "WinCLIP window sides in patches, comma-separated (the paper: 2 and 3); the whole "
                                      "image is always a scale too.")
    window_start_block: int = option(
        0, "Windows: the tower runs on the class token and each window's patches from this block on "
           "(0: from the embeddings, the paper; higher: cheaper, an approximation).")
    temperature: float = option(0.07, "Temperature of WinCLIP's text softmax (Eq. 1).")
    text_score: Literal["class", "class+map"] = option(
        "class", "Text part of the image score: the class token's P(anomalous) (class) or the mean of it and the "
                 "zero-shot map's maximum (class+map).")
    patch_layer: Optional[Layer] = option(None, "WinCLIP+: block whose patch tokens are associated (default: the last).")
    fusion_weight: float = option(
        0.5, "Weight w of the visual part: map = (1 - w) * text map + w * visual map, score = (1 - w) * text score + "
             "w * max of the visual map (WinCLIP+: 1/2).")
    lake_fusion: Literal["replace", "add"] = option(
        "replace", "WinCLIP+LAKE: LAKE's map replaces WinCLIP+'s association (replace) or is averaged with it (add).")
    k: Union[int, Literal["auto"], None] = option(
        None, "WinCLIP+LAKE: sensitive neurons kept (as LAKE: default 100 per 1024 channels, at least 100; auto: the knee).")
    layer: Optional[LayerSpec] = option(
        None, "WinCLIP+LAKE: block(s) of LAKE's gallery (as LAKE: default 3/4 of the depth).")
    false_alarm_rate: float = shared_option("false_alarm_rate")  # the decision options: lakead.fields.SHARED_OPTIONS
    threshold_rule: ThresholdRule = shared_option("threshold_rule")
    threshold: Optional[float] = shared_option("threshold")
    threshold_sigmas: float = shared_option("threshold_sigmas")
    image_size: Optional[int] = shared_option("image_size")

    @property
    def sizes(self) -> tuple[int, ...]:
        """The window sides as integers (checked by :meth:`validate`)."""
        return tuple(int(v) for v in str(self.window_sizes).replace("+", ",").split(",") if v.strip())

    @property
    def blocks(self) -> tuple[Layer | None, ...]:
        return (None,) if self.layer is None else as_blocks(self.layer)

    def validate(self) -> "WinCLIPConfig":
        super().validate()
        self.check_shared()  # backbone, image_size and the decision options
        try:
            sizes = self.sizes
        except ValueError:
            raise ConfigError(f"window_sizes must be comma-separated integers such as 2,3, got {self.window_sizes!r}") from None
        if any(s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
            raise ConfigError(f"window_sizes must be distinct positive integers, got {self.window_sizes!r}")
        if isinstance(self.window_start_block, bool) or not isinstance(self.window_start_block, int) or self.window_start_block < 0:
            raise ConfigError(f"window_start_block must be an integer >= 0, got {self.window_start_block!r}")
        for name, low, high in (("temperature", 0.0, math.inf), ("fusion_weight", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high \
                    or (name == "temperature" and v == 0):
                raise ConfigError(f"{name} must be a number in [{low}, {high}]{' above 0' if name == 'temperature' else ''}, got {v!r}")
        if self.k not in ("auto", None) and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ConfigError(f"k must be a positive integer or 'auto', got {self.k!r}")
        self.blocks  # noqa: B018 - raises on an empty or repeated list
        return self
