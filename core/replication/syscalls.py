"""The Linux system calls Python's os module lacks, through libc, each raising OSError like os does:
renameat2 with flags, fallocate with a mode, syncfs, sync_file_range, mount(2) and umount2(2), the
mount API's open_tree, mount_setattr and move_mount (x86-64 and arm64 numbers); name_to_handle_at
for the identity of an inode; and the FIEMAP ioctl for a file's unwritten (reserved, never written)
extents."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]

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
# fallocate(2): allocate without changing the size (a reservation, also past the end of file)
FALLOC_FL_KEEP_SIZE = 1
# umount2(2) flags
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8


# The new mount API (Linux 5.2+; MOVE_MOUNT_BENEATH 6.5+). The same numbers on x86-64 and arm64.
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
_AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_BENEATH = 0x200
MOUNT_ATTR_RDONLY = 0x1


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def open_tree(path: bytes, dir_fd: int | None = None) -> int:
    """A detached copy of the mount at `path` (or of `dir_fd` itself when `path` is empty), rooted
    there: a bind mount that is attached nowhere yet. Closed on exec."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_EMPTY_PATH if not path else 0)
    fd = _libc.syscall(_SYS_OPEN_TREE, ctypes.c_int(_AT_FDCWD if dir_fd is None else dir_fd), path,
                       ctypes.c_uint(flags))
    if fd < 0:
        _check(-1, f"open_tree {path.decode(errors='replace')}")
    return int(fd)


def mount_setattr(tree_fd: int, *, set_flags: int = 0, clear_flags: int = 0) -> None:
    attr = _MountAttr(set_flags, clear_flags, 0, 0)
    ret = _libc.syscall(_SYS_MOUNT_SETATTR, ctypes.c_int(tree_fd), b"", ctypes.c_uint(AT_EMPTY_PATH),
                        ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(0 if ret == 0 else -1, "mount_setattr")


def move_mount_beneath(tree_fd: int, target: bytes) -> None:
    """Attach the detached mount `tree_fd` at `target` *beneath* the mount on top there: unmounting
    that top one then uncovers it, with no moment in between where `target` is the bare directory."""
    ret = _libc.syscall(_SYS_MOVE_MOUNT, ctypes.c_int(tree_fd), b"", ctypes.c_int(_AT_FDCWD), target,
                        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_BENEATH))
    _check(0 if ret == 0 else -1, f"move_mount beneath {target.decode(errors='replace')}")


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


_MAX_HANDLE_SZ = 128
_HANDLE_HEAD = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type, then the handle


def file_handle(fd: int) -> bytes:
    """The file system's handle of the inode `fd` refers to (its type, then the handle): the same
    bytes for as long as that inode lives, others for any other inode (ext4, XFS, btrfs and tmpfs
    put the inode's generation in it, so a number reused by a new inode gives another handle)."""
    return _name_to_handle(fd, b"", AT_EMPTY_PATH)


def file_handle_at(path: bytes) -> bytes:
    """file_handle of the inode at `path` (a final symlink is not followed)."""
    return _name_to_handle(_AT_FDCWD, path, 0)


def _name_to_handle(dir_fd: int, path: bytes, flags: int) -> bytes:
    buf = ctypes.create_string_buffer(_HANDLE_HEAD.size + _MAX_HANDLE_SZ)
    _HANDLE_HEAD.pack_into(buf, 0, _MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    _check(_libc.name_to_handle_at(dir_fd, path, buf, ctypes.byref(mount_id), flags), "name_to_handle_at")
    size, kind = _HANDLE_HEAD.unpack_from(buf, 0)
    return _HANDLE_HEAD.pack(size, kind) + buf.raw[_HANDLE_HEAD.size:_HANDLE_HEAD.size + size]


# FIEMAP (linux/fiemap.h): struct fiemap, then fm_extent_count struct fiemap_extent.
_FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # fm_start fm_length fm_flags fm_mapped_extents fm_extent_count
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # fe_logical fe_physical fe_length ... fe_flags
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_EXTENT_DELALLOC = 0x4  # data waiting for writeback: written, not a reservation
_FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_BATCH = 256


def unwritten_extents(fd: int) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of `fd` that are allocated but were never written: what fallocate
    reserved (mode 0 over a hole, or KEEP_SIZE, past the end of file too) and reads as zeros.
    Empty where the file system cannot tell (no FIEMAP: tmpfs, FUSE, NFS...)."""
    out: list[tuple[int, int]] = []
    start = 0
    while True:
        buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_BATCH * _FIEMAP_EXTENT.size)
        _FIEMAP_HEAD.pack_into(buf, 0, start, 2**64 - 1 - start, 0, 0, _FIEMAP_BATCH, 0)
        try:
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                return out
            raise
        mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        for i in range(mapped):
            logical, _physical, length, flags = _FIEMAP_EXTENT.unpack_from(buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
            if flags & _FIEMAP_EXTENT_UNWRITTEN and not flags & _FIEMAP_EXTENT_DELALLOC:
                if out and out[-1][1] == logical:
                    out[-1] = (out[-1][0], logical + length)
                else:
                    out.append((logical, logical + length))
            if flags & _FIEMAP_EXTENT_LAST:
                return out
        if logical + length <= start:
            return out  # no progress: never ask for the same extents again
        start = logical + length
