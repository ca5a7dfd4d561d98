"""Exclude patterns (ReplicationConfig.exclude): which relative paths are not replicated.

Semantics, close to .gitignore so users guess right:
- `name/` (trailing slash): a directory called `name` at any depth, and everything under it;
- `*.tmp` (no slash): any entry whose name matches, at any depth, and everything under it;
- `cache/*.bin` or `/cache` (a slash inside or in front): matched against the whole relative path
  from the replicated root, and everything under a matching entry.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[bytes]
    anchored: bool
    dirs_only: bool


def check_pattern(pattern: str) -> None:
    """Raise ValueError, in words for the cluster file, if `pattern` is unusable (config validation
    calls it too, so that a file that passes never fails when replication starts)."""
    if not pattern.strip("/"):
        raise ValueError(f"empty exclude pattern {pattern!r}: name what to leave out (tmp/, *.tmp)")
    if {"", ".", ".."} & set(pattern.strip("/").split("/")):
        # Relative paths from the root never hold an empty, . or .. name: the pattern would match nothing.
        raise ValueError(f"exclude pattern {pattern!r} has an empty, '.' or '..' component: write the path "
                         "from the replicated directory down (cache/*.bin)")


def _compile(pattern: str) -> _Pattern:
    check_pattern(pattern)
    dirs_only = pattern.endswith("/")
    body = pattern.strip("/")
    anchored = "/" in pattern.rstrip("/")
    return _Pattern(re.compile(fnmatch.translate(body).encode()), anchored, dirs_only)


class Excluder:
    def __init__(self, patterns: list[str] | tuple[str, ...] = ()) -> None:
        self.patterns = tuple(patterns)
        self._patterns = tuple(_compile(p) for p in patterns)

    def __bool__(self) -> bool:
        return bool(self._patterns)

    @property
    def path_dependent(self) -> bool:
        """Some pattern matches a whole path (`cache/*.bin`): renaming a directory can then change
        whether entries below it are excluded, not only the directory itself."""
        return any(p.anchored for p in self._patterns)

    def excluded(self, path: bytes, is_dir: bool = False) -> bool:
        """True if `path` (relative, b"" is the root) or one of its ancestors matches a pattern.
        `is_dir` says whether the last component is a directory (ancestors always are)."""
        if not self._patterns or not path:
            return False
        parts = path.split(b"/")
        last = len(parts) - 1
        for pat in self._patterns:
            for i, part in enumerate(parts):
                if pat.dirs_only and i == last and not is_dir:
                    break
                subject = b"/".join(parts[:i + 1]) if pat.anchored else part
                if pat.regex.fullmatch(subject):
                    return True
        return False
