"""The LAKE detector: fit on a few normal images, predict scores, maps and decisions.

Higher score = more anomalous, everywhere.

The steps (equations of the paper as restored in ``LAKE.md``):

1. ``fit``: run the support images through the frozen backbone to the visual block(s); the
   variance of every channel over all support tokens picks ``k`` sensitive neurons (Eq. 3-4);
   the gallery keeps every support token in that subspace (Eq. 5-6). Text embeddings of a
   normal and an anomalous prompt are computed once. Each support image is scored against
   the gallery of the others (leave-one-out) to learn what a normal score looks like
   (:mod:`.fit`).
2. ``predict``: each test token's distance to its nearest gallery vector (Eq. 7), max-pooled
   into the visual score (Eq. 8); the text probe's anomaly probability pooled over tokens
   (Eq. 9-13); the fused score ``visual + lam * semantic`` (Eq. 14); the visual token scores
   upsampled to each image's own size as its map (:mod:`.score`).

Choices the paper leaves open, all configurable and recorded with the model
(:class:`~.config.LakeConfig`):

- ``score_norm="loo"`` (default) divides visual distances by the median leave-one-out visual
  score of the support images, so that ``visual`` is about 1 for a typical normal image
  whatever the backbone's feature scale, and ``lam`` weighs the text probe the same way for
  every backbone. ``score_norm="none"`` keeps raw distances, exactly Eq. 14.
- The decision threshold, without any defect example: the level a new normal image exceeds
  with probability at most the false-alarm budget, from the support images' leave-one-out
  scores (:func:`lakead.decision.budget_threshold`, docs/DECISIONS.md). With a single support image there is nothing to leave out: the threshold is infinite
  (every image normal) until one is set, and a warning says so.
- Several visual blocks (``layer=[12, 18]``) are concatenated channel-wise on one token grid
  (``block_grid``: the coarsest, average-pooled, or the finest, bilinear).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...api import Prediction, read_model_meta
from ...backbones import Backbone, BackboneInfo, Features, Layer, as_blocks, load_backbone
from ...base import BaseDetector, backbone_precision  # noqa: F401 - backbone_precision: used by benchmarks
from ...errors import ConfigError, ModelFormatError
from ...images import ImageInput
from ...index import resolve as resolve_index
from ...fields import DEFAULT_K_RULE
from . import fit as steps
from . import stream
from .config import ANOMALOUS_PROMPT, NORMAL_PROMPT, LakeConfig
from .score import ScoredBatch, batch_maps, image_parts, score_batch
from .state import LakeState

log = logging.getLogger("lakead")

METHOD = "lake"


class LakeDetector(BaseDetector):
    """Training-free few-shot anomaly detector (LAKE).

    >>> det = LakeDetector(backbone="path/to/clip", k=100, layer=18)  # doctest: +SKIP
    >>> det.fit(normal_paths, class_name="bottle").predict(test_paths).scores  # doctest: +SKIP

    ``backbone`` is a hub id, a local directory, ``"onnx:PATH"`` or a built
    :class:`~lakead.backbones.Backbone`; ``options`` are the fields of :class:`LakeConfig`
    (a misspelled one is an error), or pass ``config=``. ``device``, ``batch_size`` and
    ``precision`` say how to run (:class:`~lakead.api.Runtime`); they are not saved.
    Learned state is :class:`LakeState`, readable as ``det.<field>_`` after :meth:`fit` or
    :meth:`load`. Options, images, batching, saving and loading: :class:`lakead.base.BaseDetector`.
    """

    streaming_fit = True  # fit(memory=...), and fit_on_ray
    method = METHOD
    config_class = LakeConfig
    state_class = LakeState
    state_: LakeState | None

    @property
    def text_model(self) -> Backbone:
        """The backbone of the text probe: the visual one, or ``text_backbone`` (loaded on first use)."""
        if self.config.text_backbone is None:
            return self.backbone
        if self.__dict__.get("_text_obj") is None:
            self._text_obj = load_backbone(self.config.text_backbone, need_text=not self.is_fitted)
        return self._text_obj

    def iter_features(
        self, arrays: Sequence[np.ndarray], blocks: Sequence[Layer], joint_block: Layer | None, image_size: int
    ) -> Iterator[tuple[int, Features]]:
        """As :meth:`BaseDetector.iter_features`; with ``text_backbone``, the joint tokens come from
        that model, run on the same images with its own preprocessing and input size."""
        if joint_block is None or self.config.text_backbone is None:
            yield from super().iter_features(arrays, blocks, joint_block, image_size)
            return
        tm = self.text_model
        for start, f in super().iter_features(arrays, blocks, None, image_size):
            batch = arrays[start : start + next(iter(f.blocks.values())).shape[0]]
            pixels = tm.preprocessing(batch, tm.info.image_size)  # (B, 3, S', S')
            with backbone_precision(self.runtime.precision, tm):
                t = tm.extract(pixels, [joint_block], joint_block)
            yield start, dataclasses.replace(f, joint=t.joint, joint_grid=t.joint_grid)

    def iter_scored(self, arrays: Sequence[np.ndarray], *, text: bool = True) -> Iterator[ScoredBatch]:
        """Score batches of images against the fitted state (what predict and explain read)."""
        state = self.check_fitted()
        joint = state.semantic_layer if text else None
        for start, f in self.iter_features(arrays, as_blocks(state.layer), joint, state.image_size):
            yield score_batch(start, f, state, self.config, self.text_model, self.gallery_index().search)

    def index_vectors(self, state: LakeState) -> torch.Tensor:
        return state.gallery

    # -- fit ------------------------------------------------------------------------------

    def fit(
        self,
        images: Sequence[ImageInput],
        class_name: str,
        *,
        names: Sequence[str] | None = None,
        support_rule: str | None = None,
        on_progress: Callable[[float], None] | None = None,
        memory: int | str | None = None,
        runner: Callable[["LakeDetector", stream.Context], stream.Runner] | None = None,
    ) -> "LakeDetector":
        """Fit on normal images only. Returns ``self``.

        ``images``: paths, PIL images or ``(H, W[, C])`` arrays. Unreadable images are skipped
        with a warning (recorded in ``skipped_``); it is an error when none can be read.
        ``class_name`` fills the text prompts ("a photo of a normal {class_name}.");
        underscores are read as spaces. ``on_progress(n)`` is called after each batch with
        the number of images it held (divided by the number of passes when the fit makes two).
        ``support_rule`` says how the images were chosen (for example "first 16 of 64 images
        sorted by name"); it is saved with the model.

        Images are read and run a batch at a time. ``memory`` (bytes, or a size such as
        ``"1GiB"``; default 256 MiB) bounds what the fit holds: when the full-width tokens of
        every image do not fit in half of it, the fit makes two passes over the images and keeps
        only the gallery (:mod:`.stream`, docs/SCALE.md). ``runner`` runs the batches elsewhere
        (:func:`lakead.distributed.fit_on_ray`).
        """
        cfg = self.config
        backbone, device = self.start_fit(class_name, purpose="it fills the text prompts")
        blocks = tuple(backbone.resolve_layer(b) for b in cfg.blocks)
        tm = self.text_model if cfg.use_text else backbone  # the text probe's model
        tm.to(device)
        use_text = cfg.use_text and tm.has_text
        if cfg.use_text and not tm.has_text:
            log.warning("backbone %s has no text tower: the text probe is off (semantic scores are 0)", tm.info.source)
        if cfg.map_source == "semantic" and not use_text:
            raise ConfigError("map_source='semantic' needs the text probe: use_text=True and a backbone with a text tower")
        semantic_layer = tm.resolve_layer(cfg.semantic_layer, semantic=True) if use_text else None
        image_size = backbone.check_image_size(cfg.image_size or backbone.info.image_size)

        if isinstance(images, (str, Path, np.ndarray, Image.Image)) or not isinstance(images, Sequence):
            images = [images]  # type: ignore[list-item]
        name = class_name.strip().replace("_", " ")
        prompts = [NORMAL_PROMPT.format(name), ANOMALOUS_PROMPT.format(name)]
        text = logit_scale = None
        if use_text:
            text = torch.nn.functional.normalize(tm.text_embeddings(prompts).float(), dim=-1).to(device)  # (2, E)
            logit_scale = tm.logit_scale

        ctx = stream.Context(blocks, semantic_layer, image_size, text)
        budget = stream.DEFAULT_FIT_MEMORY if memory is None else stream.parse_memory(memory)
        run = (runner or stream.local_runner)(self, ctx)
        sup = stream.gather(self, images, names, run, budget, device, on_progress)
        self.fit_passes = sup.passes  # forward passes over the support set (not saved: how this fit ran)
        loo_raw = sup.loo_raw
        scale, loo_scores, levels, map_range, tokens = steps.decision(loo_raw, sup.loo_tokens, sup.semantic, sup.loo_scope,
                                                                      cfg, use_text)
        if not np.isfinite(loo_raw).any() and cfg.threshold is None:
            log.warning(
                "only one support image: no leave-one-out threshold can be derived, so every image is "
                "called normal until a threshold is set (threshold=... / --threshold)"
            )
        self.state_ = LakeState(
            neurons=sup.neurons,
            channel_variance=sup.variance,
            gallery=sup.gallery.to(device),
            gallery_image=sup.gallery_image,
            loo_visual=(loo_raw / scale).astype(np.float32),
            loo_semantic=sup.semantic.astype(np.float32),
            loo_scores=loo_scores.astype(np.float32),
            text_embeddings=text,
            loo_tokens=tokens,
            scope_gallery=None if sup.scope is None else sup.scope.to(device),
            scope_gallery_image=sup.scope_image,
            loo_scope=sup.loo_scope,
            gallery_index=None,  # set below
            layer=list(blocks) if isinstance(cfg.layer, (list, tuple)) else blocks[0],  # canonical names (the default resolved)
            semantic_layer=semantic_layer,
            image_size=image_size,
            grid=tuple(sup.grid),
            width=int(sup.width),
            visual_scale=scale,
            threshold=levels.image,
            threshold_rule=levels.rule,
            false_alarm_rate=levels.budget,
            seed_threshold=levels.seed,
            pixel_threshold=levels.pixel,
            scope_threshold=levels.scope,
            map_range=map_range,
            class_name=class_name.strip(),
            prompts=prompts if use_text else None,
            logit_scale=float(logit_scale) if use_text else None,
            support=list(sup.names),
            support_rule=support_rule or f"{len(images)} images as given",
            skipped=[str(e) for e in sup.errors],
            outliers=sup.outliers,
            gallery_rule=sup.gallery_rule,
            loo_rule=sup.loo_rule,
            fitted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        self.keep_index()  # HNSW: built once here, saved with the model
        return self

    # -- predict --------------------------------------------------------------------------

    def threshold_scores(self, state: LakeState) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The saved leave-one-out scores (fused, visual, tokens, scope) that ``thresholds(budget)``
        derives the levels from again (:meth:`BaseDetector.thresholds`, no refit)."""
        return state.loo_scores, state.loo_visual, state.loo_tokens, state.loo_scope

    def predict_arrays(
        self,
        arrays: Sequence[np.ndarray],
        *,
        threshold: float | None = None,
        false_alarm_rate: float | None = None,
        on_progress: Callable[[int], None] | None = None,
        on_batch: Callable[[ScoredBatch], None] | None = None,
    ) -> Prediction:
        """:meth:`predict` for images already read (``(H, W, 3)`` uint8 arrays). ``threshold``
        fixes the decision threshold for this call; ``false_alarm_rate`` derives every level
        again from the saved leave-one-out scores for that budget. ``on_batch(batch)`` sees
        each scored batch (what explain reads, from the same forward pass)."""
        state = self.check_fitted()
        levels = self.thresholds(false_alarm_rate)
        thr = levels.image if threshold is None else float(threshold)
        visual, semantic, maps, scope = [], [], [], []
        for batch in self.iter_scored(arrays):
            vis, sem = image_parts(batch, self.config)
            visual.append(vis)
            semantic.append(sem)
            if levels.scope is not None and state.scope_gallery is not None:
                scope.append(steps.scope_scores(batch.tokens, state.scope_gallery))  # (B,)
            sizes = [a.shape[:2] for a in arrays[batch.start : batch.start + vis.shape[0]]]
            maps += batch_maps(batch, sizes, self.config, state.image_size)
            if on_batch is not None:
                on_batch(batch)
            if on_progress is not None:
                on_progress(len(sizes))
        pred = assemble(visual, semantic, maps, self.config.lam, thr)
        scope_d = np.concatenate(scope).astype(np.float32) if scope else np.zeros(len(pred), np.float32)
        out = scope_d > levels.scope if scope else np.zeros(len(pred), bool)
        return dataclasses.replace(pred, anomalous=pred.anomalous | out, out_of_scope=out, scope=scope_d,
                                   pixel_threshold=levels.pixel, seed_threshold=levels.seed)

    def scoring_head(self) -> torch.nn.Module:
        """LAKE's scoring as a traceable module, what ``lakead export`` traces (:mod:`.head`)."""
        state = self.check_fitted()
        if self.config.text_backbone is not None:
            raise ConfigError(f"its text probe runs on a second model (text_backbone {self.config.text_backbone!r}) "
                              "with its own input size; one graph takes one input. Fit it without --text-backbone to export it")
        from .head import LakeHead

        return LakeHead(state, self.config, self.backbone)

    # -- model directory ------------------------------------------------------------------

    def extra_facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"k": int(self.check_fitted().neurons.numel())}  # the number of neurons kept, for readers of lakead.json
        if self.config.text_backbone is not None:
            facts["text_backbone"] = self.text_model.info.to_dict()  # checked when loaded, as the visual backbone is
        return facts

    @classmethod
    def load(cls, path, *, backbone=None, device=None, batch_size=None, precision=None) -> "LakeDetector":
        """:meth:`BaseDetector.load`, and the text probe's model when it is another one (checked
        against the saved identity, loaded without its text tower: the prompts' embeddings are saved)."""
        det = super().load(path, backbone=backbone, device=device, batch_size=batch_size, precision=precision)
        if det.config.text_backbone is not None:
            meta = read_model_meta(path)
            try:
                saved = BackboneInfo(**meta["text_backbone"])
            except (KeyError, TypeError) as exc:
                raise ModelFormatError(f"{path}: lakead.json is damaged (text_backbone: {exc})") from None
            tm = load_backbone(saved.source, need_text=False)
            if not tm.info.same_model(saved):
                raise ModelFormatError(f"{path}: the text probe's model at {saved.source!r} is not the one the model was fitted with")
            det._text_obj = tm.to(det.runtime.torch_device())
        return det

    def summary(self) -> dict[str, Any]:
        """The facts of a fitted model worth printing or reporting."""
        state = self.check_fitted()
        cfg = self.config
        finite = state.loo_scores[np.isfinite(state.loo_scores)]
        return {
            "method": self.method,
            "class_name": state.class_name,
            "backbone": cfg.backbone,
            "text_backbone": cfg.text_backbone or "the same",
            "layer": state.layer,
            "semantic_layer": state.semantic_layer,
            "image_size": state.image_size,
            "k": int(state.neurons.numel()),
            "k_rule": "all channels" if cfg.selection == "all" else (
                "auto: knee of the sorted variance curve" if cfg.k == "auto" else
                DEFAULT_K_RULE if cfg.k is None else "fixed"),
            "width": state.width,
            "selection": cfg.selection,
            "support_images": len(state.support),
            "support_rule": state.support_rule,
            "skipped_images": len(state.skipped),
            "outliers_dropped": list(state.outliers),
            "gallery_vectors": int(state.gallery.shape[0]),
            "gallery_rule": state.gallery_rule,
            "loo_rule": state.loo_rule,
            "index": resolve_index(cfg.index, *state.gallery.shape, state.gallery.device),
            "text_probe": state.text_embeddings is not None,
            "distance": cfg.distance,
            "visual_top_percent": cfg.visual_top_percent,
            "score_norm": cfg.score_norm,
            "threshold": state.threshold,
            "threshold_rule": self.describe_thresholds(state),
            "loo_score_median": float(np.median(finite)) if finite.size else None,
            "loo_score_max": float(finite.max()) if finite.size else None,
        }


def assemble(visual: list[torch.Tensor], semantic: list[torch.Tensor], maps: list[np.ndarray], lam: float, threshold: float) -> Prediction:
    """A :class:`Prediction` from per-batch image parts: ``scores = visual + lam * semantic`` (Eq. 14)."""
    vis = torch.cat(visual).numpy().astype(np.float32) if visual else np.zeros(0, np.float32)
    sem = torch.cat(semantic).numpy().astype(np.float32) if semantic else np.zeros(0, np.float32)
    scores = (vis + np.float32(lam) * sem).astype(np.float32)
    return Prediction(scores=scores, visual=vis, semantic=sem, anomalous=scores > threshold, maps=tuple(maps), threshold=threshold)
