"""The math of LAKE against hand-checked values and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lakead.ops import (
    anomaly_probability,
    channel_variance,
    nearest_neighbor,
    pool_scores,
    robust_threshold,
    top_k_channels,
    upsample_map,
)


def test_channel_variance_hand_values():
    x = torch.tensor([[1.0, 10.0, 5.0], [3.0, 10.0, -5.0]])
    # population variances: (1, 3) -> 1; constant -> 0; (5, -5) -> 25
    assert channel_variance(x).tolist() == [1.0, 0.0, 25.0]


def test_channel_variance_matches_numpy_and_chunks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=g) * torch.arange(1, 8) + 100.0
    want = np.var(x.double().numpy(), axis=0)
    np.testing.assert_allclose(channel_variance(x).numpy(), want, rtol=1e-10)
    np.testing.assert_allclose(channel_variance(x, chunk_rows=13).numpy(), want, rtol=1e-10)


def test_top_k_by_variance_hand_checked():
    # channel stds 1, 5, 2, 4, 3 -> variance order 1, 3, 4, 2, 0
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 5, generator=g)
    z = (z - z.mean(0)) / z.std(0)
    x = z * torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0])
    assert top_k_channels(channel_variance(x), 3).tolist() == [1, 3, 4]
    assert top_k_channels(channel_variance(x), 5).tolist() == [1, 3, 4, 2, 0]


def test_top_k_ties_broken_by_lower_index():
    assert top_k_channels(torch.tensor([2.0, 1.0, 2.0, 2.0]), 2).tolist() == [0, 2]


@pytest.mark.parametrize("k", [0, 5])
def test_top_k_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        top_k_channels(torch.ones(4), k)


def test_top_k_equals_truncated_pca_when_channels_uncorrelated():
    """With independent channels the covariance is diagonal, so its top-k principal axes are
    the top-k channels by variance: projecting on them keeps the same coordinates."""
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([0.5, 3.0, 1.0, 6.0, 2.0, 4.5])
    x = torch.randn(50000, 6, generator=g, dtype=torch.float64) * scales
    k = 3
    chosen = top_k_channels(channel_variance(x), k)
    xc = x - x.mean(0)
    cov = xc.T @ xc / x.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    axes = evecs[:, evals.argsort(descending=True)[:k]]  # (D, k)
    # each principal axis is (up to sign) a unit vector on one chosen channel
    on = axes.abs().argmax(0)
    assert on.tolist() == chosen.tolist()
    assert torch.allclose(axes.abs().max(0).values, torch.ones(k, dtype=torch.float64), atol=2e-2)
    # and the projections agree with the selected coordinates
    proj = xc @ axes
    sel = xc[:, chosen] * torch.sign(axes[on, torch.arange(k)])
    assert torch.allclose(proj, sel, atol=0.1 * float(scales.max()))


def brute_force(q: torch.Tensor, g: torch.Tensor, qg=None, gg=None):
    d = torch.cdist(q.double(), g.double())  # (Q, M) exact in float64
    if qg is not None:
        d[qg[:, None] == gg[None, :]] = math.inf
    val, idx = d.min(1)
    return val, idx


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 23])
def test_nearest_neighbor_equals_brute_force(block):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(37, 5, generator=g) * 10
    gal = torch.randn(113, 5, generator=g) * 10
    d, i = nearest_neighbor(q, gal, block_elements=block)
    want_d, want_i = brute_force(q, gal)
    assert torch.equal(i, want_i)
    assert torch.allclose(d.double(), want_d, rtol=1e-6, atol=1e-5)


def test_nearest_neighbor_exact_for_duplicates_far_from_origin():
    """The chosen neighbour's distance is recomputed directly: no cancellation error."""
    base = torch.full((4, 16), 1000.0)
    gal = torch.cat([base + torch.arange(4.0)[:, None], base + 0.5])
    d, i = nearest_neighbor(base.clone(), gal)
    assert d[0].item() == 0.0 and i[0].item() == 0


def test_nearest_neighbor_groups_exclude_own_image():
    q = torch.tensor([[0.0], [10.0]])
    gal = torch.tensor([[0.0], [1.0], [10.0], [12.0]])
    d, i = nearest_neighbor(q, gal, query_groups=torch.tensor([0, 1]), gallery_groups=torch.tensor([0, 2, 1, 2]))
    assert i.tolist() == [1, 3] and d.tolist() == [1.0, 2.0]
    d, i = nearest_neighbor(q[:1], gal[:1], query_groups=torch.tensor([0]), gallery_groups=torch.tensor([0]))
    assert math.isinf(d.item()) and i.item() == -1


