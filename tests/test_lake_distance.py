"""LAKE's ``distance`` and ``visual_top_percent`` options: cosine instead of Euclidean in the sensitive
subspace, the mean of the top tokens instead of their max (docs/DECISIONS.md measures why). The
defaults stay the paper's (tests/test_regression.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import texture, with_defect
from lakead import LakeDetector
from lakead.decision import derive_thresholds
from lakead.errors import ConfigError
from lakead.export import export_model
from lakead.methods.lake import fit as steps
from test_export import assert_agrees
from _onnx_models import save_tiny_onnx
from lakead.backbones import load_backbone
from regression.cases import COSINE_CASES, COSINE_RECORD, run_cosine_case

OPTS = dict(k=8, layer=2, image_size=64, batch_size=8, use_text=False)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    normal = [texture(rng) for _ in range(10)]
    test = [texture(rng) for _ in range(3)] + [with_defect(texture(rng), 20, 20, 16) for _ in range(3)]
    return normal, test


@pytest.fixture(scope="module")
def cosine(tiny_backbone, images):
    return LakeDetector(tiny_backbone, distance="cosine", **OPTS).fit(images[0], "tile")


@pytest.fixture(scope="module")
def both(tiny_backbone, images):
    return LakeDetector(tiny_backbone, distance="cosine", visual_top_percent=10, **OPTS).fit(images[0], "tile")


def subspace_tokens(det: LakeDetector, arrays: list[np.ndarray]) -> torch.Tensor:
    """The raw tokens of ``arrays`` in the sensitive neurons, ``(B, N, K)`` float64."""
    return torch.cat([b.tokens[..., det.neurons_].double() for b in det.iter_scored(arrays, text=False)])


def test_cosine_scores_are_one_minus_the_highest_cosine(cosine, images):
    normal, test = images
    sup = subspace_tokens(cosine, normal).reshape(-1, cosine.neurons_.numel())  # (n*N, K), raw support tokens
    q = subspace_tokens(cosine, test)  # (B, N, K)
    cos = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(sup, dim=-1).T  # (B, N, n*N)
    want = (1.0 - cos.amax(-1)).amax(-1) / cosine.visual_scale_
    pred = cosine.predict(test)
    np.testing.assert_allclose(pred.visual, want.numpy(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(cosine.gallery_.norm(dim=1), torch.ones(1), atol=1e-5)  # stored as unit vectors
    loo = cosine.loo_visual_ * cosine.visual_scale_  # raw cosine distances of the support images
    assert np.all((loo >= 0) & (loo <= 2)) and np.median(cosine.loo_visual_) == pytest.approx(1.0)
    assert pred.anomalous[3:].all() and pred.visual[3:].min() > pred.visual[:3].max()


def test_cosine_ignores_the_length_of_a_token_and_euclidean_does_not(cosine, tiny_backbone, images):
    """A support token scaled by 3 is at cosine distance 0 from its own direction; not in Euclidean."""
    state = cosine.state_
    g = state.gallery[:5]  # unit vectors
    tokens = torch.zeros(1, 5, cosine.width_)
    tokens[0][:, state.neurons] = 3.0 * g
    from lakead.methods.lake.score import token_distances

    d_cos, _ = token_distances(tokens, state, cosine.config)
    assert d_cos.abs().max() < 1e-5
    d_euc, _ = token_distances(tokens, state, LakeDetector(tiny_backbone, **OPTS).config)
    assert d_euc.min() * state.visual_scale > 1.9  # ||3g - g|| = 2 for the nearest unit vector g itself


def test_top_percent_pools_the_highest_tokens(tiny_backbone, images):
    """The visual score and the leave-one-out scores are the mean of the top 10 % of the token
    scores (8 x 8 tokens: the top 6), which the max-pooled model's token scores give."""
    normal, test = images
    plain = LakeDetector(tiny_backbone, **OPTS).fit(normal, "tile")
    top = LakeDetector(tiny_backbone, visual_top_percent=10, **OPTS).fit(normal, "tile")
    raw = torch.cat([b.distances for b in plain.iter_scored(test, text=False)]) * plain.visual_scale_  # (B, 64)
    want = raw.topk(6, dim=1).values.mean(1) / top.visual_scale_
    np.testing.assert_allclose(top.predict(test).visual, want.numpy(), rtol=1e-5)
    loo = torch.from_numpy(plain.loo_tokens_.reshape(len(normal), 64) * plain.visual_scale_)
    np.testing.assert_allclose(top.loo_visual_, (loo.topk(6, dim=1).values.mean(1) / top.visual_scale_).numpy(), rtol=1e-5)
    assert np.median(top.loo_visual_) == pytest.approx(1.0) and top.visual_scale_ < plain.visual_scale_
    with pytest.raises(ConfigError, match="visual_top_percent"):
        LakeDetector(tiny_backbone, visual_top_percent=0, **OPTS)


