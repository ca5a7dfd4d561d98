"""The Linux system calls Python's os module lacks, through libc, each raising OSError like os does:
renameat2 with flags, fallocate with a mode, syncfs, sync_file_range, mount(2) and umount2(2)."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_RELATIME = 1 << 21
# sync_file_range(2): start writing the range's dirty pages, wait for nothing
SYNC_FILE_RANGE_WRITE = 2
# umount2(2) flags
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    if flags == 0:
        os.rename(old, new, src_dir_fd=old_dir, dst_dir_fd=new_dir)
    else:
        _check(_libc.renameat2(old_dir, old, new_dir, new, flags), "renameat2")


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, off, length), "fallocate")


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(fd), "syncfs")


def sync_file_range(fd: int, off: int, length: int, flags: int) -> None:
    _check(_libc.sync_file_range(fd, off, length, flags), "sync_file_range")


def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None = None) -> None:
    _check(_libc.mount(source, target, fstype, flags, data), f"mount {target.decode(errors='replace')}")


def umount2(target: bytes, flags: int) -> None:
    _check(_libc.umount2(target, flags), f"umount {target.decode(errors='replace')}")
