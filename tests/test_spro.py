"""AUC-sPRO (lakead.spro): analytic values, the saturation rule, a plain computation on random
maps, and the errors of defects_config.json and of mask files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lakead import LakeadError
from lakead.metrics import pro_from_curve
from lakead.spro import SproMetrics, defect_of, read_defects_config, saturation_area


def _square(size=20, top=5, side=10) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[top : top + side, top : top + side] = True
    return m


def test_perfect_and_constant_maps():
    mask = _square()
    perfect = SproMetrics()
    perfect.add_normal(np.zeros((20, 20)))
    perfect.add_defects(mask.astype(float), [(mask, 100.0)])
    assert perfect.compute() == 1.0
    flat = SproMetrics()
    flat.add_normal(np.ones((20, 20)))
    flat.add_defects(np.ones((20, 20)), [(mask, 100.0)])
    assert flat.compute() == pytest.approx(0.5 * 0.05)  # the diagonal up to 0.05, divided by 0.05


@pytest.mark.parametrize("threshold, relative, found", [(10, False, 1.0), (0.5, True, 0.2), (1.0, True, 0.1), (1000, False, 0.1)])
def test_saturation(threshold, relative, found):
    """10 of a defect's 100 pixels score above every normal pixel, the other 90 below all of
    them: the defect counts as found in full when 10 pixels saturate it, else in part."""
    mask = _square()
    amap = np.where(mask, 0.1, 0.5)
    amap[5, 5:15] = 0.9  # 10 pixels of the defect, above every normal score
    m = SproMetrics()
    m.add_normal(np.full((20, 20), 0.5))
    m.add_defects(amap, [(mask, saturation_area(100, threshold, relative))])
    assert m.compute() == pytest.approx(min(found, 1.0))


def test_each_defect_weighs_the_same():
    """Two defects, one found (saturated), one missed: sPRO 1/2 whatever their sizes."""
    big, small = _square(40, 2, 30), np.zeros((40, 40), bool)
    small[36:38, 36:38] = True
    amap = np.where(big, 1.0, 0.0)
    m = SproMetrics()
    m.add_normal(np.full((40, 40), 0.5))
    m.add_defects(amap, [(big, 900.0), (small, 4.0)])
    assert m.compute() == pytest.approx(0.5)
    assert m.defects == 2


def test_matches_a_plain_computation_on_random_maps():
    rng = np.random.default_rng(0)
    normals = [rng.random((24, 24)).astype(np.float32) for _ in range(3)]
    defects = []
    m = SproMetrics()
    for a in normals:
        m.add_normal(a)
    for i in range(4):
        amap = rng.random((24, 24)).astype(np.float32)
        parts = []
        for j in range(2):
            mask = np.zeros((24, 24), bool)
            top, left = rng.integers(0, 16, 2)
            mask[top : top + 6, left : left + 8] = True
            amap[mask] += 0.3 * (i + j) / 4  # some defects stand out, some do not
            s = saturation_area(int(mask.sum()), [0.4, 20][j], [True, False][j])
            parts.append((mask, s))
        m.add_defects(amap, parts)
        defects += [(amap, mask, s) for mask, s in parts]
    normal = np.concatenate([a.reshape(-1) for a in normals])
    values = np.unique(np.concatenate([normal, *(a[k] for a, k, _ in defects)]))[::-1]
    fpr = [0.0] + [float(np.mean(normal >= t)) for t in values]
    spro = [0.0] + [float(np.mean([min(np.sum(a[k] >= t) / s, 1.0) for a, k, s in defects])) for t in values]
    for limit in (0.05, 0.3, 1.0):
        exact = pro_from_curve(np.array(fpr), np.array(spro), limit=limit)
        assert m.compute(limit) == pytest.approx(exact, abs=2e-3), limit
    assert 0.05 < m.compute() < 0.95  # neither trivial end


def test_nothing_to_measure_is_nan():
    m = SproMetrics()
    assert np.isnan(m.compute())
    m.add_normal(np.zeros((4, 4)))
    assert np.isnan(m.compute())
    with pytest.raises(ValueError, match="NaN"):
        m.add_normal(np.full((2, 2), np.nan))


def test_defects_config_and_mask_files(tmp_path):
    cfg = tmp_path / "defects_config.json"
    cfg.write_text(json.dumps([{"defect_name": "a", "pixel_value": 255, "saturation_threshold": 0.5, "relative_saturation": True},
                               {"defect_name": "b", "pixel_value": 200, "saturation_threshold": 30, "relative_saturation": False}]))
    config = read_defects_config(cfg)
    assert config == {255: (0.5, True), 200: (30.0, False)}
    mask = np.zeros((10, 12), np.uint8)
    mask[2:6, 3:8] = 200
    Image.fromarray(mask).save(tmp_path / "000.png")
    defect, s = defect_of(tmp_path / "000.png", config, (10, 12))
    assert defect.sum() == 20 and s == 20.0  # min(30, area)
    mask[2:6, 3:8] = 255
    Image.fromarray(mask).save(tmp_path / "001.png")
    assert defect_of(tmp_path / "001.png", config, (10, 12))[1] == 10.0
    mask[0, 0] = 7
    Image.fromarray(mask).save(tmp_path / "002.png")
    with pytest.raises(LakeadError, match=r"002.png: pixel value\(s\) \[7, 255\] do not name one defect"):
        defect_of(tmp_path / "002.png", config, (10, 12))
    with pytest.raises(LakeadError, match="001.png is 12x10 pixels, its image 9x9"):
        defect_of(tmp_path / "001.png", config, (9, 9))
    for text, problem in [("{", "cannot be read as JSON"), ("{}", "expected a list"),
                          ('[{"pixel_value": 1}]', "entry 0 needs"),
                          ('[{"pixel_value": 1, "saturation_threshold": 0, "relative_saturation": true}]', "positive")]:
        cfg.write_text(text)
        with pytest.raises(LakeadError, match=problem):
            read_defects_config(cfg)
