"""What one request may cost the service (lakead.serve.budget; issue 28 items 1 and 2): option
bounds, a memory estimate before a fit or a prediction starts, and a time limit on running work.

Before: two models created with sigma=20000 stalled every later prediction (the blur cannot be
interrupted); sigma=1e9 answered 500; PatchCore with width=100000 took the server from 409 MB
to 4 GB with three small images."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'lakead[serve]')")

from fastapi.testclient import TestClient  # noqa: E402

from lakead.methods.lake import LakeDetector  # noqa: E402
from lakead.serve import ServeLimits  # noqa: E402
from lakead.serve.budget import fit_memory  # noqa: E402
from test_serve import FIT, files, fit, make_app, normals, png, predict, tests_imgs  # noqa: E402,F401


def fit_files(imgs) -> list:
    return files(*[(f"n{i}.png", png(a)) for i, a in enumerate(imgs)])


@pytest.mark.parametrize("extra,option,flag", [
    ({"sigma": "20000"}, "sigma 20000", "--max-sigma"),
    ({"sigma": "1e9"}, "sigma 1e+09", "--max-sigma"),
    ({"method": "patchcore", "blur_sigma": "500"}, "blur_sigma 500", "--max-sigma"),
    ({"hnsw_ef_search": "1000000"}, "hnsw_ef_search 1e+06", "--max-ef-search"),
    ({"method": "patchcore", "neighbours": "100000"}, "neighbours 100000", "--max-neighbours"),
    ({"image_size": "4096"}, "image_size 4096", "--max-image-size"),
])
def test_options_past_the_server_bounds_are_refused(make_app, normals, extra, option, flag):
    with TestClient(make_app()) as c:
        t0 = time.monotonic()
        r = c.post("/models", data={**FIT, **extra}, files=fit_files(normals[:3]))
        assert r.status_code == 422, r.text
        assert option in r.json()["detail"] and flag in r.json()["detail"] and time.monotonic() - t0 < 10
        assert c.get("/models").json()["models"] == []
        info = c.get("/info").json()["limits"]
        assert (info["max_sigma"], info["max_ef_search"], info["max_neighbours"]) == (16, 1024, 64)


def test_a_stored_model_past_the_bounds_is_not_run(make_app, normals, tests_imgs, tmp_path, tiny_clip_dir):
    """A model written by 'lakead fit' with sigma=20000 is refused at once (409), and the other
    models go on answering."""
    LakeDetector(str(tiny_clip_dir), k=8, layer=2, image_size=64, sigma=20000.0, device="cpu").fit(
        normals[:3], "tile").save(tmp_path / "models" / "blurry")
    with TestClient(make_app()) as c:
        ok = fit(c, normals)["id"]
        for _ in range(2):
            t0 = time.monotonic()
            r = predict(c, "blurry", tests_imgs[:1])
            assert r.status_code == 409 and "sigma 20000" in r.json()["detail"] and "--max-sigma" in r.json()["detail"]
            assert time.monotonic() - t0 < 10
        assert predict(c, ok, tests_imgs[:1]).status_code == 200


def test_the_memory_of_a_fit_is_estimated_before_it_starts(make_app, normals):
    """PatchCore width=20000 at image_size 256 on three images: about 0.7 GB of patch features,
    refused (413) under a 256 MiB budget, naming the option; the defaults pass."""
    limits = ServeLimits(max_work_memory_mb=256)
    with TestClient(make_app(limits=limits)) as c:
        t0 = time.monotonic()
        r = c.post("/models", data={**FIT, "method": "patchcore", "width": "20000", "image_size": "256"},
                   files=fit_files(normals[:3]))
        assert r.status_code == 413, r.text
        body = r.json()
        assert "--max-work-memory-mb" in body["detail"] and "lower width" in body["detail"]
        assert "3 images x 1,024 tokens x 20,000 channels" in body["detail"] and body["errors"][0]["name"] == "width"
        assert time.monotonic() - t0 < 10 and c.get("/models").json()["models"] == []
        r = c.post("/models", data={**FIT, "method": "anomalydino", "rotations": "true", "image_size": "512"},
                   files=fit_files(normals[:3] * 20))
        assert r.status_code == 413 and "turn rotations off" in r.json()["detail"]
        assert c.post("/models", data={**FIT, "method": "patchcore"}, files=fit_files(normals[:3])).status_code == 201


def test_the_estimate_follows_the_options(tiny_backbone):
    from lakead.methods import get_method
    from lakead.methods.lake import LakeConfig

    def estimate(method, n=10, **options):
        m = get_method(method)
        lake = {k: v for k, v in options.items() if k in LakeConfig.__dataclass_fields__}
        cfg = m.configure(LakeConfig.from_options(backbone="x", **lake), {k: v for k, v in options.items() if k not in lake})
        return fit_memory(m.name, cfg, tiny_backbone, n, 8).bytes

    wide = estimate("patchcore", width=1000, image_size=64)
    assert estimate("patchcore", width=2000, image_size=64) == pytest.approx(2 * wide, rel=0.01)
    assert estimate("patchcore", width=1000, image_size=128) == pytest.approx(4 * wide, rel=0.01)  # 4x the tokens
    assert estimate("patchcore", n=20, width=1000, image_size=64) > 1.7 * wide  # (20 x 3 + a batch) / (10 x 3 + a batch)
    assert estimate("anomalydino", rotations=True, image_size=64) == pytest.approx(4 * estimate("anomalydino", image_size=64))
    assert estimate("lake", selection="all", image_size=64) > estimate("lake", k=4, image_size=64)


def test_the_memory_of_a_prediction_is_estimated(make_app, normals, tests_imgs):
    big = np.repeat(np.repeat(tests_imgs[0], 16, axis=0), 16, axis=1)  # 1024 x 1024
    with TestClient(make_app(limits=ServeLimits(max_work_memory_mb=32, max_decode_pixels=2_000_000))) as c:
        mid = fit(c, normals)["id"]
        assert predict(c, mid, tests_imgs[:2]).status_code == 200
        r = c.post(f"/models/{mid}/predict", files=files(*[(f"b{i}.png", png(big)) for i in range(4)]))
        assert r.status_code == 413 and "send fewer or smaller images" in r.json()["detail"], r.text


def test_running_work_is_stopped_at_the_time_limit(make_app, normals, tests_imgs, monkeypatch):
    """Work past --max-seconds stops at its next check (503); the worker is free again."""
    app = make_app(workers=1, limits=ServeLimits(max_seconds=1))
    with TestClient(app) as c:
        mid = fit(c, normals)["id"]
        real = LakeDetector.predict_arrays

        def slow(self, arrays, *, threshold=None, on_progress=None, **kw):
            if len(arrays) == 3:
                for _ in range(400):  # 20 s unless stopped
                    time.sleep(0.05)
                    on_progress(0)
                raise AssertionError("not stopped")
            return real(self, arrays, threshold=threshold, on_progress=on_progress, **kw)

        monkeypatch.setattr(LakeDetector, "predict_arrays", slow)
        t0 = time.monotonic()
        r = predict(c, mid, tests_imgs[:3])
        assert r.status_code == 503 and "--max-seconds" in r.json()["detail"] and time.monotonic() - t0 < 10
        assert predict(c, mid, tests_imgs[:1]).status_code == 200
