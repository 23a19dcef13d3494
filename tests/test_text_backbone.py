"""The defaults on every backbone family, and a text probe from another model (--text-backbone):
a DINOv2 visual branch with a CLIP or SigLIP text probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import texture, with_defect
from lakead import ConfigError, LakeDetector, ModelFormatError
from lakead.cli import app
from lakead.testing import save_random_backbone

FAMILIES = ("tiny-dinov2", "tiny-siglip", "tiny-siglip2")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_clip_dir):
    root = tmp_path_factory.mktemp("families")
    out = {name: save_random_backbone(root / name, name, seed=0) for name in FAMILIES}
    out["tiny"] = tiny_clip_dir
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(30)
    for sub, n in (("good", 6), ("test", 2)):
        (root / sub).mkdir()
        for i in range(n):
            Image.fromarray(texture(rng)).save(root / sub / f"{i}.png")
    Image.fromarray(with_defect(texture(rng), 20, 20, 16)).save(root / "test" / "bad.png")
    return root


@pytest.mark.parametrize("family", ["tiny", *FAMILIES])
def test_default_options_work_on_every_family(family, dirs, folders, tmp_path):
    """No --layer, no --k: block 3 of 4 (3/4 of the depth) and k = the paper's 100, every channel of a narrower block (32 of 32)."""
    r = CliRunner().invoke(app, ["fit", str(folders / "good"), "-c", "tile", "-o", str(tmp_path / "m"),
                                 "--backbone", str(dirs[family])])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "m" / "lakead.json").read_text())
    assert meta["layer"] == 3 and meta["k"] == 32
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "m"), str(folders / "test"), "-o", str(tmp_path / "o"), "--maps", "none"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("text", ["tiny", "tiny-siglip"])
def test_dinov2_visual_branch_with_another_models_text_probe(text, dirs, folders, tmp_path):
    normals = [np.asarray(Image.open(p)) for p in sorted((folders / "good").iterdir())]
    images = [np.asarray(Image.open(p)) for p in sorted((folders / "test").iterdir())]
    det = LakeDetector(str(dirs["tiny-dinov2"]), text_backbone=str(dirs[text]), batch_size=4).fit(normals, "tile")
    assert det.text_embeddings_ is not None and det.semantic_layer_ == 4  # the text model's last block
    assert det.backbone is not det.text_model and det.text_model.info.source == str(dirs[text].resolve())
    pred = det.predict(images)
    assert np.all(pred.semantic > 0) and np.allclose(pred.scores, pred.visual + 0.1 * pred.semantic, atol=1e-6)
    alone = LakeDetector(str(dirs["tiny-dinov2"]), batch_size=4).fit(normals, "tile")
    assert alone.text_embeddings_ is None  # DINOv2 has no text tower: the probe is off without --text-backbone
    np.testing.assert_allclose(alone.predict(images).visual, pred.visual, rtol=1e-5)  # the same visual branch
    loaded = LakeDetector.load(det.save(tmp_path / "m"))
    again = loaded.predict(images)
    np.testing.assert_array_equal(again.scores, pred.scores)
    assert json.loads((tmp_path / "m" / "lakead.json").read_text())["text_backbone"]["kind"] == det.text_model.info.kind


def test_text_backbone_errors(dirs, folders, tmp_path):
    normals = [np.asarray(Image.open(p)) for p in sorted((folders / "good").iterdir())]
    with pytest.raises(ConfigError):
        LakeDetector(str(dirs["tiny-dinov2"]), text_backbone="").fit(normals, "tile")
    det = LakeDetector(str(dirs["tiny-dinov2"]), text_backbone=str(dirs["tiny"])).fit(normals, "tile")
    path = det.save(tmp_path / "m")
    meta = json.loads((path / "lakead.json").read_text())
    meta["text_backbone"]["fingerprint"] = "0" * 64
    (path / "lakead.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="text probe's model"):
        LakeDetector.load(path)


def test_cli_text_backbone(dirs, folders, tmp_path):
    r = CliRunner().invoke(app, ["fit", str(folders / "good"), "-c", "tile", "-o", str(tmp_path / "m"),
                                 "--backbone", str(dirs["tiny-dinov2"]), "--text-backbone", str(dirs["tiny-siglip2"])])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "m"), str(folders / "test"), "-o", str(tmp_path / "o"), "--maps", "none"])
    assert r.exit_code == 0, r.output
    rows = (tmp_path / "o" / "scores.csv").read_text().splitlines()
    assert len(rows) == 4 and all(float(line.split(",")[3]) > 0 for line in rows[1:])  # semantic part from SigLIP 2


def test_eval_and_explain_accept_another_family_and_text_model(dirs, tmp_path):
    from _synthetic import write_category
    from lakead.api import Runtime
    from lakead.evaluate import evaluate
    from lakead.explain import explain_images
    from lakead.methods.lake import LakeConfig

    cat = write_category(tmp_path / "data", "plate", n_train=6, n_good=2, defects={"crack": 2})
    cfg = LakeConfig(backbone=str(dirs["tiny-dinov2"]), text_backbone=str(dirs["tiny-siglip"]))
    report = evaluate(cat, tmp_path / "report", cfg, shots=None, seed=0, runtime=Runtime(batch_size=4), figures=False)
    result = report.results[0]
    assert result.image["auroc"] is not None and all(row["semantic"] > 0 for row in result.rows)
    det = LakeDetector(config=cfg, backbone=str(dirs["tiny-dinov2"])).fit(sorted((cat / "train" / "good").iterdir()), "plate")
    ex = explain_images(det, sorted((cat / "test" / "crack").iterdir()))
    assert len(ex) == 2 and ex[0].contributions and ex[0].semantic > 0
