"""CLIP through Hugging Face ``transformers`` (Radford et al., 2021).

Blocks are read by running the vision tower's own public submodules in order (embeddings,
``pre_layrnorm``, then the encoder's blocks), stopping after the deepest block asked for: the
same arithmetic as the model's forward (its ``hidden_states`` are these tensors; a test checks
it exactly), without hooks, without changing the model and without a lock, so several
threads may run forwards at once. Patch tokens of the semantic block enter the joint
image-text space exactly as CLIP maps its class token: ``post_layernorm`` then
``visual_projection``. Preprocessing (mean, std, interpolation, size) comes from the
model's own ``preprocessor_config.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneUnavailableError, ConfigError
from ..fields import DEFAULT_CLIP
from .base import Backbone, BackboneInfo, Features, Layer, Preprocessing, WindowFeatures, as_blocks
from .hub import hub_options

log = logging.getLogger(__name__)



def _unavailable(source: str, reason: str) -> BackboneUnavailableError:
    return BackboneUnavailableError(
        f"cannot load the CLIP backbone {source!r}: {reason}\n"
        "lakead loads CLIP weights in one of two ways:\n"
        f"  1. a Hugging Face Hub id such as {DEFAULT_CLIP!r}, downloaded and cached on first use "
        "(needs network once; then works offline from ~/.cache/huggingface);\n"
        "  2. a local directory in the save_pretrained layout (config.json, model.safetensors, "
        "preprocessor_config.json and the tokenizer files), for machines without network. Make one "
        "where there is network with:\n"
        "       lakead download-backbone "
        f"{DEFAULT_CLIP} ./clip-l14-336\n"
        "     then pass --backbone ./clip-l14-336 (or backbone='./clip-l14-336')."
    )


def _preprocessing_from_config(cfg: dict, where: str) -> tuple[Preprocessing, int | None]:
    """Mean, std, interpolation and input size from a ``preprocessor_config.json`` dict."""
    try:
        mean = tuple(float(v) for v in cfg["image_mean"])
        std = tuple(float(v) for v in cfg["image_std"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: preprocessor config has no valid image_mean / image_std") from None
    size = None
    crop = cfg.get("crop_size")
    if isinstance(crop, dict) and "height" in crop:
        size = int(crop["height"])
    elif isinstance(cfg.get("size"), dict) and "shortest_edge" in cfg["size"]:
        size = int(cfg["size"]["shortest_edge"])
    prep = Preprocessing(
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        resample=int(cfg.get("resample", 3)),
        rescale=float(cfg.get("rescale_factor", 1.0 / 255.0)) if cfg.get("do_rescale", True) else 1.0,
    )
    return prep, size


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' weight-loading progress bars and load reports while we load."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class CLIPBackbone(Backbone):
    """A frozen ``transformers.CLIPModel`` read at intermediate blocks.

    Blocks are numbered 1..L (block ``l`` is the output of the l-th transformer block, as in
    the paper); the default visual block is 3/4 of the depth (18 of 24), the default semantic
    block L, the last one.
    """

    supports_autocast = True

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing,
        *,
        tokenizer=None,
        source: str = "<in-memory CLIPModel>",
        image_size: int | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.preprocessing = preprocessing
        self.tokenizer = tokenizer
        vcfg = model.config.vision_config
        self.num_layers = len(model.vision_model.encoder.layers)
        self.has_text = getattr(model, "text_model", None) is not None and tokenizer is not None
        weight = model.vision_model.embeddings.patch_embedding.weight.detach().to("cpu", torch.float32)
        digest = hashlib.sha256(weight.numpy().tobytes())
        digest.update(json.dumps([vcfg.hidden_size, self.num_layers, vcfg.patch_size]).encode())
        self.info = BackboneInfo(
            kind="clip",
            source=source,
            num_layers=self.num_layers,
            patch_size=int(vcfg.patch_size),
            image_size=int(image_size or vcfg.image_size),
            joint_dim=int(model.config.projection_dim),
            fingerprint=digest.hexdigest(),
        )
        self.width = int(vcfg.hidden_size)
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, source: str, *, need_text: bool = True) -> "CLIPBackbone":
        """Load from a hub id (cached on first use) or a local ``save_pretrained`` directory.

        With ``need_text=False`` the text tower is dropped after loading (its embeddings are
        already stored in a fitted model), which saves memory.
        """
        local = Path(source).expanduser()
        if local.exists():
            if not local.is_dir():
                raise _unavailable(source, "it is a file, not a directory")
            if not (local / "config.json").is_file():
                raise _unavailable(source, "the directory has no config.json (not a save_pretrained directory)")
            source = source_id = str(local.resolve())  # recorded absolute: models may be used from elsewhere
        else:
            source_id = source
        with _quiet_transformers():
            return cls._load(source, source_id, local, need_text)

    @classmethod
    def _load(cls, source: str, source_id: str, local: Path, need_text: bool) -> "CLIPBackbone":
        from transformers import AutoConfig, AutoTokenizer, CLIPModel
        from transformers.utils import cached_file

        hub = hub_options(source_id, family="CLIP")  # local_files_only without network; not cached: one message at once
        try:
            config = AutoConfig.from_pretrained(source_id, **hub)
        except (OSError, ValueError) as exc:
            where = "the local directory is unreadable" if local.exists() else (
                "it is not a local directory, and the Hugging Face Hub could not provide it"
            )
            raise _unavailable(source, f"{where} ({str(exc).splitlines()[0]})") from None
        if getattr(config, "model_type", None) != "clip":
            raise ConfigError(
                f"{source}: is a {getattr(config, 'model_type', 'unknown')!r} model; the CLIP adapter needs "
                "model_type 'clip' (use --backbone onnx:PATH for other image models)"
            )
        try:
            model = CLIPModel.from_pretrained(source_id, dtype=torch.float32, **hub)
            prep_file = cached_file(source_id, "preprocessor_config.json", **hub)
        except (OSError, ValueError) as exc:
            raise _unavailable(source, f"loading its files failed ({str(exc).splitlines()[0]})") from None
        if prep_file is None:
            raise _unavailable(source, "it has no preprocessor_config.json (save the processor with it)")
        prep, size = _preprocessing_from_config(json.loads(Path(prep_file).read_text()), source)
        tokenizer = None
        if need_text:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source_id, **hub)
            except (OSError, ValueError) as exc:
                raise _unavailable(source, f"its tokenizer could not be loaded ({str(exc).splitlines()[0]})") from None
        else:
            model.text_model = None
            model.text_projection = None
        return cls(model, prep, tokenizer=tokenizer, source=source, image_size=size)

    # -- blocks ---------------------------------------------------------------------------

    def resolve_layer(self, layer: Layer | None, *, semantic: bool = False) -> int:
        if layer is None:
            return self.num_layers if semantic else self.default_layer()
        if isinstance(layer, str):
            if not layer.lstrip("-").isdigit():
                raise ConfigError(f"layer {layer!r}: CLIP blocks are numbered 1..{self.num_layers}")
            layer = int(layer)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= self.num_layers:
            what = "semantic_layer" if semantic else "layer"
            hint = "" if semantic else (
                f"; LAKE reads block 18 of 24, 3/4 of the depth, which is block {max(1, round(0.75 * self.num_layers))} here"
            )
            raise ConfigError(f"{what} {layer} is out of range: this CLIP has blocks 1..{self.num_layers}{hint} "
                              f"(lakead layers {self.info.source} lists them)")
        return layer

    @torch.inference_mode()
    def extract(self, pixels: torch.Tensor, blocks: Sequence[Layer], joint_block: Layer | None = None) -> Features:
        blocks = as_blocks(blocks)
        wanted = {int(b) for b in blocks}
        if joint_block is not None:
            wanted.add(int(joint_block))
        vision = self.model.vision_model
        size = pixels.shape[-1]
        dtype = next(self.model.parameters()).dtype
        hidden = vision.embeddings(pixels.to(self.device, dtype), interpolate_pos_encoding=size != self.info.image_size)
        hidden = vision.pre_layrnorm(hidden)  # (B, 1 + N, D): the encoder's input, hidden_states[0]
        outputs: dict[int, torch.Tensor] = {}
        for i, block in enumerate(vision.encoder.layers[: max(wanted)], start=1):
            out = block(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out  # (B, 1 + N, D)
            if i in wanted:
                outputs[i] = hidden
        grid = (pixels.shape[-2] // self.info.patch_size, pixels.shape[-1] // self.info.patch_size)
        feats = {b: outputs[int(b)][:, 1:, :].float() for b in blocks}  # (B, N, D) each, class token dropped
        joint = None
        if joint_block is not None:
            joint = self.to_joint(outputs[int(joint_block)][:, 1:, :]).float()  # (B, N, E)
        return Features(blocks=feats, grids={b: grid for b in blocks}, joint=joint, joint_grid=grid if joint is not None else None)

    #: Window sequences run through the tower at once (bounds memory: B * windows can be large).
    WINDOW_CHUNK = 2048

    @torch.inference_mode()
    def window_embeddings(self, pixels: torch.Tensor, windows: Sequence[torch.Tensor], start_block: int = 0,
                          blocks: Sequence[Layer] = ()) -> WindowFeatures:
        """WinCLIP's features (Jeong et al. 2023, Sec. 4.2): see :meth:`Backbone.window_embeddings`.

        The full image runs once through every block (its class token gives the image
        embedding, its patch tokens the ``blocks`` asked for). For the windows, the hidden
        state after ``start_block`` blocks (0: the embeddings with their position embeddings,
        after ``pre_layrnorm``: the paper's and anomalib's choice) is cut to the class token and
        the window's patches, and blocks ``start_block + 1 .. L`` run on those ``1 + k`` tokens
        alone; the class token then enters the joint space as CLIP's does.
        """
        if not 0 <= start_block < self.num_layers:
            raise ConfigError(f"window_start_block {start_block} is out of range: 0..{self.num_layers - 1} for this CLIP")
        vision = self.model.vision_model
        size = pixels.shape[-1]
        dtype = next(self.model.parameters()).dtype
        hidden = vision.embeddings(pixels.to(self.device, dtype), interpolate_pos_encoding=size != self.info.image_size)
        hidden = vision.pre_layrnorm(hidden)  # (B, 1 + N, D)
        wanted = {int(b) for b in blocks}
        states: dict[int, torch.Tensor] = {0: hidden}
        for i, block in enumerate(vision.encoder.layers, start=1):
            out = block(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out  # (B, 1 + N, D)
            if i in wanted or i == start_block:
                states[i] = hidden
        image = self.to_joint(hidden)[:, 0, :].float()  # (B, E): CLIP's image embedding (mapped as (B, 1 + N, D): the same
        # matrix product whatever B, so an image's numbers do not depend on its batch)
        start = states[start_block]  # (B, 1 + N, D)
        b, _, width = start.shape
        embedded = []
        for table in windows:
            idx = torch.cat([torch.zeros((table.shape[0], 1), dtype=torch.int64), table.to(torch.int64) + 1], dim=1)
            idx = idx.to(start.device)  # (nw, 1 + k): the class token, then the window's patches
            seqs = start[:, idx, :].reshape(b * idx.shape[0], idx.shape[1], width)  # (B * nw, 1 + k, D)
            pooled = []
            for c in range(0, seqs.shape[0], self.WINDOW_CHUNK):
                h = seqs[c : c + self.WINDOW_CHUNK]
                for block in vision.encoder.layers[start_block:]:
                    out = block(h, None)
                    h = out[0] if isinstance(out, tuple) else out
                pooled.append(self.to_joint(h)[:, 0, :].float())  # (chunk, E)
            embedded.append(torch.cat(pooled).reshape(b, idx.shape[0], -1))  # (B, nw, E)
        grid = (pixels.shape[-2] // self.info.patch_size, pixels.shape[-1] // self.info.patch_size)
        feats = {blk: states[int(blk)][:, 1:, :].float() for blk in blocks}  # (B, N, D) each
        return WindowFeatures(image=image, windows=embedded, blocks=feats, grid=grid)

    def to_joint(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``(..., D)`` of the last block into the image-text space ``(..., E)``.

        Exactly CLIP's own mapping of its class token: ``post_layernorm`` then
        ``visual_projection`` (not normalised).
        """
        return self.model.visual_projection(self.model.vision_model.post_layernorm(tokens))

    # -- text -----------------------------------------------------------------------------

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        if not self.has_text:
            raise ConfigError(f"backbone {self.info.source!r} was loaded without its text tower")
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        out = self.model.get_text_features(**tokens)
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return emb.float()  # (P, E)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().item())

    def to(self, device: torch.device | str) -> "CLIPBackbone":
        self.model.to(device)
        self.device = torch.device(device)
        return self