def test_options_survive_save_load_and_two_passes(both, tiny_backbone, images, tmp_path):
    normal, test = images
    loaded = LakeDetector.load(both.save(tmp_path / "m"))
    assert (loaded.config.distance, loaded.config.visual_top_percent) == ("cosine", 10)
    assert (loaded.summary()["distance"], loaded.summary()["visual_top_percent"]) == ("cosine", 10)  # lakead info
    np.testing.assert_array_equal(loaded.predict(test).scores, both.predict(test).scores)
    two = LakeDetector(tiny_backbone, distance="cosine", visual_top_percent=10, **OPTS).fit(
        normal, "tile", memory=100_000)  # under 2 x 80 KiB of full-width tokens: streamed
    assert two.fit_passes >= 2  # not the one-pass fit
    np.testing.assert_allclose(two.loo_scores_, both.loo_scores_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two.predict(test).scores, both.predict(test).scores, rtol=1e-5, atol=1e-6)


def test_export_computes_both_options_in_the_graph(both, images, tmp_path):
    out = export_model(both, tmp_path / "exported")
    report = assert_agrees(both, out, images[1])
    assert report["decisions_same"]


def test_cosine_with_a_coreset_is_refused(tiny_backbone):
    with pytest.raises(ConfigError, match="gallery_size"):
        LakeDetector(tiny_backbone, distance="cosine", gallery_size=100, **OPTS)
    with pytest.raises(ConfigError, match="distance"):
        LakeDetector(tiny_backbone, distance="manhattan", **OPTS)


def test_cosine_gallery_needs_every_token():
    with pytest.raises(ValueError, match="every support token"):
        steps.cosine_gallery(torch.ones(10, 4), 3, 4, torch.device("cpu"))


@pytest.fixture(scope="module")
def cosine_record():
    with np.load(COSINE_RECORD) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("case", sorted(COSINE_CASES))
def test_same_numbers_as_the_two_search_fit(case, cosine_record, tiny_backbone, tmp_path):
    """The leave-one-out runs once, with the configured distance and pooling, and gives what the
    fit that searched twice (Euclidean, then cosine again) gave: leave-one-out scores, gallery,
    decision levels and predictions as recorded from it (tests/regression/cases.py), one pass
    and two (a pass of its own for the leave-one-out images, the outlier filter's second round)."""
    kind, opts, memory = COSINE_CASES[case]
    backbone = tiny_backbone if kind == "clip" else load_backbone("onnx:" + str(save_tiny_onnx(tmp_path / "tiny.onnx")))
    det = LakeDetector(backbone, **opts)
    got = run_cosine_case(det, memory)
    want = {k.split("/", 1)[1]: v for k, v in cosine_record.items() if k.startswith(case + "/")}
    assert sorted(got) == sorted(want)
    np.testing.assert_array_equal(got["neurons"], want["neurons"])
    assert int(got["passes"]) == int(want["passes"])
    # the decision levels: the recorded leave-one-out scores through the threshold rule of the code
    # under test, which is the recorded levels while that rule is unchanged (the rule may change
    # on its own; what the fit feeds it must not)
    levels = derive_thresholds(want["loo_scores"], want["loo_visual"], want["loo_tokens"], want.get("loo_scope"),
                               det.config)
    expect = {"threshold": levels.image, "seed_threshold": levels.seed, "pixel_threshold": levels.pixel,
              "scope_threshold": levels.scope}
    for key, value in expect.items():
        if value is None:
            assert key not in got
        else:
            assert float(got[key]) == pytest.approx(value, rel=1e-5, abs=1e-5), key
    np.testing.assert_allclose(got["map_range"], [float(np.median(want["loo_tokens"])), levels.seed], rtol=1e-5, atol=1e-5)
    for key in sorted(set(want) - set(expect) - {"neurons", "passes", "map_range"}):
        np.testing.assert_allclose(np.asarray(got[key], dtype=np.float64), want[key].astype(np.float64), rtol=1e-5,
                                   atol=1e-5, err_msg=key)
