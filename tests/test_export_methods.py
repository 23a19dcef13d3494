"""Every method exports (lakead.export with each method's scoring head): PatchCore, AnomalyDINO,
the residual subspace, WinCLIP, WinCLIP+ and WinCLIP+LAKE on the tiny random CLIP; the exported graph gives the torch
path's scores (within 1e-4 relative), maps and decisions, also at a threshold with decisions both
ways; what a head cannot hold is refused with a reason a user can act on."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import texture, with_defect
from lakead import ConfigError
from lakead.export import agreement, export_model
from lakead.methods import METHODS
from lakead.runtime import ExportedDetector, read_export_meta

RTOL = 1e-4


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    normal = [texture(rng) for _ in range(5)]
    test = [texture(rng) for _ in range(3)] + [with_defect(texture(rng), 8 + 6 * i, 10, 16) for i in range(3)]
    test.append(texture(rng, (48, 80)))  # not square: the map comes back at its own size
    return normal, test


def fitted(method: str, backbone, normal, **options):
    m = METHODS[method]
    cfg = m.config_class.from_options(backbone="tiny", **options)
    det = m.build(cfg, backbone=backbone)
    det.runtime = type(det.runtime)(device="cpu", batch_size=3, precision=det.runtime.precision)
    return det.fit(normal, "widget")


def assert_agrees(det, out, test) -> dict:
    exp = ExportedDetector.load(out)
    ref, got = det.predict_arrays(test), exp.predict_arrays(test)
    for name in ("scores", "visual", "semantic"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=RTOL, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(got.anomalous, ref.anomalous)
    assert got.threshold == ref.threshold and got.pixel_threshold == ref.pixel_threshold
    span = max(float(np.ptp(np.concatenate([m.ravel() for m in ref.maps]))), 1e-12)
    for a, b in zip(got.maps, ref.maps):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-5 * span)
    s = np.sort(ref.scores)  # a threshold with decisions both ways, between two scores, so that equal decisions mean something
    mid = float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
    both = det.predict_arrays(test, threshold=mid).anomalous
    assert both.any() and not both.all()
    np.testing.assert_array_equal(exp.predict_arrays(test, threshold=mid).anomalous, both)
    return agreement(det, exp, test)


CASES = {
    "patchcore": ("patchcore", dict(layer=[2, 3])),
    "patchcore-one-block": ("patchcore", dict(layer=3, coreset=0.5, neighbours=3)),
    "anomalydino": ("anomalydino", dict(layer=4)),
    "anomalydino-masked": ("anomalydino", dict(layer=[3, 4], mask_background=True)),
    "subspace": ("subspace", dict(layer=[3, 4])),
    "winclip": ("winclip", dict(window_sizes="2")),
    "winclip+": ("winclip+", dict(window_sizes="2,3")),
    "winclip+lake": ("winclip+lake", dict(window_sizes="2", layer=3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_exports_and_agrees(case, tiny_backbone, images, tmp_path):
    method, options = CASES[case]
    normal, test = images
    det = fitted(method, tiny_backbone, normal, **options)
    det.save(tmp_path / "model")
    out = export_model(tmp_path / "model", tmp_path / "exported", check=test)
    meta = read_export_meta(out)
    assert meta["source"]["method"] == det.method and meta["check"]["decisions_same"]
    assert meta["check"]["max_relative"] < RTOL
    assert assert_agrees(det, out, test)["decisions_same"]


def test_clean_mask_is_scipys_morphology():
    """The background mask's cleaning (max pooling, so that it exports) equals scipy's binary
    dilation, dilation and erosion by a 3 x 3 square with an uneroded border, on random masks."""
    import torch
    from scipy import ndimage

    from lakead.patchops import clean_mask

    rng = np.random.default_rng(0)
    k = np.ones((3, 3), bool)
    masks = rng.random((40, 9, 11)) < rng.uniform(0.05, 0.6, (40, 1, 1))
    got = clean_mask(torch.from_numpy(masks)).numpy()
    for m, g in zip(masks, got):
        want = ndimage.binary_erosion(ndimage.binary_dilation(ndimage.binary_dilation(m, k), k), k, border_value=1)
        np.testing.assert_array_equal(g, want)


@pytest.mark.parametrize("c,width", [(64, 32), (32, 64), (48, 32), (768, 1024), (1536, 1024), (100, 7), (7, 100)])
def test_project_width_is_adaptive_average_pooling(c, width):
    """PatchCore's projection (written so that it exports with any batch) is torch's adaptive pooling."""
    import torch
    import torch.nn.functional as F

    from lakead.patchops import project_width

    x = torch.randn(3, 5, c, generator=torch.Generator().manual_seed(c))
    want = F.adaptive_avg_pool1d(x.reshape(-1, 1, c), width).reshape(3, 5, width)
    torch.testing.assert_close(project_width(x, width), want, rtol=1e-6, atol=1e-6)
