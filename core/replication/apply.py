"""Applying replicated operations to the secondary's tree, through its directory descriptor only.

Every path goes through `paths` (no escape, no symlink followed); every open of an existing entry is
made with O_PATH first and checked to be a regular file before it is reopened for writing, so a FIFO
or a device node planted in the tree can neither block the receiver nor redirect a write.
An operation that fails here means the replica no longer matches the primary: the caller drops the
stream and the secondary must be resynchronised.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections.abc import Callable

from . import messages as m
from .paths import PathError, components, open_beneath, parent_dir
from .syscalls import fallocate, renameat2, syncfs
from .writebehind import WriteBehind

log = logging.getLogger(__name__)

MAX_HANDLES = 65536


def proc_path(fd: int) -> str:
    # The xattr calls and reopening refuse O_PATH descriptors; the magic link names the same object.
    return f"/proc/self/fd/{fd}"


def open_regular(root: int, path: bytes, flags: int) -> int:
    """Open an existing regular file for writing, never a FIFO, device, symlink or directory."""
    pfd = open_beneath(root, path, os.O_PATH | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(pfd).st_mode):
            raise PathError(f"{path!r} is not a regular file on the replica")
        return os.open(proc_path(pfd), flags | os.O_CLOEXEC)
    finally:
        os.close(pfd)


class Applier:
    """The receiving end of one replicated directory: applies operations in order and keeps the
    descriptors of files the primary has open for writing, by handle id."""

    def __init__(self, root_fd: int) -> None:
        self.root = root_fd
        self.handles: dict[int, int] = {}
        self._behind = WriteBehind(drop=True)  # nothing reads the replica: keep its page cache free
        self._dispatch: dict[type, Callable[[m.Op], None]] = {
            m.Noop: lambda op: None, m.Open: self._open, m.Close: self._close, m.Write: self._write,
            m.Create: self._create, m.Mkdir: self._mkdir, m.Mknod: self._mknod, m.Symlink: self._symlink,
            m.Link: self._link, m.Unlink: self._unlink, m.Rmdir: self._rmdir, m.Remove: self._remove,
            m.Rename: self._rename, m.SetAttr: self._setattr, m.SetXattr: self._setxattr,
            m.RemoveXattr: self._removexattr, m.Fallocate: self._fallocate, m.Fsync: self._fsync,
        }

    def apply(self, op: m.Op) -> None:
        """Apply one operation. PathError/ProtocolError: hostile or malformed; OSError: divergence."""
        self._dispatch[type(op)](op)

    def close(self) -> None:
        for fd in self.handles.values():
            os.close(fd)
        self.handles.clear()

    # ---- handles ----

    def _fd(self, hid: int) -> int:
        try:
            return self.handles[hid]
        except KeyError:
            raise m.ProtocolError(f"unknown handle {hid}") from None

    def _add_handle(self, hid: int, fd: int) -> None:
        if hid in self.handles or len(self.handles) >= MAX_HANDLES:
            os.close(fd)
            raise m.ProtocolError(f"handle {hid} already open or too many handles")
        self.handles[hid] = fd

    def _open(self, op: m.Open) -> None:
        self._add_handle(op.hid, open_regular(self.root, op.path, os.O_WRONLY))

    def _close(self, op: m.Close) -> None:
        fd = self._fd(op.hid)
        del self.handles[op.hid]
        self._behind.forget(fd)
        try:
            _set_times_fd(fd, op.atime_ns, op.mtime_ns)
        finally:
            os.close(fd)

    def _write(self, op: m.Write) -> None:
        fd = self._fd(op.hid)
        done = os.pwrite(fd, op.data, op.off)
        if done != len(op.data):
            # The rest once more: a full disk (or quota, or file size limit) then says so itself.
            done += os.pwrite(fd, memoryview(op.data)[done:], op.off + done)
            if done != len(op.data):
                raise OSError(errno.EIO, f"short write ({done} of {len(op.data)} bytes)")
        self._behind.wrote(fd, op.off, done)
        if op.sync:
            os.fdatasync(fd)

    # ---- namespace ----

    def _create(self, op: m.Create) -> None:
        with parent_dir(self.root, op.path) as (parent, name):
            # O_NONBLOCK: an existing FIFO must not block us; it is then refused as not regular.
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=parent)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PathError(f"{op.path!r} exists on the replica and is not a regular file")
            os.set_blocking(fd, True)
            os.fchown(fd, op.uid, op.gid)
            os.fchmod(fd, stat.S_IMODE(op.mode))  # after chown, which clears set-id bits
        except BaseException:
            os.close(fd)
            raise
        if op.hid is None:
            os.close(fd)
        else:
            self._add_handle(op.hid, fd)

    def _mkdir(self, op: m.Mkdir) -> None:
        with parent_dir(self.root, op.path) as (parent, name):
            os.mkdir(name, 0o700, dir_fd=parent)
            _own_and_mode(parent, name, op.uid, op.gid, op.mode)

    def _mknod(self, op: m.Mknod) -> None:
        kind = stat.S_IFMT(op.mode)
        if kind not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFREG):
            raise m.ProtocolError(f"mknod of type {kind:o} refused: device nodes are not replicated")
        with parent_dir(self.root, op.path) as (parent, name):
            os.mknod(name, kind | 0o600, dir_fd=parent)
            _own_and_mode(parent, name, op.uid, op.gid, op.mode)

    def _symlink(self, op: m.Symlink) -> None:
        if not op.target or b"\0" in op.target:
            raise m.ProtocolError("empty symlink target or NUL in it")
        with parent_dir(self.root, op.path) as (parent, name):
            os.symlink(op.target, name, dir_fd=parent)
            os.chown(name, op.uid, op.gid, dir_fd=parent, follow_symlinks=False)

    def _link(self, op: m.Link) -> None:
        with parent_dir(self.root, op.path) as (src, sname), parent_dir(self.root, op.new) as (dst, dname):
            os.link(sname, dname, src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)

    def _unlink(self, op: m.Unlink) -> None:
        with parent_dir(self.root, op.path) as (parent, name):
            os.unlink(name, dir_fd=parent)

    def _rmdir(self, op: m.Rmdir) -> None:
        with parent_dir(self.root, op.path) as (parent, name):
            os.rmdir(name, dir_fd=parent)

    def _remove(self, op: m.Remove) -> None:
        with parent_dir(self.root, op.path) as (parent, name):
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return  # already gone: Remove is idempotent (resync may send it blindly)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=parent)  # fd-based, does not follow symlinks
            else:
                os.unlink(name, dir_fd=parent)

    def _rename(self, op: m.Rename) -> None:
        with parent_dir(self.root, op.old) as (src, sname), parent_dir(self.root, op.new) as (dst, dname):
            renameat2(src, sname, dst, dname, op.flags)

    # ---- attributes ----

    def _setattr(self, op: m.SetAttr) -> None:
        if op.hid is not None and op.hid in self.handles:
            _setattr_fd(self.handles[op.hid], op)
            return
        if op.size is not None:
            fd = open_regular(self.root, op.path, os.O_WRONLY)
            try:
                _setattr_fd(fd, op)
            finally:
                os.close(fd)
            return
        pfd = open_beneath(self.root, op.path, os.O_PATH | os.O_NOFOLLOW)
        try:
            if stat.S_ISLNK(os.fstat(pfd).st_mode):
                _setattr_symlink(self.root, op)
            else:
                _setattr_fd(pfd, op, proc_path(pfd))
        finally:
            os.close(pfd)

    def _setxattr(self, op: m.SetXattr) -> None:
        pfd = open_beneath(self.root, op.path, os.O_PATH | os.O_NOFOLLOW)
        try:
            os.setxattr(proc_path(pfd), op.name, op.value, op.flags)
        finally:
            os.close(pfd)

    def _removexattr(self, op: m.RemoveXattr) -> None:
        pfd = open_beneath(self.root, op.path, os.O_PATH | os.O_NOFOLLOW)
        try:
            os.removexattr(proc_path(pfd), op.name)
        finally:
            os.close(pfd)

    # ---- data ----

    def _fallocate(self, op: m.Fallocate) -> None:
        fallocate(self._fd(op.hid), op.mode, op.off, op.length)

    def _fsync(self, op: m.Fsync) -> None:
        if op.hid is not None:
            fd = self._fd(op.hid)
            (os.fdatasync if op.datasync else os.fsync)(fd)
            # The times after the fsync: a utime before it dirtied the inode again, so this fsync
            # needed a journal commit of its own after the primary's (one disk here). Data and size
            # are durable when the ack leaves; the times follow with the next commit, and a power
            # loss before that leaves the lineage unclean, so the resync compares them.
            _set_times_fd(fd, op.atime_ns, op.mtime_ns)
            return
        fd = open_beneath(self.root, op.path or b"", os.O_RDONLY | os.O_DIRECTORY)
        try:
            if op.path is None:
                syncfs(fd)  # no handle and no path: make the whole replica durable
            else:
                os.fsync(fd)
        finally:
            os.close(fd)


def _own_and_mode(parent: int, name: bytes, uid: int, gid: int, mode: int) -> None:
    os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
    os.chmod(name, stat.S_IMODE(mode), dir_fd=parent, follow_symlinks=False)


def _set_times_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    if atime_ns is None and mtime_ns is None:
        return
    st = os.fstat(fd)
    atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
    mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
    if (atime_ns, mtime_ns) != (st.st_atime_ns, st.st_mtime_ns):
        # Only when they differ: utime dirties the inode (ctime), which costs an fsync that had
        # nothing else to write a journal commit.
        os.utime(fd, ns=(atime_ns, mtime_ns))


def _setattr_fd(fd: int, op: m.SetAttr, path: str | None = None) -> None:
    """Apply through a descriptor; `path` (/proc/self/fd/N) stands in for an O_PATH descriptor."""
    target: int | str = fd if path is None else path
    if op.uid is not None or op.gid is not None:
        os.chown(target, -1 if op.uid is None else op.uid, -1 if op.gid is None else op.gid)
    if op.mode is not None:
        os.chmod(target, stat.S_IMODE(op.mode))
    if op.size is not None:
        os.ftruncate(fd, op.size)
    if op.atime_ns is not None or op.mtime_ns is not None:
        st = os.stat(target)
        os.utime(target, ns=(st.st_atime_ns if op.atime_ns is None else op.atime_ns,
                             st.st_mtime_ns if op.mtime_ns is None else op.mtime_ns))


def _setattr_symlink(root: int, op: m.SetAttr) -> None:
    if op.mode is not None or op.size is not None:
        raise OSError(f"chmod/truncate of symlink {op.path!r}")
    with parent_dir(root, op.path) as (parent, name):
        if op.uid is not None or op.gid is not None:
            os.chown(name, -1 if op.uid is None else op.uid, -1 if op.gid is None else op.gid,
                     dir_fd=parent, follow_symlinks=False)
        if op.atime_ns is not None or op.mtime_ns is not None:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            os.utime(name, ns=(st.st_atime_ns if op.atime_ns is None else op.atime_ns,
                               st.st_mtime_ns if op.mtime_ns is None else op.mtime_ns),
                     dir_fd=parent, follow_symlinks=False)


def validate_op_paths(op: m.Op) -> None:
    """Reject bad paths before anything is touched (the open calls check again, structurally)."""
    for field in ("path", "old", "new"):
        value = getattr(op, field, None)
        if value is not None:
            components(value)
