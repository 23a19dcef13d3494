"""The residual-subspace method (lakead.pca, lakead.methods.subspace): its arithmetic against
values computed another way (numpy's SVD), the exact leave-one-out, its options, and a fit,
predict, save and load on the tiny random CLIP. The contract (shapes, maps, invariances,
decisions from normal images) is tests/test_contract.py, which runs every registered method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import texture, with_defect
from lakead.errors import ConfigError
from lakead.methods import get_method, load_detector
from lakead.methods.bank_options import SubspaceConfig
from lakead.methods.subspace import SubspaceDetector
from lakead.pca import Moments, kept_directions, principal_subspace, residual_energy


def test_the_subspace_and_residual_agree_with_numpy_svd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) @ np.diag([5.0, 3.0, 1.0, 0.3, 0.1, 0.05])  # (M, D)
    mean, values, basis = principal_subspace(Moments.of(torch.tensor(x, dtype=torch.float32)), 0.95)
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    var = s**2 / len(x)
    k = int(np.searchsorted(np.cumsum(var) / var.sum(), 0.95) + 1)
    assert basis.shape == (6, k)
    np.testing.assert_allclose(values.numpy(), var, rtol=1e-4)
    # the same subspace (projectors agree, whatever the signs)
    np.testing.assert_allclose((basis @ basis.T).numpy(), vt[:k].T @ vt[:k], atol=1e-5)
    q = rng.normal(size=(2, 4, 6))  # (B, N, D)
    c = q - x.mean(0)
    expected = ((c - c @ vt[:k].T @ vt[:k]) ** 2).sum(-1)
    np.testing.assert_allclose(residual_energy(torch.tensor(q, dtype=torch.float32), mean, basis).numpy(), expected, rtol=1e-4)


def test_kept_directions_leave_a_residual():
    assert kept_directions(torch.tensor([1.0, 1.0, 1.0]), 0.999) == 2  # never every direction
    with pytest.raises(ValueError, match="2 channels"):
        kept_directions(torch.tensor([1.0]), 0.9)


def test_moments_without_rows_are_the_moments_of_the_rest():
    x = torch.randn(50, 4)
    a, b = Moments.of(x).without(x[:10]), Moments.of(x[10:])
    assert a.count == b.count == 40
    torch.testing.assert_close(a.total, b.total)
    torch.testing.assert_close(a.outer, b.outer)
    with pytest.raises(ValueError, match="cannot take"):
        Moments.of(x[:5]).without(x)


def test_options_are_checked():
    for bad in (dict(variance_kept=1.0), dict(variance_kept=0.0), dict(top_percent=0.0), dict(blur_sigma=-1.0)):
        with pytest.raises(ConfigError):
            SubspaceConfig(**bad).validate()
    with pytest.raises(ConfigError, match="unknown option"):
        SubspaceDetector(backbone="x", variance_kep=0.9)


@pytest.fixture(scope="module")
def fitted(tiny_clip_dir):
    rng = np.random.default_rng(3)
    normals = [texture(rng) for _ in range(6)]
    det = get_method("subspace").build(SubspaceConfig(backbone=str(tiny_clip_dir), layer=2, image_size=64, variance_kept=0.9))
    return det.fit(normals, "tile"), normals, rng


def test_fit_keeps_the_subspace_and_scores_a_defect_higher(fitted):
    det, normals, rng = fitted
    st = det.state_
    assert 1 <= st.directions < st.width and st.bank.shape == (st.directions, st.width)
    assert st.variance_explained >= 0.9
    clean, broken = texture(rng), with_defect(texture(rng), 20, 20, 16)
    pred = det.predict([clean, broken])
    assert pred.scores[1] > pred.scores[0]
    assert pred.maps[1].shape == broken.shape[:2]
    info = det.summary()
    assert info["method"] == "subspace" and info["directions"] == st.directions and "bank_vectors" not in info


def test_leave_one_out_is_the_subspace_without_the_image(fitted, tiny_clip_dir):
    """The leave-one-out score of support image 0 equals the score of a model fitted on the others."""
    det, normals, _ = fitted
    others = get_method("subspace").build(det.config).fit(normals[1:], "tile")
    assert det.state_.loo_scores[0] == pytest.approx(float(others.predict([normals[0]]).scores[0]), rel=1e-4)
    assert np.isfinite(det.state_.threshold)


def test_save_and_load_give_the_same_scores(fitted, tmp_path):
    det, normals, rng = fitted
    images = [texture(rng), with_defect(texture(rng), 5, 30, 12)]
    det.save(tmp_path / "m")
    again = load_detector(tmp_path / "m")
    assert isinstance(again, SubspaceDetector)
    np.testing.assert_array_equal(again.predict(images).scores, det.predict(images).scores)
    assert again.state_.directions == det.state_.directions
