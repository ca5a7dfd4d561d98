"""Operations that recreate an entry (and its subtree) on the replica from the local tree.

Used when an entry crosses the exclusion boundary (moved from an excluded place into a replicated
one). A file with several names is copied once: its other names in the copied tree are linked to
that copy, and a name the replica already has elsewhere (`linked_name`) is linked instead of copied,
so hard links stay hard links there. Device nodes are skipped (they are never replicated).
"""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Callable, Iterator

from . import messages as m
from .exclude import Excluder

# Handle ids for copies, far above any descriptor number the FUSE layer uses as a handle id.
_hids = itertools.count(1 << 62)


def _xattrs(root: int, path: bytes) -> Iterator[m.Op]:
    target = b"/proc/self/fd/%d/%s" % (root, path)
    try:
        names = os.listxattr(target, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        try:
            value = os.getxattr(target, name, follow_symlinks=False)
        except OSError:
            continue
        yield m.SetXattr(0, path, os.fsencode(name), value)


def _file_ops(root: int, path: bytes, st: os.stat_result) -> Iterator[m.Op]:
    hid = next(_hids)
    yield m.Create(0, path, st.st_mode, st.st_uid, st.st_gid, hid=hid)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
    try:
        off = 0
        while chunk := os.pread(fd, m.MAX_CHUNK, off):
            if chunk.count(0) != len(chunk):  # leave holes as holes
                yield m.Write(0, hid, off, chunk)
            off += len(chunk)
        if off:
            yield m.SetAttr(0, path, hid=hid, size=off)
    finally:
        os.close(fd)
    yield from _xattrs(root, path)
    yield m.Close(0, hid, **m.wire_times(st))


# A replicated name, outside the tree being copied, of the file `path` whose stat is given; or None.
LinkedName = Callable[[bytes, os.stat_result], bytes | None]


def tree_ops(root: int, path: bytes, exclude: Excluder | None = None,
             linked_name: LinkedName | None = None, copied: dict[int, bytes] | None = None) -> Iterator[m.Op]:
    """Ops creating `path` as it is now under `root` (nothing if it does not exist). `copied`
    (st_ino -> path) is shared by calls whose ops go out together: a file copied by one is linked
    by the next."""
    yield from _tree_ops(root, path, exclude, linked_name, {} if copied is None else copied)


def _tree_ops(root: int, path: bytes, exclude: Excluder | None, linked_name: LinkedName | None,
              copied: dict[int, bytes]) -> Iterator[m.Op]:
    try:
        st = os.stat(path, dir_fd=root, follow_symlinks=False)
    except FileNotFoundError:
        return
    kind = stat.S_IFMT(st.st_mode)
    if exclude is not None and exclude.excluded(path, kind == stat.S_IFDIR):
        return
    if kind == stat.S_IFREG:
        other = None
        if st.st_nlink > 1:
            other = copied.get(st.st_ino) or (linked_name(path, st) if linked_name is not None else None)
        if other is not None:
            yield m.Link(0, other, path)
        else:
            copied[st.st_ino] = path
            yield from _file_ops(root, path, st)
    elif kind == stat.S_IFDIR:
        yield m.Mkdir(0, path, st.st_mode, st.st_uid, st.st_gid)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
        try:
            names = sorted(map(os.fsencode, os.listdir(fd)))
        finally:
            os.close(fd)
        for name in names:
            yield from _tree_ops(root, path + b"/" + name, exclude, linked_name, copied)
        yield from _xattrs(root, path)
        yield m.SetAttr(0, path, **m.wire_times(st))
    elif kind == stat.S_IFLNK:
        yield from m.symlink_ops(path, os.readlink(path, dir_fd=root), st)
    elif kind in (stat.S_IFIFO, stat.S_IFSOCK):
        yield m.Mknod(0, path, st.st_mode, 0, st.st_uid, st.st_gid)
