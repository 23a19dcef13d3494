"""Choosing a configuration from a product's normal images alone (``lakead tune``): candidate
configurations scored from features extracted once (:mod:`.candidates`) on synthetic defects of
held-out normal images (:mod:`lakead.synthetic`, :mod:`.search`). docs/SELECTION.md."""

from .candidates import Candidate, default_candidates, score_tokens
from .search import Scored, TuneResult, make_queries, score_candidates, tune

__all__ = ["Candidate", "Scored", "TuneResult", "default_candidates", "make_queries", "score_candidates", "score_tokens", "tune"]
