"""The service items of issue 14 (an adversarial test of the service): each test reproduces
one failure found there, against the tiny random CLIP.

2 memory amplification, 3 CPU denial of service (image_size bound, disconnected clients,
fairness between models), 4 stale model cache, 5 text tower lost, 6 one damaged model breaks
the listing, 13 non-loopback without a token, 14 non-ASCII token and the token on stdout,
15 upload error reports, 16 the page's batches (in Chromium), 17 control characters in class
names, 20 backbones not offered, security headers, long class names.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'lakead[serve]')")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from conftest import texture  # noqa: E402
from lakead.cli import app as cli_app  # noqa: E402
from lakead.methods.lake import LakeDetector  # noqa: E402
from lakead.serve import ServeLimits  # noqa: E402
from test_serve import FIT, files, fit, make_app, normals, png, predict, tests_imgs  # noqa: E402,F401

try:  # the page's fixtures (Chromium), for item 16
    from test_serve_browser import browser, images, serve  # noqa: F401
except pytest.skip.Exception:
    pass


def fit_files(imgs) -> list:
    return files(*[(f"n{i}.png", png(a)) for i, a in enumerate(imgs)])


def multipart(fields: dict[str, str], uploads: list[tuple[str, bytes]], boundary: str = "XyZ") -> bytes:
    out = b""
    for k, v in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    for name, data in uploads:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
                "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels (header only: it opens, it cannot decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def asgi_post(app, path: str, body: bytes, boundary: str, gone: threading.Event, timeout: float = 20) -> dict:
    """POST through the raw ASGI interface; the client 'disconnects' when ``gone`` is set.
    Returns {"status": ..., "seconds": ...} (status None: no answer started)."""
    import anyio

    out: dict = {"status": None}

    async def main() -> None:
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            while not gone.is_set():
                await anyio.sleep(0.02)
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                out["status"] = message["status"]

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"testserver"), (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
                             (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
        with anyio.fail_after(timeout):
            await app(scope, receive, send)

    start = time.monotonic()
    anyio.run(main)
    out["seconds"] = time.monotonic() - start
    return out


def block_predictions(app, model_ids: set[str]):
    """Make store.predict wait for the returned event on ``model_ids``; count the calls."""
    store = app.state.store
    real = store.predict
    release = threading.Event()
    calls: list[str] = []

    def slow(model_id, *args, **kwargs):
        calls.append(model_id)
        if model_id in model_ids:
            release.wait(30)
        return real(model_id, *args, **kwargs)

    store.predict = slow
    return release, calls


# -- 2: memory amplification ----------------------------------------------------------------

def test_2_large_images_are_downscaled_while_decoded(make_app, normals):
    limits = ServeLimits(max_decode_pixels=1_000_000)
    app = make_app(limits=limits)
    seen: list[tuple[int, ...]] = []
    with TestClient(app) as c:
        mid = fit(c, normals)["id"]
        real = app.state.store.predict
        app.state.store.predict = lambda m, arrays, *a, **k: (seen.extend(x.shape for x in arrays), real(m, arrays, *a, **k))[1]
        blank = np.full((2000, 3000, 3), 200, np.uint8)  # a few kB of PNG, 6 MP
        jpeg = io.BytesIO()
        Image.fromarray(blank).save(jpeg, format="JPEG")
        r = c.post(f"/models/{mid}/predict", files=files(("blank.png", png(blank)), ("blank.jpg", jpeg.getvalue())))
        assert r.status_code == 200, r.text
        for res in r.json()["results"]:
            assert (res["width"], res["height"]) == (3000, 2000)  # the image as sent
            assert res["scored_width"] * res["scored_height"] <= 1_000_000 and res["scored_width"] >= 700  # JPEG: 1/2 from its DCT, then 1/2
            overlay = Image.open(io.BytesIO(__import__("base64").b64decode(res["overlay_png"].split(",", 1)[1])))
            assert overlay.size == (res["scored_width"], res["scored_height"])
    assert seen and all(h * w <= 1_000_000 for h, w, _ in seen)


def test_2_pixels_are_bounded_per_request_and_per_server(make_app, normals, tests_imgs):
    one = 64 * 64
    limits = ServeLimits(max_total_pixels=3 * one, max_server_pixels=int(4.5 * one))
    app = make_app(limits=limits, workers=4)
    with TestClient(app) as c:
        mid = fit(c, normals[:3])["id"]
        r = predict(c, mid, [normals[0]] * 4)
        assert r.status_code == 413 and "--max-total-megapixels" in r.json()["detail"]
        assert app.state.pixels.total == int(4.5 * one)

        # several requests of 3 images at once: never more than the server's budget decoded
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda i: predict(c, mid, normals[:3]).status_code, range(6)))
        assert codes == [200] * 6
        assert 0 < app.state.pixels.peak <= app.state.pixels.total and app.state.pixels.used == 0


# -- 3: CPU denial of service ----------------------------------------------------------------

def test_3_image_size_is_bounded_by_a_server_option(make_app, normals, tmp_path, tiny_clip_dir):
    with TestClient(make_app(limits=ServeLimits(max_image_size=64))) as c:
        r = c.post("/models", data={**FIT, "image_size": "128"}, files=fit_files(normals[:2]))
        assert r.status_code == 422 and "--max-image-size" in r.json()["detail"]
        assert c.post("/models", data={**FIT, "image_size": "64"}, files=fit_files(normals[:2])).status_code == 201
        assert c.get("/info").json()["limits"]["max_image_size"] == 64
        # a model stored by hand at a larger size is not run either
        LakeDetector(str(tiny_clip_dir), k=8, layer=2, image_size=128, device="cpu").fit(normals[:2], "tile").save(tmp_path / "models" / "big")
        r = predict(c, "big", normals[:1])
        assert r.status_code == 409 and "--max-image-size" in r.json()["detail"]


def test_3_one_slow_model_does_not_starve_another(make_app, normals, tests_imgs):
    app = make_app(workers=2)
    with TestClient(app) as c:
        slow_id, fast_id = fit(c, normals)["id"], fit(c, normals[:3])["id"]
        release, calls = block_predictions(app, {slow_id})
        pool = ThreadPoolExecutor(4)
        try:
            slow = [pool.submit(predict, c, slow_id, tests_imgs[:1]) for _ in range(3)]
            while not calls:
                time.sleep(0.02)
            fast = pool.submit(predict, c, fast_id, tests_imgs[:1])
            assert fast.result(timeout=20).status_code == 200  # while the slow ones still wait
            assert not any(f.done() for f in slow)
        finally:
            release.set()
            assert [f.result(timeout=30).status_code for f in slow] == [200] * 3
            pool.shutdown()


def test_3_queue_per_model_is_limited(make_app, normals, tests_imgs):
    app = make_app(workers=1, limits=ServeLimits(max_queued=1))
    with TestClient(app) as c:
        mid = fit(c, normals)["id"]
        release, calls = block_predictions(app, {mid})
        pool = ThreadPoolExecutor(3)
        try:
            first = pool.submit(predict, c, mid, tests_imgs[:1])
            while not calls:
                time.sleep(0.02)
            second = pool.submit(predict, c, mid, tests_imgs[:1])
            time.sleep(0.3)  # queued
            r = predict(c, mid, tests_imgs[:1])
            assert r.status_code == 503 and "--max-queued" in r.json()["detail"] and r.headers["retry-after"]
        finally:
            release.set()
            assert first.result(timeout=30).status_code == second.result(timeout=30).status_code == 200
            pool.shutdown()


def test_3_work_of_a_disconnected_client_is_dropped(make_app, normals, tests_imgs):
    app = make_app(workers=1)
    with TestClient(app) as c:
        mid = fit(c, normals)["id"]
        release, calls = block_predictions(app, {mid})
        pool = ThreadPoolExecutor(1)
        try:
            first = pool.submit(predict, c, mid, tests_imgs[:1])
            while not calls:
                time.sleep(0.02)
            gone = threading.Event()
            threading.Timer(0.5, gone.set).start()
            waiting = asgi_post(app, f"/models/{mid}/predict", multipart({}, [("a.png", png(tests_imgs[0]))]), "XyZ", gone)
            assert waiting["seconds"] < 10  # it stopped waiting when the client left
        finally:
            release.set()
            assert first.result(timeout=30).status_code == 200
            pool.shutdown()
        assert calls == [mid]  # the second request's work never ran


def test_3_running_work_stops_when_the_client_leaves(make_app, normals, tests_imgs, monkeypatch):
    app = make_app()
    with TestClient(app) as c:
        mid = fit(c, normals)["id"]
    batches = []

    def endless(self, arrays, *, threshold=None, false_alarm_rate=None, on_progress=None):
        for _ in range(400):  # 20 s unless stopped
            batches.append(1)
            time.sleep(0.05)
            if on_progress is not None:
                on_progress(1)
        raise AssertionError("not stopped")

    monkeypatch.setattr(LakeDetector, "predict_arrays", endless)
    gone = threading.Event()
    threading.Timer(0.5, gone.set).start()
    out = asgi_post(app, f"/models/{mid}/predict", multipart({}, [("a.png", png(tests_imgs[0]))]), "XyZ", gone)
    assert out["seconds"] < 10 and len(batches) < 200


# -- 4: stale model cache --------------------------------------------------------------------

def test_4_a_replaced_model_directory_is_read_again(make_app, normals, tests_imgs, tmp_path, tiny_clip_dir):
    with TestClient(make_app()) as c:
        mid = fit(c, normals)["id"]
        before = [x["score"] for x in predict(c, mid, tests_imgs).json()["results"]]
        other = LakeDetector(str(tiny_clip_dir), k=8, layer=2, image_size=64, device="cpu").fit([texture(np.random.default_rng(99)) for _ in range(4)], "tile")
        other.save(tmp_path / "models" / mid)  # as lakead fit --out MODELS/<id> does
        want = other.predict(tests_imgs).scores
        assert not np.allclose(want, before, atol=1e-4)
        after = predict(c, mid, tests_imgs).json()
        assert [x["score"] for x in after["results"]] == pytest.approx(list(want), abs=1e-5)
        assert after["threshold"] == pytest.approx(c.get(f"/models/{mid}").json()["threshold"])


# -- 5: text tower -----------------------------------------------------------------------------

def test_5_a_backbone_first_used_by_a_stored_model_keeps_its_text_tower(make_app, normals, tests_imgs, tmp_path, tiny_clip_dir):
    other = shutil.copytree(tiny_clip_dir, tmp_path / "other-clip")  # a second source, allowed
    models = tmp_path / "models"
    LakeDetector(str(other), k=8, layer=2, image_size=64, device="cpu").fit(normals, "tile").save(models / "stored")
    with TestClient(make_app(allowed_backbones=(str(other),))) as c:
        assert predict(c, "stored", tests_imgs[:1]).status_code == 200  # loads the other backbone first
        model = fit(c, normals, backbone=str(other))
        assert model["description"]["text_probe"] is True and model["backbone"] == str(other)


# -- 6: damaged model ---------------------------------------------------------------------------

def _set_everywhere(obj, key, value):
    if isinstance(obj, dict):
        for k in obj:
            if k == key:
                obj[k] = value
            else:
                _set_everywhere(obj[k], key, value)


def test_6_one_damaged_model_does_not_break_the_listing(make_app, normals, tmp_path):
    models = tmp_path / "models"
    with TestClient(make_app()) as c:
        mid = fit(c, normals)["id"]
        shutil.copytree(models / mid, models / "bad")
        meta = json.loads((models / "bad" / "lakead.json").read_text())
        _set_everywhere(meta, "class_name", 123)
        (models / "bad" / "lakead.json").write_text(json.dumps(meta))
        r = c.get("/models")
        assert r.status_code == 200
        body = r.json()
        assert [m["id"] for m in body["models"]] == [mid]
        assert [d["name"] for d in body["damaged"]] == ["bad"] and "class_name" in body["damaged"][0]["problem"]
        r = c.get("/models/bad")
        assert r.status_code == 500 and "bad" in r.json()["detail"] and "class_name" in r.json()["detail"]


# -- 13, 14: the command line, the token ------------------------------------------------------------

def test_13_no_token_on_a_network_address_needs_insecure(tmp_path, tiny_clip_dir, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app, host=host))
    monkeypatch.delenv("LAKEAD_TOKEN", raising=False)
    args = ["serve", "--models-dir", str(tmp_path / "m"), "--backbone", str(tiny_clip_dir), "--host", "0.0.0.0", "--device", "cpu"]
    r = CliRunner().invoke(cli_app, args)
    assert r.exit_code == 1 and "--insecure" in r.output and not seen
    r = CliRunner().invoke(cli_app, [*args, "--insecure", "--allowed-host", "lake.example"])
    assert r.exit_code == 0, r.output
    with TestClient(seen["app"]) as c:
        assert c.get("/healthz", headers={"Host": "attacker.example"}).status_code == 400  # the Host check stays on
        for host in ("localhost:8000", "192.0.2.7:8000", "[2001:db8::1]:8000", "lake.example"):
            assert c.get("/healthz", headers={"Host": host}).status_code == 200, host


def test_14_non_ascii_token_and_no_token_on_stdout(make_app, tmp_path, tiny_clip_dir, monkeypatch):
    token = "s\u00e9cret-\u2713"
    with TestClient(make_app(token=token)) as c:
        assert c.get("/models", headers={"Authorization": b"Bearer " + token.encode("utf-8")}).status_code == 200
        assert c.get("/models", headers={"Authorization": b"Bearer s\xe9cret"}).status_code == 401

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setenv("LAKEAD_TOKEN", "from-the-environment")
    r = CliRunner().invoke(cli_app, ["serve", "--models-dir", str(tmp_path / "m"), "--backbone", str(tiny_clip_dir), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "from-the-environment" not in r.output and "LAKEAD_TOKEN" in r.output


# -- 15: upload errors --------------------------------------------------------------------------

def test_15_upload_errors(make_app, normals, tests_imgs):
    with TestClient(make_app()) as c:
        r = c.post("/models", data=FIT, files=files(("ok.png", png(normals[0])), ("bomb.png", png_header(20000, 20000))))
        assert r.status_code == 413
        assert r.json()["errors"][0]["problem"].startswith("20000x20000 pixels (400.0 MP) is more than the limit")

        mid = fit(c, normals)["id"]
        r = c.post(f"/models/{mid}/predict", files=files(("ok.png", png(tests_imgs[0])), ("notes.txt", b"hi"),
                                                         ("tiny.png", png(tests_imgs[0][:4, :4]))))
        assert r.status_code == 200  # the readable one is scored, the others listed together with their problems
        assert [x["name"] for x in r.json()["results"]] == ["ok.png"]
        assert {e["name"] for e in r.json()["failed"]} == {"notes.txt", "tiny.png"}

        body = multipart({"class_name": "tile"}, [("a.png", png(normals[0])), ("b.png", png(normals[1]))])
        r = c.post("/models", content=body[: len(body) // 2], headers={"content-type": "multipart/form-data; boundary=XyZ"})
        assert r.status_code == 400 and "closing boundary" in r.json()["detail"]


# -- 17, 20: class names, backbones, headers ---------------------------------------------------------

def test_17_control_characters_are_stripped_from_class_names(make_app, normals, tmp_path):
    with TestClient(make_app()) as c:
        model = fit(c, normals, class_name="ti\x1b[31mle\x07\x9b")
        assert model["class_name"] == "ti[31mle"
        meta = (tmp_path / "models" / model["id"] / "lakead.json").read_text()
        assert "\\u001b" not in meta and "\x1b" not in meta
        r = c.post("/models", data={**FIT, "class_name": "\x1b\x07"}, files=fit_files(normals[:2]))
        assert r.status_code == 422 and "class_name" in r.json()["detail"]


def test_20_a_model_on_different_weights_is_not_loaded(make_app, normals, tests_imgs, tmp_path, monkeypatch):
    from lakead.testing import save_random_clip

    other = save_random_clip(tmp_path / "other-clip", "tiny", seed=1)  # different weights
    LakeDetector(str(other), k=8, layer=2, image_size=64, device="cpu").fit(
        normals, "tile").save(tmp_path / "models" / "foreign")
    import lakead.serve.store as store_module

    loaded = []
    real = store_module.load_backbone
    monkeypatch.setattr(store_module, "load_backbone", lambda spec, **kw: (loaded.append(spec), real(spec, **kw))[1])
    with TestClient(make_app()) as c:
        r = predict(c, "foreign", tests_imgs[:1])
        assert r.status_code == 409 and "does not offer" in r.json()["detail"] and str(other) in r.json()["detail"]
    assert str(other) not in loaded


def test_20_security_headers_on_every_answer(make_app):
    with TestClient(make_app(token="tok")) as c:
        for path, status in [("/", 200), ("/static/app.js", 200), ("/healthz", 200), ("/models", 401), ("/docs", 200),
                             ("/models/nope", 401)]:
            r = c.get(path)
            assert r.status_code == status, path
            assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff", path
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
        assert "script-src 'self';" in c.get("/").headers["content-security-policy"]  # the page: no inline script


def test_20_a_long_class_name_does_not_crash(make_app, normals):
    with TestClient(make_app()) as c:
        model = fit(c, normals[:3], class_name="very long " * 12)
        assert model["description"]["text_probe"] is True


# -- 16: the page -------------------------------------------------------------------------------

@pytest.mark.slow
def test_16_one_unreadable_file_does_not_leave_the_others_unscored(request):
    pytest.importorskip("playwright.sync_api", reason="Python Playwright is not installed")
    from test_serve_browser import create_model, open_page

    browser, serve, images = (request.getfixturevalue(n) for n in ("browser", "serve", "images"))
    page, _ = open_page(browser, serve() + "/")
    page.wait_for_selector("body[data-ready=true]")
    create_model(page, images["normal"])
    page.set_input_files("#test-files", [str(images["test"][0]), str(images["broken"][0]), str(images["test"][1])])
    page.wait_for_selector(".result.failed")
    page.wait_for_function("document.querySelectorAll('.result.normal, .result.anomalous').length === 2", timeout=60_000)
    assert "broken.png" in page.inner_text(".result.failed") or "not an image" in page.inner_text(".result.failed")
    assert "2 image(s) scored" in page.inner_text("#predict-status") and "1 not scored" in page.inner_text("#predict-status")
    assert "broken.png" in page.inner_text("#message")
