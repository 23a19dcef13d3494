"""DICOM and NIfTI inputs (lakead.medical): windows, slices, names, errors, and the same
scores as the PNG originals (docs/MEDICAL.md)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from _medical_files import nifti_from_images, write_dicom
from lakead.cli import app
from lakead.errors import ConfigError, ImageLoadError
from lakead.images import expand_inputs, list_images, load_image
from lakead.methods.lake import LakeConfig, LakeDetector
from lakead.medical import ReadRule, parse_slices, parse_window, read_mask_source, read_source

pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

OPTS = dict(k=8, layer=2, image_size=64, batch_size=4, use_text=False)
SIDE = 48
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def grey_images(request) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Grey 48x48 images made from ../shared/data (metal plate; contrast stretched to 0..255,
    so that a full-range window reads them back as they are): 5 normal, 3 test."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "mpdd" / "metal_plate"
    if not root.is_dir():
        pytest.skip(f"real data not present at {root} (see ../shared/data/README.md)")

    def grey(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            g = np.asarray(im.convert("L").resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float64)
        return np.round((g - g.min()) / (g.max() - g.min()) * 255).astype(np.uint8)

    train = [grey(p) for p in sorted((root / "train" / "good").glob("*.png"))[:5]]
    test = [grey(p) for p in sorted((root / "test" / "good").glob("*.png"))[:1]]
    test += [grey(p) for p in sorted((root / "test" / "defective").glob("*.png"))[:2]]
    return train, test


@pytest.fixture(scope="module")
def files(grey_images, tmp_path_factory) -> dict[str, list[Path]]:
    """The same pixels as PNG files, a DICOM series (one file each), a multi-frame DICOM and
    a NIfTI volume (plus an empty slice, skipped), for the support and the test images."""
    train, test = grey_images
    d = tmp_path_factory.mktemp("medical")
    out: dict[str, list[Path]] = {}
    for part, images in (("train", train), ("test", test)):
        (d / part / "png").mkdir(parents=True)
        (d / part / "dcm").mkdir()
        out[f"{part}_png"] = [d / part / "png" / f"{i:03d}.png" for i in range(len(images))]
        for p, im in zip(out[f"{part}_png"], images):
            Image.fromarray(im).save(p)
        out[f"{part}_dcm"] = [write_dicom(d / part / "dcm" / f"{i:03d}.dcm", im, modality="MR")
                              for i, im in enumerate(images)]
        out[f"{part}_frames"] = [write_dicom(d / part / "series.dcm", np.stack(images), modality="MR")]
        blank = np.zeros((SIDE, SIDE), np.uint8)
        out[f"{part}_nii"] = [nifti_from_images(d / part / "scan.nii.gz", [blank, *images],
                                                affine=np.diag([-0.9, -0.9, 2.5, 1.0]))]
    return out


def scores_of(det, inputs) -> np.ndarray:
    return det.predict(inputs).scores


# -- the same pixels, the same scores -------------------------------------------------------


def test_png_dicom_and_nifti_read_the_same_pixels(files):
    png = [load_image(p) for p in files["test_png"]]
    for kind in ("dcm", "frames", "nii"):
        srcs, _ = expand_inputs(files[f"test_{kind}"], None, ReadRule("full"))
        got = [read_source(s, ReadRule("full")).image for s in srcs]
        assert len(got) == len(png) and all((g == p).all() for g, p in zip(got, png)), kind


@pytest.mark.slow
def test_png_dicom_and_nifti_give_the_same_scores(files, tiny_backbone):
    ref = LakeDetector(tiny_backbone, window="full", **OPTS).fit(files["train_png"], "plate")
    expected = scores_of(ref, files["test_png"])
    for kind in ("dcm", "frames", "nii"):
        det = LakeDetector(tiny_backbone, window="full", **OPTS).fit(files[f"train_{kind}"], "plate")
        got = scores_of(det, files[f"test_{kind}"])
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=kind)
        np.testing.assert_allclose(det.predict(files["test_png"]).scores, expected, atol=1e-5, err_msg=kind)


def test_sources_are_named_by_slice_and_frame(files):
    srcs, _ = expand_inputs(files["test_nii"], None, ReadRule())
    assert srcs == [f"{files['test_nii'][0]}#z={k}" for k in (1, 2, 3)]  # slice 0 has no signal
    frames, _ = expand_inputs(files["test_frames"], None, ReadRule())
    assert frames == [f"{files['test_frames'][0]}#frame={k}" for k in (1, 2, 3)]
    assert list_images(files["test_nii"][0].parent, recursive=False) == sorted([*files["test_frames"], *files["test_nii"]])


def test_a_lazy_sequence_is_expanded_as_a_view(files):
    """A Sequence that is not a list (a dataset) comes back as a lazy view with the list's
    items and names: the volume's slices in place, the other items read from it when asked."""
    from collections.abc import Sequence

    items = [files["test_png"][0], files["test_nii"][0], files["test_png"][1]]

    class Lazy(Sequence):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    names = ["a", "vol", "b"]
    want, want_names = expand_inputs(items, names, ReadRule())
    got, got_names = expand_inputs(Lazy(), names, ReadRule())
    assert not isinstance(got, list) and list(got) == want and got_names == want_names
    assert want_names == ["a", "vol#z=1", "vol#z=2", "vol#z=3", "b"]
    assert got[-1] == items[2] and got[1:3] == want[1:3]
    unnamed, labels = expand_inputs(Lazy(), None, ReadRule(), label=True)
    assert labels == [str(s) for s in want]


