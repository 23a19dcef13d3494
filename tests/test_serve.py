"""The service through FastAPI's test client, with the tiny random CLIP.

Covers the model lifecycle, agreement with the library, errors and limits, the token, the
host and origin checks, persistence across a restart, concurrency from threads, and a
schemathesis run against the OpenAPI schema.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'lakead[serve]')")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from conftest import texture, with_defect  # noqa: E402
from lakead.cli import app as cli_app  # noqa: E402
from lakead.methods.lake import LakeConfig, LakeDetector  # noqa: E402
from lakead.serve import ServeLimits, create_app  # noqa: E402
from lakead.serve.store import FIT_OPTIONS  # noqa: E402

FIT = {"class_name": "tile", "k": "8", "layer": "2", "image_size": "64"}


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def files(*items: tuple[str, bytes]) -> list:
    return [("images", (name, data, "image/png")) for name, data in items]


@pytest.fixture(scope="module")
def normals() -> list[np.ndarray]:
    rng = np.random.default_rng(10)
    return [texture(rng) for _ in range(6)]


@pytest.fixture(scope="module")
def tests_imgs() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [texture(rng) for _ in range(3)] + [with_defect(texture(rng), 24, 32, 16), texture(rng, (50, 90))]


@pytest.fixture
def make_app(tmp_path, tiny_clip_dir):
    def make(models_dir: Path | None = None, **kwargs):
        kwargs.setdefault("batch_size", 4)
        return create_app(models_dir or tmp_path / "models", backbone=str(tiny_clip_dir), device="cpu", **kwargs)

    return make


@pytest.fixture
def client(make_app):
    with TestClient(make_app()) as c:
        yield c


def fit(client: TestClient, normals, **extra) -> dict:
    r = client.post("/models", data={**FIT, **extra}, files=files(*[(f"n{i}.png", png(a)) for i, a in enumerate(normals)]))
    assert r.status_code == 201, r.text
    return r.json()


def predict(client: TestClient, model_id: str, imgs, **data):
    return client.post(f"/models/{model_id}/predict", data=data, files=files(*[(f"t{i}.png", png(a)) for i, a in enumerate(imgs)]))


# -- lifecycle ------------------------------------------------------------------------------

def test_health_and_info(client):
    assert client.get("/healthz").json() == {"status": "ok", "version": "0.1.0", "auth_required": False}
    info = client.get("/info").json()
    assert info["limits"] == ServeLimits().to_dict()
    assert info["fit_options"]["k"] is None and info["fit_options"]["layer"] is None and "device" not in info["fit_options"]
    assert info["option_choices"]["selection"] == ["top", "random", "bottom", "all"]
    # every option of the configuration but the backbone, with its default, choices and help
    fields = {f.name: f for f in dataclasses.fields(LakeConfig) if f.name != "backbone"}
    assert list(info["fit_options"]) == list(fields) == list(FIT_OPTIONS)
    assert info["fit_options"] == {name: f.default for name, f in fields.items()}
    assert info["option_choices"] == {"distance": ["euclidean", "cosine"], "block_grid": ["coarsest", "finest"],
                                      "semantic_agg": ["max", "mean"],
                                      "selection": ["top", "random", "bottom", "all"], "score_norm": ["loo", "none"],
                                      "map_source": ["visual", "semantic"],
                                      "threshold_rule": ["auto", "conformal", "exponential", "gaussian", "sigmas"],
                                      "index": ["auto", "exact", "kdtree", "hnsw"]}
    assert info["option_help"] == {name: f.metadata["help"] for name, f in fields.items()}
    assert (info["device"], info["batch_size"], info["precision"]) == ("cpu", 4, "float32")
    page = client.get("/")
    assert page.status_code == 200 and "lakead" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert "/models/{model_id}/predict" in client.get("/openapi.json").json()["paths"]


def test_create_get_list_predict_delete(client, normals, tests_imgs, tmp_path):
    model = fit(client, normals)
    mid = model["id"]
    assert mid.startswith("tile-")
    assert model["support"] == [f"n{i}.png" for i in range(len(normals))] and model["support_images"] == 6
    assert model["description"]["k"] == 8 and model["description"]["layer"] == 2 and model["config"]["image_size"] == 64 and model["warnings"] == []
    assert model["method"] == "lake" and not {"device", "batch_size", "precision"} & set(model["config"])
    assert client.get(f"/models/{mid}").json() == model
    assert [m["id"] for m in client.get("/models").json()["models"]] == [mid]

    r = predict(client, mid, tests_imgs)
    assert r.status_code == 200, r.text
    body = r.json()
    res = body["results"]
    assert [x["name"] for x in res] == [f"t{i}.png" for i in range(len(tests_imgs))]
    scores = np.array([x["score"] for x in res])
    assert scores[3] > np.delete(scores, 3).max()  # the planted defect scores highest
    assert [x["anomalous"] for x in res] == [x["score"] > model["threshold"] for x in res]
    for x, img in zip(res, tests_imgs):
        assert (x["height"], x["width"]) == img.shape[:2]
        assert x["threshold"] == body["threshold"] == model["threshold"]
        assert x["score"] == pytest.approx(x["visual"] + 0.1 * x["semantic"], abs=1e-5)
        assert x["overlay_png"].startswith("data:image/png;base64,")
        overlay = Image.open(io.BytesIO(base64.b64decode(x["overlay_png"].split(",", 1)[1])))
        assert overlay.format == "PNG" and overlay.size == (img.shape[1], img.shape[0])

    # the stored model is an ordinary lakead model: the library gives the same numbers
    det = LakeDetector.load(tmp_path / "models" / mid, device="cpu")
    p = det.predict(tests_imgs)
    assert np.allclose(scores, p.scores, atol=1e-5)
    assert np.allclose([x["map_max"] for x in res], [m.max() for m in p.maps], atol=1e-5)

    no_overlay = predict(client, mid, tests_imgs[:1], overlay="false").json()["results"][0]
    assert no_overlay["overlay_png"] is None and no_overlay["score"] == pytest.approx(res[0]["score"], abs=1e-6)

    assert client.delete(f"/models/{mid}").status_code == 204
    assert client.get(f"/models/{mid}").status_code == 404
    assert client.get("/models").json() == {"models": []}
    assert list((tmp_path / "models").iterdir()) == []  # nothing left, hidden or not


def test_threshold_override_and_one_image_model(client, normals, tests_imgs):
    mid = fit(client, normals)["id"]
    low = predict(client, mid, tests_imgs[:2], threshold="-1").json()
    assert low["threshold"] == -1 and all(x["anomalous"] for x in low["results"])
    high = predict(client, mid, tests_imgs, threshold="1e9").json()
    assert not any(x["anomalous"] for x in high["results"])

    one = fit(client, normals[:1])
    assert one["threshold"] is None and "no threshold" in one["warnings"][0]
    body = predict(client, one["id"], tests_imgs).json()
    assert body["threshold"] is None and not any(x["anomalous"] for x in body["results"])


def test_options_are_validated(client, normals):
    imgs = files(("a.png", png(normals[0])), ("b.png", png(normals[1])))
    cases = [
        ({"kk": "3"}, "kk: unknown field"),
        ({"device": "cuda"}, "device: unknown field"),
        ({"k": "0"}, "k must be a positive integer"),
        ({"k": "most"}, "k: Input should be"),
        ({"outlier_contamination": "0.9"}, "outlier_contamination must be 'auto' or a fraction in (0, 0.5]"),
        ({"precision": "bfloat16"}, "precision: unknown field"),  # how a model runs is the server's setting
        ({"batch_size": "4"}, "batch_size: unknown field"),
        ({"semantic_layer": "1,2"}, "semantic_layer: one block only"),
        ({"map_source": "pixels"}, "map_source: Input should be"),
        ({"k": "abc"}, "k: Input should be a valid integer"),
        ({"k": "999"}, "k=999 is larger than the width of block 2 (32 channels)"),
        ({"layer": "9"}, "layer 9 is out of range: this CLIP has blocks 1..4"),
        ({"selection": "best"}, "selection: Input should be"),
        ({"lam": "-1"}, "lam must be a finite number >= 0"),
        ({"image_size": "60"}, "image_size 60 must be a positive multiple of the patch size 8"),
        ({"image_size": "4096"}, "image_size 4096 is larger than this service allows"),
        ({"backbone": "openai/clip-vit-base-patch32"}, "backbone 'openai/clip-vit-base-patch32' is not offered by this server"),
        ({"class_name": ""}, "class_name"),
    ]
    for extra, message in cases:
        r = client.post("/models", data={**FIT, **extra}, files=imgs)
        assert r.status_code == 422, (extra, r.text)
        assert message in r.json()["detail"], (extra, r.json())
    r = client.post("/models", data=FIT)
    assert r.status_code == 422 and "images: Field required" in r.json()["detail"]
    assert client.get("/models").json() == {"models": []}


def test_bad_uploads_name_every_file(client, normals, tests_imgs, tmp_path):
    good = png(normals[0])
    bad = [("notes.txt", b"hello"), ("empty.png", b""), ("cut.png", good[: len(good) // 2]),
           ("tiny.png", png(normals[0][:4, :4]))]
    r = client.post("/models", data=FIT, files=files(("ok.png", good), *bad))
    assert r.status_code == 422
    errors = {e["name"]: e["problem"] for e in r.json()["errors"]}
    assert set(errors) == {"notes.txt", "empty.png", "cut.png", "tiny.png"}  # the 4x4 image too: every bad file at once
    assert "not an image" in errors["notes.txt"] and "corrupt or truncated" in errors["cut.png"]
    assert "notes.txt" in r.json()["detail"]

    r = client.post("/models", data=FIT, files=files(("ok.png", good), ("tiny.png", png(normals[0][:4, :4]))))
    assert r.status_code == 422 and r.json()["errors"] == [{"name": "tiny.png", "problem": "image is 4x4 pixels, smaller than one 8x8 patch"}]
    assert list((tmp_path / "models").iterdir()) == []

    # predict: the unreadable files are listed with their problem, the others scored all the same
    mid = fit(client, normals)["id"]
    alone = predict(client, mid, tests_imgs[:2]).json()["results"]
    r = client.post(f"/models/{mid}/predict", files=files(("a.png", png(tests_imgs[0])), ("../../evil.jpg", b"\xff\xd8junk"),
                                                        ("tiny.png", png(normals[0][:4, :4])), ("b.png", png(tests_imgs[1])),
                                                        ("C:\\photos\\x.png", b"")))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["name"] for x in body["results"]] == ["a.png", "b.png"]
    assert [x["score"] for x in body["results"]] == pytest.approx([x["score"] for x in alone], rel=1e-5)
    assert [x["width"] for x in body["results"]] == [tests_imgs[0].shape[1], tests_imgs[1].shape[1]]
    failed = {e["name"]: e["problem"] for e in body["failed"]}
    assert list(failed) == ["evil.jpg", "tiny.png", "x.png"]  # no folders, in the order sent
    assert "corrupt or truncated" in failed["evil.jpg"] or "not an image" in failed["evil.jpg"]
    assert failed["tiny.png"] == "image is 4x4 pixels, smaller than one 8x8 patch"
    assert predict(client, mid, tests_imgs[:1]).json()["failed"] == []
    # nothing readable: nothing to score, 422 naming every file
    r = client.post(f"/models/{mid}/predict", files=files(("../../evil.jpg", b"\xff\xd8junk"), ("C:\\photos\\x.png", b"")))
    assert r.status_code == 422 and [e["name"] for e in r.json()["errors"]] == ["evil.jpg", "x.png"]


def test_api_description_pages_need_no_network(make_app):
    """/docs and /redoc load Swagger UI and ReDoc from this server: no address with a host in
    the page, every file it loads is served (also without the token), no CDN in the CSP."""
    import re

    with TestClient(make_app(token="tok")) as c:
        for page, wanted in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc.standalone.js",))):
            r = c.get(page)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", r.text)
            assert urls and not [u for u in urls if "//" in u], urls
            for name in wanted:
                assert f"/docs-assets/{name}" in urls
                asset = c.get(f"/docs-assets/{name}")
                assert asset.status_code == 200 and len(asset.content) > 100_000, name
            assert "http" not in r.headers["content-security-policy"]
        assert '"validatorUrl": null' in c.get("/docs").text  # no validator badge calling out
        assert c.get("/docs/oauth2-redirect").status_code == 200


def test_api_description_without_its_assets_package(make_app, monkeypatch):
    from lakead.serve import docs

    monkeypatch.setattr(docs, "assets_dir", lambda: None)
    with TestClient(make_app()) as c:
        r = c.get("/docs")
        assert r.status_code == 200 and "fastapi-offline" in r.text and 'href="/openapi.json"' in r.text
        assert "<script" not in r.text and c.get("/redoc").status_code == 200


def test_the_legend_is_the_overlay(client):
    """The footer's colour ramp is lakead.viz's overlay: at each stop, the colormap's colour at
    MAX_ALPHA times the stop's share of the way from a typical patch (transparent) to the
    decision level; and the text says typical regions are left uncoloured."""
    import re

    from lakead.viz import MAX_ALPHA, colorize, overlay

    css = client.get("/static/style.css").text
    ramp = css[css.index(".legend-ramp span"):]
    stops = re.findall(r"rgba\((\d+), (\d+), (\d+), ([\d.]+)\) (\d+)%", ramp[: ramp.index("}")])
    assert len(stops) >= 5 and stops[0][-1] == "0" and stops[-1][-1] == "100"
    for r, g, b, a, at in stops:
        u = int(at) / 100
        if u > 0:
            assert np.abs(colorize(np.array([[u]]), 0.0, 1.0)[0, 0].astype(int) - [int(r), int(g), int(b)]).max() <= 1, at
        assert float(a) == pytest.approx(u * MAX_ALPHA, abs=0.002), at
    grey = np.full((1, 1, 3), 136, np.uint8)
    assert np.array_equal(overlay(grey, np.array([[0.0]]), 0.0, 1.0), grey)  # typical: the image shows through
    footer = client.get("/").text.split("<footer>")[1]
    assert "blue = typical" not in footer and "typical regions are left uncoloured" in footer
    assert 'href="/redoc"' in footer


def test_unknown_and_invalid_ids(client, tests_imgs):
    for method, path in [("GET", "/models/nope"), ("DELETE", "/models/nope")]:
        r = client.request(method, path)
        assert r.status_code == 404 and r.json()["detail"] == "no model with id 'nope'"
    r = predict(client, "nope", tests_imgs[:1])
    assert r.status_code == 404
    assert client.get("/models/.hidden").status_code == 422
    r = predict(client, "nope", tests_imgs[:1], colour="red")
    assert r.status_code == 422 and "colour: unknown field" in r.json()["detail"]


# -- limits -----------------------------------------------------------------------------------

def test_limits(make_app, normals, tests_imgs):
    limits = ServeLimits(max_request_bytes=200_000, max_fit_images=3, max_predict_images=2,
                         max_image_pixels=100 * 100, max_total_pixels=3 * 64 * 64)
    with TestClient(make_app(limits=limits)) as c:
        r = c.post("/models", data=FIT, files=files(*[(f"n{i}.png", png(a)) for i, a in enumerate(normals[:4])]))
        assert r.status_code == 413 and r.json()["detail"] == (
            "too many images: 4 normal images given, at most 3 per request (lakead serve --max-images)")
        big = np.zeros((101, 100, 3), np.uint8)  # a few hundred bytes, 10100 pixels
        r = c.post("/models", data=FIT, files=files(("a.png", png(normals[0])), ("big.png", png(big))))
        assert r.status_code == 413
        assert r.json()["errors"] == [{"name": "big.png", "problem": "100x101 pixels (0.0 MP) is more than the limit of 0.0 MP per image (--max-megapixels)"}]
        mid = fit(c, normals[:3])["id"]
        r = predict(c, mid, tests_imgs[:3])
        assert r.status_code == 413 and "at most 2 per request" in r.json()["detail"]
        r = c.post("/models", data=FIT, files=files(*[(f"n{i}.png", png(a)) for i, a in enumerate(normals[:3])] ,
                                                     ))
        assert r.status_code == 201  # 3 x 64 x 64 pixels: exactly at the total limit
        noise = np.random.default_rng(0).integers(0, 255, (250, 250, 3), dtype=np.uint8)  # ~190 kB of PNG
        r = c.post("/models", data=FIT, files=files(("a.png", png(noise)), ("b.png", png(noise))))
        assert r.status_code == 413 and "larger than the limit of 0.2 MiB" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(40):
                yield b"x" * 10_000

        r = c.post(f"/models/{mid}/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and r.json()["detail"] == (
            "request body is larger than the limit of 0.2 MiB (lakead serve --max-upload-mb)")


def test_limits_are_validated(make_app):
    with pytest.raises(ValueError, match="max_fit_images must be a positive integer"):
        make_app(limits=ServeLimits(max_fit_images=0))


# -- token, host, origin ----------------------------------------------------------------------

def test_token(make_app, normals, tests_imgs):
    with TestClient(make_app(token="s3cret")) as c:
        assert c.get("/healthz").json()["auth_required"] is True
        for path in ("/", "/static/app.js", "/openapi.json", "/docs"):
            assert c.get(path).status_code == 200, path
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            r = c.get("/models", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer <token>" in r.json()["detail"]
        r = c.post("/models", data=FIT, files=files(("a.png", png(normals[0]))))
        assert r.status_code == 401  # refused before the upload is parsed
        c.headers["Authorization"] = "Bearer s3cret"
        mid = fit(c, normals)["id"]
        assert predict(c, mid, tests_imgs[:1]).status_code == 200
        assert c.get("/info").status_code == 200
    with pytest.raises(ValueError, match="token must not be empty"):
        make_app(token=" ")


def test_host_and_origin_checks(make_app, normals):
    app = make_app(allowed_hosts=("127.0.0.1", "localhost"))
    with TestClient(app, base_url="http://evil.example") as c:
        r = c.get("/healthz")
        assert r.status_code == 400 and "host 'evil.example' is not served here" in r.json()["detail"]
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/healthz").status_code == 200
        r = c.post("/models", data=FIT, files=files(("a.png", png(normals[0]))), headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-origin request from http://evil.example refused" in r.json()["detail"]
        r = c.post("/models", data=FIT, files=files(("a.png", png(normals[0]))), headers={"Origin": "http://127.0.0.1:8000"})
        assert r.status_code == 201
        assert c.get("/models", headers={"Origin": "http://evil.example"}).status_code == 200  # reads are not state changes


# -- persistence, caching, atomicity ------------------------------------------------------------

def test_models_survive_a_restart_and_load_once(make_app, normals, tests_imgs, tmp_path, monkeypatch):
    with TestClient(make_app()) as c:
        model = fit(c, normals)
        before = predict(c, model["id"], tests_imgs).json()["results"]

    loads = []
    real_load = LakeDetector.load.__func__

    def counting_load(cls, *args, **kwargs):
        loads.append(args[0])
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(LakeDetector, "load", classmethod(counting_load))
    with TestClient(make_app()) as c:  # a new process over the same directory
        assert c.get("/models").json()["models"] == [model]
        for _ in range(3):
            after = predict(c, model["id"], tests_imgs).json()["results"]
            assert [x["score"] for x in after] == pytest.approx([x["score"] for x in before], abs=1e-6)
    assert len(loads) == 1


def test_other_directories_in_models_dir(make_app, normals, tmp_path):
    models = tmp_path / "models"
    with TestClient(make_app()) as c:
        mid = fit(c, normals)["id"]
    # a model written by the library under a name of one's choosing is served under that name
    LakeDetector.load(models / mid, device="cpu").save(models / "screw")
    (models / "notes").mkdir()
    (models / "broken").mkdir()
    (models / "broken" / "lakead.json").write_text("{not json")
    (models / ".screw.abc.tmp").mkdir()  # an interrupted write: hidden, never listed
    (models / ".old.abc.tmp").mkdir()  # ... and removed at start once older than an hour
    os.utime(models / ".old.abc.tmp", (time.time() - 7200, time.time() - 7200))
    with TestClient(make_app()) as c:
        assert sorted(p.name for p in models.iterdir() if p.name.startswith(".")) == [".screw.abc.tmp"]
        assert sorted(m["id"] for m in c.get("/models").json()["models"]) == sorted([mid, "screw"])
        assert c.get("/models/notes").status_code == 404
        r = c.get("/models/broken")
        assert r.status_code == 500 and "cannot be parsed" in r.json()["detail"]


def test_failed_fit_leaves_no_model(make_app, normals, tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)  # fails after lakead.json was written
    with TestClient(make_app(), raise_server_exceptions=False) as c:
        r = c.post("/models", data=FIT, files=files(*[(f"n{i}.png", png(a)) for i, a in enumerate(normals)]))
        assert r.status_code == 500 and "No space left on device" in r.json()["detail"]
        assert c.get("/models").json() == {"models": []}
    assert list((tmp_path / "models").iterdir()) == []


# -- concurrency ------------------------------------------------------------------------------

def test_concurrent_requests_from_threads(client, normals, tests_imgs, tmp_path):
    mids = [fit(client, normals)["id"], fit(client, normals[:4])["id"]]
    expected = {m: [x["score"] for x in predict(client, m, tests_imgs).json()["results"]] for m in mids}

    def one(i: int):
        m = mids[i % 2]
        j = i % len(tests_imgs)
        r = predict(client, m, tests_imgs[j:] + tests_imgs[:j])  # a different order per call
        assert r.status_code == 200, r.text
        got = [x["score"] for x in r.json()["results"]]
        return got == pytest.approx(expected[m][j:] + expected[m][:j], abs=1e-5)

    def create(i: int):
        return fit(client, normals[i:i + 3], class_name=f"part {i}")["id"]

    with ThreadPoolExecutor(8) as pool:
        checks = pool.map(one, range(16))
        created = list(pool.map(create, range(3)))
        assert all(checks)
    assert len(set(created)) == 3
    listed = {m["id"] for m in client.get("/models").json()["models"]}
    assert listed == set(mids) | set(created)
    for m in created:  # each one complete and loadable
        LakeDetector.load(tmp_path / "models" / m, device="cpu")


def test_delete_during_predictions(client, normals, tests_imgs, tmp_path):
    mid = fit(client, normals)["id"]
    want = [x["score"] for x in predict(client, mid, tests_imgs).json()["results"]]
    statuses = []
    go = threading.Event()

    def one(i):
        go.wait()
        if i % 3 == 2:
            return client.get(f"/models/{mid}").status_code  # reading the model's info meanwhile
        r = predict(client, mid, tests_imgs)
        if r.status_code == 200:  # finished before the deletion, with the right numbers
            assert [x["score"] for x in r.json()["results"]] == pytest.approx(want, abs=1e-5)
        return r.status_code

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(12)]
        go.set()
        deleted = client.delete(f"/models/{mid}").status_code
        statuses = [f.result() for f in futures]
    assert deleted == 204
    assert set(statuses) <= {200, 404}
    assert client.get(f"/models/{mid}").status_code == 404
    assert list((tmp_path / "models").iterdir()) == []
    assert client.delete(f"/models/{mid}").status_code == 404


# -- the command line ---------------------------------------------------------------------------

def test_cli_serve(tmp_path, tiny_clip_dir, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app, host=host, port=port))
    r = CliRunner().invoke(cli_app, ["serve", "--models-dir", str(tmp_path / "m"), "--backbone", str(tiny_clip_dir),
                                     "--port", "8123", "--token", "t0k", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert "http://127.0.0.1:8123/#token=t0k" in r.output.replace("\n", "")
    with TestClient(seen["app"], base_url="http://127.0.0.1:8123") as c:
        assert c.get("/models").status_code == 401
        assert c.get("/models", headers={"Authorization": "Bearer t0k"}).json() == {"models": []}
        assert c.get("/healthz", headers={"Host": "attacker.example"}).status_code == 400  # loopback: host names checked


def test_cli_serve_without_its_default_backbone_serves_the_stored_models(tmp_path, tiny_clip_dir, normals, tests_imgs,
                                                                         monkeypatch):
    """Issue 25, Medium 5: a default backbone that cannot be loaded here does not stop the
    service; the stored models are served (their backbone loaded by their first prediction),
    and creating a model on the missing one answers 503 with the reason."""
    import uvicorn

    models = tmp_path / "m"
    with TestClient(create_app(models, backbone=str(tiny_clip_dir), device="cpu", batch_size=4)) as c:
        mid = fit(c, normals)["id"]
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app))
    missing = tmp_path / "nothing"
    r = CliRunner().invoke(cli_app, ["serve", "--models-dir", str(models), "--backbone", str(missing),
                                     "--allow-backbone", str(tiny_clip_dir), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "the stored models are served" in text and "serving 1 model(s)" in text
    from lakead.backbones.hub import offline_reason

    if offline_reason() is not None:  # without network the missing backbone is named at once
        assert "no such folder" in text
    store = seen["app"].state.store
    assert store._backbones == {}  # nothing loaded at the start
    with TestClient(seen["app"], base_url="http://127.0.0.1:8000") as c:
        assert [m["id"] for m in c.get("/models").json()["models"]] == [mid]
        r = predict(c, mid, tests_imgs[:2])
        assert r.status_code == 200, r.text
        r = c.post("/models", data=FIT, files=files(*[(f"n{i}.png", png(a)) for i, a in enumerate(normals)]))
        assert r.status_code == 503 and str(missing) in r.json()["detail"]
    assert list(store._backbones) == [str(tiny_clip_dir)]  # loaded by the request that needed it


def test_cli_serve_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)  # as if the serve extra were not installed
    r = CliRunner().invoke(cli_app, ["serve", "--models-dir", str(tmp_path / "m")])
    assert r.exit_code == 1 and "pip install 'lakead[serve]'" in r.output


# -- the schema ---------------------------------------------------------------------------------

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

AUTH = {"Authorization": "Bearer tok"}
OPERATIONS = [
    ("GET", "/healthz"), ("GET", "/info"), ("GET", "/models"), ("POST", "/models"), ("GET", "/models/{model_id}"),
    ("DELETE", "/models/{model_id}"), ("POST", "/models/{model_id}/predict"), ("POST", "/models/{model_id}/normals"),
]


@pytest.fixture(scope="module")
def api_schema(tiny_clip_dir, tmp_path_factory, normals):
    app = create_app(tmp_path_factory.mktemp("schema") / "models", backbone=str(tiny_clip_dir), device="cpu", token="tok")
    with TestClient(app, headers=AUTH) as c:
        fit(c, normals[:2])  # so that GET /models lists a real model
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_operation_is_checked(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST" or "{" in p  # those that take inputs
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_openapi_conformance(api_schema, method, path, mode):
    """Generated requests (a few per operation, valid and invalid): no server error, and
    every answer, 4xx included, has a documented status code and matches its schema.

    For uploads, "schema-valid data is accepted" cannot hold: a JSON schema says "binary",
    and random bytes are no image (the service rightly answers 422), so that check is off
    for them."""
    strategy = api_schema[path][method].as_strategy(generation_mode=mode)
    excluded = [positive_data_acceptance] if method == "POST" else []

    @given(case=strategy)
    @settings(max_examples=8, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(headers=AUTH, excluded_checks=excluded)

    check()


def test_openapi_documents_errors(make_app):
    spec = TestClient(make_app()).get("/openapi.json").json()
    post = spec["paths"]["/models"]["post"]
    assert {"201", "401", "413", "422"} <= set(post["responses"])
    error = spec["components"]["schemas"]["ErrorBody"]
    assert set(error["properties"]) == {"detail", "errors"}
    form = spec["components"]["schemas"][post["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert {"images", "class_name", "k", "layer", "lam", "threshold"} <= set(form["properties"])
    assert not {"device", "batch_size", "precision"} & set(form["properties"])  # the server's settings
    assert json.dumps(spec)  # serialisable


@pytest.fixture(scope="module")
def model_form(tiny_clip_dir, tmp_path_factory) -> dict:
    """The schema of POST /models' form."""
    spec = TestClient(create_app(tmp_path_factory.mktemp("form"), backbone=str(tiny_clip_dir), device="cpu")).get("/openapi.json").json()
    ref = spec["paths"]["/models"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]


