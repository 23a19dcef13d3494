"""Gallery indexes (``index=``, lakead.index): the k-d tree finds the exact search's neighbours,
HNSW is approximate but saved with the model, ``auto`` never changes results. docs/SCALE.md
measures their speed and exactness on real images."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import texture, with_defect
from lakead import LakeDetector
from lakead.errors import ConfigError
from lakead.index import AUTO_MAX_DIM, AUTO_MIN_VECTORS, GalleryIndex, resolve
from lakead.ops import nearest_neighbor

OPTS = dict(k=8, layer=2, image_size=64, batch_size=8, use_text=False)


def clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    """Vectors around a few centres (features are not uniform noise), float32."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=g) * 3
    return centres[torch.randint(0, 20, (n,), generator=g)] + torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("dim", [3, 8])
def test_kdtree_finds_the_exact_neighbours(dim):
    gallery, queries = clustered(5000, dim, 0), clustered(300, dim, 1)
    d0, i0 = nearest_neighbor(queries, gallery)
    d, i = GalleryIndex(gallery, "kdtree").search(queries)
    assert torch.equal(i, i0)
    assert torch.equal(d, d0)  # the same distance formula as the exact search, bit for bit


def test_hnsw_is_close_and_never_nearer_than_the_exact_neighbour():
    pytest.importorskip("faiss")
    gallery, queries = clustered(20000, 8, 2), clustered(400, 8, 3)
    d0, i0 = nearest_neighbor(queries, gallery)
    index = GalleryIndex(gallery, "hnsw", ef_search=64)
    d, i = index.search(queries)
    assert (i == i0).float().mean() > 0.85  # recall@1 at ef 64 (0.94 when written)
    assert bool((d >= d0 - 1e-5).all())  # an approximate neighbour is never nearer than the nearest
    narrow, _ = GalleryIndex(gallery, "hnsw", ef_search=1, serialized=index.serialize()).search(queries)
    assert bool((narrow >= d - 1e-5).all())  # a narrower search finds no better neighbour


def test_a_saved_hnsw_index_searches_the_same_and_must_match_its_gallery():
    pytest.importorskip("faiss")
    gallery, queries = clustered(3000, 6, 4), clustered(50, 6, 5)
    index = GalleryIndex(gallery, "hnsw")
    data = index.serialize()
    assert data is not None and data.dtype == np.uint8
    again = GalleryIndex(gallery, "hnsw", serialized=data)
    assert all(torch.equal(a, b) for a, b in zip(index.search(queries), again.search(queries)))
    with pytest.raises(ValueError, match="saved HNSW index holds 3000 x 6"):
        GalleryIndex(gallery[:100], "hnsw", serialized=data)
    assert GalleryIndex(gallery, "kdtree").serialize() is None


def test_auto_is_the_tree_only_where_it_is_exact_and_pays():
    assert resolve("auto", AUTO_MIN_VECTORS - 1, 6) == "exact"
    assert resolve("auto", AUTO_MIN_VECTORS, AUTO_MAX_DIM) == "kdtree"
    assert resolve("auto", AUTO_MIN_VECTORS, AUTO_MAX_DIM + 1) == "exact"
    assert resolve("auto", AUTO_MIN_VECTORS, 6, "meta") == "exact"  # not on a GPU: matrix products win there
    assert resolve("hnsw", 10, 2) == "hnsw"
    with pytest.raises(ConfigError, match="index must be one of"):
        resolve("annoy", 10, 2)


def test_hnsw_without_faiss_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ConfigError, match=r"lakead\[index\].*kdtree"):
        GalleryIndex(torch.zeros(4, 2), "hnsw")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    normal = [texture(rng) for _ in range(8)]
    test = [texture(rng) for _ in range(3)] + [with_defect(texture(rng), 20, 20, 16) for _ in range(3)]
    return normal, test


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_lake_with_the_kdtree_gives_the_exact_numbers(tiny_backbone, images, distance):
    normal, test = images
    exact = LakeDetector(tiny_backbone, index="exact", distance=distance, **OPTS).fit(normal, "tile")
    tree = LakeDetector(tiny_backbone, index="kdtree", distance=distance, **OPTS).fit(normal, "tile")
    a, b = exact.predict(test), tree.predict(test)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(np.stack(a.maps), np.stack(b.maps))
    assert tree.summary()["index"] == "kdtree" and exact.summary()["index"] == "exact"
    assert tree.gallery_index_ is None  # nothing to save: the tree is rebuilt when needed


