"""SigLIP (Zhai et al., 2023) and SigLIP 2 (Tschannen et al., 2025) through ``transformers``:
visual tokens, and a text probe in the joint image-text space.

``model_type`` ``siglip`` (``SiglipModel``: SigLIP, and the fixed-resolution SigLIP 2
checkpoints such as ``google/siglip2-base-patch16-224``) and ``siglip2`` (``Siglip2Model``,
the NaFlex checkpoints, which take patchified pixels with their grid).

Blocks are read by calling the vision tower's own submodules in order, as its forward does:
``embeddings`` (SigLIP: position embeddings interpolated, bicubic, when the input is not the
native size; SigLIP 2: the pixels cut into patches exactly as its image processor does, the
position embeddings resized to the grid by the embeddings themselves, and the all-ones
attention mask the model builds), then ``encoder.layers``, stopping after the deepest block
asked for. There is no class token: every token is a patch.

**Patch tokens into the joint space.** SigLIP has no class token and no projection matrix:
its image embedding (``pooler_output``) is ``head(post_layernorm(h))``, where ``head`` is an
attention-pooling block: one learned probe query attends over all tokens
(``out_proj(sum_i a_i v_proj(h_i))``), then ``x + mlp(layernorm(x))``. A patch token is
mapped as the model maps an image made of that token alone: ``post_layernorm``, then the
*same* ``head`` on a sequence of length one, where the attention weight is 1, so the token
goes through ``v_proj``, ``out_proj`` and the residual MLP. This is the model's own pooling
path per token (MaskCLIP's value path, with SigLIP's MLP after it). It is exact in two
senses that the tests check: a token's joint vector equals ``head`` applied to that token
alone, and when all tokens are equal it equals the model's ``pooler_output``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .hf import HFViTBackbone


class SigLIPBackbone(HFViTBackbone):
    """A frozen ``SiglipModel`` (or ``Siglip2Model``: see :class:`SigLIP2Backbone`)."""

    kind = "siglip"
    FAMILY = "SigLIP"
    EXAMPLE = "google/siglip-base-patch16-224"
    CLASSES = {"siglip": "SiglipModel"}

    @classmethod
    def _text_family(cls) -> bool:
        return True

    def _vision(self) -> nn.Module:
        return self.model.vision_model

    def _layers(self) -> Sequence[nn.Module]:
        return self.model.vision_model.encoder.layers

    def _has_text(self) -> bool:
        return getattr(self.model, "text_model", None) is not None and self.tokenizer is not None and self._joint_dim() is not None

    def _joint_dim(self) -> int | None:
        vision = self._vision()
        return int(vision.config.hidden_size) if getattr(vision, "use_head", False) else None

    def _embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        vision = self._vision()
        size = vision.config.image_size
        interpolate = tuple(pixels.shape[-2:]) != (size, size)
        return vision.embeddings(pixels, interpolate_pos_encoding=interpolate), None  # (B, N, D)

    def _call_block(self, block: nn.Module, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        out = block(hidden, ctx)  # ctx: the attention mask (None: every token attends to every token)
        return out[0] if isinstance(out, tuple) else out

    def to_joint(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, D)`` of a block into the image-text space ``(B, N, E)``:
        ``post_layernorm`` then the attention-pooling ``head`` on each token alone (see the
        module docstring); not normalised."""
        vision = self._vision()
        if self._joint_dim() is None:
            raise ConfigError(f"backbone {self.info.source!r} has no image head (vision_use_head=False): no joint space")
        b, n, d = tokens.shape
        one = vision.post_layernorm(tokens).reshape(b * n, 1, d)  # each token a sequence of length one
        return vision.head(one).reshape(b, n, -1)

    # -- text ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> ``(P, E)`` text embeddings (the text model's ``pooler_output``). The
        prompts are padded to the text model's full length (``padding="max_length"``), as
        SigLIP was trained: its text embedding is read at the last position."""
        if not self.has_text:
            raise ConfigError(f"backbone {self.info.source!r} was loaded without its text tower")
        length = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        out = self.model.get_text_features(**inputs)
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return emb.float()  # (P, E)

    @property
    def logit_scale(self) -> float:
        """``exp(t)`` of the model's learned temperature ``t`` (the cosine's multiplier)."""
        return float(self.model.logit_scale.detach().exp().item())

    @property
    def logit_bias(self) -> float:
        """The model's learned bias ``b`` of the sigmoid loss (about -10 on released checkpoints)."""
        return float(self.model.logit_bias.detach().item())

    def text_probability(self, joint_tokens: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Per-token P(anomalous) ``(B, N)`` from SigLIP's own pairwise probabilities.

        With ``z`` a token and ``t_n``, ``t_a`` the normal and anomalous prompts (all
        L2-normalised), SigLIP scores each image-text pair on its own:
        ``p_j = sigmoid(s * cos(z, t_j) + b)`` with ``s = exp(logit_scale)`` and ``b =
        logit_bias``, the probability that the pair matches (the sigmoid loss it was trained
        with; there is no softmax over captions). The probe returns the anomalous prompt's
        share of the two: ``p_a / (p_n + p_a)``, computed stably as a softmax over
        ``log sigmoid`` of the two logits.

        Why not CLIP's softmax: with SigLIP's scale it would be ``sigmoid(s * (cos_a -
        cos_n))``, where the bias cancels, discarding how the model calibrated each match;
        and ``p_a`` alone is not comparable across images, since for a token that matches
        neither prompt both are near 0. The normalised share keeps the bias, stays in [0, 1]
        and is 0.5 when the two prompts fit equally, as CLIP's is.
        """
        z = F.normalize(joint_tokens.to(torch.float32), dim=-1)
        t = F.normalize(text_embeddings.to(torch.float32), dim=-1)
        logits = self.logit_scale * torch.einsum("bne,pe->bnp", z, t) + self.logit_bias  # (B, N, 2)
        return F.logsigmoid(logits).softmax(dim=-1)[..., 1]


class SigLIP2Backbone(SigLIPBackbone):
    """A frozen ``Siglip2Model`` (NaFlex): pixels enter as patches with their grid."""

    kind = "siglip2"
    FAMILY = "SigLIP 2"
    EXAMPLE = "google/siglip2-base-patch16-naflex"
    CLASSES = {"siglip2": "Siglip2Model"}

    def _native_size(self) -> int:
        return math.isqrt(int(self._vision().config.num_patches)) * self.patch

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` -> ``(B, gh * gw, p * p * C)``, row-major patches with each patch's
        pixels in (row, column, channel) order: the image processor's ``convert_image_to_patches``."""
        b, c, h, w = pixels.shape
        p = self.patch
        x = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def _embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        from transformers.masking_utils import create_bidirectional_mask

        vision = self._vision()
        b, _, h, w = pixels.shape
        patches = self.patchify(pixels)  # (B, N, p*p*3)
        shapes = torch.tensor([[h // self.patch, w // self.patch]] * b, dtype=torch.long, device=pixels.device)
        mask = torch.ones(patches.shape[:2], dtype=torch.int32, device=pixels.device)  # every token is an image token
        hidden = vision.embeddings(patches, shapes)  # (B, N, D)
        return hidden, create_bidirectional_mask(config=vision.config, inputs_embeds=hidden, attention_mask=mask)
