"""The service and the models folder (issue 28 items 9 and 10): one damaged lakead.json (200,000
levels deep) neither stops the service from starting nor breaks GET /models; WinCLIP models,
created through the service or by the command line, are listed, read and run."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'lakead[serve]')")

from fastapi.testclient import TestClient  # noqa: E402

from test_serve import FIT, fit, files, make_app, normals, png, predict, tests_imgs  # noqa: E402,F401


def _deep(path) -> None:
    path.mkdir(parents=True)
    (path / "lakead.json").write_text('{"format": "lakead-model", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")


def test_a_deeply_nested_model_file_is_listed_as_damaged(make_app, normals, tmp_path):
    _deep(tmp_path / "models" / "deep")  # before the service starts
    with TestClient(make_app()) as c:
        good = fit(c, normals[:3])["id"]
        _deep(tmp_path / "models" / "deep2")  # while it runs
        r = c.get("/models")
        assert r.status_code == 200, r.text
        body = r.json()
        assert [m["id"] for m in body["models"]] == [good]
        assert {d["name"] for d in body["damaged"]} == {"deep", "deep2"}
        assert all("nested deeper" in d["problem"] for d in body["damaged"])
        r = c.get("/models/deep")
        assert r.status_code == 500 and "nested deeper" in r.json()["detail"]


def test_winclip_through_the_service(make_app, normals, tests_imgs):
    with TestClient(make_app()) as c:
        for method in ("winclip", "winclip+"):
            r = c.post("/models", data={"class_name": "tile", "method": method, "image_size": "64"},
                       files=files(*[(f"n{i}.png", png(a)) for i, a in enumerate(normals[:3])]))
            assert r.status_code == 201, r.text
            mid = r.json()["id"]
            assert c.get(f"/models/{mid}").status_code == 200
            assert mid in [m["id"] for m in c.get("/models").json()["models"]]
            assert "damaged" not in c.get("/models").json()
            r = predict(c, mid, tests_imgs[:2])
            assert r.status_code == 200, r.text


def test_a_multi_slice_upload_is_refused_without_the_servers_path(make_app, normals, tests_imgs, tmp_path):
    """Item 21: the advice named the server's temporary upload path (.../lakead-upload-xxx/0.nii.gz#z=K)."""
    pytest.importorskip("nibabel", reason="the medical extra is not installed")
    from _medical_files import nifti_from_images

    vol = nifti_from_images(tmp_path / "scan.nii.gz", [a[:, :, 0] for a in tests_imgs[:3]])
    with TestClient(make_app()) as c:
        mid = fit(c, normals[:3])["id"]
        r = c.post(f"/models/{mid}/predict", files=[("images", ("scan.nii.gz", vol.read_bytes(), "application/gzip")),
                                                    ("images", ("ok.png", png(tests_imgs[0]), "image/png"))])
        assert r.status_code == 200, r.text
        (failed,) = r.json()["failed"]
        assert failed["name"] == "scan.nii.gz" and "lakead-upload" not in failed["problem"] and "#z=" not in failed["problem"]
        assert "holds 3 axial slices: the service scores one image per file" in failed["problem"], failed
