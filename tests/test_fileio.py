"""Atomic writes: complete or absent, with the usual permissions."""

from __future__ import annotations

import os
import stat

import pytest

from lakead.fileio import DIR_MODE, FILE_MODE, atomic_directory, atomic_write_bytes, atomic_write_text


def test_atomic_write_replaces_and_has_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(os.stat(target).st_mode) == FILE_MODE
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_atomic_directory_success_failure_and_replace(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "x").write_text("1")
    assert (target / "x").read_text() == "1"
    assert stat.S_IMODE(os.stat(target).st_mode) == DIR_MODE
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("boom")
    assert (target / "x").read_text() == "1"  # the old one is untouched
    with atomic_directory(target) as tmp:
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left
    with pytest.raises(FileExistsError):
        with atomic_directory(target, overwrite=False):
            pass
