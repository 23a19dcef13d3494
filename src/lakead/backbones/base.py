"""The small protocol every backbone adapter implements.

A backbone turns a batch of RGB images into patch tokens of one or several blocks (the
visual branch) and, when it has a text tower, patch tokens of one block mapped into the
joint image-text space (the semantic branch). It runs the network only as deep as the
deepest block asked for, without changing the model, so several threads may call it at
once. The detector knows nothing else about the network.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..fields import BLOCK_SEPARATORS, Layer, LayerSpec, as_blocks, default_k, parse_layer  # noqa: F401 - re-exported
from ..images import preprocess
from ..ops import anomaly_probability

@dataclass(frozen=True)
class BackboneInfo:
    """What identifies a backbone; saved with every model and checked when it is loaded."""

    kind: str  # adapter family: "clip", "dinov2", "siglip", ... or "onnx"
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
        return torch.from_numpy(preprocess(images, size, self.mean, self.std, self.resample, self.rescale))  # (B, 3, S, S)


@dataclass(frozen=True)
class Features:
    """Block outputs for a batch.

    ``blocks``: for each block asked for, its patch tokens (class and register tokens
    dropped), ``(B, N_b, D_b)`` float32. ``grids``: each block's token grid ``(gh, gw)``,
    ``gh * gw == N_b``. ``joint``: patch tokens of the semantic block mapped into the
    image-text space, ``(B, N, E)``, or None when no semantic block was asked for;
    ``joint_grid`` its grid.
    """

    blocks: dict[Layer, torch.Tensor]
    grids: dict[Layer, tuple[int, int]]
    joint: torch.Tensor | None = None
    joint_grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class WindowFeatures:
    """What WinCLIP reads of a batch (:meth:`Backbone.window_embeddings`).

    ``image``: the image embedding in the joint space ``(B, E)`` (CLIP's own: the class token
    after the last block, post-layernorm, projection; not normalised). ``windows``: for each
    set of windows asked for, ``(B, nw, E)``: the class token's embedding when the tower sees
    only the class token and that window's patches. ``blocks`` / ``grid``: patch tokens
    ``(B, N, D)`` of the blocks asked for, from the full-image forward, on the patch grid.
    """

    image: torch.Tensor
    windows: list[torch.Tensor]
    blocks: dict[Layer, torch.Tensor]
    grid: tuple[int, int]


@dataclass(frozen=True)
class LayerInfo:
    """One block ``--layer`` can read (``lakead layers BACKBONE`` lists them)."""

    name: str  # what --layer takes: a block number, or an ONNX tensor name
    channels: int  # width of its tokens
    grid: tuple[int, int]  # (H, W) tokens at the model's own input size
    note: str = ""  # e.g. how a quantized tensor is read


class Backbone(abc.ABC):
    """A frozen image model that can be read at intermediate blocks."""

    info: BackboneInfo
    preprocessing: Preprocessing
    has_text: bool
    device: torch.device
    #: True for torch models: ``torch.autocast`` (bfloat16) applies to their forward.
    supports_autocast: bool = False
    #: Channels of a block's tokens (the same for every block of a ViT); None when it depends
    #: on the block read (ONNX tensors).
    width: int | None = None

    def default_layer(self) -> Layer:
        """The visual block read when none is given: 3/4 of the depth, as the paper's block 18
        of 24 (block 9 of 12 on a ViT-B). Backbones without numbered blocks have none."""
        n = self.info.num_layers
        if n < 1:
            raise ConfigError(f"backbone {self.info.source!r} has no default block: give one (--layer)")
        return max(1, round(0.75 * n))

    def default_k(self) -> int | None:
        """Sensitive neurons kept by default at this backbone's width (:func:`lakead.fields.default_k`:
        the paper's 100 per 1024 channels, at least 100, every channel of a narrower block); None
        when the width depends on the block read (ONNX)."""
        if not self.width:
            return None
        return default_k(self.width)

    def layers(self) -> list[LayerInfo]:
        """Every block ``--layer`` can read, in the network's order (numbered blocks: 1..L, all
        of the same width and grid; ONNX overrides this with its tensors)."""
        grid = self.grid_size(self.info.image_size)
        return [LayerInfo(str(i), int(self.width or 0), grid) for i in range(1, self.info.num_layers + 1)]

    @abc.abstractmethod
    def resolve_layer(self, layer: Layer | None, *, semantic: bool = False) -> Layer:
        """Check a block reference and return it in canonical form; None means the default."""

    @abc.abstractmethod
    def extract(self, pixels: torch.Tensor, blocks: Sequence[Layer], joint_block: Layer | None = None) -> Features:
        """Run the network on ``(B, 3, S, S)`` pixels, only as deep as the blocks asked for:
        the tokens of each of ``blocks`` and, when ``joint_block`` is given, that block's
        tokens in the image-text space. Never changes the model (thread-safe)."""

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> ``(P, E)`` embeddings in the joint space (not normalised)."""
        raise ConfigError(f"backbone {self.info.source!r} has no text tower")

    @property
    def logit_scale(self) -> float:
        raise ConfigError(f"backbone {self.info.source!r} has no text tower")

    def text_probability(self, joint_tokens: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Per-token P(anomalous) of the text probe, ``(B, N, E)`` joint tokens and ``(2, E)``
        prompt embeddings (row 0 normal, row 1 anomalous) -> ``(B, N)``.

        The default is CLIP's (Eq. 11-12): both sides L2-normalised, the two cosine similarities
        scaled by :attr:`logit_scale`, softmax over the two prompts
        (:func:`lakead.ops.anomaly_probability`). A family trained with another contrastive loss
        overrides it (SigLIP: sigmoid with its bias).
        """
        return anomaly_probability(joint_tokens, text_embeddings, self.logit_scale)

    def window_embeddings(self, pixels: torch.Tensor, windows: Sequence[torch.Tensor], start_block: int = 0,
                          blocks: Sequence[Layer] = ()) -> WindowFeatures:
        """WinCLIP's multi-scale features of ``(B, 3, S, S)`` pixels: the image embedding, and
        for each ``(nw, k)`` int64 table of patch indices (row-major on the patch grid) the
        embeddings of its windows, each computed by running the tower from ``start_block`` on
        the class token and the window's ``k`` patch tokens only (see :class:`WindowFeatures`).
        Families with a class token and a joint projection implement it (CLIP)."""
        raise ConfigError(f"backbone {self.info.source!r} ({self.info.kind}) has no class token to embed windows with: "
                          "WinCLIP needs a CLIP backbone")

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
