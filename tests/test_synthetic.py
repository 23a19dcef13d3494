"""The synthetic defects of lakead.synthetic: mask area and location, seed reproducibility, the
image outside the mask unchanged where the kind promises it, the placement mask."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import texture
from lakead.synthetic import AREA, KINDS, make_defect, placement_mask


def _image(seed: int = 0, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    return texture(np.random.default_rng(seed), size)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_only_its_mask_and_is_reproducible(kind):
    img, other = _image(0), _image(1)
    a = make_defect(kind, img, np.random.default_rng(7), source=other)
    b = make_defect(kind, img, np.random.default_rng(7), source=other)
    assert a.kind == kind and a.image.dtype == np.uint8 and a.image.shape == img.shape and a.mask.shape == img.shape[:2]
    np.testing.assert_array_equal(a.image, b.image)  # the same seed, the same defect
    np.testing.assert_array_equal(a.mask, b.mask)
    c = make_defect(kind, img, np.random.default_rng(8), source=other)
    assert not np.array_equal(a.mask, c.mask) or not np.array_equal(a.image, c.image)  # another seed, another defect
    assert a.mask.any()
    assert (a.image != img).any(axis=2)[a.mask].mean() > 0.3  # the defect changes what it covers
    changed = (a.image != img).any(axis=2)
    if kind == "blend":  # the feathered edge reaches beyond the mask, not far
        from scipy.ndimage import binary_dilation

        assert not (changed & ~binary_dilation(a.mask, iterations=8)).any()
    else:
        assert not (changed & ~a.mask).any()
    assert img is not a.image and (img == _image(0)).all()  # the input is not modified


@pytest.mark.parametrize("kind", ["cutpaste", "blend", "noise", "blur", "colour", "intensity"])
def test_areas_are_subtle(kind):
    img = _image(2, (120, 120))
    shares = [make_defect(kind, img, np.random.default_rng(s), source=_image(3, (120, 120))).mask.mean() for s in range(10)]
    assert min(shares) >= 0.3 * AREA[0] and max(shares) <= 1.6 * AREA[1], shares


def test_scar_and_scratch_are_thin_and_small():
    img = _image(4, (128, 128))
    for kind in ("scar", "scratch"):
        shares = [make_defect(kind, img, np.random.default_rng(s)).mask.mean() for s in range(10)]
        assert max(shares) <= 0.03, (kind, shares)


def test_defects_are_centred_where_the_placement_allows():
    img = np.full((80, 80, 3), 30, np.uint8)  # a plain background
    img[20:60, 30:70] = texture(np.random.default_rng(5), (40, 40))  # the object
    where = placement_mask(img)
    assert where[25:55, 35:65].mean() > 0.9 and not where[:10].any()
    for s in range(8):
        d = make_defect("cutpaste", img, np.random.default_rng(s), where=where)
        ys, xs = np.nonzero(d.mask)
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        assert 15 <= cy <= 65 and 25 <= cx <= 75  # inside the object, up to half a defect


def test_a_small_object_or_a_plain_image_may_take_a_defect_anywhere():
    img = np.full((80, 80, 3), 30, np.uint8)
    img[38:42, 38:42] = 200  # 0.25 % of the image
    assert placement_mask(img).all() and placement_mask(np.full((40, 40, 3), 7, np.uint8)).all()


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown defect kind 'dent'"):
        make_defect("dent", _image(), np.random.default_rng(0))
