"""POST /models/{id}/normals (issue 29): an image the model flags, added as normal, is not flagged
by the next prediction; every addition is a version (lakead history), refused inputs change nothing."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'lakead[serve]')")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import texture, with_defect  # noqa: E402
from lakead.line.versions import read_history  # noqa: E402
from lakead.serve import create_app  # noqa: E402

FIT = {"class_name": "tile", "k": "8", "layer": "2", "image_size": "64"}


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def files(*items):
    return [("images", (name, data, "image/png")) for name, data in items]


def test_mark_as_good_then_predict(tmp_path, tiny_clip_dir):
    rng = np.random.default_rng(40)
    normals = [texture(rng) for _ in range(6)]
    odd = png(with_defect(texture(rng), 0, 0, 64))  # all checker: flagged (out of scope) on the tiny random CLIP
    with TestClient(create_app(tmp_path / "models", backbone=str(tiny_clip_dir), device="cpu", batch_size=4)) as c:
        r = c.post("/models", data=FIT, files=files(*[(f"n{i}.png", png(a)) for i, a in enumerate(normals)]))
        assert r.status_code == 201, r.text
        mid = r.json()["id"]
        r = c.post(f"/models/{mid}/predict", files=files(("odd.png", odd)))
        assert r.json()["results"][0]["anomalous"] is True
        r = c.post(f"/models/{mid}/normals", data={"by": "operator 7"}, files=files(("odd.png", odd)))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == 2 and body["added"] == ["odd.png"] and body["support_after"] == 7
        r = c.post(f"/models/{mid}/predict", files=files(("odd.png", odd)))
        assert r.json()["results"][0]["anomalous"] is False
        assert c.get(f"/models/{mid}").json()["support_images"] == 7
        hist = read_history(tmp_path / "models" / mid)
        assert hist["current"] == 2 and hist["versions"][1]["by"] == "operator 7"
        # refused: nothing changes
        r = c.post(f"/models/{mid}/normals", files=files(("bad.png", b"not an image")))
        assert r.status_code == 422 and "bad.png" in r.text
        r = c.post(f"/models/{mid}/normals", data={"bogus": "1"}, files=files(("odd.png", odd)))
        assert r.status_code == 422
        assert c.post("/models/nope-00000000/normals", files=files(("odd.png", odd))).status_code == 404
        assert read_history(tmp_path / "models" / mid)["current"] == 2
        assert [m["id"] for m in c.get("/models").json()["models"]] == [mid]  # the versions folder is no model
