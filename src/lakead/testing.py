"""Random-weight CLIP models written to a directory, for tests and speed benchmarks.

No weights are downloaded: a ``transformers.CLIPConfig`` is built from a preset, the model is
initialised at random (same arithmetic as a trained one of that size), and saved with a
processor config and a small character-level tokenizer in the ``save_pretrained`` layout,
so the result loads exactly like a real CLIP directory::

    python -m lakead.testing tiny ./tiny-clip
    python -m lakead.testing vit-l-14-336 ./clip-l14-336-random
"""

from __future__ import annotations

import argparse
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
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

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
    model = CLIPModel(config).eval()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    s = p["image_size"]
    CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(out)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(save_random_clip(args.out, args.preset, args.seed))


if __name__ == "__main__":
    main()