def test_empty_slices_are_skipped_and_counted(files, caplog):
    from lakead.medical.rule import _cache

    _cache.clear()
    with caplog.at_level(logging.WARNING, logger="lakead"):
        expand_inputs(files["test_nii"], None, ReadRule())
    assert "1 of 4 axial slices have no signal" in caplog.text


def test_predict_writes_maps_as_a_nifti_volume_with_the_input_affine(files, tiny_backbone, tmp_path):
    det = LakeDetector(tiny_backbone, window="full", **OPTS).fit(files["train_nii"], "plate")
    det.save(tmp_path / "model")
    scan = files["test_nii"][0]
    r = invoke("predict", tmp_path / "model", scan, "-o", tmp_path / "out", "--maps", "nifti")
    assert r.exit_code == 0, r.output
    with open(tmp_path / "out" / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["path"] for row in rows] == [f"{scan}#z={k}" for k in (1, 2, 3)]
    np.testing.assert_allclose([float(row["score"]) for row in rows], scores_of(det, [scan]), atol=1e-5)
    vol = nib.load(tmp_path / "out" / "maps" / "scan.nii.gz.nii.gz")
    src = nib.load(scan)
    assert vol.shape == src.shape
    np.testing.assert_allclose(vol.affine, src.affine)
    data = np.asarray(vol.dataobj)
    assert not data[:, :, 0].any()  # the empty slice was not scored
    for k, amap in zip((1, 2, 3), det.predict([scan]).maps):  # each slice's map where its image is
        back = np.flipud(data[::-1, ::-1, k].T)  # the affine flips x and y: see nifti_from_images
        np.testing.assert_allclose(back, amap, atol=1e-6)


def test_model_saves_the_read_rule_and_checks_the_modality(files, tiny_backbone, tmp_path):
    det = LakeDetector(tiny_backbone, window="full", **OPTS).fit(files["train_dcm"], "plate")
    det.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "lakead.json").read_text())
    assert meta["config"]["window"] == "full" and meta["read"]["modalities"] == ["MR"]
    shown = invoke("info", tmp_path / "m")
    assert shown.exit_code == 0 and "modalities" in shown.output and "MR" in shown.output
    from lakead.methods import load_detector

    back = load_detector(tmp_path / "m")
    assert back.read_rule == ReadRule("full", "axial")
    ct = write_dicom(tmp_path / "ct.dcm", np.zeros((SIDE, SIDE), np.uint16) + 1000, modality="CT")
    with pytest.raises(ImageLoadError, match="is a CT image, but the model was fitted on MR"):
        back.predict([ct])


# -- windows --------------------------------------------------------------------------------


