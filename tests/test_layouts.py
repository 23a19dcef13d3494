"""Dataset layouts read as they are (lakead.layouts): VisA (split file and raw), MVTec LOCO
(several masks per image), a plain folder layout; detection and its error; eval --save-maps.

Each layout is built from the images of one MVTec-layout category (real images from
../shared/data when present, else synthetic ones), file by file, and must give the same
samples and the same metrics as that category read in the MVTec layout."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from _onnx_models import save_tiny_onnx
from _synthetic import write_category
from conftest import SHARED
from lakead import LakeadError, LakeConfig, Runtime
from lakead.cli import app
from lakead.data import load_dataset, read_mask
from lakead.evaluate import evaluate
from lakead.layouts import (
    FOLDER_TEST_NORMAL_RATIO,
    VISA_TEST_NORMAL_RATIO,
    held_out_positions,
    load_any,
    loco_note,
    sample_masks,
)
from lakead.metrics import pro_from_curve

RT = Runtime(device="cpu", batch_size=8)
runner = CliRunner()


def _from_shared(root: Path) -> Path | None:
    """A small MVTec-layout copy of the real tire images: 18 normal training, 2 normal test,
    2 'cut' and 2 'hole' test images with their masks, each a quarter of its side (200 x 150,
    masks by nearest neighbour): the layouts are read as they are, and the metrics compared
    on all their pixels cost a sixteenth."""
    src = SHARED / "data" / "mvtec3d_tire" / "tire"
    if not src.is_dir():
        return None
    cat = root / "tire"
    for rel, n in (("train/good", 18), ("test/good", 2), ("test/cut", 2), ("test/hole", 2)):
        (cat / rel).mkdir(parents=True)
        for p in sorted((src / rel).iterdir())[:n]:
            _quarter(p, cat / rel / p.name, Image.Resampling.BILINEAR)
            if rel.startswith("test/") and rel != "test/good":
                gt = cat / "ground_truth" / rel.split("/")[1]
                gt.mkdir(parents=True, exist_ok=True)
                _quarter(src / "ground_truth" / rel.split("/")[1] / f"{p.stem}_mask.png", gt / f"{p.stem}_mask.png",
                         Image.Resampling.NEAREST)
    return cat


def _quarter(src: Path, dst: Path, resample: Image.Resampling) -> None:
    with Image.open(src) as im:
        im.resize((max(1, im.width // 4), max(1, im.height // 4)), resample).save(dst)


@pytest.fixture(scope="module", params=["synthetic", pytest.param("shared", marks=pytest.mark.slow)])
def source(request, tmp_path_factory):
    """One category in the MVTec layout: 18 normal training and 2 normal test images, two
    defect types of 2 images each (so that the raw VisA rule, 1 in 10 normal images held
    out, and the folder rule, 1 in 5, can be matched by naming)."""
    root = tmp_path_factory.mktemp(f"mvtec-{request.param}")
    if request.param == "shared":
        cat = _from_shared(root)
        if cat is None:
            pytest.skip(f"real data not present at {SHARED / 'data'} (see ../shared/data/README.md)")
        return cat
    return write_category(root, "tire", n_train=18, n_good=2, defects={"cut": 2, "hole": 2}, seed=3)


@pytest.fixture(scope="module")
def onnx_config(tmp_path_factory):
    return LakeConfig(backbone=f"onnx:{save_tiny_onnx(tmp_path_factory.mktemp('onnx') / 'tiny.onnx')}",
                      layer="block2", k=6)


def _normals_named(cat, ratio: float) -> list[tuple[Path, str]]:
    """The category's normal images (train and test) with new names whose sorted order puts
    the test ones where the fixed rule holds images out."""
    n = len(cat.train) + sum(1 for s in cat.test if s.label == 0)
    held = sorted(held_out_positions(n, ratio))
    tests = [s.path for s in cat.test if s.label == 0]
    assert len(held) == len(tests)
    trains = iter(cat.train)
    out = []
    for i in range(n):
        src = tests[held.index(i)] if i in held else next(trains)
        out.append((src, f"{i:04d}.png"))
    return out


def write_visa(cat, root: Path, *, with_csv: bool) -> Path:
    """``root/<object>/Data/Images/{Normal,Anomaly}``, ``Data/Masks/Anomaly`` and, with
    ``with_csv``, ``root/split_csv/1cls.csv``. Anomaly images get an upper-case ending (as
    VisA's ``.JPG``), with PNG bytes so that the pixels stay the same."""
    obj = root / cat.name
    rows = []
    for sub in ("Data/Images/Normal", "Data/Images/Anomaly", "Data/Masks/Anomaly"):
        (obj / sub).mkdir(parents=True)
    test_normals = {s.path for s in cat.test if s.label == 0}
    for src, name in _normals_named(cat, VISA_TEST_NORMAL_RATIO):
        shutil.copy(src, obj / "Data/Images/Normal" / name)
        rows.append([cat.name, "test" if src in test_normals else "train", "normal", f"{cat.name}/Data/Images/Normal/{name}", ""])
    for i, s in enumerate(x for x in cat.test if x.label == 1):
        shutil.copy(s.path, obj / "Data/Images/Anomaly" / f"{i:03d}.PNG")
        shutil.copy(s.mask, obj / "Data/Masks/Anomaly" / f"{i:03d}.png")
        rows.append([cat.name, "test", "anomaly", f"{cat.name}/Data/Images/Anomaly/{i:03d}.PNG",
                     f"{cat.name}/Data/Masks/Anomaly/{i:03d}.png"])
    if with_csv:
        (root / "split_csv").mkdir()
        with (root / "split_csv" / "1cls.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["object", "split", "label", "image", "mask"])
            w.writerows(rows)
    return root


#: defects_config.json of the LOCO copies: the top half of a defect (pixel value 255) is found
#: once 30 % of it is flagged, the bottom half (254) once 40 of its pixels are.
LOCO_CONFIG = [{"defect_name": "top", "pixel_value": 255, "saturation_threshold": 0.3, "relative_saturation": True},
               {"defect_name": "bottom", "pixel_value": 254, "saturation_threshold": 40, "relative_saturation": False}]


def write_loco(cat, root: Path, *, config: bool = True) -> Path:
    """``root/<class>`` in the MVTec LOCO layout: the first defect type as logical, the
    second as structural anomalies; each mask split into two files (top and bottom rows of
    its defect, pixel values 255 and 254), whose union is the original; with ``config``,
    :data:`LOCO_CONFIG` as its ``defects_config.json``."""
    c = root / cat.name
    for rel in ("train/good", "validation/good", "test/good"):
        (c / rel).mkdir(parents=True)
    for p in cat.train:
        shutil.copy(p, c / "train/good" / p.name)
    shutil.copy(cat.train[0], c / "validation/good" / "000.png")  # read by nobody: LOCO's validation split
    kinds = dict(zip(sorted({s.defect for s in cat.test if s.label}), ("logical_anomalies", "structural_anomalies")))
    for i, s in enumerate(cat.test):
        if s.label == 0:
            shutil.copy(s.path, c / "test/good" / f"{i:03d}.png")
            continue
        kind = kinds[s.defect]
        (c / "test" / kind).mkdir(exist_ok=True)
        shutil.copy(s.path, c / "test" / kind / f"{i:03d}.png")
        mask = read_mask(s.mask)
        rows = np.flatnonzero(mask.any(axis=1))
        mid = rows[len(rows) // 2]
        gt = c / "ground_truth" / kind / f"{i:03d}"
        gt.mkdir(parents=True)
        top, bottom = mask.copy(), mask.copy()
        top[mid:] = False
        bottom[:mid] = False
        for j, (part, value) in enumerate(((top, 255), (bottom, 254))):
            Image.fromarray(part.astype(np.uint8) * value).save(gt / f"{j:03d}.png")
    if config:
        (c / "defects_config.json").write_text(json.dumps(LOCO_CONFIG))
    return c


def write_folder(cat, root: Path, *, normal_test_dir: bool) -> Path:
    """``root/good`` (+ ``root/good_test``), ``root/<defect>/`` and ``root/masks/<defect>/<name>_mask.png``."""
    (root / "good").mkdir(parents=True)
    if normal_test_dir:
        (root / "good_test").mkdir()
        for p in cat.train:
            shutil.copy(p, root / "good" / p.name)
        for s in cat.test:
            if s.label == 0:
                shutil.copy(s.path, root / "good_test" / s.path.name)
    else:
        for src, name in _normals_named(cat, FOLDER_TEST_NORMAL_RATIO):
            shutil.copy(src, root / "good" / name)
    for s in cat.test:
        if s.label:
            (root / s.defect).mkdir(exist_ok=True)
            (root / "masks" / s.defect).mkdir(parents=True, exist_ok=True)
            shutil.copy(s.path, root / s.defect / s.path.name)
            shutil.copy(s.mask, root / "masks" / s.defect / f"{s.path.stem}_mask.png")
    return root


def _content(cat) -> tuple:
    """What a category holds, by file content: train images, and each test image's label
    and mask (the union of its mask files)."""
    def key(p):
        return np.asarray(Image.open(p)).tobytes()

    def mask(s):
        files = sample_masks(s)
        return b"" if not files else np.logical_or.reduce([read_mask(f) for f in files]).tobytes()

    return sorted(key(p) for p in cat.train), sorted((key(s.path), s.label, mask(s)) for s in cat.test)


def _layout(kind: str, cat, root: Path) -> tuple[Path, dict]:
    """The layout ``kind`` of ``cat`` under ``root``: its root and the options of load_any.
    (For "folder", ``cat`` must have 4 normal training images per normal test image.)"""
    if kind == "visa_csv":
        return write_visa(cat, root, with_csv=True), {}
    if kind == "visa_raw":
        return write_visa(cat, root, with_csv=False), {}
    if kind == "visa_object":
        return write_visa(cat, root, with_csv=True) / cat.name, {}
    if kind == "loco":
        return write_loco(cat, root), {}
    if kind == "loco_dataset":
        write_loco(cat, root)
        return root, {}
    if kind == "folder":
        defects = sorted({s.defect for s in cat.test if s.label})
        return write_folder(cat, root, normal_test_dir=False), {"normal_dir": "good", "abnormal_dirs": defects, "mask_dir": "masks"}
    defects = sorted({s.defect for s in cat.test if s.label})
    return write_folder(cat, root, normal_test_dir=True), {
        "normal_dir": "good", "abnormal_dirs": defects, "mask_dir": root / "masks", "normal_test_dir": "good_test"}


def _reference(source: Path, kind: str):
    """The source category; for the folder rule (1 in 5 normal images tested), 8 of its
    training images, so that its 2 normal test images are 1 in 5."""
    (ref,) = load_dataset(source)
    return dataclasses.replace(ref, train=ref.train[:8]) if kind == "folder" else ref


KINDS = ["visa_csv", "visa_raw", "visa_object", "loco", "loco_dataset", "folder", "folder_test_dir"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_layout_reads_the_same_images_and_masks(kind, source, tmp_path):
    ref = _reference(source, kind)
    root, options = _layout(kind, ref, tmp_path / "layout")
    (cat,) = load_any(root, **options)
    assert cat.class_name == ref.class_name == "tire" or kind.startswith("folder")
    assert cat.counts() == ref.counts()
    assert _content(cat) == _content(ref)
    if kind.startswith("loco"):
        assert getattr(cat, "note", "") == loco_note(cat.root / "defects_config.json")
        assert cat.saturation == ((254, 40.0, False), (255, 0.3, True))
        assert {s.defect for s in cat.test if s.label} == {"logical_anomalies", "structural_anomalies"}
        assert all(len(sample_masks(s)) == 2 for s in cat.test if s.label)


@pytest.mark.parametrize("kind", ["visa_csv", "loco", "folder"])
def test_eval_gives_the_same_metrics_as_the_mvtec_layout(kind, source, onnx_config, tmp_path):
    ref = _reference(source, kind)
    root, options = _layout(kind, ref, tmp_path / "layout")
    cats = load_any(root, **options)
    want = evaluate([ref], tmp_path / "a", onnx_config, shots=None, seed=None, figures=False, runtime=RT)
    got = evaluate(cats, tmp_path / "b", onnx_config, shots=None, seed=None, figures=False, runtime=RT)
    a, b = want.results[0].metrics(), got.results[0].metrics()
    assert list(a) == list(b)
    for name in a:
        assert b[name] == pytest.approx(a[name], abs=1e-6, nan_ok=True), name
    assert got.results[0].pixel_images == want.results[0].pixel_images == 6
    notes = json.loads((tmp_path / "b" / "metrics.json").read_text())["settings"]["data_notes"]
    assert notes == ([loco_note(cats[0].root / "defects_config.json")] if kind == "loco" else [])
    assert ("spro" in got.results[0].pixel) == (kind == "loco")
    if kind == "loco":
        assert "AUC-sPRO" in (tmp_path / "b" / "report.md").read_text()


def _exact_spro(normal_maps, defects, limit=0.05) -> float:
    """AUC-sPRO computed the plain way: every distinct score a threshold, no bins."""
    normal = np.sort(np.concatenate([m.reshape(-1) for m in normal_maps]))
    values = np.unique(np.concatenate([normal, *(amap[mask] for amap, mask, _ in defects)]))[::-1]  # every threshold

    def at_or_above(sorted_values, t):  # how many of sorted_values are >= each t
        return sorted_values.size - np.searchsorted(sorted_values, t, side="left")

    fpr = at_or_above(normal, values) / normal.size
    spro = np.mean([np.minimum(at_or_above(np.sort(amap[mask]), values) / s, 1.0) for amap, mask, s in defects], axis=0)
    return pro_from_curve(np.concatenate([[0.0], fpr]), np.concatenate([[0.0], spro]), limit=limit)


def test_loco_spro_matches_a_plain_computation_on_the_saved_maps(source, onnx_config, tmp_path):
    """eval on a LOCO copy: AUC-sPRO from the runner equals a plain computation on the maps
    it saved (--save-maps npy) with the saturation of each mask file from defects_config.json;
    without defects_config.json it is not computed, and the report says so."""
    (ref,) = load_dataset(source)
    loco = write_loco(ref, tmp_path / "loco")
    rep = evaluate(loco, tmp_path / "r", onnx_config, shots=None, seed=None, figures=False, runtime=RT, save_maps=["npy"])
    got = rep.results[0].pixel["spro"]
    (cat,) = load_any(loco)
    normal, defects = [], []
    for s in cat.test:
        amap = np.load(tmp_path / "r" / "maps" / cat.name / f"{s.path.relative_to(cat.root).as_posix()}.npy")
        if s.label == 0:
            normal.append(amap)
            continue
        for f in sample_masks(s):
            raw = np.asarray(Image.open(f))
            area = int((raw > 0).sum())
            s_area = 0.3 * area if raw.max() == 255 else min(40, area)
            defects.append((amap, raw > 0, s_area))
    assert len(defects) == 8 and 0 < got <= 1
    assert got == pytest.approx(_exact_spro(normal, defects), abs=2e-3)
    assert "AUC-sPRO" in (tmp_path / "r" / "report.md").read_text()

    bare = write_loco(ref, tmp_path / "bare", config=False)
    rep = evaluate(bare, tmp_path / "r2", onnx_config, shots=None, seed=None, figures=False, runtime=RT)
    assert "spro" not in rep.results[0].pixel
    assert "sPRO (saturated per-region overlap) is not computed (no defects_config.json found)" in (
        tmp_path / "r2" / "report.md").read_text()


def test_loco_union_is_the_mask_the_metrics_see(source, tmp_path):
    """The union of a LOCO image's mask files is what pixel metrics read: its regions are
    the source's regions (here each source defect was cut in two files)."""
    from lakead.evaluate.runner import _mask_for

    (ref,) = load_dataset(source)
    (cat,) = load_any(write_loco(ref, tmp_path / "loco"))
    by_content = {np.asarray(Image.open(s.path)).tobytes(): s for s in ref.test if s.label}
    for s in (x for x in cat.test if x.label):
        want = read_mask(by_content[np.asarray(Image.open(s.path)).tobytes()].mask)
        got = _mask_for(s, want.shape)
        assert np.array_equal(got, want)
        assert ndimage.label(got)[1] == ndimage.label(want)[1]


def test_held_out_positions_is_a_fixed_even_rule():
    assert sorted(held_out_positions(20, 0.1)) == [9, 19]
    assert sorted(held_out_positions(1000, 0.1))[:3] == [9, 19, 29] and len(held_out_positions(1000, 0.1)) == 100
    assert held_out_positions(1, 0.2) == set() and held_out_positions(2, 0.2) == {1}


def test_no_layout_matches_names_the_folder_and_the_layouts(tmp_path):
    (tmp_path / "x" / "stuff").mkdir(parents=True)
    with pytest.raises(LakeadError) as e:
        load_any(tmp_path / "x")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'x'}: no dataset layout matches")
    for layout in ("MVTec-AD", "meta.json", "VisA", "split_csv/1cls.csv", "MVTec LOCO", "--normal-dir"):
        assert layout in msg, layout
    with pytest.raises(LakeadError, match="no such dataset folder"):
        load_any(tmp_path / "missing")


def test_layout_errors_name_the_file(tmp_path):
    cat = write_category(tmp_path / "src", "bottle", n_train=4, n_good=1, defects={"crack": 1})
    (ref,) = load_dataset(cat)
    root = write_visa(ref, tmp_path / "visa", with_csv=True)
    split = root / "split_csv" / "1cls.csv"
    split.write_text(split.read_text() + "bottle,test,anomaly,bottle/Data/Images/Anomaly/nope.JPG,\n")
    with pytest.raises(LakeadError, match=r"1cls.csv, line \d+: the image .*nope.JPG does not exist"):
        load_any(root)
    split.write_text("object,split,image\n")
    with pytest.raises(LakeadError, match="1cls.csv: missing column\\(s\\) label, mask"):
        load_any(root)
    folder = write_folder(ref, tmp_path / "f", normal_test_dir=False)
    with pytest.raises(LakeadError, match="needs --normal-dir .* and at least one --abnormal-dir"):
        load_any(folder, normal_dir="good")
    with pytest.raises(LakeadError, match=f"--abnormal-dir {folder / 'nope'}: no such folder"):
        load_any(folder, normal_dir="good", abnormal_dirs=["nope"])
    with pytest.raises(LakeadError, match="--mask-dir .*: no mask matches a defective image by name"):
        load_any(folder, normal_dir="good", abnormal_dirs=["crack"], mask_dir="good")
    loco = write_loco(ref, tmp_path / "loco")
    mask = next((loco / "ground_truth").rglob("001.png"))
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(mask)
    with pytest.raises(LakeadError) as e:
        load_any(loco)
    assert str(mask) in str(e.value) and "7x5" in str(e.value)


def test_cli_eval_folder_layout_and_save_maps(source, onnx_config, tmp_path):
    ref = _reference(source, "folder")
    root = write_folder(ref, tmp_path / "data", normal_test_dir=False)
    out = tmp_path / "r"
    args = ["eval", str(root), "--out", str(out), "--backbone", onnx_config.backbone, "--layer", "block2", "--k", "6",
            "--shots", "all", "--no-figures", "--normal-dir", "good", "--abnormal-dir", "cut", "--abnormal-dir", "hole",
            "--mask-dir", "masks", "--save-maps", "png,npy"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 6 and {r["defect"] for r in rows} == {"good", "cut", "hole"}
    for row in rows:
        rel = Path(row["path"]).relative_to(root).as_posix()
        amap = np.load(out / "maps" / root.name / f"{rel}.npy")
        size = Image.open(row["path"]).size
        assert amap.shape == (size[1], size[0]) and amap.dtype == np.float32
        with Image.open(out / "overlays" / root.name / f"{rel}.png") as im:
            assert im.size == size
    assert not list(out.rglob(".*"))  # no temporary file left behind
    assert "Maps of every test image kept in overlays/ and maps/" in (out / "report.md").read_text()
    r = runner.invoke(app, [*args[:-1], "jpeg"])
    assert r.exit_code == 1 and "maps: 'jpeg' is not one of none, png, npy" in r.output
    r = runner.invoke(app, ["eval", str(tmp_path / "r"), "--out", str(tmp_path / "r2"), "--backbone", onnx_config.backbone])
    assert r.exit_code == 1 and "no dataset layout matches" in r.output
