"""Render a ``lakead explain`` report in headless Chromium and save a full-page screenshot.

    python benchmarks/explain_screenshot.py REPORT_DIR SHOT.png [--width 1280]

Fails (exit 1) when the page references an image that does not load. Chromium is found at
``$LAKEAD_CHROMIUM``, on the PATH, or at /usr/bin/chromium (Playwright's own download is not
needed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    return os.environ.get("LAKEAD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def screenshot(report_dir: Path, shot: Path, width: int = 1280) -> list[str]:
    """Open ``report_dir/index.html``, save a full-page PNG to ``shot``; return the images that failed to load."""
    from playwright.sync_api import sync_playwright

    page_url = (report_dir / "index.html").resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(page_url, wait_until="load")
            broken = page.evaluate(
                "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'))"
            )
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    return broken


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report_dir", type=Path)
    ap.add_argument("shot", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    args = ap.parse_args(argv)
    if not (args.report_dir / "index.html").is_file():
        print(f"error: {args.report_dir}: no index.html (write one with 'lakead explain')", file=sys.stderr)
        return 1
    broken = screenshot(args.report_dir, args.shot, args.width)
    if broken:
        print(f"error: images that did not load: {broken}", file=sys.stderr)
        return 1
    print(f"screenshot written to {args.shot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
