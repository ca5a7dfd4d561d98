"""The FUSE kernel protocol (include/uapi/linux/fuse.h) as Python data: opcodes, flags, the fixed
structs with struct.Struct codecs, and the types the file system handlers (fusefs.py) see.

Pure: no I/O. fusesession.py reads requests from /dev/fuse, decodes them with what is here, calls the
handlers and encodes their replies. All structs are in the kernel's byte order (the host's) with no
implicit padding: every padding field of the header is spelled out, so sizes match the C layout.
"""

from __future__ import annotations

import errno
import stat
import struct
from enum import IntEnum, IntFlag
from typing import NamedTuple, TypeVar

KERNEL_VERSION = 7
# The minor version implemented here: structs below are those of 7.38 (init_in/out with flags2,
# open_in.open_flags, in_header.total_extlen). The session replies min(kernel's, this one).
KERNEL_MINOR = 38
MIN_KERNEL_MINOR = 23  # 64-byte init_out, full-size attr/entry replies, RENAME2, READDIRPLUS
ROOT_INODE = 1
PAGE_SIZE = 4096


class Opcode(IntEnum):
    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36  # no reply
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


class InitFlag(IntFlag):
    """INIT request/reply flags (fuse_init_in/out.flags; bits 32..63 travel in flags2 with INIT_EXT)."""
    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41


def flag_names(flags: int) -> list[str]:
    """Readable INIT flags (logs, tests); unknown bits as bitN."""
    names = {int(f): f.name for f in InitFlag}
    return [names.get(1 << i) or f"bit{i}" for i in range(64) if flags >> i & 1]


# ---- fuse_setattr_in.valid ----
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# ---- fuse_open_out.open_flags ----
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

# ---- other request flags ----
OPEN_KILL_SUIDGID = 1 << 0  # fuse_open_in/fuse_create_in.open_flags
WRITE_CACHE = 1 << 0  # fuse_write_in.write_flags
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0
RELEASE_FLUSH = 1 << 0
XATTR_CREATE = 1
XATTR_REPLACE = 2

# ---- user-facing constants (the names pyfuse3 used) ----
ENOATTR = errno.ENODATA
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

