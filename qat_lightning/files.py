"""Atomic file writes with ordinary permissions, shared by every layer (plain Python, no torch).

A report is written to a temporary file in the target's folder, then renamed onto its final name with
``os.replace``: a reader sees the old file or the new one, never half of one, and a failed write leaves the
old file intact. ``tempfile.mkstemp`` creates its file with mode ``0600``; :func:`write_atomic` gives the
result the mode a plain ``open(path, "w")`` would (``0666`` minus the umask: ``0644`` under umask ``022``),
or keeps the mode of the file it replaces.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["default_file_mode", "write_atomic"]


def default_file_mode() -> int:
    """Return the mode ``open(path, "w")`` gives a new file: ``0o666`` minus the process umask."""
    umask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` via a temporary file and ``os.replace``.

    Creates the parent folders. The file gets the mode of the file it replaces, else
    :func:`default_file_mode`.

    Args:
        path: the file to write.
        data: its new content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = default_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename: a crash leaves the old file or the new
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target
