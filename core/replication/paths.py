"""Resolving peer-supplied relative paths strictly beneath the replicated directory.

Two layers: `components` is a pure check of the bytes (no absolute path, no `.`/`..`, no empty
component, no NUL, bounded lengths); `open_beneath` / `parent_dir` then resolve them relative to the
directory descriptor without ever following a symbolic link, so a symlink planted on the receiving
side cannot redirect a write outside the tree. openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) does
that in one system call; where the kernel lacks it we walk one component at a time with O_NOFOLLOW.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator

from .messages import ProtocolError
from .mountinfo import mounts_below

NAME_MAX = 255
PATH_MAX = 4096

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # the same number on every architecture (added after the syscall table unification)


class PathError(ProtocolError):
    """A path that is not a plain relative path inside the tree."""


def components(path: bytes) -> tuple[bytes, ...]:
    """The components of a relative path, or PathError. b"" is the root itself."""
    if not isinstance(path, bytes):
        raise PathError(f"path must be bytes, got {type(path).__name__}")
    if path == b"":
        return ()
    if len(path) > PATH_MAX:
        raise PathError(f"path longer than {PATH_MAX} bytes")
    if b"\0" in path:
        raise PathError("NUL in path")
    if path.startswith(b"/"):
        raise PathError(f"absolute path {path!r}")
    parts = tuple(path.split(b"/"))
    for part in parts:
        if part in (b"", b".", b".."):
            raise PathError(f"path {path!r} has an empty, '.' or '..' component")
        if len(part) > NAME_MAX:
            raise PathError(f"component longer than {NAME_MAX} bytes in {path!r}")
    return parts


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _load_syscall():  # type: ignore[no-untyped-def]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall = _load_syscall()


def _openat2(dir_fd: int, path: bytes, flags: int, mode: int) -> int:
    if not flags & os.O_CREAT and flags & os.O_TMPFILE != os.O_TMPFILE:
        mode = 0  # openat2 refuses a mode it would not use (EINVAL)
    how = _OpenHow(flags | os.O_CLOEXEC, mode, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = _syscall(_SYS_OPENAT2, dir_fd, path, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def _walk(dir_fd: int, parts: tuple[bytes, ...], flags: int, mode: int) -> int:
    cur = dir_fd
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            if cur != dir_fd:
                os.close(cur)
            cur = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
    finally:
        if cur != dir_fd:
            os.close(cur)


def _probe_openat2() -> bool:
    if _syscall is None:
        return False
    try:
        os.close(_openat2(-100, b".", os.O_PATH, 0))  # AT_FDCWD
    except OSError:
        return False  # ENOSYS (old kernel) or EPERM (seccomp): walk instead
    return True


_have_openat2 = _probe_openat2()


def open_beneath(dir_fd: int, path: bytes, flags: int, mode: int = 0o600) -> int:
    """open(2) of `path` relative to `dir_fd`, refusing symlinks at every component (ELOOP) and any
    escape. A trailing symlink is only returned with O_PATH | O_NOFOLLOW (as an O_PATH descriptor)."""
    parts = components(path)
    if not parts:
        return os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    if _have_openat2:
        return _openat2(dir_fd, path, flags, mode)
    return _walk(dir_fd, parts, flags, mode)


@contextlib.contextmanager
def parent_dir(dir_fd: int, path: bytes) -> Iterator[tuple[int, bytes]]:
    """(descriptor of the parent directory, last component) for a non-root path; the caller then
    acts with dir_fd= and follow_symlinks=False so the last component is never followed either."""
    parts = components(path)
    if not parts:
        raise PathError("the root itself has no parent")
    if len(parts) == 1:
        yield dir_fd, parts[0]
        return
    parent = open_beneath(dir_fd, path.rpartition(b"/")[0], os.O_PATH | os.O_DIRECTORY)
    try:
        yield parent, parts[-1]
    finally:
        os.close(parent)


def openat2_available() -> bool:
    return _have_openat2


def open_replicated_dir(path: str | os.PathLike[str]) -> int:
    """An O_PATH descriptor of a replicated directory itself, or an OSError saying what to do."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"replicated directory {os.fspath(path)}: {exc.strerror}: create it on this "
                                 "node (with the application's owner and mode), or correct "
                                 "replication.directories") from None
    try:
        refuse_nested_mounts(os.fsencode(os.readlink(f"/proc/self/fd/{fd}")))
    except OSError:
        os.close(fd)
        raise
    return fd


def refuse_nested_mounts(directory: bytes) -> None:
    """OSError if another file system is mounted inside `directory` (absolute, no symlinks): its
    files would be reached through the directory, their inode numbers mixed with its own, and the
    other node would hold them on its own file system or not at all."""
    nested = mounts_below(directory)
    if nested:
        raise OSError(errno.EXDEV, f"replicated directory {os.fsdecode(directory)}: {os.fsdecode(nested[0])} is a "
                                   "mount point inside it (another file system), which replication does not "
                                   "support: mount it outside the replicated directory, or replicate a directory "
                                   "that does not contain it")
