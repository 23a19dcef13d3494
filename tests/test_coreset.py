"""Greedy coreset: the k-center rule against a plain reference, bounds, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lakead.coreset import coreset_count, greedy_coreset, random_projection


def _reference(x: np.ndarray, count: int, start: int) -> list[int]:
    """k-center greedy written the obvious way (full distance matrix), float64."""
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    chosen = [start]
    while len(chosen) < count:
        nearest = d[:, chosen].min(1)
        nearest[chosen] = -1
        chosen.append(int(np.argmax(nearest)))
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_without_projection(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 16))
    got = greedy_coreset(torch.from_numpy(x).float(), 40, projection_dim=64, start=5).tolist()
    assert got == _reference(x, 40, 5)


def test_projection_is_used_above_its_width_and_is_deterministic():
    x = torch.randn(500, 300, generator=torch.Generator().manual_seed(0))
    a = greedy_coreset(x, 50, projection_dim=32, seed=3)
    b = greedy_coreset(x, 50, projection_dim=32, seed=3)
    assert torch.equal(a, b)
    assert len(set(a.tolist())) == 50
    p = random_projection(x, 32, seed=3)
    assert p.shape == (500, 32)
    # distances are kept roughly (Johnson-Lindenstrauss): ratio of a pair's distances near 1
    ratio = (p[0] - p[1]).norm() / (x[0] - x[1]).norm()
    assert 0.5 < float(ratio) < 1.5


def test_coverage_radius_shrinks_with_count():
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(1))

    def radius(idx):
        return float(torch.cdist(x, x[idx]).min(1).values.max())

    r = [radius(greedy_coreset(x, c, seed=0)) for c in (10, 100, 1000)]
    assert r[0] > r[1] > r[2]
    # k-center greedy is a 2-approximation: it beats random picks of the same size clearly
    rand = torch.randperm(2000, generator=torch.Generator().manual_seed(0))[:100]
    assert r[1] < radius(rand)


def test_edges_and_errors():
    x = torch.randn(7, 3)
    assert greedy_coreset(x, 7).tolist() == list(range(7))
    assert greedy_coreset(x, 100).tolist() == list(range(7))
    dup = torch.zeros(5, 3)  # all equal: still distinct indices
    assert sorted(greedy_coreset(dup, 3, start=0).tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 1"):
        greedy_coreset(x, 0)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        greedy_coreset(torch.randn(2, 3, 4), 1)
    with pytest.raises(ValueError, match="ratio"):
        coreset_count(10, 0.0)
    assert coreset_count(10, 0.25) == 3


def test_float16_bank_is_projected_in_chunks():
    x = torch.randn(1000, 200, generator=torch.Generator().manual_seed(2))
    a = random_projection(x.half(), 64, seed=1, chunk_rows=128)
    b = random_projection(x.half().float(), 64, seed=1)
    assert torch.allclose(a, b, atol=1e-5)
