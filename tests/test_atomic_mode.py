"""Outputs honour the umask, like a plain open() / mkdir() (mkstemp alone would give 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from cscr.atomic import atomic_dir, atomic_write_json, atomic_write_text


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                            (0o002, 0o664, 0o775)])
def test_outputs_honour_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(plain) == file_mode  # what the user expects from any program
    assert _mode(atomic_write_text(tmp_path / "a.txt", "x")) == file_mode
    assert _mode(atomic_write_json(tmp_path / "b.json", {"a": 1})) == file_mode
    folder = atomic_dir(tmp_path / "folder", lambda d: (d / "f.txt").write_text("y"))
    assert _mode(folder) == dir_mode and _mode(folder / "f.txt") == file_mode


def test_explicit_folder_mode_wins(tmp_path, umask):
    umask(0o077)
    assert _mode(atomic_dir(tmp_path / "m", lambda d: None, mode=0o755)) == 0o755


def test_replacing_a_file_keeps_the_umask_mode(tmp_path, umask):
    umask(0o022)
    p = atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and _mode(p) == 0o644
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]  # no temporary left behind