def test_lake_saves_its_hnsw_index_and_predicts_the_same_after_loading(tiny_backbone, images, tmp_path):
    pytest.importorskip("faiss")
    normal, test = images
    det = LakeDetector(tiny_backbone, index="hnsw", **OPTS).fit(normal, "tile")
    assert det.gallery_index_ is not None and det.gallery_index_.dtype == np.uint8
    before = det.predict(test)
    det.save(tmp_path / "m")
    loaded = LakeDetector.load(tmp_path / "m", backbone=tiny_backbone)
    assert np.array_equal(loaded.gallery_index_, det.gallery_index_)
    after = loaded.predict(test)
    np.testing.assert_array_equal(before.scores, after.scores)
    exact = LakeDetector(tiny_backbone, **OPTS).fit(normal, "tile").predict(test)
    assert np.all(before.visual >= exact.visual - 1e-5)  # approximate: never below the exact distance


def test_an_hnsw_index_chosen_after_fit_is_saved_with_the_model(tiny_backbone, images, tmp_path):
    pytest.importorskip("faiss")
    normal, test = images
    det = LakeDetector(tiny_backbone, **OPTS).fit(normal, "tile")
    det.config.index = "hnsw"
    before = det.predict(test).scores
    det.save(tmp_path / "m")
    assert det.gallery_index_ is not None
    loaded = LakeDetector.load(tmp_path / "m", backbone=tiny_backbone)
    assert loaded.config.index == "hnsw" and np.array_equal(loaded.gallery_index_, det.gallery_index_)
    np.testing.assert_array_equal(loaded.predict(test).scores, before)  # the same graph, not one built again


def test_the_index_can_change_after_fit_without_refitting(tiny_backbone, images):
    normal, test = images
    det = LakeDetector(tiny_backbone, **OPTS).fit(normal, "tile")
    exact = det.predict(test).scores
    det.config.index = "kdtree"
    assert det.gallery_index().kind == "kdtree"
    np.testing.assert_array_equal(det.predict(test).scores, exact)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_bad_ef_search_is_refused(tiny_backbone, bad):
    with pytest.raises(ConfigError, match="hnsw_ef_search"):
        LakeDetector(tiny_backbone, hnsw_ef_search=bad, **OPTS)


def test_an_unknown_index_is_refused(tiny_backbone):
    with pytest.raises(ConfigError, match="index"):
        LakeDetector(tiny_backbone, index="annoy", **OPTS)


def test_an_exported_hnsw_model_searches_exactly(tiny_backbone, images, tmp_path):
    """The exported graph takes the min over every gallery vector: its check compares it with the exact search."""
    pytest.importorskip("faiss")
    pytest.importorskip("onnxruntime")
    from lakead.export import agreement, export_model
    from lakead.runtime import ExportedDetector

    normal, test = images
    det = LakeDetector(tiny_backbone, index="hnsw", **OPTS).fit(normal, "tile")
    out = export_model(det, tmp_path / "exported")
    got = ExportedDetector.load(out).predict_arrays(test)
    det.config.index = "exact"
    np.testing.assert_allclose(got.scores, det.predict_arrays(test).scores, rtol=1e-4, atol=1e-6)
    det.config.index = "hnsw"
    assert agreement(det, ExportedDetector.load(out), test)["decisions_same"]


def test_the_leave_one_out_through_the_tree_is_the_exact_one():
    """fit's leave-one-out through the k-d tree: the same distances as the exact search with groups,
    also for tokens whose nearest candidates are all of their own image (the exact fallback)."""
    from lakead.methods.lake.fit import leave_one_out

    n, n_tok = 12, 40
    g = clustered(n * n_tok, 5, 6)
    g[:n_tok] = g[0] + 1e-3 * torch.randn(n_tok, 5, generator=torch.Generator().manual_seed(1))  # image 0: one tight clump
    exact = leave_one_out(g, n, n_tok, torch.device("cpu"), "exact")
    tree = leave_one_out(g, n, n_tok, torch.device("cpu"), "kdtree")
    np.testing.assert_array_equal(tree[0], exact[0])
    for a, b in zip(tree[1], exact[1]):
        np.testing.assert_array_equal(a, b)
    index = GalleryIndex(g, "kdtree")
    groups = torch.arange(n, dtype=torch.int32).repeat_interleave(n_tok)
    _, idx = index._tree.query(g[:n_tok].numpy(), k=16)
    assert (groups[torch.from_numpy(idx)] == 0).all()  # image 0's candidates are all its own: the fallback ran


