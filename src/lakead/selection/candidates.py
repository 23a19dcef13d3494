"""Candidate configurations and their scores computed from block tokens already extracted, so
that ``lakead tune`` runs the network once per image and scores every candidate on the same
features (:mod:`lakead.selection.search`).

A :class:`Candidate` is a registered method (:data:`lakead.methods.METHODS`) with some of its
options; :func:`score_tokens` gives the image scores ``(B,)`` and patch scores ``(B, N)`` the
detector that :meth:`Candidate.build` makes would give after a fit on the same support images,
up to one positive factor per model (LAKE divides its visual scores by the median
leave-one-out score: the ranking is the same). ``tests/test_selection.py`` checks that
equality for every kind, so what tune measures is what the chosen model does.

Kinds (the ``method``): ``visual`` and ``all`` (LAKE's visual branch: the configured neurons,
Euclidean or cosine distance to the nearest support token, max or top-percent pooling),
``anomalydino`` (cosine nearest neighbour, mean of the top 1 %), ``subspace`` (residual outside
the principal subspace, mean of the top 1 %).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..backbones import Backbone, Layer
from ..backbones.base import as_blocks
from ..methods import get_method
from ..methods.lake.config import LakeConfig
from ..methods.lake.fit import choose_neurons, pool_visual, to_unit, token_distance
from ..ops import channel_variance, combine_blocks, nearest_neighbor
from ..patchops import cosine_distances, top_percent_mean
from ..pca import Moments, principal_subspace, residual_energy

#: The methods :func:`score_tokens` can score.
KINDS = ("visual", "all", "anomalydino", "subspace")

#: Block tokens of a set of images: block -> ``(B, N_b, D_b)`` float32, and block -> grid.
Tokens = Mapping[Layer, torch.Tensor]
Grids = Mapping[Layer, tuple[int, int]]


@dataclass(frozen=True)
class Candidate:
    """A method and the options that make it (``layer`` among them: a block or a list)."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in KINDS:
            raise ValueError(f"tune scores {', '.join(KINDS)}; not {self.method!r}")

    @property
    def blocks(self) -> tuple[Layer, ...]:
        return as_blocks(self.options["layer"])

    @property
    def label(self) -> str:
        """A short name: ``anomalydino @ 400``, ``visual k=64 cosine top5% @ 365+400``."""
        o = {k: v for k, v in self.options.items() if k != "layer"}
        words = [self.method] + [f"{k}={v}" for k, v in sorted(o.items())]
        return " ".join(words) + " @ " + "+".join(map(str, self.blocks))

    def config(self, base: Any) -> Any:
        """The method's configuration: ``base`` (another method's config, for the shared fields:
        backbone, image size, decision options) with these options."""
        return get_method(self.method).configure(base, self.options)

    def build(self, base: Any, backbone: Backbone | None = None, runtime: Any = None) -> Any:
        """An unfitted detector of this candidate."""
        return get_method(self.method).build(base, backbone, runtime, self.options)


def tokens_of(features: Tokens, grids: Grids, blocks: Sequence[Layer]) -> tuple[torch.Tensor, tuple[int, int]]:
    """The candidate's patch tokens ``(B, N, D)``: its blocks concatenated on the coarsest grid
    (as every one of these methods combines several blocks)."""
    return combine_blocks([features[b].float() for b in blocks], [grids[b] for b in blocks], "coarsest")


def score_tokens(cand: Candidate, support: Tokens, query: Tokens, grids: Grids, base: Any = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores ``(B,)`` and patch scores ``(B, N)`` of the ``query`` images for a model
    of ``cand`` fitted on the ``support`` images (block tokens of both, with their grids)."""
    cfg = cand.config(base if base is not None else LakeConfig())
    sup, _ = tokens_of(support, grids, cand.blocks)  # (n, N, D)
    qry, _ = tokens_of(query, grids, cand.blocks)  # (B, N, D)
    n, n_tok, width = sup.shape
    b = qry.shape[0]
    flat = sup.reshape(n * n_tok, width)
    if cand.method in ("visual", "all"):
        neurons = choose_neurons(channel_variance(flat), cfg)
        gallery, q = flat[:, neurons], qry[..., neurons].reshape(b * n_tok, -1)
        if cfg.distance == "cosine":
            gallery, q = to_unit(gallery), to_unit(q)
        d, _ = nearest_neighbor(q, gallery.contiguous())
        patches = token_distance(d, cfg).reshape(b, n_tok)
        return pool_visual(patches, cfg), patches
    if cand.method == "anomalydino":
        d, _ = nearest_neighbor(F.normalize(qry, dim=-1).reshape(b * n_tok, width), F.normalize(flat, dim=-1))
        patches = cosine_distances(d).reshape(b, n_tok)
        return top_percent_mean(patches, float(cfg.top_percent)), patches
    mean, _, basis = principal_subspace(Moments.of(flat), float(cfg.variance_kept))
    patches = residual_energy(qry, mean, basis)
    return top_percent_mean(patches, float(cfg.top_percent)), patches


def default_candidates(blocks: Sequence[Any]) -> list[Candidate]:
    """The grid ``lakead tune`` scores by default, per candidate block (or block list): LAKE's
    visual branch as it comes (top-k neurons with the default k, Euclidean, max; the paper) and
    with AnomalyDINO's cosine distance and top-percent pooling on the same neurons; AnomalyDINO's
    rule; the residual subspace at 99 % and 90 % of the variance. Four hypotheses about where a
    defect shows (the high-variance channels, every channel by angle, outside the normal subspace)
    times the blocks: a small grid, scored on features extracted once."""
    out = []
    for layer in blocks:
        out += [
            Candidate("visual", {"layer": layer}),
            Candidate("visual", {"layer": layer, "distance": "cosine", "visual_top_percent": 5.0}),
            Candidate("anomalydino", {"layer": layer}),
            Candidate("subspace", {"layer": layer}),
            Candidate("subspace", {"layer": layer, "variance_kept": 0.9}),
        ]
    return out

