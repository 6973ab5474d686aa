"""Writing a file or a folder so that a reader sees the old version or the new one, never half.

The one place for it: the run directory (``config.yaml``, ``metrics.jsonl``, the adapter,
checkpoints, ``report.html``), the exports and the site's privacy ledger all write through
these two functions. The standard library has the pieces (``tempfile``, ``os.replace``,
``os.fsync``) but no function that puts them together; nothing in the stack provides one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_write_text", "replace_dir"]


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically and durably.

    The text goes to a temporary file in the same folder, is flushed and fsynced, then moved
    over ``path`` with ``os.replace`` (atomic on POSIX); the folder is fsynced so that the
    rename survives a crash too. On failure the temporary file is removed and ``path`` is
    untouched.
    """
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing an older ``final``.

    The older folder is renamed aside (``.NAME.old``) before the new one is renamed in and
    removed after, so ``final`` is at every moment absent for at most the gap between two
    renames, and never half-written.
    """
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
