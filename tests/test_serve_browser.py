"""The web page, driven end to end in headless Chromium against a real server on loopback.

Debian's Chromium is used through Python Playwright (no browser download). Skipped, with the
reason, where Chromium or Playwright is absent.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'lakead[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'lakead[serve]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="Python Playwright is not installed (pip install playwright)")

from conftest import texture, with_defect  # noqa: E402
from lakead.serve import create_app  # noqa: E402

pytestmark = pytest.mark.slow  # a real browser: seconds per test

CHROMIUM = os.environ.get("LAKEAD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM} (install Debian's chromium, or set LAKEAD_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def serve(tmp_path, tiny_clip_dir):
    """Start the service on a free loopback port in a thread; returns its base URL."""
    servers = []

    def start(**kwargs) -> str:
        app = create_app(tmp_path / "models", backbone=str(tiny_clip_dir), device="cpu",
                         allowed_hosts=("127.0.0.1", "localhost"), **kwargs)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        servers.append((server, thread, sock))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread, sock in servers:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("page-images")
    rng = np.random.default_rng(10)
    normal = []
    for i in range(6):
        p = root / f"normal_{i}.png"
        Image.fromarray(texture(rng)).save(p)
        normal.append(p)
    rng = np.random.default_rng(11)
    good, bad = root / "good.png", root / "scratch.png"
    Image.fromarray(texture(rng, (64, 96))).save(good)
    Image.fromarray(with_defect(texture(rng), 24, 32, 16)).save(bad)
    broken = root / "broken.png"
    broken.write_bytes(b"this is not a PNG")
    return {"normal": normal, "test": [good, bad], "broken": [broken]}


def open_page(browser, url: str):
    page = browser.new_page(bypass_csp=True)  # playwright waits by eval, which the CSP forbids
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.goto(url)
    return page, problems


def create_model(page, normal: list[Path], text: bool = True) -> str:
    page.fill("#class-name", "tile")
    page.click("#fit-options summary")
    page.fill("#opt-k", "8")
    page.fill("#opt-layer", "2")
    page.fill("#opt-image_size", "64")
    if not text:
        page.select_option("#opt-use_text", "false")
    page.set_input_files("#fit-files", [str(p) for p in normal])
    assert page.inner_text("#fit-chosen").startswith(f"{len(normal)} image(s)")
    assert page.locator("#fit-thumbs img").count() == len(normal)
    page.click("#fit-button")
    page.wait_for_function("document.querySelector('#fit-status').textContent.startsWith('created')", timeout=60_000)
    return page.input_value("#model-select")


def wait_for_overlays(page, n: int) -> None:
    page.wait_for_function(
        """(n) => {
            const imgs = [...document.querySelectorAll('.result img.overlay')];
            return imgs.length === n && imgs.every((i) => i.complete && i.naturalWidth > 0);
        }""",
        arg=n, timeout=60_000,
    )


def test_create_a_model_score_images_and_see_the_overlays(browser, serve, images):
    url = serve()
    page, problems = open_page(browser, url + "/")
    page.wait_for_selector("body[data-ready=true]")
    model_id = create_model(page, images["normal"])
    assert model_id.startswith("tile-")
    assert model_id in page.inner_text("#model-info") and "6" in page.inner_text("#model-info")

    page.set_input_files("#test-files", [str(p) for p in images["test"]])
    wait_for_overlays(page, 2)
    cards = page.locator(".result")
    names = [cards.nth(i).locator("h4").inner_text() for i in range(2)]
    assert names == ["good.png", "scratch.png"]
    sizes = page.eval_on_selector_all(".result img.overlay", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[96, 64], [64, 64]]  # each overlay at its image's own size
    inputs = page.eval_on_selector_all(".result img.input", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
    assert inputs == [True, True]  # the image beside its map
    for i in range(2):
        text = cards.nth(i).inner_text()
        assert ("NORMAL" in text or "ANOMALOUS" in text) and "score" in text and "threshold" in text
        assert " text " in text  # the text probe's score: this model has one
    scores = [float(cards.nth(i).get_attribute("data-score")) for i in range(2)]
    assert scores[1] > scores[0]  # the planted defect scores higher
    assert "2 image(s) scored" in page.inner_text("#predict-status")

    # a file that is not an image: the card says why, naming the problem from the server
    page.set_input_files("#test-files", [str(p) for p in images["broken"]])
    page.wait_for_selector(".result.failed")
    assert "not an image" in page.inner_text(".result.failed")
    assert "broken.png" in page.inner_text("#message")
    # no broken-image icon: neither the file the browser cannot show nor the map never made
    page.wait_for_function("document.querySelectorAll('.result.failed img').length === 0", timeout=10_000)
    assert page.locator(".result.failed .unshown").all_inner_texts() == ["the browser cannot show this file", "no map: not scored"]
    assert len(problems) <= 1 and all("status of 422" in p for p in problems), problems  # Chromium logs the 422


def test_dropping_files_and_deleting_a_model(browser, serve, images):
    url = serve()
    page, problems = open_page(browser, url + "/")
    page.wait_for_selector("body[data-ready=true]")
    model_id = create_model(page, images["normal"][:4], text=False)

    # a real drop event carrying files, as a file manager sends it
    payload = [(p.name, list(p.read_bytes())) for p in images["test"]]
    page.evaluate(
        """(files) => {
            const dt = new DataTransfer();
            for (const [name, bytes] of files) dt.items.add(new File([new Uint8Array(bytes)], name, {type: 'image/png'}));
            document.querySelector('#test-drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        payload,
    )
    wait_for_overlays(page, 2)
    assert model_id in page.inner_text(".result")
    assert all(" text " not in t for t in page.locator(".result .scores").all_inner_texts())  # no text probe: no "text 0.00"

    page.once("dialog", lambda d: d.accept())
    page.click("#delete-model")
    page.wait_for_function("document.querySelector('#message').textContent.startsWith('Deleted model')")
    assert page.input_value("#model-select") == ""
    assert problems == []


def test_token_from_the_address_or_typed_in(browser, serve, images):
    url = serve(token="s3cret")
    page, problems = open_page(browser, url + "/")
    page.wait_for_selector("#token-form:not([hidden])")
    assert "needs a token" in page.inner_text("#message")
    page.fill("#token", "s3cret")
    page.click("#token-form button")
    page.wait_for_selector("body[data-ready=true]")

    page2, _ = open_page(browser, url + "/#token=s3cret")
    page2.wait_for_selector("body[data-ready=true]")
    assert "token" not in page2.url  # taken out of the address bar
    create_model(page2, images["normal"][:3])
    page2.set_input_files("#test-files", [str(images["test"][1])])
    wait_for_overlays(page2, 1)
    assert problems == []


def test_sort_filter_and_download_the_results_as_csv(browser, serve, images, tmp_path):
    odd = tmp_path / "=1+1,odd.png"  # a comma to quote and a leading '=' a spreadsheet would run
    odd.write_bytes(images["test"][0].read_bytes())
    page, problems = open_page(browser, serve() + "/")
    page.wait_for_selector("body[data-ready=true]")
    model_id = create_model(page, images["normal"])
    assert page.is_hidden("#results-tools")
    page.set_input_files("#test-files", [str(images["test"][0]), str(images["broken"][0]), str(images["test"][1]), str(odd)])
    page.wait_for_function("document.querySelectorAll('.result.normal, .result.anomalous, .result.failed').length === 4",
                           timeout=60_000)
    assert page.inner_text("#shown-count") == "4 of 4 shown"

    def shown() -> list[tuple[str, str]]:
        return page.eval_on_selector_all(".result:not([hidden])", "cs => cs.map(c => [c.dataset.name, c.dataset.score || ''])")

    assert [n for n, _ in shown()] == ["good.png", "broken.png", "scratch.png", "=1+1,odd.png"]  # as sent
    page.select_option("#sort-by", "score-desc")
    rows = shown()
    scores = [float(s) for _, s in rows[:3]]
    assert scores == sorted(scores, reverse=True) and rows[3] == ["broken.png", ""]  # not scored: last
    page.select_option("#sort-by", "score-asc")
    assert [float(s) for _, s in shown()[:3]] == sorted(scores) and shown()[3][0] == "broken.png"
    page.select_option("#sort-by", "name")
    assert [n for n, _ in shown()] == ["=1+1,odd.png", "broken.png", "good.png", "scratch.png"]

    page.select_option("#show-only", "failed")
    assert [n for n, _ in shown()] == ["broken.png"] and page.inner_text("#shown-count") == "1 of 4 shown"
    page.select_option("#show-only", "all")
    page.fill("#name-filter", "SCRATCH")
    assert [n for n, _ in shown()] == ["scratch.png"]
    page.fill("#name-filter", "")
    decisions = page.eval_on_selector_all(".result", "cs => cs.map(c => c.dataset.decision)")
    page.select_option("#show-only", "normal")
    assert len(shown()) == decisions.count("normal")

    # the CSV: the rows shown, in the order shown, the same numbers as the cards
    page.select_option("#show-only", "all")
    page.select_option("#sort-by", "score-desc")
    with page.expect_download() as info:
        page.click("#download-csv")
    download = info.value
    assert download.suggested_filename == f"lakead-results-{model_id}.csv"
    import csv

    with open(download.path(), newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert [r["name"] for r in table] == ["'" + n if n.startswith("=") else n for n, _ in shown()]
    assert table[0].keys() >= {"name", "decision", "score", "visual", "semantic", "threshold", "regions", "model", "problem"}
    for r, (_, score) in zip(table, shown()):
        assert (r["score"] == score) if score == "" else float(r["score"]) == pytest.approx(float(score))
    assert table[-1]["decision"] == "failed" and "not an image" in table[-1]["problem"]
    assert {r["model"] for r in table[:3]} == {model_id}
    assert all(p == "" or "status of 422" in p for p in problems) and len(problems) <= 1, problems


@pytest.mark.parametrize("path, rendered", [("/docs", ".opblock"), ("/redoc", "h1:has-text('lakead')")])
def test_api_description_renders_without_network(browser, serve, path, rendered):
    """Swagger UI and ReDoc start from this server's own files, under its CSP: every request
    the page makes goes to the server (none to a CDN), and the operations are shown."""
    url = serve()
    page = browser.new_page()  # the server's CSP in force
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    failed: dict[str, str] = {}
    page.on("requestfailed", lambda r: failed.setdefault(r.url, r.failure or ""))
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.goto(url + path)
    page.wait_for_selector(rendered, timeout=60_000)
    assert "/models/{model_id}/predict" in page.inner_text("body")
    outside = [u for u in requested if not (u.startswith(url) or u.startswith("data:") or u.startswith("blob:"))]
    assert any("/docs-assets/" in u for u in requested), requested
    # ReDoc always asks for its maker's logo (cdn.redoc.ly): the CSP stops it in the browser, and the page goes on
    assert outside in ([], ["https://cdn.redoc.ly/redoc/logo-mini.svg"]) and all(failed.get(u) == "csp" for u in outside), (outside, failed)
    assert not [p for p in problems if "Content Security Policy" in p and "cdn.redoc.ly" not in p], problems


def test_mark_as_good_updates_the_model(browser, serve, images, tmp_path):
    """A flagged image's "mark as good" adds it to the model (a new version), and the next time it
    is scored it is normal (issue 29)."""
    odd = tmp_path / "odd.png"
    Image.fromarray(with_defect(texture(np.random.default_rng(12)), 0, 0, 64)).save(odd)  # flagged on the tiny CLIP
    url = serve()
    page, problems = open_page(browser, url + "/")
    page.wait_for_selector("body[data-ready=true]")
    create_model(page, images["normal"])
    page.set_input_files("#test-files", [str(odd)])
    wait_for_overlays(page, 1)
    assert "ANOMALOUS" in page.inner_text(".result .badge") or "NOT THIS PRODUCT" in page.inner_text(".result .badge")
    page.click(".result button.mark-good")
    page.wait_for_selector(".result .marked", timeout=60_000)
    assert "version 2" in page.inner_text(".result .marked")
    # the model list is reloaded after the note is shown: wait for it rather than race it
    page.wait_for_function("document.querySelector('#model-select option:checked').textContent.includes('7 images')",
                           timeout=30_000)
    page.click("#clear-results")
    page.set_input_files("#test-files", [str(odd)])
    page.wait_for_function("[...document.querySelectorAll('.result')].some((c) => c.dataset.decision === 'normal')",
                           timeout=60_000)
    assert not problems, problems
