"""Random-weight models of every backbone family written to a directory, for tests, speed
benchmarks and trying the tool offline.

No weights are downloaded: a ``transformers`` config is built from a preset, the model is
initialised at random (same arithmetic as a trained one of that size), and saved with its
image processor config and (for models with a text tower) a small character-level tokenizer
in the ``save_pretrained`` layout, so the result loads exactly like a real checkpoint::

    python -m lakead.testing tiny ./tiny-clip                # CLIP
    python -m lakead.testing tiny-dinov2 ./tiny-dinov2       # also tiny-dinov2-registers, tiny-dinov3
    python -m lakead.testing tiny-siglip ./tiny-siglip       # also tiny-siglip2 (NaFlex)
    python -m lakead.testing vit-l-14-336 ./clip-l14-336-random
    python -m lakead.testing dinov2-base ./dinov2-base-random  # full-size presets: FAMILY_PRESETS
"""

from __future__ import annotations

import argparse
import json
import math
import string
from pathlib import Path

import torch

#: Vision and text sizes of the presets. ``vit-l-14-336`` is the paper's model.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(image_size=32, patch_size=8, width=32, layers=4, heads=2, mlp=64, proj=16, text_width=32, text_layers=2, text_heads=2),
    "vit-b-16": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp=3072, proj=512, text_width=512, text_layers=12, text_heads=8),
    "vit-l-14": dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp=4096, proj=768, text_width=768, text_layers=12, text_heads=12),
    "vit-l-14-336": dict(image_size=336, patch_size=14, width=1024, layers=24, heads=16, mlp=4096, proj=768, text_width=768, text_layers=12, text_heads=12),
}

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _char_vocab() -> dict[str, int]:
    chars = string.ascii_lowercase + string.digits + ".,-'"
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab


def save_random_clip(path: str | Path, preset: str = "tiny", seed: int = 0, **overrides: int) -> Path:
    """Build a random CLIP from ``preset`` (sizes may be overridden) and save it to ``path``."""
    from transformers import CLIPImageProcessor, CLIPTokenizer

    model, vocab, s = random_clip(preset, seed, **overrides)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(out)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(out)
    return out


def random_clip(preset: str = "tiny", seed: int = 0, **overrides: int):
    """``(CLIPModel, tokenizer vocabulary, input size)`` of ``preset``, in memory."""
    from transformers import CLIPConfig, CLIPModel

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = {**PRESETS[preset], **overrides}
    vocab = _char_vocab()
    bos, eos = vocab[BOS], vocab[EOS]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=p["text_width"], intermediate_size=4 * p["text_width"],
            num_hidden_layers=p["text_layers"], num_attention_heads=p["text_heads"],
            max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=p["width"], intermediate_size=p["mlp"], num_hidden_layers=p["layers"],
            num_attention_heads=p["heads"], image_size=p["image_size"], patch_size=p["patch_size"],
        ),
        projection_dim=p["proj"],
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval(), vocab, p["image_size"]


#: Other families: preset -> (model_type, sizes). ``image_size`` is the native input size.
_V = dict(width=32, layers=4, heads=2, mlp=64, image_size=32, patch_size=8)
FAMILY_PRESETS: dict[str, tuple[str, dict[str, int]]] = {
    "tiny-dinov2": ("dinov2", _V),
    "tiny-dinov2-registers": ("dinov2_with_registers", dict(_V, registers=4)),
    "tiny-dinov3": ("dinov3_vit", dict(_V, registers=4)),
    "tiny-siglip": ("siglip", dict(_V, text_width=32, text_layers=2, text_heads=2, text_length=64)),
    "tiny-siglip2": ("siglip2", dict(_V, text_width=32, text_layers=2, text_heads=2, text_length=64)),
    "dinov2-small": ("dinov2", dict(width=384, layers=12, heads=6, mlp=1536, image_size=224, patch_size=14)),
    "dinov2-base": ("dinov2", dict(width=768, layers=12, heads=12, mlp=3072, image_size=224, patch_size=14)),
    "dinov2-large": ("dinov2", dict(width=1024, layers=24, heads=16, mlp=4096, image_size=224, patch_size=14)),
    "dinov2-base-registers": ("dinov2_with_registers", dict(width=768, layers=12, heads=12, mlp=3072, image_size=224,
                                                            patch_size=14, registers=4)),
    "dinov3-vitb16": ("dinov3_vit", dict(width=768, layers=12, heads=12, mlp=3072, image_size=224, patch_size=16, registers=4)),
    "siglip-base-patch16-224": ("siglip", dict(width=768, layers=12, heads=12, mlp=3072, image_size=224, patch_size=16,
                                               text_width=768, text_layers=12, text_heads=12, text_length=64)),
    "siglip2-base-patch16-naflex": ("siglip2", dict(width=768, layers=12, heads=12, mlp=3072, image_size=256, patch_size=16,
                                                    text_width=768, text_layers=12, text_heads=12, text_length=64)),
}
#: Where the position embeddings of DINOv2 were trained (518 px, 37 x 37 patches of 14), as released.
_DINOV2_POSITIONS = 37