# ---- structs ----
IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
ATTR = struct.Struct("=QQQqqqIIIIIIIIII")  # ino size blocks atime mtime ctime *nsec mode nlink uid gid rdev blksize flags
ENTRY_OUT_HEAD = struct.Struct("=QQQQII")  # nodeid generation entry_valid attr_valid entry_nsec attr_nsec
ATTR_OUT_HEAD = struct.Struct("=QII")  # attr_valid attr_valid_nsec dummy
ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size
ATTR_OUT_SIZE = ATTR_OUT_HEAD.size + ATTR.size
INIT_IN = struct.Struct("=IIIII44x")  # major minor max_readahead flags flags2 unused[11]
INIT_IN_V1 = struct.Struct("=IIII")  # before 7.36: no flags2
INIT_OUT = struct.Struct("=IIIIHHIIHHII24x")  # ... max_pages map_alignment flags2 max_stack_depth unused[6]
GETATTR_IN = struct.Struct("=IIQ")  # getattr_flags dummy fh
SETATTR_IN = struct.Struct("=IIQQQqqqIIIIIIII")
OPEN_IN = struct.Struct("=II")  # flags open_flags
CREATE_IN = struct.Struct("=IIII")  # flags mode umask open_flags
OPEN_OUT = struct.Struct("=QIi")  # fh open_flags backing_id
MKNOD_IN = struct.Struct("=IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("=II")  # mode umask
RENAME_IN = struct.Struct("=Q")  # newdir
RENAME2_IN = struct.Struct("=QII")  # newdir flags padding
LINK_IN = struct.Struct("=Q")  # oldnodeid
RELEASE_IN = struct.Struct("=QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("=QIIQ")  # fh unused padding lock_owner
READ_IN = struct.Struct("=QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("=QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("=II")  # size padding
KSTATFS = struct.Struct("=QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
FSYNC_IN = struct.Struct("=QII")  # fh fsync_flags padding
SETXATTR_IN = struct.Struct("=II")  # size flags (without FUSE_SETXATTR_EXT, which is never negotiated)
SETXATTR_IN_EXT = struct.Struct("=IIII")  # size flags setxattr_flags padding
GETXATTR_IN = struct.Struct("=II")  # size padding
GETXATTR_OUT = struct.Struct("=II")  # size padding
ACCESS_IN = struct.Struct("=II")  # mask padding
INTERRUPT_IN = struct.Struct("=Q")  # unique
FORGET_IN = struct.Struct("=Q")  # nlookup
FORGET_ONE = struct.Struct("=QQ")  # nodeid nlookup
BATCH_FORGET_IN = struct.Struct("=II")  # count dummy
FALLOCATE_IN = struct.Struct("=QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("=QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("=Q")  # offset
DIRENT = struct.Struct("=QQII")  # ino off namelen type, then the name, the record 8-byte aligned
DIRENT_NAME_OFFSET = DIRENT.size
DIRENTPLUS_NAME_OFFSET = ENTRY_OUT_SIZE + DIRENT.size

R = TypeVar("R", bound=tuple)  # type: ignore[type-arg]


class InHeader(NamedTuple):
    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int = 0
    padding: int = 0


class InitIn(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32 when the kernel set FUSE_INIT_EXT


class InitOut(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    map_alignment: int
    flags2: int
    max_stack_depth: int


class SetattrIn(NamedTuple):
    valid: int
    padding: int
    fh: int
    size: int
    lock_owner: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    unused4: int
    uid: int
    gid: int
    unused5: int


class WriteIn(NamedTuple):
    fh: int
    offset: int
    size: int
    write_flags: int
    lock_owner: int
    flags: int
    padding: int = 0


class ReadIn(NamedTuple):
    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int
    padding: int = 0


class FallocateIn(NamedTuple):
    fh: int
    offset: int
    length: int
    mode: int
    padding: int = 0


def decode(st: struct.Struct, cls: type[R], buf: bytes | bytearray | memoryview, offset: int = 0) -> R:
    return cls._make(st.unpack_from(buf, offset))  # type: ignore[attr-defined, no-any-return]


def encode(st: struct.Struct, rec: tuple) -> bytes:  # type: ignore[type-arg]
    return st.pack(*rec)


def decode_init_in(body: bytes | bytearray | memoryview) -> InitIn:
    """fuse_init_in: 16 bytes from kernels before 7.36, 64 after (flags2 valid with INIT_EXT)."""
    major, minor, readahead, flags = INIT_IN_V1.unpack_from(body)
    if flags & InitFlag.INIT_EXT and len(body) >= INIT_IN.size:
        flags |= INIT_IN.unpack_from(body)[4] << 32
    return InitIn(major, minor, readahead, flags)


def encode_init_out(out: InitOut) -> bytes:
    return INIT_OUT.pack(*out)


def align8(n: int) -> int:
    return (n + 7) & ~7


# ---- what the handlers see and return (the names and fields of pyfuse3's types) ----


class FUSEError(Exception):
    """Raised by a handler: the request fails with this errno."""

    def __init__(self, errno_: int) -> None:
        super().__init__(errno_)
        self.errno = errno_

    def __str__(self) -> str:
        return f"FUSEError({self.errno}: {errno.errorcode.get(self.errno, '?')})"


class EntryAttributes:
    """An inode's attributes with the kernel cache timeouts (lookup, getattr, create... replies)."""

    __slots__ = (
        "attr_timeout",
        "entry_timeout",
        "generation",
        "st_atime_ns",
        "st_blksize",
        "st_blocks",
        "st_ctime_ns",
        "st_gid",
        "st_ino",
        "st_mode",
        "st_mtime_ns",
        "st_nlink",
        "st_rdev",
        "st_size",
        "st_uid",
    )

    def __init__(self) -> None:
        self.st_ino = 0
        self.generation = 0
        self.entry_timeout = 0.0
        self.attr_timeout = 0.0
        self.st_mode = 0
        self.st_nlink = 0
        self.st_uid = 0
        self.st_gid = 0
        self.st_rdev = 0
        self.st_size = 0
        self.st_blksize = 0
        self.st_blocks = 0
        self.st_atime_ns = 0
        self.st_mtime_ns = 0
        self.st_ctime_ns = 0


class SetattrFields:
    """Which fields of a SETATTR request are to be changed (FATTR_* bits, decoded)."""

    __slots__ = (
        "kill_suidgid",
        "update_atime",
        "update_ctime",
        "update_gid",
        "update_mode",
        "update_mtime",
        "update_size",
        "update_uid",
    )

    def __init__(self) -> None:
        self.update_atime = False
        self.update_mtime = False
        self.update_ctime = False
        self.update_mode = False
        self.update_uid = False
        self.update_gid = False
        self.update_size = False
        # FATTR_KILL_SUIDGID (HANDLE_KILLPRIV_V2): a truncate by a caller without CAP_FSETID, or a
        # chown: clear set-user-ID, and set-group-ID if group-executable, as the local VFS would.
        self.kill_suidgid = False


class FileInfo:
    __slots__ = ("direct_io", "fh", "keep_cache", "nonseekable")

    def __init__(self, fh: int = 0, direct_io: bool = False, keep_cache: bool = True,
                 nonseekable: bool = False) -> None:
        self.fh = fh
        self.direct_io = direct_io
        self.keep_cache = keep_cache
        self.nonseekable = nonseekable

    def open_flags(self) -> int:
        return ((FOPEN_DIRECT_IO if self.direct_io else 0) | (FOPEN_KEEP_CACHE if self.keep_cache else 0)
                | (FOPEN_NONSEEKABLE if self.nonseekable else 0))


class RequestContext(NamedTuple):
    uid: int
    gid: int
    pid: int
    umask: int = 0


class StatvfsData:
    __slots__ = (
        "f_bavail",
        "f_bfree",
        "f_blocks",
        "f_bsize",
        "f_favail",
        "f_ffree",
        "f_files",
        "f_frsize",
        "f_namemax",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


class Operations:
    """Base of a file system served by fusesession: a request whose handler method is missing gets
    ENOSYS (the kernel then stops sending most of them)."""

    supports_dot_lookup = True  # lookups of "." and ".." only come with EXPORT_SUPPORT, never negotiated
    enable_writeback_cache = False
    enable_acl = False


# ---- encoders of replies ----

_NS = 1_000_000_000


def _timeout(t: float) -> tuple[int, int]:
    """A cache timeout in seconds as (sec, nsec), clamped like libfuse."""
    if t <= 0:
        return 0, 0
    if t >= 2**64:
        return 2**64 - 1, 0
    sec = int(t)
    return sec, min(int((t - sec) * _NS), _NS - 1)


def _attr_tuple(e: EntryAttributes) -> tuple[int, ...]:
    a_s, a_ns = divmod(e.st_atime_ns, _NS)
    m_s, m_ns = divmod(e.st_mtime_ns, _NS)
    c_s, c_ns = divmod(e.st_ctime_ns, _NS)
    return (e.st_ino, e.st_size, e.st_blocks, a_s, m_s, c_s, a_ns, m_ns, c_ns, e.st_mode, e.st_nlink,
            e.st_uid, e.st_gid, e.st_rdev & 0xFFFFFFFF, e.st_blksize, 0)


def encode_attr(e: EntryAttributes) -> bytes:
    return ATTR.pack(*_attr_tuple(e))


def encode_entry_out(e: EntryAttributes) -> bytes:
    es, ens = _timeout(e.entry_timeout)
    as_, ans = _timeout(e.attr_timeout)
    return ENTRY_OUT_HEAD.pack(e.st_ino, e.generation, es, as_, ens, ans) + ATTR.pack(*_attr_tuple(e))


def encode_attr_out(e: EntryAttributes) -> bytes:
    as_, ans = _timeout(e.attr_timeout)
    return ATTR_OUT_HEAD.pack(as_, ans, 0) + ATTR.pack(*_attr_tuple(e))


def encode_open_out(fi: FileInfo) -> bytes:
    return OPEN_OUT.pack(fi.fh, fi.open_flags(), 0)


def encode_statfs(s: StatvfsData) -> bytes:
    return KSTATFS.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize,
                        s.f_namemax, s.f_frsize, 0)


def decode_setattr(body: bytes | bytearray | memoryview, now_ns: int) -> tuple[EntryAttributes, SetattrFields, int | None]:
    """fuse_setattr_in -> (the new values, which of them to set, the file handle or None).
    ATIME_NOW/MTIME_NOW mean "the current time", given as `now_ns`."""
    s = decode(SETATTR_IN, SetattrIn, body)
    attr, fields = EntryAttributes(), SetattrFields()
    v = s.valid
    attr.st_mode, attr.st_uid, attr.st_gid, attr.st_size = s.mode, s.uid, s.gid, s.size
    attr.st_atime_ns = s.atime * _NS + s.atimensec
    attr.st_mtime_ns = s.mtime * _NS + s.mtimensec
    attr.st_ctime_ns = s.ctime * _NS + s.ctimensec
    if v & FATTR_ATIME_NOW:
        attr.st_atime_ns = now_ns
    if v & FATTR_MTIME_NOW:
        attr.st_mtime_ns = now_ns
    fields.update_atime = bool(v & (FATTR_ATIME | FATTR_ATIME_NOW))
    fields.update_mtime = bool(v & (FATTR_MTIME | FATTR_MTIME_NOW))
    fields.update_ctime = bool(v & FATTR_CTIME)
    fields.update_mode = bool(v & FATTR_MODE)
    fields.update_uid = bool(v & FATTR_UID)
    fields.update_gid = bool(v & FATTR_GID)
    fields.update_size = bool(v & FATTR_SIZE)
    fields.kill_suidgid = bool(v & FATTR_KILL_SUIDGID)
    return attr, fields, (s.fh if v & FATTR_FH else None)


def killed_mode(mode: int) -> int:
    """`mode` after a write or truncate by a caller without CAP_FSETID, or a chown: set-user-ID off,
    set-group-ID off when the group may execute (otherwise it marks mandatory locking and stays)."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


# ---- directory listings ----


class ReaddirToken:
    """The reply buffer of one READDIR(PLUS) request: at most `size` bytes of records."""

    __slots__ = ("buf", "plus", "size")

    def __init__(self, size: int, plus: bool = True) -> None:
        self.size = size
        self.plus = plus
        self.buf = bytearray()


def readdir_reply(token: ReaddirToken, name: bytes, attr: EntryAttributes, next_id: int) -> bool:
    """Add one entry; `next_id` is the offset the kernel passes back to continue after it. False
    (and nothing added) when the buffer is full: the handler stops, the kernel asks again later.
    With READDIRPLUS every entry added counts as one lookup of its inode for the kernel."""
    base = DIRENTPLUS_NAME_OFFSET if token.plus else DIRENT_NAME_OFFSET
    reclen = align8(base + len(name))
    buf = token.buf
    if len(buf) + reclen > token.size:
        return False
    if token.plus:
        buf += encode_entry_out(attr)
    buf += DIRENT.pack(attr.st_ino, next_id, len(name), stat.S_IFMT(attr.st_mode) >> 12)
    buf += name
    buf += bytes(reclen - base - len(name))
    return True


def decode_dirents(buf: bytes | bytearray | memoryview, plus: bool) -> list[tuple[int, int, int, bytes, int]]:
    """Parse a READDIR(PLUS) reply (tests): [(ino, next_off, type, name, entry nodeid or 0)]."""
    out, pos, view = [], 0, memoryview(buf)
    while pos < len(view):
        nodeid = ENTRY_OUT_HEAD.unpack_from(view, pos)[0] if plus else 0
        d = pos + (ENTRY_OUT_SIZE if plus else 0)
        ino, off, namelen, typ = DIRENT.unpack_from(view, d)
        name = bytes(view[d + DIRENT.size:d + DIRENT.size + namelen])
        out.append((ino, off, typ, name, nodeid))
        pos = align8(d + DIRENT.size + namelen)
    return out
