"""Every kind of image a user may have becomes an (H, W, 3) uint8 RGB array, or a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lakead.errors import ImageLoadError, LakeadError
from lakead.images import list_images, load_image


def _rgb(h=6, w=9):
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w) * 20
    a[..., 1] = 100
    a[..., 2] = np.arange(h)[:, None] * 30
    return a


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1", "YCbCr", "I;16", "I", "F"])
def test_modes_become_rgb_uint8(tmp_path, mode):
    src = Image.fromarray(_rgb())
    if mode == "I;16":
        im = Image.fromarray((np.arange(54).reshape(6, 9) * 1000).astype(np.uint16))
    elif mode == "I":
        im = Image.fromarray((np.arange(54).reshape(6, 9) * 1000).astype(np.int32))
    elif mode == "F":
        im = Image.fromarray((np.arange(54).reshape(6, 9) / 53.0).astype(np.float32))
    else:
        im = src.convert(mode)
    suffix = ".tif" if mode in ("I", "F", "CMYK", "YCbCr") else ".png"
    if mode == "YCbCr":
        suffix = ".jpg"
    path = tmp_path / f"x{suffix}"
    im.save(path)
    for given in (path, im):
        out = load_image(given)
        assert out.shape == (6, 9, 3) and out.dtype == np.uint8


def test_sixteen_bit_scaled_from_full_range(tmp_path):
    a = np.array([[0, 257, 65535]], dtype=np.uint16).repeat(4, 0)
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    out = load_image(path)
    assert out[0, :, 0].tolist() == [0, 1, 255]
    assert load_image(a)[0, :, 1].tolist() == [0, 1, 255]


def test_grey_and_alpha_values_kept(tmp_path):
    grey = np.full((5, 5), 77, np.uint8)
    assert (load_image(grey) == 77).all()
    rgba = np.dstack([_rgb(), np.zeros((6, 9), np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), _rgb())  # alpha dropped, colour kept


def test_exif_orientation_is_honoured(tmp_path):
    a = _rgb(4, 10)  # wide
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "o.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "o.jpg")
    assert out.shape == (10, 4, 3)  # displayed upright: tall


def test_arrays(tmp_path):
    assert load_image(_rgb()).shape == (6, 9, 3)
    assert load_image(_rgb()[..., :1]).shape == (6, 9, 3)
    assert load_image(np.dstack([_rgb(), np.full((6, 9), 255, np.uint8)])).shape == (6, 9, 3)
    assert load_image(np.ones((3, 3), bool))[0, 0, 0] == 255
    assert load_image(np.full((3, 3), 0.5))[0, 0, 0] == 128
    with pytest.raises(ImageLoadError, match="channels first"):
        load_image(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ImageLoadError, match="0..1"):
        load_image(np.full((3, 3), 2.0))
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(np.full((3, 3), np.nan))
    with pytest.raises(ImageLoadError, match="dtype"):
        load_image(np.zeros((3, 3), np.int64))
    with pytest.raises(ImageLoadError, match="no pixels"):
        load_image(np.zeros((0, 3, 3), np.uint8))


def test_bad_files_name_the_file_and_the_problem(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageLoadError, match=r"missing\.png: file not found"):
        load_image(missing)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageLoadError, match=r"notes\.png: not an image"):
        load_image(text)
    good = tmp_path / "good.png"
    Image.fromarray(_rgb(64, 64)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:80])
    with pytest.raises(ImageLoadError, match=r"broken\.png: corrupt or truncated"):
        load_image(broken)
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="unsupported input type"):
        load_image(3.5)  # type: ignore[arg-type]


def test_list_images(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.png", "1.JPG", "b/0.bmp", ".hidden.png", "readme.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["1.JPG", "b/0.bmp", "b/2.png"]
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["1.JPG"]
    # a file given explicitly is taken as is, whatever its ending
    assert list_images([tmp_path / "readme.txt"]) == [tmp_path / "readme.txt"]


def test_list_images_errors(tmp_path):
    with pytest.raises(LakeadError, match="no such file or directory"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(LakeadError, match=r"empty: no images found"):
        list_images(tmp_path / "empty")