def test_nearest_neighbor_groups_brute_force_in_blocks():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(40, 4, generator=g)
    gal = torch.randn(90, 4, generator=g)
    qg = torch.randint(0, 5, (40,), generator=g)
    gg = torch.randint(0, 5, (90,), generator=g)
    d, i = nearest_neighbor(q, gal, query_groups=qg, gallery_groups=gg, block_elements=50)
    want_d, want_i = brute_force(q, gal, qg, gg)
    assert torch.equal(i, want_i)
    assert torch.allclose(d.double(), want_d, atol=1e-5)


def test_nearest_neighbor_bad_shapes():
    with pytest.raises(ValueError, match="expected queries"):
        nearest_neighbor(torch.zeros(3, 4), torch.zeros(5, 3))


def test_pooling():
    s = torch.tensor([[0.1, 0.9, 0.2], [0.5, 0.5, 0.5]])
    assert pool_scores(s, "max").tolist() == pytest.approx([0.9, 0.5])
    assert pool_scores(s, "mean").tolist() == pytest.approx([0.4, 0.5])
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_scores(s, "median")


def test_max_pooling_keeps_one_hot_token():
    s = torch.zeros(1, 576)
    s[0, 300] = 7.0
    assert pool_scores(s).item() == 7.0
    assert pool_scores(s, "mean").item() == pytest.approx(7.0 / 576)


def test_anomaly_probability_hand_values():
    # cosine with the normal prompt 1, with the anomalous 0: softmax([s, 0])[1] = 1 / (1 + e^s)
    z = torch.tensor([[[2.0, 0.0]]])  # normalised inside
    t = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    p = anomaly_probability(z, t, logit_scale=100.0)
    assert p.item() == pytest.approx(1.0 / (1.0 + math.exp(100.0)))
    p = anomaly_probability(torch.tensor([[[1.0, 1.0]]]), t, logit_scale=50.0)
    assert p.item() == pytest.approx(0.5)


@pytest.mark.parametrize("size", [(24, 24), (600, 800), (7, 300)])
def test_upsample_map_has_the_requested_size(size):
    m = upsample_map(torch.rand(4, 4), size)
    assert m.shape == size and m.dtype == np.float32


def test_upsample_map_values_and_blur():
    grid = torch.zeros(3, 3)
    grid[1, 1] = 9.0
    m = upsample_map(grid, (30, 30))
    assert np.unravel_index(m.argmax(), m.shape) in {(14, 14), (14, 15), (15, 14), (15, 15)}
    assert m.max() <= 9.0 and m.min() >= 0.0
    blurred = upsample_map(grid, (30, 30), sigma=4.0)
    assert blurred.max() < m.max()
    assert blurred.sum() == pytest.approx(m.sum(), rel=2e-2)  # a blur moves mass (edges: "nearest" mode)
    assert np.allclose(upsample_map(torch.full((2, 5), 3.0), (8, 11)), 3.0)


def test_robust_threshold():
    assert robust_threshold([1.0, 2.0, 3.0, 4.0, 100.0], 3.0) == pytest.approx(3.0 + 3 * 1.4826 * 1.0)
    # MAD zero: falls back to the standard deviation
    assert robust_threshold([2.0, 2.0, 2.0, 5.0], 1.0) == pytest.approx(2.0 + np.std([2.0, 2.0, 2.0, 5.0]))
    assert robust_threshold([3.0], 3.0) == 3.0
    with pytest.raises(ValueError, match="no finite"):
        robust_threshold([math.nan])


def test_nearest_neighbor_memory_is_bounded_for_a_large_gallery(monkeypatch):
    """100k+ gallery vectors: no distance block larger than block_elements, same answer."""
    import lakead.ops as ops

    sizes = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(ops.torch, "addmm", spy)
    g = torch.Generator().manual_seed(4)
    gallery = torch.randn(120_000, 16, generator=g)
    queries = torch.randn(300, 16, generator=g)
    d, i = nearest_neighbor(queries, gallery, block_elements=1 << 20)
    assert max(sizes) <= 1 << 20 and len(sizes) > 1
    monkeypatch.setattr(ops.torch, "addmm", real_addmm)
    want_d, want_i = brute_force(queries[:50], gallery)
    assert torch.equal(i[:50], want_i)
    assert torch.allclose(d[:50].double(), want_d, atol=1e-4)


@pytest.mark.parametrize("n_q,n_g,block", [(196, 2_000_000, 1 << 20), (1, 10, 100), (10, 10, 100), (5000, 5000, 1 << 20),
                                           (3, 1 << 22, 1 << 20), (1 << 22, 3, 1 << 20), (7, 9, 1)])
def test_search_blocks_hold_at_most_the_bound_and_are_real_products(n_q, n_g, block):
    from lakead.ops import search_blocks

    qb, gb = search_blocks(n_q, n_g, block)
    assert 1 <= qb <= n_q and 1 <= gb <= n_g
    assert qb * gb <= max(block, 1)
    side = math.isqrt(block)
    assert qb >= min(n_q, side) and gb >= min(n_g, side)  # no one-row blocks while a square one fits
