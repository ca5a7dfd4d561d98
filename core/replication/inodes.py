"""FUSE inode bookkeeping: which relative paths name each inode the kernel knows, and its lookup count.

Pure data structure (no I/O) so renames, hard links and forgets are tested on their own. FUSE inode
numbers are the backing st_ino, except that the replicated root is ROOT_INODE (1) and whatever file
backs st_ino 1 takes the root's backing number instead (a bijection, so no collision).
"""

from __future__ import annotations

from collections.abc import Callable

ROOT = 1


def fuse_ino(st_ino: int, root_st_ino: int) -> int:
    if st_ino == root_st_ino:
        return ROOT
    if st_ino == ROOT:
        return root_st_ino
    return st_ino


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def is_under(path: bytes, top: bytes) -> bool:
    return path == top or path.startswith(top + b"/")


class Inodes:
    def __init__(self, prefer: Callable[[bytes], bool] | None = None) -> None:
        self._paths: dict[int, list[bytes]] = {ROOT: [b""]}
        self._by_path: dict[bytes, int] = {b"": ROOT}
        self._lookups: dict[int, int] = {ROOT: 1}  # the kernel never forgets the root
        self._prefer = prefer

    def path(self, ino: int) -> bytes | None:
        """One current path of `ino`, None if every name of it was removed: the first name known
        that `prefer` accepts (the FUSE layer prefers replicated names, so that a change made
        through an excluded hard link of a replicated file still reaches the replica), else the
        first one."""
        paths = self._paths.get(ino)
        if not paths:
            return None
        if len(paths) > 1 and self._prefer is not None:
            for p in paths:
                if self._prefer(p):
                    return p
        return paths[0]

    def paths(self, ino: int) -> list[bytes]:
        return list(self._paths.get(ino, ()))

    def names(self) -> list[tuple[bytes, int]]:
        """Every (path, inode) the table holds."""
        return list(self._by_path.items())

    def ino_of(self, path: bytes) -> int | None:
        return self._by_path.get(path)

    def known(self, ino: int) -> bool:
        return ino in self._lookups

    def lookup(self, ino: int, path: bytes) -> None:
        """The kernel learnt `ino` under `path` (lookup, create, mkdir, readdirplus...): count it."""
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        self.add_path(ino, path)

    def add_path(self, ino: int, path: bytes) -> None:
        old = self._by_path.get(path)
        if old == ino:
            return
        if old is not None:
            self._drop_path(old, path)
        self._paths.setdefault(ino, []).append(path)
        self._by_path[path] = ino

    def remove_path(self, path: bytes, is_dir: bool = False) -> None:
        """An entry was unlinked or removed: forget the name (and, for a directory, what was under it).
        Only directories pay for the scan of known paths, so unlinking many files stays linear."""
        ino = self._by_path.get(path)
        if ino is not None:
            self._drop_path(ino, path)
        if is_dir:
            for sub in [p for p in self._by_path if p.startswith(path + b"/")]:
                self._drop_path(self._by_path[sub], sub)

    def rename(self, old: bytes, new: bytes, is_dir: bool = False) -> None:
        """`old` now lives at `new` (replacing whatever was there: a file or an empty directory),
        with its descendants when it is a directory."""
        self.remove_path(new)
        if not is_dir:
            ino = self._by_path.get(old)
            if ino is not None:
                self._drop_path(ino, old)
                self.add_path(ino, new)
            return
        moved = [(p, i) for p, i in self._by_path.items() if is_under(p, old)]
        for p, i in moved:
            self._drop_path(i, p)
        for p, i in moved:
            self.add_path(i, new + p[len(old):])

    def exchange(self, a: bytes, b: bytes) -> None:
        """RENAME_EXCHANGE: the entries (and subtrees) at `a` and `b` swap names."""
        under_a = [(p, i) for p, i in self._by_path.items() if is_under(p, a)]
        under_b = [(p, i) for p, i in self._by_path.items() if is_under(p, b)]
        for p, i in under_a + under_b:
            self._drop_path(i, p)
        for p, i in under_a:
            self.add_path(i, b + p[len(a):])
        for p, i in under_b:
            self.add_path(i, a + p[len(b):])

    def forget(self, ino: int, count: int) -> None:
        if ino == ROOT:
            return
        left = self._lookups.get(ino, 0) - count
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        for p in self._paths.pop(ino, []):
            if self._by_path.get(p) == ino:
                del self._by_path[p]

    def _drop_path(self, ino: int, path: bytes) -> None:
        paths = self._paths.get(ino)
        if paths and path in paths:
            paths.remove(path)
        if self._by_path.get(path) == ino:
            del self._by_path[path]

    def __len__(self) -> int:
        return len(self._lookups)
