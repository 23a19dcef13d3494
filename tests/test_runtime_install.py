"""The runtime-only install (issue 25, Medium 1): the documented commands are the ones CI runs
(.ci/runtime-install runs docs/DEPLOY.md's block as written) and install the "runtime" extra;
``lakead-runtime predict --overwrite`` replaces an earlier run; on such an install the ``lakead``
command says what to install instead of a ModuleNotFoundError."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import texture
from lakead import LakeDetector
from lakead import __main__ as entry
from lakead.runtime_cli import main as runtime_main

ROOT = Path(__file__).resolve().parents[1]


def deploy_block() -> list[str]:
    """The command lines between DEPLOY.md's ``ci: runtime-install`` markers (what CI runs)."""
    text = (ROOT / "docs" / "DEPLOY.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- ci: runtime-install.*?```bash\n(.*?)```\n<!-- /ci -->", text, re.S)
    assert block, "docs/DEPLOY.md: no ci: runtime-install block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_documented_install_is_the_runtime_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    lines = deploy_block()
    assert lines[0] == "pip wheel --no-deps -w dist ." and lines[1] == "pip install --no-deps dist/lakead-*.whl"
    installed = sorted(w.strip('"') for w in lines[2].removeprefix("pip install ").split())
    assert installed == sorted(meta["project"]["optional-dependencies"]["runtime"])
    assert meta["project"]["scripts"]["lakead"] == "lakead.__main__:main"


def test_the_readme_gives_the_same_lines_and_ci_runs_them():
    readme = [line.split("#")[0].strip() for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()]
    for line in deploy_block():
        assert line in readme, line
    assert "pip install --no-deps lakead " not in (ROOT / "README.md").read_text(encoding="utf-8")
    assert ".ci/runtime-install" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "docs/DEPLOY.md" in (ROOT / ".ci" / "runtime-install").read_text(encoding="utf-8")


def test_lakead_on_a_runtime_only_install_says_what_to_install(monkeypatch, capsys):
    real = entry.importlib.util.find_spec
    monkeypatch.setattr(entry.importlib.util, "find_spec", lambda name: None if name in ("typer", "torch") else real(name))
    with pytest.raises(SystemExit) as e:
        entry.main()
    assert e.value.code == 1
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and "typer, torch not installed" in msg
    assert "pip install -e ." in msg and "lakead-runtime predict" in msg


def test_python_m_lakead_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "lakead", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "fit" in done.stdout


@pytest.fixture(scope="module")
def exported(tiny_backbone, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from lakead.export import export_model

    rng = np.random.default_rng(4)
    det = LakeDetector(tiny_backbone, k=8, layer=2).fit([texture(rng) for _ in range(4)], "tile")
    root = tmp_path_factory.mktemp("rt")
    images = root / "images"
    images.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(texture(rng)).save(images / f"{i}.png")
    return export_model(det, root / "exported"), images


def test_runtime_predict_takes_overwrite(exported, tmp_path, capsys):
    model, images = exported
    out = tmp_path / "res"
    assert runtime_main(["predict", str(model), str(images), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert runtime_main(["predict", str(model), str(images), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert runtime_main(["predict", str(model), str(images), "--out", str(out), "--overwrite", "--maps", "none"]) == 0
    assert not (out / "maps").exists() and (out / "notes.txt").read_text() == "mine"
    assert len((out / "scores.csv").read_text().splitlines()) == 4
    with pytest.raises(SystemExit) as e:  # one or the other
        runtime_main(["predict", str(model), str(images), "--out", str(out), "--overwrite", "--resume"])
    assert e.value.code == 2


def test_the_readme_offers_the_cpu_build_of_the_same_torch():
    """Issue 25, Medium 2: one line for CPU-only users, from PyTorch's CPU index, pinning the
    torch that the README's main command (run by CI as written) installs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    main_pin = re.search(r"pip install (?:-q )?(torch==[\d.]+) -e \.", ci).group(1)
    assert f"pip install {main_pin} -e . && lakead demo" in readme  # the main command, unchanged
    cpu = [line for line in readme.splitlines() if "download.pytorch.org/whl/cpu" in line]
    assert cpu == [f"python -m venv .venv && . .venv/bin/activate && pip install {main_pin} "
                   "--index-url https://download.pytorch.org/whl/cpu"]
