"""The streaming fit (issue 16): two passes in bounded memory give the one-pass fit's numbers.

The one-pass fit is the fit as it always was (every full-width token held, the steps of
``lakead.methods.lake.fit`` on them; ``tests/test_regression.py`` pins its numbers). A ``memory``
below twice the full-width tokens makes the same fit stream: moments merged batch by batch,
neurons chosen, a second pass keeping the gallery. Both must agree to 1e-5, with the same
neurons and the same decisions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import texture, with_defect
from lakead import LakeDetector
from lakead.coreset import greedy_coreset
from lakead.errors import ConfigError
from lakead.methods.lake import fit as steps
from lakead.methods.lake import stream
from lakead.ops import Moments, channel_variance
from regression.cases import CASES, held_out_images, normals

TOL = dict(rtol=1e-5, atol=1e-5)


def full_bytes(det: LakeDetector, n_inputs: int) -> int:
    gh, gw = det.grid_
    return n_inputs * gh * gw * det.width_ * 4


def compare(one: LakeDetector, two: LakeDetector, held: list[np.ndarray]) -> None:
    """Same learned state and the same predictions, to 1e-5."""
    np.testing.assert_array_equal(one.neurons_.numpy(), two.neurons_.numpy())
    np.testing.assert_allclose(one.channel_variance_.numpy(), two.channel_variance_.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(one.gallery_.numpy(), two.gallery_.numpy(), **TOL)
    np.testing.assert_array_equal(one.gallery_image_.numpy(), two.gallery_image_.numpy())
    for name in ("loo_visual", "loo_semantic", "loo_scores", "loo_tokens", "loo_scope"):
        a, b = getattr(one, name + "_"), getattr(two, name + "_")
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_allclose(a, b, **TOL, err_msg=name)
    if one.scope_gallery_ is not None:
        np.testing.assert_allclose(one.scope_gallery_.numpy(), two.scope_gallery_.numpy(), **TOL)
        np.testing.assert_array_equal(one.scope_gallery_image_.numpy(), two.scope_gallery_image_.numpy())
    assert (one.support_, one.outliers_, one.skipped_) == (two.support_, two.outliers_, two.skipped_)
    assert (one.gallery_rule_, one.loo_rule_) == (two.gallery_rule_, two.loo_rule_)
    for a, b in ((one.threshold_, two.threshold_), (one.visual_scale_, two.visual_scale_)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(one.map_range_, two.map_range_, **TOL)
    p1, p2 = one.predict(held), two.predict(held)
    np.testing.assert_array_equal(p1.anomalous, p2.anomalous)
    for key in ("scores", "visual", "semantic", "scope"):
        np.testing.assert_allclose(getattr(p1, key), getattr(p2, key), **TOL, err_msg=key)
    for m1, m2 in zip(p1.maps, p2.maps):
        np.testing.assert_allclose(m1, m2, **TOL)


def both(make, images, **fit) -> tuple[LakeDetector, LakeDetector]:
    one = make().fit(images, "tile", **fit)
    assert one.fit_passes == 1
    two = make().fit(images, "tile", memory=2 * full_bytes(one, len(images)) - 1, **fit)
    assert two.fit_passes >= 2
    return one, two


@pytest.fixture(scope="module")
def onnx_backbone(tmp_path_factory):
    from _onnx_models import save_tiny_onnx
    from lakead.backbones import load_backbone

    return load_backbone("onnx:" + str(save_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")))


@pytest.mark.parametrize("case", sorted(CASES))
def test_streaming_fit_gives_the_one_pass_numbers(case, tiny_backbone, onnx_backbone):
    """Every recorded regression configuration (k auto and the outlier filter, random and
    all channels, no text, the semantic map, ONNX), with the scope check on."""
    kind, opts = CASES[case]
    bb = tiny_backbone if kind == "clip" else onnx_backbone
    compare(*both(lambda: LakeDetector(bb, **opts), normals()), held_out_images())


def test_streaming_fit_with_several_blocks_outliers_dropped_and_an_unreadable_image(tiny_backbone, tmp_path):
    rng = np.random.default_rng(5)
    images = [texture(rng) for _ in range(9)] + [with_defect(texture(rng), 10, 10, 30)]
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i:02d}.png")
        Image.fromarray(img).save(paths[-1])
    paths.insert(3, tmp_path / "missing.png")
    opts = dict(k="auto", layer=[2, 3], image_size=48, batch_size=3, filter_outliers=True, outlier_contamination=0.1)
    one, two = both(lambda: LakeDetector(tiny_backbone, **opts), [str(p) for p in paths])
    assert one.outliers_ and len(one.skipped_) == 1 and two.fit_passes >= 4  # the filter made it fit again
    compare(one, two, held_out_images())


def test_streaming_fit_on_subsets_and_a_coreset_gallery(tiny_backbone, monkeypatch):
    """Leave-one-out on an evenly spaced subset, the scope gallery a random subset of the
    tokens, the gallery a coreset: the same in one pass and in two."""
    monkeypatch.setattr(steps, "MAX_LOO_IMAGES", 4)
    monkeypatch.setattr(steps, "MAX_SCOPE_TOKENS", 50)
    rng = np.random.default_rng(6)
    images = [texture(rng) for _ in range(11)]
    opts = dict(k=6, layer=2, image_size=32, batch_size=4, gallery_size=40)
    one, two = both(lambda: LakeDetector(tiny_backbone, **opts), images)
    assert one.gallery_.shape[0] == 40 and one.scope_gallery_.shape[0] == 50
    assert np.isfinite(one.loo_visual_).sum() == 4
    assert one.loo_rule_.startswith("4 of 11") and one.gallery_rule_.startswith("greedy coreset: 40 of 176")
    assert one.summary()["gallery_rule"] == one.gallery_rule_ and one.summary()["loo_rule"] == one.loo_rule_
    compare(one, two, held_out_images())


def test_reduced_model_saves_and_loads_the_same(tiny_backbone, tmp_path):
    rng = np.random.default_rng(7)
    det = LakeDetector(tiny_backbone, k=6, layer=2, image_size=32, gallery_size=30).fit([texture(rng) for _ in range(6)], "tile")
    loaded = LakeDetector.load(det.save(tmp_path / "m"))
    assert loaded.gallery_rule_ == det.gallery_rule_ and loaded.config.gallery_size == 30
    assert loaded.fingerprint() == det.fingerprint()
    held = held_out_images()
    np.testing.assert_array_equal(det.predict(held).scores, loaded.predict(held).scores)


def test_gallery_builder_does_not_depend_on_the_batches():
    torch.manual_seed(0)
    tokens = torch.randn(23, 5, 3)  # 23 images of 5 tokens, 3 neurons
    results = []
    for sizes in ([23], [1] * 23, [4, 7, 2, 10]):
        b, start = stream.GalleryBuilder(12, seed=1), 0
        for s in sizes:
            b.add(tokens[start : start + s], start)
            start += s
        results.append(b.result())
    for g, i in results[1:]:
        torch.testing.assert_close(g, results[0][0], rtol=0, atol=0)
        assert torch.equal(i, results[0][1])
    g, i = results[0]
    assert g.shape == (12, 3) and torch.equal(g, tokens.reshape(-1, 3)[i.long() * 5 + _token_of(g, tokens, i)])


def _token_of(g, tokens, image):
    """Which token of its image each gallery vector is (they are copies of support tokens)."""
    return torch.tensor([int((tokens[im] == v).all(1).nonzero()[0]) for v, im in zip(g, image.long())])


def test_gallery_builder_without_a_cap_keeps_every_token_in_order():
    tokens = torch.randn(4, 3, 2)
    b = stream.GalleryBuilder(None)
    b.add(tokens[:3], 0)
    b.add(tokens[3:], 3)
    g, i = b.result()
    assert torch.equal(g, tokens.reshape(12, 2)) and i.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert stream.GalleryBuilder(100).describe(100, 12, 12).startswith("every support token")


def test_gallery_builder_reduces_once_with_the_coreset_of_lakead_coreset():
    x = torch.randn(30, 4)
    b = stream.GalleryBuilder(10, seed=2)
    b.add(x[:, None, :], 0)  # 30 images of one token: one block of 30 = 3 x 10, reduced to 10
    g, i = b.result()
    want = greedy_coreset(x, 10, seed=2).sort().values
    assert b.reductions == 1 and i.tolist() == want.tolist() and torch.equal(g, x[want])


def test_moments_merge_equals_the_two_pass_variance():
    x = torch.randn(1000, 7, dtype=torch.float64) * 1e3 + 1e6  # a large mean: the naive sum of squares would cancel
    m = None
    for chunk in x.split(77):
        c = Moments.of(chunk)
        m = c if m is None else m.merge(c)
    torch.testing.assert_close(m.variance, channel_variance(x), rtol=1e-12, atol=0)
    assert m.count == 1000


@pytest.mark.parametrize("text,want", [("1GiB", 1 << 30), ("300MiB", 300 << 20), ("1.5G", 1_500_000_000), ("65536", 65536)])
def test_parse_memory(text, want):
    assert stream.parse_memory(text) == want


@pytest.mark.parametrize("text", ["lots", "1 parsec", "-5MiB", "12", ""])
def test_parse_memory_refuses(text):
    with pytest.raises(ConfigError, match="fit memory"):
        stream.parse_memory(text)


def test_a_gallery_over_the_memory_is_a_clear_error(tiny_backbone):
    rng = np.random.default_rng(8)
    images = [texture(rng) for _ in range(6)]
    det = LakeDetector(tiny_backbone, selection="all", layer=2, image_size=64, batch_size=2)
    with pytest.raises(ConfigError, match="gallery_size"):
        det.fit(images, "tile", memory=2048)


def test_gallery_size_is_checked():
    with pytest.raises(ConfigError, match="gallery_size"):
        LakeDetector("unused", gallery_size=0)



def test_fit_from_a_lazy_sequence_never_holds_the_images(tiny_backbone):
    """A Sequence that makes its images when indexed (a dataset) is read batch by batch: the
    fit keeps no reference to an image it has scored, so at most a few batches are alive."""
    import weakref
    from collections.abc import Sequence

    alive: set[int] = set()
    peak = [0]

    class Dataset(Sequence):
        def __len__(self) -> int:
            return 120

        def __getitem__(self, i):
            if isinstance(i, slice):
                return [self[j] for j in range(*i.indices(len(self)))]
            if not 0 <= i < len(self):
                raise IndexError(i)
            arr = texture(np.random.default_rng(i), (32, 32))
            key = id(arr)
            alive.add(key)
            weakref.finalize(arr, alive.discard, key)
            peak[0] = max(peak[0], len(alive))
            return arr

    det = LakeDetector(tiny_backbone, layer=2, k=4, batch_size=8, use_text=False, device="cpu")
    det.fit(Dataset(), "texture", memory="200KiB")  # below the 240 KiB of full-width tokens: two passes
    assert det.fit_passes >= 2 and len(det.support_) == 120
    assert peak[0] <= 4 * 8, f"{peak[0]} images alive at once"
    one = LakeDetector(tiny_backbone, layer=2, k=4, batch_size=8, use_text=False, device="cpu")
    one.fit([texture(np.random.default_rng(i), (32, 32)) for i in range(120)], "texture")
    np.testing.assert_allclose(one.gallery_.numpy(), det.gallery_.numpy(), **TOL)