def test_windows_in_their_order(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, (16, 16)).astype(np.int16)
    path = write_dicom(tmp_path / "ct.dcm", (hu + 1024).astype(np.uint16), modality="CT", slope=1.0,
                       intercept=-1024.0, window=(40, 80), bits_stored=12)

    def expected(lo, hi):
        return np.round(np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)

    given = read_source(path, ReadRule("400,1800"))
    assert (given.image[..., 0] == expected(400 - 0.5 - 899.5, 400 - 0.5 + 899.5)).all()
    assert (read_source(path, ReadRule("bone")).image == given.image).all()
    own = read_source(path, ReadRule("auto"))
    assert own.window == "file C40/W80" and (own.image[..., 0] == expected(0.0, 79.0)).all()
    full = read_source(path, ReadRule("full"))
    assert full.window == "full -1024..3071" and (full.image[..., 0] == expected(-1024, 3071)).all()
    bare = write_dicom(tmp_path / "bare.dcm", (hu + 1024).astype(np.uint16), modality="CT", intercept=-1024.0,
                       bits_stored=12)
    assert read_source(bare, ReadRule("auto")).window == "full -1024..3071"
    with pytest.raises(ImageLoadError, match="has no window of its own"):
        read_source(bare, ReadRule("file"))


def test_monochrome1_is_inverted_and_colour_is_kept(tmp_path):
    rng = np.random.default_rng(1)
    g = rng.integers(0, 256, (12, 10)).astype(np.uint8)
    assert (load_image(write_dicom(tmp_path / "m1.dcm", g, photometric="MONOCHROME1"))[..., 0] == 255 - g).all()
    rgb = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
    assert (load_image(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")) == rgb).all()


def test_nifti_window_from_cal_and_planes(tmp_path):
    rng = np.random.default_rng(2)
    ims = [rng.integers(0, 1000, (8, 6)).astype(np.int16) for _ in range(3)]
    path = nifti_from_images(tmp_path / "v.nii", ims, dtype=np.int16, cal=(100, 600))
    got = read_source(f"{path}#z=1", ReadRule())
    assert got.window == "file cal_min..cal_max 100..600"
    assert (got.image[..., 0] == np.round(np.clip((ims[1] - 100) / 500, 0, 1) * 255)).all()
    sag, _ = expand_inputs([path], None, ReadRule(slices="sagittal"))
    assert sag == [f"{path}#x={i}" for i in range(6)]
    cor, _ = expand_inputs([path], None, ReadRule(slices="coronal/3"))
    assert cor == [f"{path}#y={i}" for i in (0, 3, 6)]
    # a sagittal slice: anterior (y) across, superior (z) up
    vol = np.asarray(nib.load(path).dataobj)
    assert read_source(f"{path}#x=2", ReadRule("full")).image.shape[:2] == (3, 8)
    img = read_source(f"{path}#x=2", ReadRule(f"{(vol.min() + vol.max()) / 2 + 0.5},{vol.max() - vol.min() + 1}"))
    assert img.image.shape[:2] == (vol.shape[2], vol.shape[1])


@pytest.mark.parametrize("text, message", [("40", "CENTER,WIDTH"), ("40,0", "width"), ("head", "CENTER,WIDTH")])
def test_bad_windows(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_window(text)
    with pytest.raises(ConfigError, match=message):
        LakeConfig(window=text).validate()


@pytest.mark.parametrize("text", ["transverse", "axial:3", "axial:a-b", "axial/0", "axial:5-2", "axial:1-2-3"])
def test_bad_slices(text):
    assert parse_slices("axial:2-4/2") == parse_slices(" Axial:2-4/2 ") and parse_slices("axial/2").step == 2
    with pytest.raises(ConfigError, match="slices"):
        parse_slices(text)


# -- bad input: one clear message naming the file ------------------------------------------


def test_bad_medical_files(tmp_path):
    nopix = write_dicom(tmp_path / "nopix.dcm", np.zeros((4, 4), np.uint8), with_pixels=False)
    with pytest.raises(ImageLoadError, match=r"nopix.dcm: DICOM file without pixel data"):
        load_image(nopix)
    jpeg = write_dicom(tmp_path / "jpeg.dcm", np.zeros((4, 4), np.uint8), transfer_syntax="1.2.840.10008.1.2.4.81")
    with pytest.raises(ImageLoadError, match=r"jpeg.dcm: unsupported transfer syntax JPEG-LS"):
        load_image(jpeg)
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), str(four))
    with pytest.raises(ImageLoadError, match=r"four.nii.gz: is a 4D NIfTI image \(shape \(4, 4, 4, 2\)\)"):
        load_image(four)
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"not a volume")
    with pytest.raises(ImageLoadError, match="junk.nii: not a readable NIfTI file"):
        load_image(junk)
    vol = nifti_from_images(tmp_path / "v.nii.gz", [np.eye(4, dtype=np.uint8) * 9] * 2)
    with pytest.raises(ImageLoadError, match=r"v.nii.gz: holds 2 axial slices"):
        load_image(vol)
    with pytest.raises(ImageLoadError, match=r"no such slice"):
        load_image(f"{vol}#z=7")


