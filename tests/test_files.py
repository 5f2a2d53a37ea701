"""qat_lightning.files.write_atomic: whole files, ordinary modes, the old file kept on failure."""

from __future__ import annotations

import os
import stat

import pytest

from qat_lightning.files import default_file_mode, write_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_new_file_gets_0644_under_umask_022(tmp_path, umask_022):
    path = write_atomic(tmp_path / "sub" / "report.md", "hello\n")
    assert path.read_text() == "hello\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert default_file_mode() == 0o644


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        path = write_atomic(tmp_path / "private.txt", b"\x00\x01")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes() == b"\x00\x01"


def test_replacing_keeps_the_existing_mode_and_leaves_no_temp_file(tmp_path, umask_022):
    path = tmp_path / "summary.md"
    path.write_text("old")
    os.chmod(path, 0o640)
    write_atomic(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.md"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_atomic(path, object())  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]