def _char_tokenizer(length: int):
    """A Gemma-style (SentencePiece-like BPE, spaces as '▁') character tokenizer that loads offline."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in "\u2581" + string.ascii_lowercase + string.digits + ".,-'":
        vocab[c] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=length, padding_side="right")


def save_random_backbone(path: str | Path, preset: str = "tiny-dinov2", seed: int = 0) -> Path:
    """Build a random model of any family's ``preset`` (CLIP ones included) and save it to ``path``."""
    if preset in PRESETS:
        return save_random_clip(path, preset, seed)
    model, processor, tokenizer = random_backbone_parts(preset, seed)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def random_backbone_parts(preset: str, seed: int = 0):
    """``(model, preprocessor config dict, tokenizer or None)`` of a non-CLIP ``preset``, in memory
    (what :func:`save_random_backbone` writes)."""
    if preset not in FAMILY_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS) + sorted(FAMILY_PRESETS)}")
    import transformers

    model_type, p = FAMILY_PRESETS[preset]
    vision = dict(hidden_size=p["width"], num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                  intermediate_size=p["mlp"], patch_size=p["patch_size"])
    s, patch = p["image_size"], p["patch_size"]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tokenizer = None
    if model_type in ("dinov2", "dinov2_with_registers"):
        positions = s if s <= 64 else _DINOV2_POSITIONS * patch
        vision = {k: v for k, v in vision.items() if k != "intermediate_size"}
        vision.update(mlp_ratio=p["mlp"] // p["width"], image_size=positions)
        if model_type == "dinov2":
            config, cls = transformers.Dinov2Config(**vision), transformers.Dinov2Model
        else:
            config = transformers.Dinov2WithRegistersConfig(num_register_tokens=p["registers"], **vision)
            cls = transformers.Dinov2WithRegistersModel
        processor = dict(image_processor_type="BitImageProcessor", size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    elif model_type == "dinov3_vit":
        config = transformers.DINOv3ViTConfig(image_size=s, num_register_tokens=p["registers"], **vision)
        cls = transformers.DINOv3ViTModel
        processor = dict(image_processor_type="DINOv3ViTImageProcessorFast", size={"height": s, "width": s})
    else:  # siglip, siglip2
        text = dict(vocab_size=len(_char_tokenizer(8)), hidden_size=p["text_width"], intermediate_size=4 * p["text_width"],
                    num_hidden_layers=p["text_layers"], num_attention_heads=p["text_heads"],
                    max_position_embeddings=p["text_length"], projection_size=p["width"], pad_token_id=0,
                    bos_token_id=2, eos_token_id=1)
        mean = std = (0.5, 0.5, 0.5)
        tokenizer = _char_tokenizer(p["text_length"])
        if model_type == "siglip":
            config = transformers.SiglipConfig(text_config=text, vision_config=dict(vision, image_size=s))
            cls = transformers.SiglipModel
            processor = dict(image_processor_type="SiglipImageProcessor", size={"height": s, "width": s}, resample=2)
        else:
            config = transformers.Siglip2Config(text_config=text, vision_config=dict(vision, num_patches=(s // patch) ** 2))
            cls = transformers.Siglip2Model
            processor = dict(image_processor_type="Siglip2ImageProcessor", patch_size=patch,
                             max_num_patches=(s // patch) ** 2, resample=2)
    torch.manual_seed(seed)
    model = cls(config).eval()
    if model_type in ("siglip", "siglip2"):  # SigLIP's own initial temperature and bias (log 10, -10); transformers zeroes them
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
    if model_type == "dinov3_vit":  # transformers leaves the register tokens uninitialised when built from a config
        with torch.no_grad():
            model.embeddings.register_tokens.normal_(0.0, config.initializer_range)
    processor.update(do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                     image_mean=list(mean), image_std=list(std))
    processor.setdefault("resample", 3)
    return model, processor, tokenizer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=sorted(PRESETS) + sorted(FAMILY_PRESETS), metavar="FAMILY",
                    help="tiny (CLIP), " + ", ".join(FAMILY_PRESETS) + ", or a CLIP size: " + ", ".join(p for p in PRESETS if p != "tiny"))
    ap.add_argument("out", type=Path, metavar="DIR")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(save_random_backbone(args.out, args.preset, args.seed))


if __name__ == "__main__":
    main()