@pytest.mark.parametrize("field", dataclasses.fields(LakeConfig), ids=lambda f: f.name)
def test_every_config_field_is_a_form_field_of_model_creation(model_form, field):
    prop = model_form[field.name]
    if field.name == "backbone":  # chosen among the server's backbones
        assert "backbones" in prop["description"]
        return
    assert prop["description"] == field.metadata["help"]
    enums = [alt["enum"] for alt in prop.get("anyOf", [prop]) if "enum" in alt]
    words = typing.get_args(typing.get_type_hints(LakeConfig)[field.name])
    if words and all(isinstance(w, str) for w in words):  # a Literal: its words, and nothing else
        assert enums == [list(words)]
    else:
        assert enums == []


# -- the load script ------------------------------------------------------------------------------

def test_load_script_against_a_running_service(make_app, normals, capsys, tmp_path):
    import importlib.util
    import socket

    import uvicorn

    spec = importlib.util.spec_from_file_location("load_serve", Path(__file__).parents[1] / "benchmarks" / "load_serve.py")
    load_serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_serve)
    with pytest.raises(SystemExit, match="loopback addresses only"):
        load_serve.loopback_only("http://192.0.2.1:8000")
    load_serve.loopback_only("http://localhost:8000")

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(make_app(token="tok"), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            threading.Event().wait(0.05)
        out = tmp_path / "load.json"
        status = load_serve.main([
            "--url", f"http://127.0.0.1:{sock.getsockname()[1]}", "--token", "tok", "--fit-option", "k=8",
            "--fit-option", "layer=2", "--shots", "3", "--size", "64", "--requests", "12", "--concurrency", "3",
            "--batch", "2", "--warmup", "1", "--json", str(out),
        ])
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert status == 0, capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["requests"] == 12 and result["errors"] == 0 and result["images_per_request"] == 2
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p95"] <= result["latency_ms"]["max"]
    assert "errors: 0" in capsys.readouterr().out


def test_predict_returns_regions_and_out_of_scope_and_takes_a_budget(client, normals, tests_imgs):
    model = fit(client, normals)
    assert model["threshold_rule"] in ("conformal", "exponential") and model["false_alarm_rate"] == 0.05
    res = predict(client, model["id"], tests_imgs, overlay="false").json()
    strict = predict(client, model["id"], tests_imgs, overlay="false", false_alarm_rate="0.001").json()
    # 6 support images: at 0.05 an extrapolated tail, at 0.2 (>= 1/7) their order statistic
    loose = predict(client, model["id"], tests_imgs, overlay="false", false_alarm_rate="0.2").json()
    assert strict["threshold"] >= res["threshold"] > loose["threshold"]
    defect = loose["results"][3]  # the planted defect
    assert defect["anomalous"] and defect["regions"] and not defect["out_of_scope"]
    box = defect["regions"][0]
    assert 0 <= box["top"] < box["bottom"] <= defect["scored_height"] and box["area"] > 0
    assert predict(client, model["id"], tests_imgs, false_alarm_rate="1.5").status_code == 422


def test_text_backbone_must_be_offered(client, normals):
    r = client.post("/models", data={**FIT, "text_backbone": "/etc"}, files=files(*[(f"n{i}.png", png(a)) for i, a in enumerate(normals)]))
    assert r.status_code == 422 and "not offered by this server" in r.text
