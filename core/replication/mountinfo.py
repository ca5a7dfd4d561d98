"""/proc/self/mountinfo, read without touching any mounted file system: safe from the event loop
that serves a FUSE mount (resolving a path could ask that very mount)."""

from __future__ import annotations

import re
from pathlib import Path


def entries() -> list[list[bytes]]:
    """The fields of every line, the mount point (field 4) unescaped; [] if it cannot be read."""
    try:
        lines = Path("/proc/self/mountinfo").read_bytes().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6:
            fields[4] = unescape(fields[4])
            out.append(fields)
    return out


def unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040...)."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def mounts_below(directory: bytes) -> list[bytes]:
    """Mount points strictly inside `directory` (an absolute path without symlinks), sorted."""
    prefix = directory.rstrip(b"/") + b"/"
    return sorted({f[4] for f in entries() if f[4].startswith(prefix)})
