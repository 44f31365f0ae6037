"""Files that survive a power cut once a database row says they exist.

A rename or a commit elsewhere is durable long before the page cache reaches the disk: after a crash a model's
folder can be there, its row committed, and ``weights.pt`` empty. The checksum would refuse it, but the serving
version would be gone with it. So what a row will point at is synced first, and the folder entry after a rename.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def sync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def sync_dir(path: Path) -> None:
    """The folder's entries (a file created or renamed in it); a no-op where folders cannot be opened (Windows) or
    synced (some network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some network file systems (a ReadWriteMany volume) refuse it on a folder: best effort
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise  # EIO and the like: the data did not reach the disk, and the caller must hear it
    finally:
        os.close(fd)


def sync_tree(directory: Path) -> None:
    """Every file under ``directory``, each folder's entries, and ``directory`` itself."""
    for root, _, files in os.walk(directory):
        for name in files:
            sync_file(Path(root) / name)
        sync_dir(Path(root))


def write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` whole or not at all: a crash, a power cut included, leaves the old file or none,
    never half of one. Synced before the rename and the folder after it: a row committed next (a drift report's)
    must not point at a file the page cache lost, and a simulated gateway's counter must not go back."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    sync_file(tmp)
    tmp.replace(path)
    sync_dir(path.parent)
