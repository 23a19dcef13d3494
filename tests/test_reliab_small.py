"""Smaller items of issue 28: GIF files in folder listings (25), PatchCore's neighbourhood
bounded by the token grid (26), lakead-runtime reports an unwritable --out in one line (18)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import texture
from lakead.errors import ConfigError
from lakead.images import iter_images


def test_gif_files_are_listed(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(texture(rng)).save(tmp_path / "a.gif")
    Image.fromarray(texture(rng)).save(tmp_path / "b.png")
    assert sorted(p.rsplit("/", 1)[-1] for p in map(str, iter_images([tmp_path]))) == ["a.gif", "b.png"]


def test_a_neighbourhood_larger_than_the_grid_is_refused(tiny_backbone):
    """neighbourhood=999 was accepted and gave every score 0."""
    from lakead.methods import get_method
    from lakead.methods.lake import LakeConfig

    rng = np.random.default_rng(1)
    m = get_method("patchcore")
    cfg = m.configure(LakeConfig.from_options(backbone="x", layer=3, image_size=32), {"neighbourhood": 999})
    with pytest.raises(ConfigError, match="neighbourhood 999 is larger than the 4-patch side"):
        m.build(cfg, tiny_backbone).fit([texture(rng) for _ in range(3)], "tile")


def test_the_runtime_reports_an_unwritable_out_in_one_line(tiny_backbone, tmp_path, capsys):
    from lakead import LakeDetector
    from lakead.export import export_model
    from lakead.runtime_cli import main

    rng = np.random.default_rng(2)
    out = export_model(LakeDetector(tiny_backbone, device="cpu", layer=3).fit([texture(rng) for _ in range(4)], "w"),
                       tmp_path / "x")
    Image.fromarray(texture(rng)).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("not a folder")
    assert main(["predict", str(out), str(tmp_path / "a.png"), "--out", str(tmp_path / "file" / "results")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "file" in err and "Traceback" not in err


@pytest.mark.parametrize("text,words", [
    ("k: 3\nk: 5\n", "the key 'k' is given twice"),
    ("a: " + "[" * 200_000 + "]" * 200_000 + "\n", "nested deeper"),
])
def test_config_files_with_repeated_keys_or_deep_nesting_are_refused(tmp_path, text, words):
    """Item 20: a repeated key kept the last value silently; a 200k-deep YAML was a RecursionError traceback."""
    import typer

    from lakead.configfile import read_config

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(typer.BadParameter) as err:
        read_config(tmp_path / "c.yaml")
    assert words in str(err.value) and "c.yaml" in str(err.value)


def test_resuming_with_an_fp32_export_of_the_same_model(tiny_backbone, tmp_path):
    """Item 24: 'written with precision float32, this run uses fp32' (an fp32 export gives the same scores)."""
    from lakead import LakeDetector
    from lakead.batch import predict_to_dir
    from lakead.export import export_model
    from lakead.runtime import ExportedDetector

    rng = np.random.default_rng(3)
    det = LakeDetector(tiny_backbone, device="cpu", layer=3).fit([texture(rng) for _ in range(4)], "w")
    for i in range(3):
        Image.fromarray(texture(rng)).save(tmp_path / f"{i}.png")
    predict_to_dir(det, [tmp_path / "0.png", tmp_path / "1.png"], tmp_path / "r", maps="none")
    exported = ExportedDetector.load(export_model(det, tmp_path / "x"))
    summary = predict_to_dir(exported, [tmp_path / f"{i}.png" for i in range(3)], tmp_path / "r", maps="none", resume=True)
    assert summary.skipped == 2 and summary.scored == 1


def test_a_long_file_name_gets_output_files(tiny_backbone, tmp_path):
    """Item 11: a legal 255-byte name made the overlay name too long: 0 of 5 rows were written."""
    from lakead import LakeDetector
    from lakead.batch import predict_to_dir

    rng = np.random.default_rng(4)
    det = LakeDetector(tiny_backbone, device="cpu", layer=3).fit([texture(rng) for _ in range(4)], "w")
    src = tmp_path / "in"
    src.mkdir()
    names = ["a" * 251 + ".png", "a" * 250 + "b.png", "é" * 125 + ".png", "short.png"]
    for n in names:
        Image.fromarray(texture(rng)).save(src / n)
    summary = predict_to_dir(det, [src], tmp_path / "r", maps="png,npy", masks=True)
    assert summary.scored == 4 and summary.failed == 0
    overlays = sorted(p.name for p in (tmp_path / "r" / "overlays").iterdir())
    assert len(overlays) == 4 and len(set(overlays)) == 4 and "short.png.png" in overlays
    assert all(len(o.encode()) <= 255 for o in overlays)


@pytest.mark.parametrize("damage", ["bytes", "size"])
def test_a_damaged_hnsw_graph_is_one_error(tiny_backbone, tmp_path, damage):
    """Item 17: a damaged HNSW graph was a faiss RuntimeError traceback, one of the wrong size a ValueError."""
    pytest.importorskip("faiss", reason="the index extra is not installed")
    from safetensors.torch import load_file, save_file

    from lakead import LakeDetector
    from lakead.errors import ModelFormatError
    from lakead.methods import load_detector

    rng = np.random.default_rng(5)
    det = LakeDetector(tiny_backbone, device="cpu", layer=3, index="hnsw").fit([texture(rng) for _ in range(4)], "w")
    path = det.save(tmp_path / "m")
    tensors = load_file(str(path / "tensors.safetensors"))
    g = tensors["gallery_index"]
    if damage == "bytes":
        g = g.clone()
        g[40:400] = 255
    else:
        other = LakeDetector(tiny_backbone, device="cpu", layer=3, index="hnsw").fit([texture(rng) for _ in range(2)], "w")
        g = other.save(tmp_path / "o") and load_file(str(tmp_path / "o" / "tensors.safetensors"))["gallery_index"]
    tensors["gallery_index"] = g.contiguous()
    save_file(tensors, str(path / "tensors.safetensors"))
    with pytest.raises(ModelFormatError, match="saved HNSW graph .* is damaged or of another gallery"):
        load_detector(path, backbone=tiny_backbone).predict([texture(rng)])


def test_a_full_disk_at_save_is_one_error_and_keeps_the_old_model(tiny_backbone, tmp_path, monkeypatch):
    """Item 16: fit on a full disk was a SafetensorError traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    from lakead import LakeDetector
    from lakead.errors import LakeadError

    rng = np.random.default_rng(6)
    det = LakeDetector(tiny_backbone, device="cpu", layer=3).fit([texture(rng) for _ in range(3)], "w")
    det.save(tmp_path / "m")
    before = (tmp_path / "m" / "tensors.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(LakeadError, match=r"m: the model cannot be written \(.*No space left on device.*\); nothing was replaced"):
        det.save(tmp_path / "m")
    assert (tmp_path / "m" / "tensors.safetensors").read_bytes() == before


def test_leftovers_of_a_killed_save_are_removed_by_the_next_one(tiny_backbone, tmp_path):
    """Item 23: hidden .M.*.tmp copies left by kill -9 were never cleaned by the command line."""
    import os
    import time

    from lakead import LakeDetector

    rng = np.random.default_rng(8)
    det = LakeDetector(tiny_backbone, device="cpu", layer=3).fit([texture(rng) for _ in range(3)], "w")
    old, young, other = tmp_path / ".M.abcd1234.tmp", tmp_path / ".M.wxyz9876.tmp", tmp_path / ".M.notlakead"
    for d in (old, young, other):
        d.mkdir()
        (d / "lakead.json").write_text("{}")
    past = time.time() - 7200
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    det.save(tmp_path / "M")
    assert not old.exists() and young.exists() and other.exists() and (tmp_path / "M" / "lakead.json").is_file()


@pytest.mark.parametrize("method", ["lake", "anomalydino"])
def test_identical_support_images_are_said_at_fit(tiny_backbone, method, caplog):
    """Item 12: five identical support images gave a threshold every test image passed, without a word."""
    import logging

    from lakead.methods import get_method
    from lakead.methods.lake import LakeConfig

    img = texture(np.random.default_rng(9))
    m = get_method(method)
    cfg = m.configure(LakeConfig.from_options(backbone="x", layer=3), {})
    with caplog.at_level(logging.WARNING, logger="lakead"):
        m.build(cfg, tiny_backbone).fit([img] * 5, "tile")
    assert any("score alike when each is left out" in r.getMessage() for r in caplog.records)
    caplog.clear()
    rng = np.random.default_rng(10)
    with caplog.at_level(logging.WARNING, logger="lakead"):
        m.build(cfg, tiny_backbone).fit([texture(rng) for _ in range(5)], "tile")
    assert not any("score alike" in r.getMessage() for r in caplog.records)
