"""The computations of the neuron-level report: plain dataclasses, no file and no picture.

:func:`variance_curve` (the sorted channel variances, ``k`` and the elbow),
:func:`explain_images` (each image's most anomalous patch and the neurons behind its distance)
and :func:`compare_models` (overlap and fingerprints of several models' sensitive neurons).
:mod:`lakead.explain.figures` draws them; :mod:`lakead.explain.render` writes the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..fields import DEFAULT_K_RULE
from ..images import ImageInput
from ..methods.lake import LakeDetector
from ..methods.lake.score import ScoredBatch
from ..neurons import embed_2d, jaccard_matrix, knee_k, neuron_fingerprints, patch_contributions, top_contributors

#: Percentiles of a neuron's support values that span the colour scale of its activation map.
NORMAL_PERCENTILES = (1.0, 99.0)


@dataclass(frozen=True)
class VarianceCurve:
    """The sorted channel-variance curve of a fitted model."""

    channels: np.ndarray  # (D,) int: channel indices, largest variance first (ties: lower index)
    variance: np.ndarray  # (D,) float64: their variances
    neurons: np.ndarray  # (K,) int: the model's sensitive neurons, in the model's order
    k: int  # K
    k_rule: str  # how K was chosen
    knee_k: int  # the elbow estimate on this curve (lakead.neurons.knee_k)
    selection: str  # the model's neuron selection rule


@dataclass(frozen=True)
class NeuronContribution:
    """One sensitive neuron's part in the distance of the most anomalous patch."""

    channel: int  # channel index in the block
    position: int  # position in the model's neuron list (0 = largest variance with selection "top")
    squared_diff: float  # (value - normal_value)^2, in the block's raw units
    share: float  # squared_diff / the patch's squared distance
    value: float  # the channel at the patch
    normal_value: float  # the channel in the nearest gallery vector
    activation: np.ndarray  # (gh, gw) float32: the channel at every token of the image
    normal_range: tuple[float, float]  # NORMAL_PERCENTILES of the channel over the support tokens


@dataclass(frozen=True)
class ImageExplanation:
    """Why one image scored as it did."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    amap: np.ndarray  # (H, W) float32: the prediction's anomaly map
    score: float
    visual: float
    semantic: float
    anomalous: bool
    threshold: float
    patch: tuple[int, int]  # (row, col) of the most anomalous token on the (gh, gw) grid
    patch_score: float  # that token's visual score (the image's visual score)
    nearest_support: str  # the support image that holds the nearest gallery vector
    nearest_patch: tuple[int, int]  # (row, col) of that vector in its image
    contributions: tuple[NeuronContribution, ...]  # the top contributors, largest first
    top_share: float  # their summed share of the squared distance


@dataclass(frozen=True)
class ModelComparison:
    """Sensitive neurons of several models fitted on the same backbone and block."""

    labels: tuple[str, ...]  # one per model (C)
    neuron_sets: tuple[np.ndarray, ...]  # C arrays of channel indices
    jaccard: np.ndarray  # (C, C)
    fingerprints: np.ndarray  # (D, C)
    embedding: np.ndarray  # (D, 2)
    explained: np.ndarray  # (2,) fraction of the fingerprints' variance on each axis
    membership: np.ndarray  # (D, C) bool: channel d is a sensitive neuron of model c


def _k_rule(det: LakeDetector) -> str:
    if det.config.selection == "all":
        return "all channels (selection 'all')"
    if det.config.k == "auto":
        return "auto: k = the elbow estimate"
    if det.config.k is None:
        return DEFAULT_K_RULE
    return "fixed by the user"


def variance_curve(det: LakeDetector) -> VarianceCurve:
    """The sorted variance curve of ``det``'s support set, its ``k`` and the elbow estimate."""
    det.check_fitted()
    v = det.channel_variance_.detach().cpu().numpy().astype(np.float64)  # (D,)
    order = np.argsort(-v, kind="stable")
    neurons = det.neurons_.detach().cpu().numpy().astype(np.int64)
    return VarianceCurve(
        channels=order, variance=v[order], neurons=neurons, k=int(neurons.size), k_rule=_k_rule(det),
        knee_k=knee_k(v), selection=det.config.selection,
    )