def test_the_fit_uses_the_tree_only_within_its_memory(tiny_backbone, images, monkeypatch):
    """The leave-one-out's tree counts against --fit-memory (a quarter of it at most); the same numbers either way."""
    import lakead.methods.lake.fit as steps

    kinds = []
    real = steps.GalleryIndex

    def spy(gallery, kind="auto", **kw):
        kinds.append(kind)
        return real(gallery, kind, **kw)

    monkeypatch.setattr(steps, "GalleryIndex", spy)
    normal, test = images
    roomy = LakeDetector(tiny_backbone, index="kdtree", **OPTS).fit(normal, "tile", memory="64MiB")
    assert kinds == ["kdtree"]
    tight = LakeDetector(tiny_backbone, index="kdtree", **OPTS).fit(normal, "tile", memory=60_000)
    assert kinds == ["kdtree", "exact"]  # the tree would take more than a quarter of 60 kB
    np.testing.assert_array_equal(roomy.loo_scores_, tight.loo_scores_)
    assert roomy.gallery_index_ is None  # an exact index is built when first needed, not at fit


# -- the memory-bank methods (PatchCore, AnomalyDINO): the same index option -------------------------


@pytest.fixture(scope="module")
def bank_models(tiny_backbone, images):
    from lakead.methods.anomalydino import AnomalyDinoDetector
    from lakead.methods.patchcore import PatchCoreDetector

    normal, _ = images
    return {"patchcore": lambda **o: PatchCoreDetector(tiny_backbone, image_size=64, coreset=1.0, **o).fit(normal, "tile"),
            "anomalydino": lambda **o: AnomalyDinoDetector(tiny_backbone, image_size=64, layer=2, **o).fit(normal, "tile")}


@pytest.mark.parametrize("method", ["patchcore", "anomalydino"])
def test_a_memory_bank_searched_through_each_index(bank_models, images, method, tmp_path):
    """auto on a wide bank is the exact search; a k-d tree gives the same scores bit for bit; HNSW is
    never nearer than the exact neighbour, is saved with the model and predicts the same after loading."""
    pytest.importorskip("faiss")
    from lakead.methods import load_detector

    _, test = images
    exact = bank_models[method]()
    assert exact.summary()["index"] == "exact" and exact.gallery_index_ is None
    ref = exact.predict(test)
    tree = bank_models[method](index="kdtree")
    np.testing.assert_array_equal(tree.predict(test).scores, ref.scores)
    np.testing.assert_array_equal(tree.loo_scores_, exact.loo_scores_)  # the leave-one-out stays exact
    hnsw = bank_models[method](index="hnsw")
    assert hnsw.gallery_index_ is not None and hnsw.summary()["index"] == "hnsw"
    got = hnsw.predict(test)
    for a, b in zip(got.maps, ref.maps):
        assert a.shape == b.shape
    hnsw.save(tmp_path / "m")
    again = load_detector(tmp_path / "m", backbone=hnsw.backbone)
    assert np.array_equal(again.gallery_index_, hnsw.gallery_index_)
    np.testing.assert_array_equal(again.predict(test).scores, got.scores)
    assert torch.equal(hnsw.bank_, exact.bank_)  # the same bank, searched two ways
    q = exact.bank_[:40] + 0.3 * torch.randn(40, exact.bank_.shape[1], generator=torch.Generator().manual_seed(0))
    d_exact, d_hnsw = exact.nearest(q, exact.state_)[0], hnsw.nearest(q, hnsw.state_)[0]
    assert d_hnsw.shape == (40,) and torch.all(d_hnsw >= d_exact - 1e-5)  # approximate: never nearer
    assert float((d_hnsw - d_exact).abs().max()) < 1e-4  # and on a bank this small, the same neighbours


def test_a_bank_index_chosen_after_fit_is_saved(bank_models, images, tmp_path):
    pytest.importorskip("faiss")
    from lakead.methods import load_detector

    _, test = images
    det = bank_models["patchcore"]()
    det.config.index = "hnsw"
    before = det.predict(test).scores
    det.save(tmp_path / "m")
    loaded = load_detector(tmp_path / "m", backbone=det.backbone)
    assert loaded.config.index == "hnsw" and loaded.gallery_index_ is not None
    np.testing.assert_array_equal(loaded.predict(test).scores, before)


@pytest.mark.parametrize("bad", [0, True])
def test_a_bank_refuses_a_bad_index_option(tiny_backbone, bad):
    from lakead.methods.patchcore import PatchCoreDetector

    with pytest.raises(ConfigError, match="hnsw_ef_search"):
        PatchCoreDetector(tiny_backbone, hnsw_ef_search=bad)
    with pytest.raises(ConfigError, match="index"):
        PatchCoreDetector(tiny_backbone, index="annoy")
