"""What every ``transformers`` ViT adapter shares: loading, preprocessing, identity, the block loop.

A family adapter (:mod:`.dinov2`, :mod:`.siglip`) says which model classes it reads, how
pixels enter the first block (:meth:`HFViTBackbone._embed`), how one block is called
(:meth:`HFViTBackbone._call_block`) and how many leading tokens are not patches (class and
register tokens); the loop here runs the model's own submodules in order up to the deepest
block asked for, without hooks and without changing the model, so several threads may run
forwards at once (as :mod:`.clip` does).

Weights come from a Hugging Face hub id (downloaded and cached on first use) or a local
directory in the ``save_pretrained`` layout; preprocessing from the checkpoint's own
``preprocessor_config.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import BackboneUnavailableError, ConfigError
from .base import Backbone, BackboneInfo, Features, Layer, Preprocessing, as_blocks
from .clip import _preprocessing_from_config, _quiet_transformers
from .hub import hub_options


def unavailable(family: str, example: str, source: str, reason: str) -> BackboneUnavailableError:
    """The error for missing weights, naming both ways to provide them."""
    target = "./" + example.rsplit("/", 1)[-1]
    return BackboneUnavailableError(
        f"cannot load the {family} backbone {source!r}: {reason}\n"
        f"lakead loads {family} weights in one of two ways:\n"
        f"  1. a Hugging Face Hub id such as {example!r}, downloaded and cached on first use "
        "(needs network once; then works offline from ~/.cache/huggingface);\n"
        "  2. a local directory in the save_pretrained layout (config.json, model.safetensors, "
        "preprocessor_config.json, and the tokenizer files of a model with a text tower), for machines "
        "without network. Make one where there is network with:\n"
        f"       lakead download-backbone {example} {target}\n"
        f"     then pass --backbone {target} (or backbone='{target}')."
    )


def image_size_from_config(cfg: dict, where: str, patch_size: int) -> tuple[Preprocessing, int | None]:
    """Preprocessing and native input size from a ``preprocessor_config.json`` dict: ``crop_size``,
    ``size.shortest_edge``, ``size.height`` or (SigLIP 2 NaFlex) ``max_num_patches`` patches."""
    prep, size = _preprocessing_from_config(cfg, where)
    if size is None and isinstance(cfg.get("size"), dict) and "height" in cfg["size"]:
        size = int(cfg["size"]["height"])
    if size is None and cfg.get("max_num_patches"):
        size = math.isqrt(int(cfg["max_num_patches"])) * patch_size
    return prep, size


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its processor config, its tokenizer (or None), its source."""

    model: nn.Module
    processor: dict
    tokenizer: Any
    source: str


def load_checkpoint(
    source: str, *, family: str, example: str, classes: dict[str, str], need_tokenizer: bool
) -> Checkpoint:
    """Load a hub id or a ``save_pretrained`` directory whose ``model_type`` is a key of
    ``classes`` (-> the ``transformers`` class name), with its processor config and, when
    ``need_tokenizer``, its tokenizer. Missing weights raise :func:`unavailable`."""
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise unavailable(family, example, source, "it is a file, not a directory")
        if not (local / "config.json").is_file():
            raise unavailable(family, example, source, "the directory has no config.json (not a save_pretrained directory)")
        source = str(local.resolve())  # recorded absolute: models may be used from elsewhere
    with _quiet_transformers():
        import transformers
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import cached_file

        hub = hub_options(source, family=family, example=example)  # local_files_only without network; not cached: one message at once
        try:
            config = AutoConfig.from_pretrained(source, **hub)
        except (OSError, ValueError) as exc:
            where = "the local directory is unreadable" if local.exists() else (
                "it is not a local directory, and the Hugging Face Hub could not provide it")
            raise unavailable(family, example, source, f"{where} ({str(exc).splitlines()[0]})") from None
        model_type = getattr(config, "model_type", None)
        if model_type not in classes:
            raise ConfigError(
                f"{source}: is a {model_type!r} model; the {family} adapter reads model_type "
                f"{' or '.join(map(repr, classes))} (use --backbone onnx:PATH for other image models)"
            )
        try:
            model = getattr(transformers, classes[model_type]).from_pretrained(source, dtype=torch.float32, **hub)
            prep_file = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False, **hub)
        except (OSError, ValueError) as exc:
            raise unavailable(family, example, source, f"loading its files failed ({str(exc).splitlines()[0]})") from None
        if prep_file is None:
            raise unavailable(family, example, source, "it has no preprocessor_config.json (save the image processor with it)")
        tokenizer = None
        if need_tokenizer:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, **hub)
            except (OSError, ValueError, TypeError) as exc:
                raise unavailable(family, example, source, f"its tokenizer could not be loaded ({str(exc).splitlines()[0]})") from None
    return Checkpoint(model, json.loads(Path(prep_file).read_text()), tokenizer, source)


