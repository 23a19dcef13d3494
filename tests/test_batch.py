"""Streaming predict into a directory: rows as they come, resume after any interruption, bounded memory."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import texture, with_defect
from lakead import LakeDetector
from lakead.batch import (
    SCORES_FILE,
    BatchSummary,
    output_name,
    output_root,
    parse_maps,
    predict_to_dir,
    read_ahead,
)
from lakead.cli import app
from lakead.errors import ConfigError, LakeadError

OPTS = dict(k=8, layer=2, batch_size=8)  # the tiny CLIP's own 32 px input: 4 x 4 tokens


def make_images(root: Path, n: int, *, per_folder: int = 100, size: int = 40, seed: int = 0) -> Path:
    """``n`` small PNGs in folders of ``per_folder``: shifted copies of one texture, every
    seventh with a planted defect, so the scores differ from image to image."""
    rng = np.random.default_rng(seed)
    base = texture(rng, (size, size))
    for i in range(n):
        img = np.roll(base, (i * 3) % size, axis=1 if i % 2 else 0)
        if i % 7 == 3:
            img = with_defect(img, 8, 8, 12)
        folder = root / f"part{i // per_folder:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png", compress_level=1)
    return root


@pytest.fixture(scope="module")
def model_dir(tiny_backbone, tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    det = LakeDetector(tiny_backbone, **OPTS).fit([texture(rng) for _ in range(6)], "tile")
    return det.save(tmp_path_factory.mktemp("model") / "tile")


@pytest.fixture(scope="module")
def detector(model_dir) -> LakeDetector:
    return LakeDetector.load(model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """30 images in 3 folders, an unreadable file, and a file name that needs CSV quoting."""
    root = make_images(tmp_path_factory.mktemp("images"), 30, per_folder=10)
    (root / "part001" / "broken.png").write_text("not an image")
    odd = texture(np.random.default_rng(9), (40, 40))
    Image.fromarray(odd).save(root / "part002" / 'odd, "quoted"\nname.png')
    return root


@pytest.fixture(scope="module")
def reference(detector, images, tmp_path_factory) -> Path:
    """One uninterrupted run: what every resumed run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference")
    summary = predict_to_dir(detector, [images], out, maps="npy")
    assert (summary.scored, summary.failed, summary.skipped) == (31, 1, 0)
    return out


def rows(out: Path) -> list[dict[str, str]]:
    with (out / SCORES_FILE).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# -- options, names, the reader -------------------------------------------------------------


def test_parse_maps():
    assert parse_maps("png,npy") == parse_maps("npy, png") == {"png", "npy"}
    assert parse_maps("none") == frozenset() and parse_maps("PNG") == {"png"}
    for bad in ("", "both", "png,none", "jpg"):
        with pytest.raises(ConfigError, match="none, png, npy or png,npy"):
            parse_maps(bad)


