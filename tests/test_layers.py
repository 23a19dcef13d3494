"""Finding a layer (issue 25, Medium 6): ``lakead layers BACKBONE`` lists every tensor ``--layer``
can read with its channels and grid; a bad ``--layer`` is one message, naming that command,
before any image is read; a name never stands for another tensor silently; ``--class-name`` is
needed only where a text probe uses it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from _onnx_models import save_tiny_onnx
from conftest import texture
from lakead.backbones import load_backbone
from lakead.cli import app

pytest.importorskip("onnxruntime")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    return save_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def normal(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "widget" / "train" / "good"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(texture(rng, (32, 32))).save(root / f"{i}.png")
    return root


def test_layers_lists_every_readable_tensor(tiny_onnx):
    r = invoke("layers", f"onnx:{tiny_onnx}")
    assert r.exit_code == 0, r.output
    text = flat(r.output)
    shapes = load_backbone(f"onnx:{tiny_onnx}").feature_maps()
    assert f"{len(shapes)} layers --layer can read" in text
    for name, (c, h, w) in shapes.items():  # every one, with channels and grid
        assert f"{name} │ {c} │ {h} x {w}" in text, name
    assert "feat1 │ 8 │ 32 x 32" in text and "block2_quantized │ 12 │ 16 x 16 │ int8, read dequantized" in text


def test_layers_of_a_clip_lists_its_blocks(tiny_clip_dir):
    bb = load_backbone(str(tiny_clip_dir))
    r = invoke("layers", tiny_clip_dir)
    assert r.exit_code == 0, r.output
    text = flat(r.output)
    g = bb.grid_size(bb.info.image_size)
    for i in range(1, bb.info.num_layers + 1):
        assert f"│ {i} │ {bb.width} │ {g[0]} x {g[1]} │" in text
    assert f"│ {bb.default_layer()} │ {bb.width} │ {g[0]} x {g[1]} │ default" in text


def test_an_exact_name_is_never_another_tensor(tmp_path, caplog):
    import onnx

    path = save_tiny_onnx(tmp_path / "t.onnx")
    bb = load_backbone(f"onnx:{path}")
    assert bb.resolve_layer("block2") == "block2"  # both block2 and block2_quantized exist: the exact one
    m = onnx.load(str(path))
    for n in m.graph.node:  # feat1 -> 382_quantized, and no tensor 382
        n.input[:] = ["382_quantized" if i == "feat1" else i for i in n.input]
        n.output[:] = ["382_quantized" if o == "feat1" else o for o in n.output]
    onnx.save(m, str(path))
    bb = load_backbone(f"onnx:{path}")
    with caplog.at_level(logging.INFO, logger="lakead"):
        assert bb.resolve_layer(382) == "382_quantized" and bb.resolve_layer("382") == "382_quantized"
    said = [r.getMessage() for r in caplog.records if "382" in r.getMessage()]
    assert len(said) == 1 and "has no tensor '382'; reading '382_quantized'" in said[0]  # said, once


def test_a_bad_layer_is_one_message_before_any_work(tiny_onnx, normal, tmp_path, monkeypatch):
    from lakead.methods.lake import LakeDetector

    def no_fit(*a, **k):
        raise AssertionError("the fit started")

    monkeypatch.setattr(LakeDetector, "fit", no_fit)
    r = invoke("fit", normal, "--backbone", f"onnx:{tiny_onnx}", "--layer", "nope", "--out", tmp_path / "m")
    assert r.exit_code == 1, r.output
    text = flat(r.output)
    assert "layer 'nope' is not a tensor" in text and f"lakead layers onnx:{tiny_onnx.resolve()}" in text
    assert not (tmp_path / "m").exists()


def test_class_name_is_optional_without_a_text_probe(tiny_onnx, normal, tiny_clip_dir, tmp_path):
    r = invoke("fit", normal, "--backbone", f"onnx:{tiny_onnx}", "--layer", "feat1", "--k", "4", "--out", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "lakead.json").read_text())["class_name"] == "widget"  # the folder's
    clip = ["fit", normal, "--backbone", tiny_clip_dir, "--layer", "2", "--k", "8", "--image-size", "32"]
    r = invoke(*clip, "--out", tmp_path / "c")
    assert r.exit_code == 2 and "--class-name" in r.output and "text probe" in flat(r.output)
    assert not (tmp_path / "c").exists()
    r = invoke(*clip, "--no-text", "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    r = invoke(*clip, "--class-name", "widget", "--out", tmp_path / "d")
    assert r.exit_code == 0, r.output
