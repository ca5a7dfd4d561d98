"""State files written so that a power loss leaves the old or the new content, never an empty or
missing file where one was written: the module state (store.py), the markers of replication
(protect.py, journal.py) that decide what the next resync compares."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(folder: Path) -> None:
    """Make the entries of `folder` (a file created, renamed or removed there) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, content: str | bytes, mode: int = 0o600, tmp: Path | None = None) -> None:
    """`path` holds `content`: written to a temporary file beside it (`tmp`, default `<name>.tmp`),
    synced, renamed over it, and the rename synced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or path.with_name(path.name + ".tmp")
    data = content.encode() if isinstance(content, str) else content
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(path.parent)
