"""The worked example of docs/MEDICAL.md: medical-style files built from ../shared/data, then
fit and predict through the command line on PNG, DICOM and NIfTI copies of the same pixels.

    python benchmarks/medical_example.py [--out runs/medical] [--backbone onnx:../shared/models/mobilenetv2-12-int8.onnx]

Builds, from the metal-plate images of ../shared/data (grey, 128x128, contrast stretched to 0..255):
``train/{png,dcm}/``, ``train/series.dcm`` (multi-frame), ``train/scan.nii.gz`` (one slice per
image, and an empty slice), the same under ``test/`` with a good and two defective images; fits
one model per format (``--window full``) and predicts the test images of every format with
every model, then prints the largest score difference against the PNG model on PNG images.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _medical_files import nifti_from_images, write_dicom  # noqa: E402

PLATE = ROOT.parent / "shared" / "data" / "mpdd" / "metal_plate"
SIDE = 128


def grey(p: Path) -> np.ndarray:
    with Image.open(p) as im:
        g = np.asarray(im.convert("L").resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float64)
    return np.round((g - g.min()) / (g.max() - g.min()) * 255).astype(np.uint8)


def build(out: Path) -> None:
    train = [grey(p) for p in sorted((PLATE / "train" / "good").glob("*.png"))[:16]]
    test = [grey(p) for p in sorted((PLATE / "test" / "good").glob("*.png"))[:4]]
    test += [grey(p) for p in sorted((PLATE / "test" / "defective").glob("*.png"))[:4]]
    affine = np.diag([-0.8, -0.8, 3.0, 1.0])  # LPS-stored, 0.8 mm pixels, 3 mm slices
    for part, images in (("train", train), ("test", test)):
        for kind in ("png", "dcm"):
            (out / part / kind).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            Image.fromarray(im).save(out / part / "png" / f"{i:03d}.png")
            write_dicom(out / part / "dcm" / f"{i:03d}.dcm", im, modality="MR")
        write_dicom(out / part / "series.dcm", np.stack(images), modality="MR")
        nifti_from_images(out / part / "scan.nii.gz", [np.zeros((SIDE, SIDE), np.uint8), *images], affine=affine)


def lakead(*args: object) -> None:
    cmd = [sys.executable, "-m", "lakead.cli", *map(str, args)]
    print("$", " ".join(["lakead", *map(str, args)]), flush=True)
    subprocess.run(cmd, check=True)


def scores(path: Path) -> list[float]:
    with open(path, newline="") as fh:
        return [float(r["score"]) for r in csv.DictReader(fh)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/medical"))
    ap.add_argument("--backbone", default=f"onnx:{ROOT.parent / 'shared' / 'models' / 'mobilenetv2-12-int8.onnx'}")
    ap.add_argument("--layer", default="400")
    args = ap.parse_args()
    data = args.out / "data"
    build(data)
    inputs = {"png": data / "train" / "png", "dcm": data / "train" / "dcm", "frames": data / "train" / "series.dcm",
              "nii": data / "train" / "scan.nii.gz"}
    tests = {"png": data / "test" / "png", "dcm": data / "test" / "dcm", "frames": data / "test" / "series.dcm",
             "nii": data / "test" / "scan.nii.gz"}
    for kind, src in inputs.items():
        lakead("fit", src, "-c", "metal plate", "-o", args.out / f"model-{kind}", "--backbone", args.backbone,
               "--layer", args.layer, "--k", "32", "--window", "full")
    ref = None
    for kind in inputs:
        for tkind, src in tests.items():
            run = args.out / f"pred-{kind}-{tkind}"
            maps = "nifti" if tkind == "nii" else "none"
            lakead("predict", args.out / f"model-{kind}", src, "-o", run, "--maps", maps)
            got = np.asarray(scores(run / "scores.csv"))
            ref = got if ref is None else ref
            print(f"model {kind:6s} test {tkind:6s}: {len(got)} images, max |score - png/png| = {np.abs(got - ref).max():.2e}")
    import nibabel as nib

    scan, maps = nib.load(tests["nii"]), nib.load(args.out / "pred-nii-nii" / "maps" / "scan.nii.gz.nii.gz")
    print(f"map volume {maps.shape} {maps.get_data_dtype()}, scan {scan.shape}; same affine: "
          f"{np.allclose(maps.affine, scan.affine)}; axes {''.join(nib.aff2axcodes(maps.affine))}")


if __name__ == "__main__":
    main()
