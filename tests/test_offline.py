"""Without network: a backbone given as a hub id that is not cached fails at once with one
message naming every way to give a backbone (no retries, no progress bar); a cached one is
read from the cache alone (issue 15, item 2). The network is never used: the hub is switched
off with HF_HUB_OFFLINE, or pointed at a closed local port."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lakead.backbones import hub
from lakead.errors import BackboneUnavailableError

from _synthetic import write_category

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


def _lakead(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    full = {**os.environ, "COLUMNS": "200", **env}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        if name not in env:
            full.pop(name, None)
    return subprocess.run([sys.executable, "-m", "lakead.cli", *args], capture_output=True, text=True, env=full, cwd=cwd)


@pytest.mark.parametrize("offline", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": CLOSED_PORT}], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_fit_without_network_fails_with_one_message(tmp_path, offline):
    cat = write_category(tmp_path / "data", "thing", n_train=2)
    env = {"HF_HOME": str(tmp_path / "hf"), **offline}  # an empty cache
    done = _lakead(["fit", str(cat / "train" / "good"), "-c", "thing", "-o", str(tmp_path / "m")], env, tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("error:") == 1
    message = done.stderr
    assert "openai/clip-vit-large-patch14-336" in message  # the hub id
    assert "download-backbone" in message and "save_pretrained" in message  # a local directory
    assert "onnx:" in message and "python -m lakead.testing tiny" in message
    assert ("HF_HUB_OFFLINE is set" if "HF_HUB_OFFLINE" in offline else "cannot reach http://127.0.0.1:9") in message
    assert "Retry" not in done.stderr and "fit " not in done.stderr  # no hub retries, no progress bar
    assert not (tmp_path / "m").exists()


@pytest.mark.slow  # a fit in a fresh process (imports torch)
def test_a_cached_hub_model_is_read_offline(tmp_path, tiny_clip_dir):
    """A hub id in the cache (laid out as huggingface_hub writes it) loads with the hub switched off."""
    snapshot = tmp_path / "hf" / "hub" / "models--lakead--tiny-clip" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_clip_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    cat = write_category(tmp_path / "data", "thing", n_train=3)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": CLOSED_PORT}
    done = _lakead(["-q", "fit", str(cat / "train" / "good"), "-c", "thing", "-o", str(tmp_path / "m"),
                    "--backbone", "lakead/tiny-clip"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Retry" not in done.stderr
    assert '"source": "lakead/tiny-clip"' in (tmp_path / "m" / "lakead.json").read_text()


def test_offline_reason(monkeypatch):
    monkeypatch.setattr(hub, "_checked", {})
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline_reason() == "HF_HUB_OFFLINE is set"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    assert hub.offline_reason().startswith("cannot reach http://127.0.0.1:9")
    monkeypatch.setenv("HF_ENDPOINT", "not a url")
    assert "not a URL" in hub.offline_reason()


def test_hub_options(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "_checked", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_options(str(tmp_path)) == {}  # a local directory never asks the hub
    monkeypatch.setattr(hub, "is_cached", lambda repo: repo == "org/cached")
    assert hub.hub_options("org/cached") == {"local_files_only": True}
    with pytest.raises(BackboneUnavailableError, match="org/missing.*HF_HUB_OFFLINE is set"):
        hub.hub_options("org/missing")
    with pytest.raises(BackboneUnavailableError, match="no such folder"):
        hub.hub_options("./not-here/clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "_checked", {hub.endpoint(): None})  # reachable: transformers decides
    assert hub.hub_options("org/missing") == {}
