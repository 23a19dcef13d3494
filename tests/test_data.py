"""Datasets on disk: MVTec layout (one category, a dataset, a collection), BTAD names,
meta.json, masks: missing, wrong size, every pixel format."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from _synthetic import write_category
from lakead import LakeadError
from lakead.data import load_dataset, read_mask


def test_one_category_in_mvtec_layout(tmp_path):
    cat_dir = write_category(tmp_path, "bottle", n_train=4, n_good=2, defects={"crack": 2, "hole": 1})
    cat = load_dataset(cat_dir)[0]
    assert cat.name == cat.class_name == "bottle" and cat.root == cat_dir
    assert [p.name for p in cat.train] == ["000.png", "001.png", "002.png", "003.png"]
    assert cat.counts() == {"train": 4, "test_normal": 2, "test_defect": 3, "defect_without_mask": 0}
    crack = [s for s in cat.test if s.defect == "crack"]
    assert crack[0].label == 1 and crack[0].mask == cat_dir / "ground_truth" / "crack" / "000_mask.png"
    assert all(s.mask is None and s.label == 0 for s in cat.test if s.defect == "good")


def test_dataset_and_collection_roots(tmp_path):
    write_category(tmp_path / "mvtec", "bottle")
    write_category(tmp_path / "mvtec", "screw", seed=1)
    write_category(tmp_path / "btad", "01", normal_dir="ok", mask_suffix="", defects={"ko": 2}, seed=2)
    assert [c.name for c in load_dataset(tmp_path / "mvtec")] == ["bottle", "screw"]
    cats = load_dataset(tmp_path)
    assert [c.name for c in cats] == ["btad/01", "mvtec/bottle", "mvtec/screw"]
    btad = cats[0]
    assert btad.class_name == "01" and len(btad.train) == 6
    assert btad.counts()["test_normal"] == 3 and all(s.mask is not None for s in btad.test if s.label)
    assert [c.name for c in load_dataset(tmp_path, ["screw", "btad/01"])] == ["mvtec/screw", "btad/01"]


def test_category_filter_errors(tmp_path):
    write_category(tmp_path / "a", "tile")
    write_category(tmp_path / "b", "tile", seed=1)
    with pytest.raises(LakeadError, match="no category 'wood'; available: a/tile, b/tile"):
        load_dataset(tmp_path, ["wood"])
    with pytest.raises(LakeadError, match="'tile' matches a/tile, b/tile; give the full name"):
        load_dataset(tmp_path, ["tile"])


def test_missing_mask_warns_and_is_listed(tmp_path, caplog):
    cat_dir = write_category(tmp_path, "bottle", defects={"crack": 3})
    (cat_dir / "ground_truth" / "crack" / "001_mask.png").unlink()
    with caplog.at_level(logging.WARNING, logger="lakead"):
        cat = load_dataset(cat_dir)[0]
    assert [s.path.name for s in cat.missing_masks] == ["001.png"]
    assert "1 defect image(s) have no mask" in caplog.text and "pixel metrics leave them out" in caplog.text


def test_mask_of_another_size_names_both_files(tmp_path):
    cat_dir = write_category(tmp_path, "bottle")
    mask = cat_dir / "ground_truth" / "crack" / "000_mask.png"
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(mask)
    with pytest.raises(LakeadError) as e:
        load_dataset(cat_dir)
    msg = str(e.value)
    assert str(mask) in msg and str(cat_dir / "test" / "crack" / "000.png") in msg and "40x32" in msg and "64x64" in msg


@pytest.mark.parametrize("layout", ["empty", "file", "missing", "no_train"])
def test_not_a_dataset(tmp_path, layout):
    target = tmp_path / "d"
    if layout == "empty":
        target.mkdir()
        problem = "no category found"
    elif layout == "file":
        target.write_text("x")
        problem = "is a file"
    elif layout == "missing":
        problem = "no such dataset folder"
    else:
        cat = write_category(tmp_path, "d", n_train=0)
        problem = "no normal training image"
        target = cat
    with pytest.raises(LakeadError, match=problem):
        load_dataset(target)


def write_meta(root, cat_dir, *, mask_for_all=True):
    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    train = [{"img_path": rel(p), "mask_path": "", "cls_name": "bottle", "specie_name": "good", "anomaly": 0}
             for p in sorted((cat_dir / "train" / "good").iterdir())]
    test = []
    for p in sorted((cat_dir / "test").rglob("*.png")):
        bad = p.parent.name != "good"
        mask = cat_dir / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
        test.append({"img_path": rel(p), "mask_path": rel(mask) if bad and (mask_for_all or p.stem != "000") else "",
                     "cls_name": "bottle", "specie_name": p.parent.name, "anomaly": int(bad)})
    (root / "meta.json").write_text(json.dumps({"train": {"bottle": train}, "test": {"bottle": test}}))


def test_meta_json(tmp_path, caplog):
    cat_dir = write_category(tmp_path, "bottle", defects={"crack": 2})
    write_meta(tmp_path, cat_dir, mask_for_all=False)
    with caplog.at_level(logging.WARNING, logger="lakead"):
        (cat,) = load_dataset(tmp_path)
    from_folder = load_dataset(cat_dir)[0]
    assert cat.name == "bottle" and cat.root == tmp_path and cat.train == from_folder.train
    assert sorted(s.path for s in cat.test) == sorted(s.path for s in from_folder.test)
    assert [s.path.name for s in cat.missing_masks] == ["000.png"] and "no mask" in caplog.text
    crack1 = next(s for s in cat.test if s.path.name == "001.png" and s.label)
    assert crack1.defect == "crack" and crack1.mask.name == "001_mask.png"


@pytest.mark.parametrize(
    "meta, problem",
    [
        ("{", "cannot be parsed"),
        (json.dumps({"train": {}}), "expected an object with a 'test'"),
        (json.dumps({"test": {"x": [{"img_path": "nope.png", "anomaly": 0}]}}), "test/x\\[0\\].img_path points to"),
        (json.dumps({"test": {"x": [{"img_path": "a.png"}]}}), "needs 'img_path' and 'anomaly'"),
    ],
)
def test_bad_meta_json(tmp_path, meta, problem):
    (tmp_path / "meta.json").write_text(meta)
    with pytest.raises(LakeadError, match=problem) as e:
        load_dataset(tmp_path)
    assert "meta.json" in str(e.value)


def test_read_mask_formats(tmp_path):
    ref = np.zeros((6, 5), bool)
    ref[1:3, 2:4] = True
    grey = ref.astype(np.uint8) * 255
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(ref.astype(np.uint8)).save(tmp_path / "zero_one.png")  # 0/1 masks count too
    Image.fromarray((ref * 65535).astype(np.uint16)).save(tmp_path / "sixteen.png")
    rgb = np.zeros((6, 5, 3), np.uint8)
    rgb[ref] = (0, 0, 200)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(grey).convert("1").save(tmp_path / "bits.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png")
    for name in ("grey", "zero_one", "sixteen", "rgb", "bits", "palette"):
        assert np.array_equal(read_mask(tmp_path / f"{name}.png"), ref), name
    with pytest.raises(LakeadError, match="is 5x6 pixels, its image 6x6"):
        read_mask(tmp_path / "grey.png", size=(6, 6))
    (tmp_path / "bad.png").write_text("no")
    with pytest.raises(LakeadError, match="bad.png: cannot be read as a mask"):
        read_mask(tmp_path / "bad.png")


@pytest.mark.realdata
def test_shared_data_counts(shared_data):
    cats = {c.name: c.counts() for c in load_dataset(shared_data)}
    assert cats == {  # ../shared/data/README.md
        "magnetic_tile/tile": {"train": 64, "test_normal": 200, "test_defect": 388, "defect_without_mask": 0},
        "mpdd/metal_plate": {"train": 41, "test_normal": 39, "test_defect": 28, "defect_without_mask": 0},
        "mvtec3d_tire/tire": {"train": 64, "test_normal": 25, "test_defect": 87, "defect_without_mask": 0},
    }
