"""The pixel budget of input files (lakead.limits): a small file that would decode to gigabytes
is refused from its header, before any of it is decoded, by the command line as by the service
(issue 28 items 5, 6, 15, 22): a DICOM header claiming 10^8 frames, a deflated DICOM, a
compressed NIfTI of many voxels, a PNG of 20000 x 20000 pixels. Each is listed in errors.csv
with the limit that refused it; the other images are scored."""

from __future__ import annotations

import csv
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pydicom", reason="the medical extra is not installed")
pytest.importorskip("nibabel", reason="the medical extra is not installed")

from _medical_files import write_dicom  # noqa: E402
from conftest import texture  # noqa: E402
from lakead import limits  # noqa: E402
from lakead.errors import ImageLoadError  # noqa: E402
from lakead.images import load_image  # noqa: E402
from lakead.medical import ReadRule, expand, header_size, read_source  # noqa: E402


@pytest.fixture(autouse=True)
def default_budget():
    yield
    limits.set_max_pixels(None)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels (header only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def frames_bomb(path):
    """A DICOM file of a few hundred bytes whose header claims 10^8 frames of 64 x 64."""
    import pydicom

    write_dicom(path, np.zeros((64, 64), np.uint8))
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 100_000_000
    ds.save_as(path, enforce_file_format=True)
    return path


def deflated(path, frames: int = 200):
    """A deflated DICOM: a few hundred KB that inflate to ``frames`` x 512 x 512 x 2 bytes."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    return write_dicom(path, np.zeros((frames, 512, 512), np.uint16), transfer_syntax=DeflatedExplicitVRLittleEndian)


def nifti_bomb(path, depth: int = 4096):
    """A gzip-compressed NIfTI of 64 x 64 x ``depth`` voxels (a few KB on disk)."""
    import nibabel as nib

    vol = np.zeros((64, 64, depth), np.uint8)
    vol[10:20, 10:20, :] = 7
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    return path


def test_header_checks(tmp_path):
    bomb = frames_bomb(tmp_path / "frames.dcm")
    assert bomb.stat().st_size < 10_000
    with pytest.raises(ImageLoadError, match=r"100000000 frames of 64x64 pixels .* more than the limit of 320 M per file"):
        expand(bomb, ReadRule())
    with pytest.raises(ImageLoadError, match="100000000 frames"):
        read_source(f"{bomb}#frame=1", ReadRule())
    assert header_size(bomb) == (64, 64, 100_000_000)  # what the service measures (and refuses, 413)

    limits.set_max_pixels(1_000_000)  # volumes: 8 M pixels
    big = deflated(tmp_path / "deflated.dcm")
    assert big.stat().st_size < 1_000_000
    with pytest.raises(ImageLoadError, match="deflated DICOM data expands past 61 MiB"):
        expand(big, ReadRule())
    assert header_size(big)[0] * header_size(big)[1] > limits.max_pixels() * limits.VOLUME_FACTOR
    vol = nifti_bomb(tmp_path / "v.nii.gz")
    with pytest.raises(ImageLoadError, match=r"4096 slices of 64x64 pixels \(16.8 M in all\) is more than the limit of 8 M"):
        expand(vol, ReadRule())
    (tmp_path / "big.png").write_bytes(png_header(1001, 1000))
    with pytest.raises(ImageLoadError, match=r"1001x1000 pixels \(1.0 MP\) is more than the limit of 1 MP per image \(--max-pixels\)"):
        load_image(tmp_path / "big.png")
    limits.set_max_pixels(3_000_000)
    assert len(expand(vol, ReadRule())) == 4096  # within a larger budget: read as before


def test_dicom_headers_that_lie_are_errors(tmp_path):
    """NumberOfFrames -5 vanished (not scored, not in errors.csv); a RescaleSlope of NaN or 1e309
    gave an all-black image scored normal (items 15)."""
    import pydicom

    path = write_dicom(tmp_path / "neg.dcm", np.zeros((16, 16), np.uint8))
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = -5
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageLoadError, match="NumberOfFrames .* is not a positive whole number"):
        expand(path, ReadRule())
    for slope in ("NaN", "1e309"):
        p = write_dicom(tmp_path / f"s{slope}.dcm", np.arange(256, dtype=np.uint16).reshape(16, 16))
        ds = pydicom.dcmread(p)
        ds.RescaleSlope = slope
        ds.save_as(p, enforce_file_format=True)
        with pytest.raises(ImageLoadError, match="RescaleSlope .* is not a finite number"):
            read_source(p, ReadRule())


def test_an_all_nan_nifti_is_an_error(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.full((16, 16, 3), np.nan, np.float32), np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(ImageLoadError, match="holds no finite voxel"):
        expand(tmp_path / "nan.nii.gz", ReadRule())


def test_the_command_line_refuses_them_from_their_headers(tiny_clip_dir, tmp_path):
    from typer.testing import CliRunner

    from lakead.cli import app

    rng = np.random.default_rng(0)
    (tmp_path / "normal").mkdir()
    for i in range(4):
        Image.fromarray(texture(rng)).save(tmp_path / "normal" / f"{i}.png")
    runner = CliRunner()
    r = runner.invoke(app, ["fit", str(tmp_path / "normal"), "-c", "tile", "--out", str(tmp_path / "m"), "--backbone",
                            str(tiny_clip_dir), "--layer", "3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    test = tmp_path / "test"
    test.mkdir()
    Image.fromarray(texture(rng)).save(test / "good.png")
    frames_bomb(test / "frames.dcm")
    deflated(test / "deflated.dcm")
    nifti_bomb(test / "volume.nii.gz")
    (test / "huge.png").write_bytes(png_header(20000, 20000))
    r = runner.invoke(app, ["predict", str(tmp_path / "m"), str(test), "--out", str(tmp_path / "r"), "--device", "cpu",
                            "--max-pixels", "1000000"])
    assert r.exit_code == 1 and "4 input(s) could not be read" in r.output, r.output
    with open(tmp_path / "r" / "errors.csv", newline="") as f:
        errors = {row["path"].rsplit("/", 1)[-1]: row["error"] for row in csv.DictReader(f)}
    assert set(errors) == {"frames.dcm", "deflated.dcm", "volume.nii.gz", "huge.png"}
    assert "100000000 frames" in errors["frames.dcm"] and "expands past" in errors["deflated.dcm"]
    assert "4096 slices" in errors["volume.nii.gz"] and "20000x20000 pixels" in errors["huge.png"]
    rows = (tmp_path / "r" / "scores.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[0].endswith("good.png")


def webp_header(width: int, height: int) -> bytes:
    """A lossless WebP whose header declares ``width x height`` (its data is a 16 x 16 image's)."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "WEBP", lossless=True)
    data = buf.getvalue()
    i = data.index(b"VP8L") + 9  # after the chunk header and the signature byte: 14 bits each, width-1 and height-1
    rest = int.from_bytes(data[i:i + 4], "little") & ~((1 << 28) - 1)
    return data[:i] + ((width - 1) | ((height - 1) << 14) | rest).to_bytes(4, "little") + data[i + 4:]


def test_a_file_past_pillows_bomb_limit_is_measured(tmp_path):
    """A 16383 x 16383 WebP was reported as '178956971x1 pixels' (item 19)."""
    from lakead.images import raster_size
    from lakead.serve.uploads import _header_size

    path = tmp_path / "big.webp"
    path.write_bytes(webp_header(16383, 16383))
    assert raster_size(path) == (16383, 16383) == _header_size(path)
    with pytest.raises(ImageLoadError, match=r"16383x16383 pixels \(268.4 MP\) is more than the limit of 40 MP"):
        load_image(path)