def test_output_names_are_relative_to_the_inputs(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert output_root([tmp_path / "a"]) == tmp_path / "a"
    assert output_name(tmp_path / "a" / "b" / "x.png", output_root([tmp_path / "a"])) == os.path.join("b", "x.png")
    f = tmp_path / "a" / "b" / "x.png"
    f.write_bytes(b"")
    assert output_root([f]) == tmp_path / "a" / "b"
    assert output_root([f, tmp_path / "a"]) == tmp_path / "a"


def test_read_ahead_keeps_order_and_pulls_a_bounded_number_ahead():
    from concurrent.futures import ThreadPoolExecutor

    pulled = []

    def source():
        for i in range(50):
            pulled.append(i)
            yield i

    def read(i):
        time.sleep(0.001 * (i % 3))  # out-of-order completion
        if i == 7:
            raise LakeadError("not this one")  # a non-image error is raised, not yielded
        return i * i

    with ThreadPoolExecutor(4) as pool:
        got = []
        for item, result in read_ahead((i for i in source() if i != 7), read, pool, depth=5):
            assert len(pulled) <= item + 1 + 5 + 1  # never more than `depth` beyond the consumer
            got.append((item, result))
    assert got == [(i, i * i) for i in range(50) if i != 7]


# -- one run ----------------------------------------------------------------------------------


def test_rows_follow_input_order_and_equal_one_predict_call(detector, images, reference):
    got = rows(reference)
    listed = sorted(p for p in images.rglob("*.png") if p.name != "broken.png")
    assert [r["path"] for r in got] == [str(p) for p in listed]
    pred = detector.predict([str(p) for p in listed])
    assert [r["score"] for r in got] == [str(s) for s in pred.scores]  # every float32 digit (str of np.float32)
    assert [np.float32(r["score"]) for r in got] == list(pred.scores)  # reads back as the same float32
    assert [r["anomalous"] for r in got] == [str(bool(a)).lower() for a in pred.anomalous]
    name = output_name(listed[5], output_root([images]))
    assert np.array_equal(np.load(reference / "maps" / f"{name}.npy"), pred.maps[5])
    assert not (reference / "overlays").exists()  # maps="npy" only
    errors = list(csv.DictReader((reference / "errors.csv").open(newline="")))
    assert errors == [{"path": str(images / "part001" / "broken.png"),
                       "error": "not an image, or an image format Pillow cannot read"}]


@pytest.mark.parametrize("maps, dirs", [("none", set()), ("png", {"overlays"}), ("png,npy", {"overlays", "maps"})])
def test_maps_option_chooses_the_files(detector, tmp_path, maps, dirs):
    src = make_images(tmp_path / "in", 3)
    out = tmp_path / "out"
    predict_to_dir(detector, [src], out, maps=maps)
    assert {p.name for p in out.iterdir() if p.is_dir()} == dirs
    for d in dirs:
        assert len(list((out / d).rglob("*.*"))) == 3


# -- resume -----------------------------------------------------------------------------------


def partial_copy(reference: Path, out: Path, keep_bytes: int) -> None:
    out.mkdir()
    (out / SCORES_FILE).write_bytes((reference / SCORES_FILE).read_bytes()[:keep_bytes])
    (out / "run.json").write_bytes((reference / "run.json").read_bytes())


def cut_points(data: bytes) -> dict[str, int]:
    header = data.index(b"\n") + 1
    quoted = data.index(b'odd, ""quoted""')
    line_end = data.index(b"\n", header + len(data) // 3) + 1
    return {
        "empty file": 0,
        "torn header": header - 4,
        "header only": header,
        "clean stop": line_end,
        "torn last line": line_end + 17,
        "torn inside a quoted newline": data.index(b"\n", quoted) + 1,
        "all but the last byte": len(data) - 1,
        "complete": len(data),
    }


def test_resume_after_a_clean_stop_or_a_torn_line_gives_the_uninterrupted_csv(detector, images, reference, tmp_path):
    data = (reference / SCORES_FILE).read_bytes()
    for case, keep in cut_points(data).items():
        out = tmp_path / case.replace(" ", "-")
        partial_copy(reference, out, keep)
        summary = predict_to_dir(detector, [images], out, maps="npy", resume=True)
        assert (out / SCORES_FILE).read_bytes() == data, case
        assert summary.scored + summary.skipped == 31 and summary.failed == 1, case
        # every image without a row was scored now and has its map
        assert len(list((out / "maps").rglob("*.npy"))) == summary.scored, case
        assert (out / "errors.csv").read_bytes() == (reference / "errors.csv").read_bytes()


def test_resume_after_ctrl_c_loses_only_the_batch_in_flight(detector, images, reference, tmp_path):
    out = tmp_path / "out"
    calls = []

    def interrupt(n: int) -> None:
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_to_dir(detector, [images], out, maps="npy", on_progress=interrupt)
    done = rows(out)
    assert len(done) == 3 * OPTS["batch_size"]  # three committed batches, complete rows only
    assert done == rows(reference)[: len(done)]
    summary = predict_to_dir(detector, [images], out, maps="npy", resume=True)
    assert summary.skipped == len(done) and summary.scored == 31 - len(done)
    assert (out / SCORES_FILE).read_bytes() == (reference / SCORES_FILE).read_bytes()


@pytest.mark.slow
def test_resume_after_sigkill_of_the_command(model_dir, tmp_path, detector):
    """Kill -9 a real `lakead predict` as soon as its first rows are on disk, then resume."""
    src = make_images(tmp_path / "in", 200)
    ref = tmp_path / "ref"
    predict_to_dir(detector, [src], ref, maps="none")
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from lakead.cli import app; app()", "-q", "predict", str(model_dir), str(src),
           "--out", str(out), "--maps", "none", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    scores = out / SCORES_FILE
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if scores.exists() and scores.stat().st_size > 200:  # the header and a few rows
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr.read()!r}"
    n_before = len(rows(out))
    assert 0 < n_before < 200
    summary = predict_to_dir(detector, [src], out, maps="none", resume=True)
    assert summary.skipped == n_before and summary.scored == 200 - n_before
    assert scores.read_bytes() == (ref / SCORES_FILE).read_bytes()


def test_resume_refuses_another_model_threshold_or_precision(tiny_backbone, model_dir, detector, images, reference, tmp_path):
    out = tmp_path / "out"
    partial_copy(reference, out, 300)
    other = LakeDetector(tiny_backbone, **OPTS).fit([texture(np.random.default_rng(4)) for _ in range(6)], "tile")
    with pytest.raises(LakeadError, match="written by another model"):
        predict_to_dir(other, [images], out, resume=True)
    with pytest.raises(LakeadError, match="written with threshold .* give the same --threshold"):
        predict_to_dir(detector, [images], out, resume=True, threshold=0.5)
    bf16 = LakeDetector.load(model_dir, precision="bfloat16")
    with pytest.raises(LakeadError, match="written with precision float32, this run uses bfloat16"):
        predict_to_dir(bf16, [images], out, resume=True)
    assert (out / SCORES_FILE).read_bytes() == (reference / SCORES_FILE).read_bytes()[:300]  # untouched

    (out / SCORES_FILE).write_bytes(b"a,b\r\n1,2\r\n")
    with pytest.raises(LakeadError, match="not a lakead scores file"):
        predict_to_dir(detector, [images], out, resume=True)
    lines = (reference / SCORES_FILE).read_bytes().splitlines(keepends=True)
    (out / SCORES_FILE).write_bytes(b"".join(lines[:3] + [b"edited,by hand\r\n"] + lines[4:8]))
    with pytest.raises(LakeadError, match="line 4: expected 6 fields, found 2"):
        predict_to_dir(detector, [images], out, resume=True)


def test_resume_with_nothing_written_starts_fresh_and_overwrite_replaces(detector, tmp_path):
    src = make_images(tmp_path / "in", 5)
    out = tmp_path / "out"
    first = predict_to_dir(detector, [src], out, maps="none", resume=True)
    again = predict_to_dir(detector, [src], out, maps="none", resume=True)
    assert (first.scored, again.scored, again.skipped) == (5, 0, 5)
    before = (out / SCORES_FILE).read_bytes()
    with pytest.raises(LakeadError, match="earlier run"):  # neither --resume nor --overwrite: refused
        predict_to_dir(detector, [src], out, maps="none")
    replaced = predict_to_dir(detector, [src], out, maps="none", overwrite=True)
    assert replaced.scored == 5 and (out / SCORES_FILE).read_bytes() == before


def test_two_runs_cannot_write_to_one_directory(detector, tmp_path):
    from lakead.batch import OutputDir, run_info

    src = make_images(tmp_path / "in", 2)
    info = run_info("tile", "t", "f", 1.0, "float32", ["npy"])
    with OutputDir(tmp_path / "out", info):
        with pytest.raises(LakeadError, match="another lakead predict is writing to this directory"):
            predict_to_dir(detector, [src], tmp_path / "out", overwrite=True)
    assert predict_to_dir(detector, [src], tmp_path / "out", maps="none", overwrite=True).scored == 2  # free again


def test_unreadable_inputs_are_reported_on_every_run(detector, images, reference, tmp_path):
    out = tmp_path / "out"
    partial_copy(reference, out, len((reference / SCORES_FILE).read_bytes()))  # everything scored already
    seen = []
    summary = predict_to_dir(detector, [images], out, resume=True, on_error=lambda p, e: seen.append(p))
    assert summary == BatchSummary(scored=0, anomalous=0, failed=1, skipped=31, threshold=detector.threshold_)
    assert seen == [str(images / "part001" / "broken.png")]
    assert (out / "errors.csv").read_bytes() == (reference / "errors.csv").read_bytes()


# -- memory -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_images(model_dir, tmp_path):
    """Resident memory, sampled after every batch of a 1200-image run, stays flat.

    Keeping each image's map (64 x 64 float32) would add 14 MB over the 900 images after
    the first quarter, and keeping the decoded images 11 MB; the allowance is 4 MB. The
    images lie in folders of 100 because listing holds one folder's file names at a time.
    """
    src = make_images(tmp_path / "in", 1200, size=64)
    det = LakeDetector.load(model_dir, batch_size=32)  # fewer, larger batches: the same streaming, a faster test
    page = os.sysconf("SC_PAGE_SIZE")
    samples: list[tuple[int, int]] = []
    done = 0

    def sample(n: int) -> None:
        nonlocal done
        done += n
        with open("/proc/self/statm") as fh:
            samples.append((done, int(fh.read().split()[1]) * page))

    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc/self/statm (Linux) to read resident memory")
    summary = predict_to_dir(det, [src], tmp_path / "out", maps="none", on_progress=sample)
    assert summary.scored == 1200
    after_warmup = next(rss for n, rss in samples if n >= 300)
    growth = max(rss for _, rss in samples) - after_warmup
    assert growth < 4 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MB from image 300 to 1200"


# -- the command line -------------------------------------------------------------------------

runner = CliRunner()


def flat(text: str) -> str:
    """Console output with the panel borders and line wrapping taken out."""
    return " ".join(text.replace("│", " ").split())


def test_cli_maps_resume_and_usage_errors(model_dir, tmp_path):
    src = make_images(tmp_path / "in", 6)
    out = tmp_path / "out"
    r = runner.invoke(app, ["predict", str(model_dir), str(src), "--out", str(out), "--maps", "none"])
    assert r.exit_code == 0, r.output
    assert not (out / "overlays").exists() and not (out / "maps").exists()
    r = runner.invoke(app, ["predict", str(model_dir), str(src), "--out", str(out), "--maps", "none", "--resume"])
    assert r.exit_code == 0 and "scored 0 image(s) (6 already in scores.csv, skipped)" in r.output
    r = runner.invoke(app, ["predict", str(model_dir), str(src), "--out", str(out), "--maps", "jpg"])
    assert r.exit_code == 2 and "--maps: 'jpg' is not one of none, png, npy or png,npy" in flat(r.output)
    r = runner.invoke(app, ["predict", str(model_dir), str(src), "--out", str(out), "--ray-address", "auto"])
    assert r.exit_code == 2 and "--ray-address/--ray-workers: only used with --ray" in flat(r.output)


def test_cli_ctrl_c_says_how_to_go_on(model_dir, tmp_path, monkeypatch):
    import lakead.batch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lakead.batch, "predict_to_dir", interrupted)
    src = make_images(tmp_path / "in", 2)
    r = runner.invoke(app, ["predict", str(model_dir), str(src), "--out", str(tmp_path / "out")])
    assert r.exit_code == 130 and "run the same command with --resume" in r.stderr