def weights_fingerprint(module: nn.Module, facts: Sequence[int]) -> str:
    """sha256 over the first 256 values of every parameter of ``module`` (in name order) and
    the architecture ``facts``: cheap, and two models that differ in any tensor differ here."""
    digest = hashlib.sha256(json.dumps(list(facts)).encode())
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        digest.update(name.encode())
        digest.update(p.detach().reshape(-1)[:256].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


class HFViTBackbone(Backbone):
    """A frozen ``transformers`` ViT read at intermediate blocks (numbered 1..L, block ``l``
    being the output of the l-th transformer block, ``output_hidden_states[l]``).

    Subclasses set :attr:`kind`, :attr:`CLASSES`, :attr:`EXAMPLE`, :attr:`FAMILY` and write
    :meth:`_vision`, :meth:`_layers`, :meth:`_embed` and :meth:`_call_block`; a family with a
    text tower writes :meth:`to_joint` and the text methods too.
    """

    kind: ClassVar[str] = "vit"
    FAMILY: ClassVar[str] = "ViT"
    EXAMPLE: ClassVar[str] = ""
    #: ``model_type`` -> ``transformers`` class name
    CLASSES: ClassVar[dict[str, str]] = {}
    supports_autocast = True

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing,
        *,
        tokenizer=None,
        source: str | None = None,
        image_size: int | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.preprocessing = preprocessing
        self.tokenizer = tokenizer
        vision = self._vision()
        vcfg = vision.config
        patch = vcfg.patch_size
        self.patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.num_layers = len(self._layers())
        self.width = int(vcfg.hidden_size)
        self.prefix_tokens = self._prefix_tokens()
        self.has_text = self._has_text()
        native = image_size or self._native_size()
        self.info = BackboneInfo(
            kind=self.kind,
            source=source or f"<in-memory {type(model).__name__}>",
            num_layers=self.num_layers,
            patch_size=self.patch,
            image_size=int(native),
            joint_dim=self._joint_dim(),
            fingerprint=weights_fingerprint(vision, [self.width, self.num_layers, self.patch]),
        )
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, source: str, *, need_text: bool = True) -> "HFViTBackbone":
        """Load from a hub id (cached on first use) or a local ``save_pretrained`` directory.
        With ``need_text=False`` a text tower is dropped after loading (a fitted model has its
        prompt embeddings already)."""
        ckpt = load_checkpoint(source, family=cls.FAMILY, example=cls.EXAMPLE, classes=cls.CLASSES,
                               need_tokenizer=need_text and cls._text_family())
        model = ckpt.model
        if not need_text and getattr(model, "text_model", None) is not None:
            model.text_model = None
        vcfg = getattr(model.config, "vision_config", model.config)
        patch = vcfg.patch_size
        prep, size = image_size_from_config(ckpt.processor, ckpt.source, int(patch[0] if isinstance(patch, (tuple, list)) else patch))
        return cls(model, prep, tokenizer=ckpt.tokenizer, source=ckpt.source, image_size=size)

    # -- what a family says -------------------------------------------------------------------

    @classmethod
    def _text_family(cls) -> bool:
        return False

    def _vision(self) -> nn.Module:
        return self.model

    def _layers(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def _prefix_tokens(self) -> int:
        """Tokens before the patch tokens (class, registers)."""
        return 0

    def _has_text(self) -> bool:
        return False

    def _joint_dim(self) -> int | None:
        return None

    def _native_size(self) -> int:
        size = self._vision().config.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def _embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``(B, 3, S, S)`` pixels -> the first block's input ``(B, P + N, D)`` (the model's
        ``hidden_states[0]``) and what every block call needs besides (masks, rotary tables)."""
        raise NotImplementedError

    def _call_block(self, block: nn.Module, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        out = block(hidden, None)
        return out[0] if isinstance(out, tuple) else out

    def to_joint(self, tokens: torch.Tensor) -> torch.Tensor:
        raise ConfigError(f"backbone {self.info.source!r} has no text tower: there is no joint image-text space")

    # -- blocks -------------------------------------------------------------------------------

    def resolve_layer(self, layer: Layer | None, *, semantic: bool = False) -> int:
        """A block number 1..L; None is the default (3/4 of the depth; the last block for the
        text probe)."""
        if semantic and self.info.joint_dim is None:  # a joint space (kept when a fitted model drops the text tower)
            raise ConfigError(f"backbone {self.info.source!r} has no text tower: there is no semantic layer")
        if layer is None:
            return self.num_layers if semantic else int(self.default_layer())
        if isinstance(layer, str):
            if not layer.strip().lstrip("-").isdigit():
                raise ConfigError(f"layer {layer!r}: {self.FAMILY} blocks are numbered 1..{self.num_layers}")
            layer = int(layer)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= self.num_layers:
            what = "semantic_layer" if semantic else "layer"
            raise ConfigError(
                f"{what} {layer} is out of range: this {self.FAMILY} has blocks 1..{self.num_layers} "
                f"(the default, 3/4 of the depth, is block {self.default_layer()}; lakead layers {self.info.source} lists them)"
            )
        return layer

    def grid_size(self, image_size: int) -> tuple[int, int]:
        g = image_size // self.patch
        return (g, g)

    @torch.inference_mode()
    def extract(self, pixels: torch.Tensor, blocks: Sequence[Layer], joint_block: Layer | None = None) -> Features:
        """Blocks' patch tokens (class and register tokens dropped), by running the model's own
        submodules in order up to the deepest block asked for. Any square input size that is
        a multiple of the patch size: position embeddings are interpolated (or rotary)."""
        blocks = as_blocks(blocks)
        if joint_block is not None and self.info.joint_dim is None:
            raise ConfigError(f"backbone {self.info.source!r} has no text tower: there is no semantic layer")
        wanted = {int(b) for b in blocks} | ({int(joint_block)} if joint_block is not None else set())
        dtype = next(self.model.parameters()).dtype
        hidden, ctx = self._embed(pixels.to(self.device, dtype))  # (B, P + N, D)
        outputs: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self._layers()[: max(wanted)], start=1):
            hidden = self._call_block(block, hidden, ctx)  # (B, P + N, D)
            if i in wanted:
                outputs[i] = hidden
        grid = (pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch)
        p = self.prefix_tokens
        feats = {b: outputs[int(b)][:, p:, :].float() for b in blocks}  # (B, N, D) each
        joint = None
        if joint_block is not None:
            joint = self.to_joint(outputs[int(joint_block)][:, p:, :]).float()  # (B, N, E)
        return Features(blocks=feats, grids={b: grid for b in blocks}, joint=joint,
                        joint_grid=grid if joint is not None else None)

    def to(self, device: torch.device | str) -> "HFViTBackbone":
        self.model.to(device)
        self.device = torch.device(device)
        return self
