"""Choosing support images ("shots") from a pool; datasets on disk.

How the shots were drawn is part of every result: :func:`select_shots` returns the chosen
paths together with a one-line description that reports and saved models record.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError


def select_shots(
    pool: Sequence[Path], shots: int | None, seed: int | None = None
) -> tuple[list[Path], str]:
    """Pick ``shots`` images from ``pool``.

    ``shots=None`` (or at least the pool size) takes all. Otherwise, with ``seed=None``, the
    first ``shots`` after sorting by path; with a seed, a sample drawn with
    ``random.Random(seed)`` from the sorted pool (the same seed gives the same shots on every
    machine). Returns the chosen paths, sorted, and a description of the rule used.
    """
    ordered = sorted(pool, key=lambda p: str(p))
    if shots is not None and shots < 1:
        raise ConfigError(f"shots must be at least 1, got {shots}")
    if shots is None or shots >= len(ordered):
        return ordered, f"all {len(ordered)} images"
    if seed is None:
        return ordered[:shots], f"first {shots} of {len(ordered)} images sorted by name"
    chosen = random.Random(seed).sample(ordered, shots)
    return sorted(chosen, key=lambda p: str(p)), f"{shots} of {len(ordered)} images sampled with seed {seed}"
