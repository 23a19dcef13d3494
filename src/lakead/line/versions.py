"""Versions of a model directory: every update is a new version, any version can be restored.

Layout (the model directory stays what :func:`lakead.methods.load_detector` reads)::

    MODEL/lakead.json, MODEL/tensors.safetensors     the current version
    MODEL/versions/<v>/lakead.json, tensors.safetensors   every version, 1 = the fit
    MODEL/versions/history.json                       what each version is; which is current

The current version's files are hard links to its files under ``versions/`` (copies where the
file system has no hard links), so a version costs its own tensors once and a rollback gives the
version's files back byte for byte. Every change (:func:`write_version`, :func:`rollback`)
builds the whole directory under a temporary name, the earlier versions linked into it, and
swaps it in at once (:func:`lakead.fileio.atomic_directory`): a reader sees the old directory
or the new one, never a mix, and a killed update leaves the model as it was. Writers of models
in one folder take turns (a lock on that folder). Files in the model directory that lakead did
not write are carried over into each new directory.

A reader that must not mix two versions (a running ``watch`` or service) loads
:func:`current` 's version directory, whose files never change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..api import CONFIG_FILE, TENSORS_FILE, finite_or_none, read_model_meta
from ..errors import ConfigError, ModelFormatError
from ..fileio import atomic_directory, write_error

VERSIONS = "versions"
HISTORY = "history.json"
MODEL_FILES = (CONFIG_FILE, TENSORS_FILE)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _writer_lock(model_dir: Path) -> Iterator[None]:
    """One writer at a time for the models of ``model_dir``'s folder (``flock`` on the folder)."""
    parent = model_dir.resolve().parent
    try:
        fd = os.open(parent, os.O_RDONLY)
    except OSError as exc:
        raise write_error(model_dir, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_history(model_dir: str | Path) -> dict[str, Any]:
    """``{"current": v, "versions": [entry, ...]}`` of a model directory. A model that was never
    updated has one version, 1, the fit (described from its ``lakead.json``)."""
    p = Path(model_dir)
    meta = read_model_meta(p)  # a clear error when it is no model
    f = p / VERSIONS / HISTORY
    if not f.is_file():
        return {"current": 1, "versions": [_fit_entry(meta)]}
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not isinstance(doc.get("versions"), list) or not isinstance(doc.get("current"), int):
            raise ValueError("expected {'current': int, 'versions': [...]}")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFormatError(f"{f}: cannot be read ({exc})") from None
    return doc


def _fit_entry(meta: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "parent": None, "action": "fit", "time": meta.get("fitted_at"), "by": None,
            "added": list(meta.get("support") or []), "support": len(meta.get("support") or []),
            "threshold_before": None, "threshold_after": meta.get("threshold")}


def current(model_dir: str | Path) -> tuple[int, Path]:
    """The current version's number and a directory holding its files that no later write
    changes (``versions/<v>``; the model directory itself for a model never updated)."""
    p = Path(model_dir)
    hist = read_history(p)
    v = int(hist["current"])
    d = p / VERSIONS / str(v)
    return v, (d if d.is_dir() else p)


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a tree of hard links to ``src``'s files (copies where links cannot be made)."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link, symlinks=True)


def _rebuild(model_dir: Path, tmp: Path, hist: dict[str, Any], exclude: set[str]) -> None:
    """Into the new directory ``tmp``: the earlier versions (linked), and what else the model
    directory holds that lakead did not write (carried over)."""
    old_versions = model_dir / VERSIONS
    (tmp / VERSIONS).mkdir(exist_ok=True)
    if old_versions.is_dir():
        for child in old_versions.iterdir():
            if child.name in exclude or child.name == HISTORY or child.name.startswith("."):
                continue
            if child.is_dir():
                _link_tree(child, tmp / VERSIONS / child.name)
    else:  # first version written: the fit becomes version 1
        first = tmp / VERSIONS / "1"
        first.mkdir()
        for name in MODEL_FILES:
            _link_tree_file(model_dir / name, first / name)
    for child in model_dir.iterdir():  # anything else: carried over
        if child.name in MODEL_FILES or child.name == VERSIONS or (tmp / child.name).exists():
            continue
        if child.is_dir() and not child.is_symlink():
            _link_tree(child, tmp / child.name)
        else:
            _link_tree_file(child, tmp / child.name)


def _link_tree_file(a: Path, b: Path) -> None:
    if a.is_symlink():
        os.symlink(os.readlink(a), b)
        return
    try:
        os.link(a, b)
    except OSError:
        shutil.copy2(a, b)


def _write_history(tmp: Path, hist: dict[str, Any]) -> None:
    (tmp / VERSIONS / HISTORY).write_text(json.dumps(hist, indent=2) + "\n", encoding="utf-8")


def _make_current(tmp: Path, v: int) -> None:
    for name in MODEL_FILES:
        _link_tree_file(tmp / VERSIONS / str(v) / name, tmp / name)


def write_version(model_dir: str | Path, det: Any, *, action: str, added: list[str] | None = None, by: str | None = None,
                  threshold_before: float | None = None, threshold_after: float | None = None) -> int:
    """Save the fitted ``det`` as a new version of the model in ``model_dir`` and make it the
    current one (the module docstring says how). Returns its number."""
    p = Path(model_dir)
    with _writer_lock(p):
        hist = read_history(p)
        v = max(int(e["version"]) for e in hist["versions"]) + 1
        with atomic_directory(p) as tmp:
            _rebuild(p, tmp, hist, exclude={str(v)})
            det.save(tmp / VERSIONS / str(v))
            _make_current(tmp, v)
            hist["versions"].append({
                "version": v, "parent": hist["current"], "action": action, "time": _now(), "by": by,
                "added": list(added or []), "support": len(det.state_.support),
                "threshold_before": None if threshold_before is None else finite_or_none(float(threshold_before)),
                "threshold_after": None if threshold_after is None else finite_or_none(float(threshold_after)),
            })
            hist["current"] = v
            _write_history(tmp, hist)
    return v


def rollback(model_dir: str | Path, version: int, *, by: str | None = None) -> dict[str, Any]:
    """Make ``version`` the current one again: the model directory's files become that version's,
    byte for byte (a new history entry says so; no version is removed). Returns the entry."""
    p = Path(model_dir)
    with _writer_lock(p):
        hist = read_history(p)
        known = {int(e["version"]): e for e in hist["versions"]}
        if version not in known:
            raise ConfigError(f"{p}: has no version {version} (versions: {', '.join(map(str, sorted(known)))})")
        if not (p / VERSIONS / str(version)).is_dir() and version != 1:
            raise ModelFormatError(f"{p / VERSIONS / str(version)}: the files of version {version} are missing")
        entry = {"action": "rollback", "version": version, "from": hist["current"], "time": _now(), "by": by}
        if version == hist["current"]:
            return entry
        with atomic_directory(p) as tmp:
            _rebuild(p, tmp, hist, exclude=set())
            _make_current(tmp, version)
            hist.setdefault("rollbacks", []).append(entry)
            hist["current"] = version
            _write_history(tmp, hist)
    return entry