def explain_images(
    det: LakeDetector,
    images: Sequence[ImageInput],
    *,
    names: Sequence[str] | None = None,
    top: int = 8,
    on_progress: Callable[[int], None] | None = None,
) -> list[ImageExplanation]:
    """Explain each image's score: its map, its most anomalous patch and the neurons behind it.

    The backbone runs once per image (:meth:`LakeDetector.iter_scored`, as ``predict``):
    the scores, decisions and maps are ``predict``'s numbers, and the contributions come
    from the same tokens, distances and nearest gallery vectors. ``on_progress(n)`` after
    every batch. Raises :class:`~lakead.errors.ImageLoadError` on the first image that
    cannot be read.
    """
    state = det.check_fitted()
    if top < 1:
        raise ConfigError(f"top must be at least 1, got {top}")
    loaded = det.read_images(images, names)  # as predict reads them
    arrays, labels = loaded.arrays, loaded.names
    if not arrays:
        return []
    gallery = state.gallery  # (M, K)
    neurons = state.neurons.to(gallery.device)
    neuron_ids = state.neurons.detach().cpu().numpy()  # (K,)
    gallery_np = gallery.detach().cpu().numpy()
    lo, hi = np.percentile(gallery_np, NORMAL_PERCENTILES, axis=0)  # (K,) each
    gh, gw = state.grid
    rows_per_image = gh * gw
    found = []  # per image: (patch token, its score, nearest gallery row, contributions)

    def contributions_of(batch: ScoredBatch) -> None:  # the same forward pass as the prediction
        q = batch.tokens.to(gallery.device)[..., neurons]  # (B, N, K)
        if det.config.distance == "cosine":  # the gallery holds unit vectors: compare like with like
            q = torch.nn.functional.normalize(q, dim=-1)
        for j in range(batch.tokens.shape[0]):
            t = int(torch.argmax(batch.distances[j]))
            g_row = int(batch.nearest[j, t])
            query = q[j, t].detach().cpu().numpy()  # (K,)
            contrib = patch_contributions(query, gallery_np[g_row])  # (K,)
            total = float(contrib.sum())
            acts = batch.tokens[j].detach().cpu().numpy()  # (N, D)
            contributions = tuple(
                NeuronContribution(
                    channel=int(neuron_ids[p]), position=int(p), squared_diff=float(contrib[p]),
                    share=float(contrib[p] / total) if total > 0 else 0.0, value=float(query[p]),
                    normal_value=float(gallery_np[g_row, p]),
                    activation=acts[:, int(neuron_ids[p])].reshape(gh, gw).astype(np.float32),  # (gh, gw)
                    normal_range=(float(lo[p]), float(hi[p])),
                )
                for p in top_contributors(contrib, top)
            )
            found.append((t, float(batch.distances[j, t]), g_row, contributions))

    pred = det.predict_arrays(arrays, on_batch=contributions_of, on_progress=on_progress)  # exactly predict's numbers
    out: list[ImageExplanation] = []
    for i, (t, patch_score, g_row, contributions) in enumerate(found):
        support_index = int(state.gallery_image[g_row])
        pos = g_row - support_index * rows_per_image
        out.append(ImageExplanation(
            name=labels[i], image=arrays[i], amap=pred.maps[i], score=float(pred.scores[i]),
            visual=float(pred.visual[i]), semantic=float(pred.semantic[i]), anomalous=bool(pred.anomalous[i]),
            threshold=float(pred.threshold), patch=(t // gw, t % gw),
            patch_score=patch_score, nearest_support=state.support[support_index],
            nearest_patch=(pos // gw, pos % gw), contributions=contributions,
            top_share=float(sum(c.share for c in contributions)),
        ))
    return out


def compare_models(detectors: Sequence[LakeDetector], labels: Sequence[str]) -> ModelComparison:
    """Overlap and fingerprints of the sensitive neurons of ``C >= 2`` fitted models.

    Every model must read the same block of the same backbone (else the channel indices
    do not name the same neurons): a :class:`~lakead.errors.ConfigError` says which differs.
    """
    if len(detectors) != len(labels):
        raise ConfigError(f"got {len(labels)} labels for {len(detectors)} models")
    if len(detectors) < 2:
        raise ConfigError("comparing sensitive neurons needs at least two fitted models")
    first = detectors[0]
    for det, label in zip(detectors, labels):
        det.check_fitted()
        if det.backbone.info.fingerprint != first.backbone.info.fingerprint:
            raise ConfigError(f"model {label!r} was fitted on another backbone than {labels[0]!r}: their neurons cannot be compared")
        if det.layer_ != first.layer_ or det.width_ != first.width_:
            raise ConfigError(
                f"model {label!r} reads block {det.layer_!r} ({det.width_} channels) but {labels[0]!r} reads "
                f"block {first.layer_!r} ({first.width_} channels): compare models fitted at the same block"
            )
    sets = tuple(det.neurons_.detach().cpu().numpy().astype(np.int64) for det in detectors)
    variances = np.stack([det.channel_variance_.detach().cpu().numpy().astype(np.float64) for det in detectors])  # (C, D)
    fingerprints = neuron_fingerprints(variances)  # (D, C)
    embedding, explained = embed_2d(fingerprints)
    membership = np.zeros((first.width_, len(detectors)), dtype=bool)
    for c, s in enumerate(sets):
        membership[s, c] = True
    return ModelComparison(
        labels=tuple(labels), neuron_sets=sets, jaccard=jaccard_matrix(sets), fingerprints=fingerprints,
        embedding=embedding, explained=explained, membership=membership,
    )


def comparison_labels(detectors: Sequence[LakeDetector], dirs: Sequence[str | Path]) -> list[str]:
    """A label per model: its class name, with its directory name where class names repeat."""
    names = [det.class_name_ for det in detectors]
    return [n if names.count(n) == 1 else f"{n} ({Path(d).name})" for n, d in zip(names, dirs)]
