"""The small protocol every backbone adapter implements.

A backbone turns a batch of RGB images into patch tokens of one block (the visual branch)
and, when it has a text tower, patch tokens mapped into the joint image-text space (the
semantic branch). The detector knows nothing else about the network.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError

#: A block of the network: a 1-based block number for transformers, a tensor name for ONNX.
Layer = Union[int, str]


def parse_layer(value: str | None) -> Layer | None:
    """A layer as typed by a user (command line, form field): block numbers become integers;
    ONNX tensor names stay strings."""
    if value is None:
        return None
    v = value.strip()
    return int(v) if v.lstrip("-").isdigit() else v


@dataclass(frozen=True)
class BackboneInfo:
    """What identifies a backbone; saved with every model and checked when it is loaded."""

    kind: str  # adapter family: "clip" or "onnx"
    source: str  # how it was given: a hub id, a local directory or an ONNX file
    num_layers: int  # number of blocks that can be read (0 when blocks are named tensors)
    patch_size: int  # pixels per token side at the input resolution
    image_size: int  # the model's own input size (square)
    joint_dim: int | None  # width of the image-text space, None without a text tower
    fingerprint: str  # sha256 over a slice of the weights: two different models differ here

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def same_model(self, other: "BackboneInfo") -> bool:
        """True when both describe the same architecture and weights (the source may differ)."""
        keys = ("kind", "num_layers", "patch_size", "joint_dim", "fingerprint")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


@dataclass(frozen=True)
class Preprocessing:
    """How pixels are prepared, read from the model's own processor config."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int  # a PIL.Image.Resampling value (3 = bicubic)
    rescale: float = 1.0 / 255.0

    def __call__(self, images: Sequence[np.ndarray], size: int) -> torch.Tensor:
        """``B`` uint8 ``(H, W, 3)`` arrays -> float32 ``(B, 3, size, size)``.

        The whole image is resized to ``size x size`` (no centre crop, so every pixel of the
        input is scored; the map is resized back to the image's own height and width).
        """
        batch = np.empty((len(images), size, size, 3), dtype=np.float32)  # (B, S, S, 3)
        for i, arr in enumerate(images):
            im = Image.fromarray(arr)
            if im.size != (size, size):
                im = im.resize((size, size), resample=Image.Resampling(self.resample))
            batch[i] = np.asarray(im, dtype=np.float32)
        batch *= self.rescale
        batch -= np.asarray(self.mean, dtype=np.float32)
        batch /= np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)


@dataclass(frozen=True)
class Features:
    """Block outputs for a batch.

    ``visual``: patch tokens of the visual block, class token dropped, ``(B, N, D)``.
    ``joint``: patch tokens of the semantic block mapped into the image-text space,
    ``(B, N, E)``, or None when no semantic block was asked for or there is no text tower.
    ``grid``: ``(gh, gw)`` with ``gh * gw == N``.
    """

    visual: torch.Tensor
    joint: torch.Tensor | None
    grid: tuple[int, int]


class Backbone(abc.ABC):
    """A frozen image model that can be read at an intermediate block."""

    info: BackboneInfo
    preprocessing: Preprocessing
    has_text: bool
    device: torch.device

    @abc.abstractmethod
    def resolve_layer(self, layer: Layer | None, *, semantic: bool = False) -> Layer:
        """Check a block reference and return it in canonical form; None means the default."""

    @abc.abstractmethod
    def extract(self, pixels: torch.Tensor, layer: Layer, semantic_layer: Layer | None) -> Features:
        """Run the network on ``(B, 3, S, S)`` pixels, only as deep as the blocks asked for."""

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> ``(P, E)`` embeddings in the joint space (not normalised)."""
        raise ConfigError(f"backbone {self.info.source!r} has no text tower")

    @property
    def logit_scale(self) -> float:
        raise ConfigError(f"backbone {self.info.source!r} has no text tower")

    def grid_size(self, image_size: int) -> tuple[int, int]:
        """Token grid ``(gh, gw)`` for a square input of ``image_size`` pixels."""
        g = image_size // self.info.patch_size
        return (g, g)

    def check_image_size(self, image_size: int) -> int:
        p = self.info.patch_size
        if image_size < p or image_size % p:
            lower = max(p, image_size // p * p)
            raise ConfigError(
                f"image_size {image_size} must be a positive multiple of the patch size {p} "
                f"(for example {lower} or {lower + p})"
            )
        return image_size

    def to(self, device: torch.device | str) -> "Backbone":
        self.device = torch.device(device)
        return self
