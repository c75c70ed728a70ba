"""Atomic writes: the target appears whole or not at all, and errors name the target."""

from __future__ import annotations

import errno
import os

import pytest

from attnc import atomic


def test_write_replaces_whole_and_keeps_mode(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    os.chmod(p, 0o755)
    atomic.write_text(p, "new")
    assert p.read_text() == "new" and (p.stat().st_mode & 0o777) == 0o755
    assert [q.name for q in tmp_path.iterdir()] == ["a.txt"]  # no temp file left


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["a.txt"]


def test_missing_folder_names_the_folder_not_the_temp_file(tmp_path):
    target = tmp_path / "no" / "a.txt"
    with pytest.raises(FileNotFoundError) as e:
        atomic.write_text(target, "x")
    assert e.value.errno == errno.ENOENT and e.value.filename == str(tmp_path / "no")
    assert ".tmp" not in str(e.value)


def test_directory_target_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError):
        atomic.write_text(tmp_path, "x")