def test_missing_extra_is_named(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_pydicom(name, *args, **kwargs):
        if name.startswith("pydicom"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pydicom)
    (tmp_path / "a.dcm").write_bytes(b"x")
    with pytest.raises(ImageLoadError, match=r"a.dcm: reading DICOM files needs pydicom: pip install 'lakead\[medical\]'"):
        load_image(tmp_path / "a.dcm")


def test_mask_volume_is_read_as_its_scan(tmp_path):
    m = np.zeros((8, 6), np.uint8)
    m[2:4, 1:3] = 1
    seg = nifti_from_images(tmp_path / "seg.nii.gz", [np.zeros_like(m), m], affine=np.diag([-1, 1, 1, 1]))
    assert (read_mask_source(f"{seg}#z=1") == (m > 0)).all()
    with pytest.raises(ImageLoadError, match="mask is 6x8 pixels, its image 6x9"):
        read_mask_source(f"{seg}#z=1", (9, 6))


# -- evaluation: slices in the MVTec layout, volumes in the BraTS layout ---------------------


@pytest.fixture(scope="module")
def plate_with_masks(grey_images, tmp_path_factory):
    """Grey metal-plate images with their defect masks (48x48) from ../shared/data."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "mpdd" / "metal_plate"
    defects = sorted((root / "test" / "defective").glob("*.png"))[:3]

    def grey(p: Path, mask: bool = False) -> np.ndarray:
        with Image.open(p) as im:
            g = im.convert("L").resize((SIDE, SIDE), Image.Resampling.NEAREST if mask else Image.Resampling.BILINEAR)
        a = np.asarray(g, dtype=np.float64)
        return (a > 127).astype(np.uint8) if mask else np.round((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)

    bad = [grey(p) for p in defects]
    masks = [grey(root / "ground_truth" / "defective" / f"{p.stem}_mask.png", mask=True) for p in defects]
    return grey_images[0], grey_images[1][:1], bad, masks


def _eval_config(tiny_clip_dir, **extra):
    return LakeConfig(backbone=str(tiny_clip_dir), k=8, layer=2, image_size=64, use_text=False, window="full", **extra)


@pytest.mark.slow
def test_eval_on_dicom_slices_in_mvtec_layout_equals_png(plate_with_masks, tiny_clip_dir, tmp_path):
    from lakead.evaluate.runner import evaluate

    train, good, bad, masks = plate_with_masks
    results = {}
    for kind in ("png", "dcm"):
        cat = tmp_path / kind / "plate"
        for sub, images in (("train/good", train), ("test/good", good), ("test/dent", bad)):
            (cat / sub).mkdir(parents=True)
            for i, im in enumerate(images):
                p = cat / sub / f"{i:03d}.{kind}"
                Image.fromarray(im).save(p) if kind == "png" else write_dicom(p, im)
        (cat / "ground_truth" / "dent").mkdir(parents=True)
        for i, m in enumerate(masks):
            Image.fromarray(m * 255).save(cat / "ground_truth" / "dent" / f"{i:03d}_mask.png")
        rep = evaluate(tmp_path / kind, tmp_path / f"r-{kind}", _eval_config(tiny_clip_dir), shots=None, seed=None,
                       figures=False)
        results[kind] = rep.results[0]
    np.testing.assert_allclose(results["dcm"].scores, results["png"].scores, atol=1e-5)
    assert results["dcm"].pixel == pytest.approx(results["png"].pixel, abs=1e-6)


def test_eval_on_volumes_in_brats_layout(plate_with_masks, tiny_clip_dir, tmp_path):
    train, good, bad, masks = plate_with_masks
    root = tmp_path / "BraTS-mini"
    blank = np.zeros((SIDE, SIDE), np.uint8)
    cases = {"BraTS_001": (train[:3], [blank] * 3), "BraTS_002": (train[3:] + [bad[0]], [blank] * 2 + [masks[0]]),
             "BraTS_003": (good + bad[1:], [blank] + masks[1:]), "BraTS_004": ([blank, *bad[:1], *good], [blank, masks[0], blank])}
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for case, (images, segs) in cases.items():
        (root / case).mkdir(parents=True)
        nifti_from_images(root / case / f"{case}_flair.nii.gz", images, affine=affine)
        nifti_from_images(root / case / f"{case}_seg.nii.gz", segs, affine=affine)
    from lakead.data import load_dataset

    (cat,) = load_dataset(root, rule=ReadRule("full"))
    assert cat.name == "flair" and cat.class_name == "brain"
    assert [p.name for p in cat.train] == [f"BraTS_001_flair.nii.gz#z={k}" for k in range(3)] + \
        [f"BraTS_002_flair.nii.gz#z={k}" for k in range(2)]  # the tumour slice of case 2 is not support
    assert [(s.path.name, s.label) for s in cat.test] == [
        ("BraTS_003_flair.nii.gz#z=0", 0), ("BraTS_003_flair.nii.gz#z=1", 1), ("BraTS_003_flair.nii.gz#z=2", 1),
        ("BraTS_004_flair.nii.gz#z=1", 1), ("BraTS_004_flair.nii.gz#z=2", 0)]  # slice 0 of case 4 is empty
    assert cat.test[1].mask.name == "BraTS_003_seg.nii.gz#z=1"
    r = invoke("eval", root, "-o", tmp_path / "report", "--backbone", tiny_clip_dir, "--layer", "2", "--k", "8",
               "--no-text", "--window", "full", "--shots", "all", "--no-figures")
    assert r.exit_code == 0, r.output
    with open(tmp_path / "report" / "metrics.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert (row["category"], row["n_normal"], row["n_defect"], row["pixel_images"]) == ("flair", "2", "3", "5")
    assert 0 <= float(row["pixel_pro"]) <= 1
    # a mask volume of another shape: one message naming both files
    nib.save(nib.Nifti1Image(np.zeros((SIDE, SIDE, 2), np.uint8), affine), str(root / "BraTS_004" / "BraTS_004_seg.nii.gz"))
    with pytest.raises(Exception, match=r"mask volume .*BraTS_004_seg.nii.gz has shape \(48, 48, 2\), its scan .*BraTS_004_flair"):
        load_dataset(root, rule=ReadRule("full"))


def test_service_reads_dicom_and_nifti_uploads_with_the_models_window(files, tiny_clip_dir, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lakead.serve import create_app

    def upload(paths):
        return [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]

    with TestClient(create_app(tmp_path / "models", backbone=str(tiny_clip_dir), device="cpu", batch_size=4)) as c:
        data = {"class_name": "plate", "k": "8", "layer": "2", "image_size": "64", "use_text": "false", "window": "full"}
        r = c.post("/models", data=data, files=upload(files["train_dcm"]))
        assert r.status_code in (200, 201), r.text
        model = r.json()["id"]
        got = c.post(f"/models/{model}/predict", files=upload(files["test_dcm"]))
        assert got.status_code == 200, got.text
        png = c.post(f"/models/{model}/predict", files=upload(files["test_png"]))
        assert [x["score"] for x in got.json()["results"]] == pytest.approx([x["score"] for x in png.json()["results"]], abs=1e-5)
        bad = c.post(f"/models/{model}/predict", files=upload(files["test_nii"]))
        assert bad.status_code == 422 and "scan.nii.gz" in bad.text and "3 axial slices" in bad.text


def test_the_files_voi_lut_is_used(tmp_path):
    import pydicom
    from pydicom.dataset import Dataset

    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    path = write_dicom(tmp_path / "lut.dcm", g, window=(128, 256))
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 8])  # LUT Descriptor: 256 entries from 0, 8 bits
    item.add_new(0x00283006, "US", [255 - v for v in range(256)])  # LUT Data: an inverting LUT
    ds.VOILUTSequence = [item]
    ds.save_as(path)
    got = read_source(path, ReadRule())
    assert got.window == "file VOI LUT" and (got.image[..., 0] == 255 - g).all()
    assert (read_source(path, ReadRule("full")).image[..., 0] == g).all()  # a window given wins over the file's


def test_service_refuses_a_dicom_over_the_decode_limit(tmp_path):
    from lakead.serve.uploads import ServeLimits, UploadRejected, Uploads

    big = write_dicom(tmp_path / "big.dcm", np.zeros((30, 40, 50), np.uint8))  # 30 frames of 40x50
    limits = ServeLimits(max_decode_pixels=50_000)
    with pytest.raises(UploadRejected, match=r"big.dcm.*0.1 MP in all its images"):
        with open(big, "rb") as fh, Uploads([("big.dcm", fh)], limits):
            pass
