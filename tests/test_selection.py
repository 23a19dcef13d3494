"""lakead.selection (``lakead tune``): every candidate kind scored from extracted tokens gives
what its detector gives after a fit on the same images; the held-out queries; the search, its
budget and its choice; what tune writes; the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import texture, with_defect
from lakead.cli import app
from lakead.errors import LakeadError
from lakead.methods import load_detector
from lakead.methods.lake.config import LakeConfig
from lakead.selection import Candidate, default_candidates, make_queries, score_candidates, score_tokens, tune
from lakead.selection.output import write_tuning
from lakead.selection.search import extract, fold_of


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(11)
    normals = [texture(rng) for _ in range(6)]
    tests = [texture(rng), texture(rng), with_defect(texture(rng), 20, 24, 14), with_defect(texture(rng), 4, 40, 12)]
    return normals, tests


@pytest.mark.parametrize("cand", [
    Candidate("visual", {"layer": 2}),
    Candidate("visual", {"layer": 2, "distance": "cosine", "visual_top_percent": 5.0, "k": 8}),
    Candidate("all", {"layer": [1, 2]}),
    Candidate("anomalydino", {"layer": 2}),
    Candidate("subspace", {"layer": 3, "variance_kept": 0.9}),
], ids=lambda c: c.label)
def test_scores_from_tokens_are_the_detectors_scores(cand, images, tiny_backbone):
    """What tune measures is what the chosen model does: the same image scores (LAKE's up to
    its one leave-one-out scale factor) and patch scores."""
    normals, tests = images
    base = LakeConfig(backbone="tiny", image_size=64, use_text=False)
    det = cand.build(base, tiny_backbone).fit(normals, "tile")
    pred = det.predict(tests)
    blocks = list(cand.blocks)
    sup, grids = extract(tiny_backbone, normals, blocks, 64)
    qry, _ = extract(tiny_backbone, tests, blocks, 64)
    img, patches = score_tokens(cand, sup, qry, grids, base)
    got = img.numpy()
    if cand.method in ("visual", "all"):
        ratio = pred.visual / got
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
    else:
        np.testing.assert_allclose(pred.scores, got, rtol=1e-4, atol=1e-6)
    assert patches.shape == (len(tests), grids[blocks[-1]][0] * grids[blocks[-1]][1])


def test_queries_of_several_images_and_of_one():
    rng = np.random.default_rng(0)
    arrays = [texture(rng) for _ in range(5)]
    q = make_queries(arrays, defects_per_image=2, seed=3)
    assert q.label == [1] * 10 and q.origin == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert len(set(q.kinds)) == 8  # the kinds in turn
    assert all(m.any() for m in q.masks)
    again = make_queries(arrays, defects_per_image=2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(q.arrays, again.arrays))
    assert len(make_queries(arrays, seed=3).label) == 35  # 7 each: at least 32 in all
    one = make_queries(arrays[:1], defects_per_image=2, views=3, seed=3)
    assert one.label == [0, 0, 0, 1, 1, 1, 1, 1, 1] and set(one.origin) == {0}
    assert not any(m.any() for m in one.masks[:3])
    assert fold_of(6, 4) == [0, 1, 2, 3, 0, 1]


def test_patch_labels_of_masks_of_several_sizes():
    from lakead.selection.search import patch_labels

    a, b = np.zeros((40, 40), bool), np.zeros((20, 60), bool)
    a[:20, :20] = True  # the top-left cell of a 2 x 2 grid, whole
    b[:, 45:] = True  # half of the right column's cells
    np.testing.assert_array_equal(patch_labels([a, b], (2, 2)), [[1, 0, 0, 0], [0, 1, 0, 1]])
    c = np.zeros((40, 40), bool)
    c[:4, :4] = True  # 4 % of a cell: neither
    assert np.isnan(patch_labels([c], (2, 2))[0, 0])


def test_tune_ranks_candidates_and_fits_the_best(images, tiny_backbone, tmp_path):
    normals, tests = images
    base = LakeConfig(backbone="tiny", image_size=64, use_text=False)
    cands = default_candidates([2, 3])
    seen = []
    res = tune(normals, "tile", cands, base, backbone=tiny_backbone, on_candidate=seen.append)
    assert len(res.results) == len(cands) == len(seen) and all(r.scored for r in res.results)
    top = max((round(r.image_auroc, 3), r.separation) for r in res.results)
    assert (round(res.chosen.image_auroc, 3), res.chosen.separation) == top
    assert res.detector.method == {"visual": "lake", "all": "lake"}.get(res.chosen.candidate.method, res.chosen.candidate.method)
    assert res.detector.is_fitted and len(res.detector.state_.support) == len(normals)
    assert res.settings["folds"] == 4 and res.settings["synthetic_images"] == 6 * len(normals)  # at least 32 in all
    pred = res.detector.predict(tests)
    assert pred.scores.shape == (4,)
    doc = write_tuning(res, tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["candidates.csv", "candidates.md", "model", "tuning.json"]
    assert doc["chosen"]["candidate"] == res.chosen.candidate.label and len(doc["candidates"]) == len(cands)
    loaded = load_detector(tmp_path / "t" / "model")
    np.testing.assert_allclose(loaded.predict(tests).scores, pred.scores, rtol=1e-5)
    write_tuning(res, tmp_path / "t")  # an earlier tuning is replaced
    (tmp_path / "t" / "notes.txt").write_text("mine")
    with pytest.raises(LakeadError, match="notes.txt"):
        write_tuning(res, tmp_path / "t")
    assert (tmp_path / "t" / "notes.txt").read_text() == "mine"


def test_the_budget_scores_the_first_candidate_and_lists_the_rest(images, tiny_backbone):
    normals, _ = images
    base = LakeConfig(backbone="tiny", image_size=64, use_text=False)
    res = tune(normals[:3], "tile", default_candidates([2]), base, backbone=tiny_backbone, budget_seconds=0)
    assert [r.scored for r in res.results] == [True] + [False] * 4
    assert res.chosen is res.results[0]


def test_one_support_image_is_scored_on_jittered_views(images, tiny_backbone):
    normals, _ = images
    base = LakeConfig(backbone="tiny", image_size=64, use_text=False)
    q = make_queries(normals[:1], defects_per_image=2, views=4)
    blocks = [2]
    sup, grids = extract(tiny_backbone, normals[:1], blocks, 64)
    qt, _ = extract(tiny_backbone, q.arrays, blocks, 64)
    res = score_candidates(default_candidates(blocks), sup, q, qt, grids, base=base)
    assert all(np.isfinite(r.image_auroc) and len(r.folds) == 1 for r in res)


def test_the_command_line_writes_the_tuning(images, tiny_clip_dir, tmp_path):
    normals, _ = images
    folder = tmp_path / "good"
    folder.mkdir()
    for i, a in enumerate(normals):
        Image.fromarray(a).save(folder / f"{i}.png")
    r = CliRunner().invoke(app, ["tune", str(folder), "-c", "tile", "-o", str(tmp_path / "t"), "--backbone",
                                 str(tiny_clip_dir), "--layer", "2,1+3", "--image-size", "64"])
    assert r.exit_code == 0, r.output
    assert "chosen:" in r.output
    doc = json.loads((tmp_path / "t" / "tuning.json").read_text())
    assert [c["options"]["layer"] for c in doc["candidates"][::5]] == [2, [1, 3]]
    assert (tmp_path / "t" / "model" / "lakead.json").exists()
    r = CliRunner().invoke(app, ["info", str(tmp_path / "t")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert doc["chosen"]["candidate"] in r.output and "separation" in r.output and "tuning_rule" in r.output
    r = CliRunner().invoke(app, ["tune", str(folder), "-c", "tile", "-o", str(folder), "--backbone", str(tiny_clip_dir)])
    assert r.exit_code != 0 and "--out" in r.output
