"""The FUSE wire format (fuseabi) and the session's dispatching (fusesession), without a mount:
struct sizes against the kernel header, round trips, directory records, and requests fed to
FuseSession._dispatch with the replies captured."""

from __future__ import annotations

import asyncio
import contextvars
import errno
import os
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from safekit_cloud.core.replication import fuseabi as abi
from safekit_cloud.core.replication.fuseabi import InitFlag, Opcode
from safekit_cloud.core.replication.fusesession import MAX_WRITE, WANTED, FuseSession

# Sizes as include/uapi/linux/fuse.h documents them (the FUSE_COMPAT_*_SIZE constants are the
# older, shorter forms; the full forms follow from the fields).
DOCUMENTED = {
    "IN_HEADER": 40, "OUT_HEADER": 16, "ATTR": 88, "INIT_IN": 64, "INIT_IN_V1": 16, "INIT_OUT": 64,
    "GETATTR_IN": 16, "SETATTR_IN": 88, "OPEN_IN": 8, "CREATE_IN": 16, "OPEN_OUT": 16, "MKNOD_IN": 16,
    "MKDIR_IN": 8, "RENAME_IN": 8, "RENAME2_IN": 16, "LINK_IN": 8, "RELEASE_IN": 24, "FLUSH_IN": 24,
    "READ_IN": 40, "WRITE_IN": 40, "WRITE_OUT": 8, "KSTATFS": 80, "FSYNC_IN": 16, "SETXATTR_IN": 8,
    "SETXATTR_IN_EXT": 16, "GETXATTR_IN": 8, "GETXATTR_OUT": 8, "ACCESS_IN": 8, "INTERRUPT_IN": 8,
    "FORGET_IN": 8, "FORGET_ONE": 16, "BATCH_FORGET_IN": 8, "FALLOCATE_IN": 32, "LSEEK_IN": 24,
    "LSEEK_OUT": 8, "DIRENT": 24,
}
COMPAT = {"ENTRY_OUT": 120, "ATTR_OUT": 96, "WRITE_IN": 24, "STATFS": 48, "INIT_OUT": 8, "INIT_OUT_22": 24,
          "SETXATTR_IN": 8, "MKNOD_IN": 8}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_struct_sizes_match_the_header(name: str) -> None:
    assert getattr(abi, name).size == DOCUMENTED[name]


def test_composite_sizes() -> None:
    assert abi.ENTRY_OUT_SIZE == 128 > COMPAT["ENTRY_OUT"]
    assert abi.ATTR_OUT_SIZE == 104 > COMPAT["ATTR_OUT"]
    assert abi.DIRENT_NAME_OFFSET == 24  # FUSE_NAME_OFFSET
    assert abi.DIRENTPLUS_NAME_OFFSET == 152  # FUSE_NAME_OFFSET_DIRENTPLUS
    # The compat forms are prefixes of ours: the fields we rely on sit where the old ones were.
    assert abi.WRITE_IN.size > COMPAT["WRITE_IN"] and abi.KSTATFS.size > COMPAT["STATFS"]


_C_PROBE = textwrap.dedent("""
    #include <stdio.h>
    #include <stddef.h>
    #include <linux/fuse.h>
    #define S(t) printf(#t " %zu\\n", sizeof(struct t))
    int main(void) {
        S(fuse_in_header); S(fuse_out_header); S(fuse_attr); S(fuse_entry_out); S(fuse_attr_out);
        S(fuse_init_in); S(fuse_init_out); S(fuse_getattr_in); S(fuse_setattr_in); S(fuse_open_in);
        S(fuse_create_in); S(fuse_open_out); S(fuse_mknod_in); S(fuse_mkdir_in); S(fuse_rename_in);
        S(fuse_rename2_in); S(fuse_link_in); S(fuse_release_in); S(fuse_flush_in); S(fuse_read_in);
        S(fuse_write_in); S(fuse_write_out); S(fuse_kstatfs); S(fuse_fsync_in); S(fuse_setxattr_in);
        S(fuse_getxattr_in); S(fuse_getxattr_out); S(fuse_access_in); S(fuse_interrupt_in);
        S(fuse_forget_in); S(fuse_forget_one); S(fuse_batch_forget_in); S(fuse_fallocate_in);
        S(fuse_lseek_in); S(fuse_lseek_out); S(fuse_dirent); S(fuse_direntplus);
        printf("name_offset %zu\\n", offsetof(struct fuse_dirent, name));
        printf("name_offset_plus %zu\\n", offsetof(struct fuse_direntplus, dirent.name));
        printf("setattr_mode %zu\\n", offsetof(struct fuse_setattr_in, mode));
        printf("init_out_max_pages %zu\\n", offsetof(struct fuse_init_out, max_pages));
        return 0;
    }
""")


@pytest.mark.skipif(shutil.which("cc") is None or not os.path.exists("/usr/include/linux/fuse.h"),
                    reason="no C compiler or no kernel headers (linux-libc-dev)")
def test_struct_sizes_match_the_installed_kernel_header(tmp_path: Path) -> None:
    src, exe = tmp_path / "probe.c", tmp_path / "probe"
    src.write_text(_C_PROBE)
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, capture_output=True)
    c = dict(line.rsplit(" ", 1) for line in subprocess.run([str(exe)], check=True, capture_output=True,
                                                            text=True).stdout.splitlines())
    sizes = {k: int(v) for k, v in c.items()}
    ours = {
        "fuse_in_header": abi.IN_HEADER.size, "fuse_out_header": abi.OUT_HEADER.size, "fuse_attr": abi.ATTR.size,
        "fuse_entry_out": abi.ENTRY_OUT_SIZE, "fuse_attr_out": abi.ATTR_OUT_SIZE, "fuse_init_out": abi.INIT_OUT.size,
        "fuse_getattr_in": abi.GETATTR_IN.size, "fuse_setattr_in": abi.SETATTR_IN.size,
        "fuse_open_in": abi.OPEN_IN.size, "fuse_create_in": abi.CREATE_IN.size, "fuse_open_out": abi.OPEN_OUT.size,
        "fuse_mknod_in": abi.MKNOD_IN.size, "fuse_mkdir_in": abi.MKDIR_IN.size, "fuse_rename_in": abi.RENAME_IN.size,
        "fuse_rename2_in": abi.RENAME2_IN.size, "fuse_link_in": abi.LINK_IN.size,
        "fuse_release_in": abi.RELEASE_IN.size, "fuse_flush_in": abi.FLUSH_IN.size, "fuse_read_in": abi.READ_IN.size,
        "fuse_write_in": abi.WRITE_IN.size, "fuse_write_out": abi.WRITE_OUT.size, "fuse_kstatfs": abi.KSTATFS.size,
        "fuse_fsync_in": abi.FSYNC_IN.size, "fuse_getxattr_in": abi.GETXATTR_IN.size,
        "fuse_getxattr_out": abi.GETXATTR_OUT.size, "fuse_access_in": abi.ACCESS_IN.size,
        "fuse_interrupt_in": abi.INTERRUPT_IN.size, "fuse_forget_in": abi.FORGET_IN.size,
        "fuse_forget_one": abi.FORGET_ONE.size, "fuse_batch_forget_in": abi.BATCH_FORGET_IN.size,
        "fuse_fallocate_in": abi.FALLOCATE_IN.size, "fuse_lseek_in": abi.LSEEK_IN.size,
        "fuse_lseek_out": abi.LSEEK_OUT.size, "fuse_dirent": abi.DIRENT.size,
        "fuse_direntplus": abi.DIRENTPLUS_NAME_OFFSET, "name_offset": abi.DIRENT_NAME_OFFSET,
        "name_offset_plus": abi.DIRENTPLUS_NAME_OFFSET, "setattr_mode": 68, "init_out_max_pages": 28,
    }
    for name, size in ours.items():
        assert sizes[name] == size, name
    # init_in and setxattr_in grew (7.36, 7.33): the header has the long forms, we parse both.
    assert sizes["fuse_init_in"] in (abi.INIT_IN_V1.size, abi.INIT_IN.size)
    assert sizes["fuse_setxattr_in"] in (abi.SETXATTR_IN.size, abi.SETXATTR_IN_EXT.size)


def test_record_round_trips() -> None:
    w = abi.WriteIn(fh=7, offset=2**40 + 3, size=4096, write_flags=abi.WRITE_KILL_SUIDGID, lock_owner=9, flags=2)
    assert abi.decode(abi.WRITE_IN, abi.WriteIn, abi.encode(abi.WRITE_IN, w)) == w
    r = abi.ReadIn(1, 2, 3, 0, 5, 6)
    assert abi.decode(abi.READ_IN, abi.ReadIn, abi.encode(abi.READ_IN, r)) == r
    fa = abi.FallocateIn(3, 4096, 1 << 30, 0x11)
    assert abi.decode(abi.FALLOCATE_IN, abi.FallocateIn, abi.encode(abi.FALLOCATE_IN, fa)) == fa
    h = abi.InHeader(80, Opcode.WRITE, 12345, 1, 1000, 1000, 42)
    raw = abi.encode(abi.IN_HEADER, h)
    assert len(raw) == 40 and abi.decode(abi.IN_HEADER, abi.InHeader, raw) == h
    out = abi.InitOut(7, 38, 131072, int(WANTED), 0, 0, MAX_WRITE, 1, 256, 0, 0, 0)
    assert abi.INIT_OUT.unpack(abi.encode_init_out(out)) == tuple(out)


def test_init_in_with_and_without_flags2() -> None:
    short = abi.INIT_IN_V1.pack(7, 31, 65536, InitFlag.ASYNC_READ)
    assert abi.decode_init_in(short) == abi.InitIn(7, 31, 65536, InitFlag.ASYNC_READ)
    long = abi.INIT_IN.pack(7, 45, 131072, InitFlag.INIT_EXT | InitFlag.MAX_PAGES, 1 << (39 - 32))
    init = abi.decode_init_in(long)
    assert init.flags == InitFlag.INIT_EXT | InitFlag.MAX_PAGES | InitFlag.HAS_RESEND
    no_ext = abi.INIT_IN.pack(7, 45, 131072, InitFlag.MAX_PAGES, 0xFFFF)  # flags2 without INIT_EXT: ignored
    assert abi.decode_init_in(no_ext).flags == InitFlag.MAX_PAGES
    assert abi.flag_names(InitFlag.ASYNC_READ | InitFlag.HAS_RESEND | 1 << 60) == ["ASYNC_READ", "HAS_RESEND", "bit60"]


def _attrs(ino: int = 5, mode: int = stat.S_IFREG | 0o644) -> abi.EntryAttributes:
    e = abi.EntryAttributes()
    e.st_ino, e.generation, e.st_mode, e.st_nlink = ino, 3, mode, 2
    e.st_uid, e.st_gid, e.st_rdev, e.st_size = 1000, 100, 0, 12345
    e.st_blksize, e.st_blocks = 4096, 24
    e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = 1_700_000_000_123_456_789, -1, 5
    e.entry_timeout, e.attr_timeout = 1.5, 10.0
    return e


def test_entry_and_attr_encoding() -> None:
    e = _attrs()
    raw = abi.encode_entry_out(e)
    assert len(raw) == abi.ENTRY_OUT_SIZE
    nodeid, gen, ev, av, ens, ans = abi.ENTRY_OUT_HEAD.unpack_from(raw)
    assert (nodeid, gen, ev, av, ens, ans) == (5, 3, 1, 10, 500_000_000, 0)
    attr = abi.ATTR.unpack_from(raw, abi.ENTRY_OUT_HEAD.size)
    assert attr[:6] == (5, 12345, 24, 1_700_000_000, -1, 0)
    assert attr[6:9] == (123_456_789, 999_999_999, 5)  # a time before 1970 stays exact
    assert attr[9:15] == (stat.S_IFREG | 0o644, 2, 1000, 100, 0, 4096)
    out = abi.encode_attr_out(e)
    assert len(out) == abi.ATTR_OUT_SIZE and abi.ATTR_OUT_HEAD.unpack_from(out) == (10, 0, 0)
    e.attr_timeout = -3  # clamped, as libfuse does
    assert abi.ATTR_OUT_HEAD.unpack_from(abi.encode_attr_out(e)) == (0, 0, 0)


def test_setattr_decoding() -> None:
    raw = abi.SETATTR_IN.pack(abi.FATTR_MODE | abi.FATTR_SIZE | abi.FATTR_FH | abi.FATTR_MTIME_NOW
                              | abi.FATTR_ATIME | abi.FATTR_KILL_SUIDGID,
                              0, 77, 4096, 0, 10, 20, 30, 1, 2, 3, 0o4755, 0, 5, 6, 0)
    attr, fields, fh = abi.decode_setattr(raw, now_ns=999)
    assert fh == 77 and attr.st_size == 4096 and attr.st_mode == 0o4755
    assert attr.st_atime_ns == 10 * 10**9 + 1 and attr.st_mtime_ns == 999
    assert fields.update_mode and fields.update_size and fields.update_atime and fields.update_mtime
    assert fields.kill_suidgid and not (fields.update_uid or fields.update_gid or fields.update_ctime)
    _, _, fh = abi.decode_setattr(abi.SETATTR_IN.pack(abi.FATTR_UID, *([0] * 15)), now_ns=0)
    assert fh is None


def test_killed_mode_is_the_vfs_rule() -> None:
    assert abi.killed_mode(stat.S_IFREG | 0o6755) == stat.S_IFREG | 0o755  # group may execute: both go
    assert abi.killed_mode(stat.S_IFREG | 0o6745) == stat.S_IFREG | 0o2745  # sgid without g+x: stays
    assert abi.killed_mode(stat.S_IFREG | 0o644) == stat.S_IFREG | 0o644


def test_dirents_are_8_byte_aligned_and_decode() -> None:
    for plus in (False, True):
        tok = abi.ReaddirToken(65536, plus)
        names = [b"a", b"abcdefgh", b"x" * 13, b"\xff\xfe-raw"]
        for i, name in enumerate(names):
            assert abi.readdir_reply(tok, name, _attrs(100 + i, stat.S_IFDIR | 0o755), i + 1)
        assert len(tok.buf) % 8 == 0
        got = abi.decode_dirents(tok.buf, plus)
        assert [g[3] for g in got] == names
        assert [g[1] for g in got] == [1, 2, 3, 4]
        assert all(g[2] == stat.S_IFDIR >> 12 for g in got)
        assert [g[4] for g in got] == ([100, 101, 102, 103] if plus else [0, 0, 0, 0])
        base = abi.DIRENTPLUS_NAME_OFFSET if plus else abi.DIRENT_NAME_OFFSET
        assert len(tok.buf) == sum(abi.align8(base + len(n)) for n in names)


def test_readdir_reply_refuses_what_does_not_fit() -> None:
    one = abi.align8(abi.DIRENTPLUS_NAME_OFFSET + 5)
    tok = abi.ReaddirToken(2 * one + 7, plus=True)
    assert abi.readdir_reply(tok, b"aaaaa", _attrs(), 1)
    assert abi.readdir_reply(tok, b"bbbbb", _attrs(), 2)
    before = bytes(tok.buf)
    assert not abi.readdir_reply(tok, b"c", _attrs(), 3)  # full: nothing added, the kernel asks again
    assert bytes(tok.buf) == before and len(tok.buf) == 2 * one
    assert not abi.readdir_reply(abi.ReaddirToken(10), b"x", _attrs(), 1)


def test_statfs_and_open_out() -> None:
    s = abi.StatvfsData()
    s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail = 4096, 4096, 100, 50, 40
    s.f_files, s.f_ffree, s.f_namemax = 1000, 900, 255
    assert abi.KSTATFS.unpack(abi.encode_statfs(s)) == (100, 50, 40, 1000, 900, 4096, 255, 4096, 0)
    fi = abi.FileInfo(fh=9, direct_io=True, keep_cache=True)
    assert abi.OPEN_OUT.unpack(abi.encode_open_out(fi)) == (9, abi.FOPEN_DIRECT_IO | abi.FOPEN_KEEP_CACHE, 0)


def test_wanted_flags() -> None:
    for flag in (InitFlag.HANDLE_KILLPRIV_V2, InitFlag.MAX_PAGES, InitFlag.DO_READDIRPLUS, InitFlag.PARALLEL_DIROPS):
        assert WANTED & flag
    for flag in (InitFlag.ATOMIC_O_TRUNC, InitFlag.WRITEBACK_CACHE, InitFlag.EXPORT_SUPPORT, InitFlag.DONT_MASK,
                 InitFlag.POSIX_ACL, InitFlag.SETXATTR_EXT, InitFlag.INIT_EXT, InitFlag.READDIRPLUS_AUTO):
        assert not WANTED & flag


# ---- the session's dispatching, fed requests by hand ----

CURRENT: contextvars.ContextVar[int] = contextvars.ContextVar("current", default=0)


class FakeOps(abi.Operations):
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.seen: list[Any] = []

    async def getattr(self, inode: int, ctx: abi.RequestContext) -> abi.EntryAttributes:
        return _attrs(inode)

    async def lookup(self, parent: int, name: bytes, ctx: abi.RequestContext) -> abi.EntryAttributes:
        if name == b"bug":
            raise RuntimeError("a bug in a handler")
        if name == b"missing":
            raise abi.FUSEError(errno.ENOENT)
        return _attrs(parent + 1)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        CURRENT.set(fh)  # per request: another request's context must not see it
        await self.gate.wait()
        self.seen.append((fh, off, buf, CURRENT.get()))
        return len(buf)

    async def forget(self, items: list[tuple[int, int]]) -> None:
        self.seen.append(("forget", list(items)))


class Capture(FuseSession):
    def __init__(self, ops: Any) -> None:
        super().__init__(ops, Path("/nonexistent"), max_tasks=3)
        self.replies: list[tuple[int, int, bytes]] = []
        self.buf = bytearray(1 << 16)

    def _write(self, parts: list[Any]) -> None:
        raw = b"".join(bytes(p) for p in parts)
        length, err, unique = abi.OUT_HEADER.unpack_from(raw)
        assert length == len(raw)
        self.replies.append((unique, err, raw[abi.OUT_HEADER.size:]))

    def feed(self, opcode: int, unique: int, nodeid: int, body: bytes) -> None:
        raw = abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 1, 0, 0) + body
        self.buf[:len(raw)] = raw
        self._dispatch(memoryview(self.buf), len(raw))
        self.buf[:len(raw)] = b"\xee" * len(raw)  # the buffer is reused: nothing may still point into it


def test_dispatch_replies_inline_and_parks_suspended_handlers_on_their_futures() -> None:
    async def main() -> None:
        ops = FakeOps()
        s = Capture(ops)
        s._loop = asyncio.get_running_loop()
        s.feed(Opcode.GETATTR, 1, 7, abi.GETATTR_IN.pack(0, 0, 0))
        assert s.replies[-1][:2] == (1, 0) and abi.ATTR.unpack_from(s.replies[-1][2], 16)[0] == 7
        assert not s._tasks  # completed inline: no task
        s.feed(Opcode.LOOKUP, 2, 1, b"name\0")
        assert s.replies[-1][:2] == (2, 0) and len(s.replies[-1][2]) == abi.ENTRY_OUT_SIZE
        s.feed(Opcode.LOOKUP, 3, 1, b"missing\0")
        assert s.replies[-1] == (3, -errno.ENOENT, b"")
        s.feed(Opcode.LOOKUP, 4, 1, b"bug\0")  # a bug fails one call with EIO, the session goes on
        assert s.replies[-1] == (4, -errno.EIO, b"")
        for fh in (10, 11):  # two writes that wait: parked, each in its own context, no task
            s.feed(Opcode.WRITE, 100 + fh, 5, abi.WRITE_IN.pack(fh, 4096, 3, 0, 0, 0, 0) + b"abc")
        assert s.in_flight == 2 and not s._tasks and len(s.replies) == 4
        s.feed(Opcode.FORGET, 200, 9, abi.FORGET_IN.pack(2))  # no reply
        s.feed(Opcode.BATCH_FORGET, 201, 0, abi.BATCH_FORGET_IN.pack(2, 0) + abi.FORGET_ONE.pack(3, 1)
               + abi.FORGET_ONE.pack(4, 5))
        s.feed(Opcode.INTERRUPT, 202, 0, abi.INTERRUPT_IN.pack(110))
        assert len(s.replies) == 4
        assert ("forget", [(9, 2)]) in ops.seen and ("forget", [(3, 1), (4, 5)]) in ops.seen
        ops.gate.set()
        await asyncio.sleep(0.01)
        writes = [x for x in ops.seen if x[0] in (10, 11)]
        assert sorted(writes) == [(10, 4096, b"abc", 10), (11, 4096, b"abc", 11)]  # data copied, contexts apart
        assert sorted(r[:2] for r in s.replies[4:]) == [(110, 0), (111, 0)]
        assert all(abi.WRITE_OUT.unpack(r[2]) == (3, 0) for r in s.replies[4:])
        assert s.in_flight == 0 and CURRENT.get() == 0

    asyncio.run(main())


def test_missing_and_unknown_opcodes_get_enosys(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        s = Capture(FakeOps())
        s._loop = asyncio.get_running_loop()
        s.feed(Opcode.FLUSH, 1, 1, abi.FLUSH_IN.pack(1, 0, 0, 0))  # FakeOps has no flush
        s.feed(Opcode.IOCTL, 2, 1, b"\0" * 32)
        s.feed(Opcode.IOCTL, 3, 1, b"\0" * 32)
        s.feed(4242, 4, 1, b"")
        assert [r[:2] for r in s.replies] == [(1, -errno.ENOSYS), (2, -errno.ENOSYS), (3, -errno.ENOSYS),
                                              (4, -errno.ENOSYS)]

    with caplog.at_level("INFO"):
        asyncio.run(main())
    assert sum("IOCTL" in r.message for r in caplog.records) == 1  # logged once per opcode
    assert any("4242" in r.message for r in caplog.records)


def test_init_negotiates_only_what_is_offered_and_wanted() -> None:
    async def main() -> None:
        s = Capture(FakeOps())
        loop = s._loop = asyncio.get_running_loop()
        s._initialized, s._ended = loop.create_future(), loop.create_future()
        offered = (InitFlag.ASYNC_READ | InitFlag.ATOMIC_O_TRUNC | InitFlag.WRITEBACK_CACHE | InitFlag.MAX_PAGES
                   | InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO | InitFlag.INIT_EXT | InitFlag.POSIX_ACL)
        s.feed(Opcode.INIT, 1, 0, abi.INIT_IN.pack(7, 45, 131072, offered, 0xFF))
        unique, err, raw = s.replies[-1]
        out = abi.InitOut._make(abi.INIT_OUT.unpack(raw))
        assert (unique, err, out.major, out.minor) == (1, 0, 7, abi.KERNEL_MINOR)
        # FakeOps has no kill_suidgid: HANDLE_KILLPRIV_V2 is not asked for even if offered
        assert out.flags == InitFlag.ASYNC_READ | InitFlag.MAX_PAGES | InitFlag.DO_READDIRPLUS
        assert (out.max_write, out.max_pages, out.max_readahead, out.flags2) == (MAX_WRITE, 256, 131072, 0)
        assert s._initialized.done()
        acl_ops = FakeOps()
        acl_ops.enable_posix_acl = True  # type: ignore[attr-defined]
        s3 = Capture(acl_ops)
        s3._loop, s3._initialized, s3._ended = loop, loop.create_future(), loop.create_future()
        s3.feed(Opcode.INIT, 1, 0, abi.INIT_IN.pack(7, 45, 131072, offered, 0xFF))
        acl_out = abi.InitOut._make(abi.INIT_OUT.unpack(s3.replies[-1][2]))
        assert acl_out.flags == out.flags | InitFlag.POSIX_ACL  # asked for by a file system that keeps ACLs
        s2 = Capture(FakeOps())
        s2._loop, s2._initialized, s2._ended = loop, loop.create_future(), loop.create_future()
        s2.feed(Opcode.INIT, 1, 0, abi.INIT_IN_V1.pack(7, 19, 0, offered))
        assert s2.replies[-1][1] == -errno.EPROTO and s2.ended
        with pytest.raises(ConnectionError):
            await s2._initialized

    asyncio.run(main())


def test_suspended_requests_beyond_max_tasks_pause_reading() -> None:
    async def main() -> None:
        ops = FakeOps()
        s = Capture(ops)  # max_tasks=3
        s._loop = asyncio.get_running_loop()
        paused: list[bool] = []
        s._stop_reading = lambda: paused.append(True)  # type: ignore[method-assign]
        s._resume_reading = lambda: paused.append(False)  # type: ignore[method-assign]
        for i in range(3):
            s.feed(Opcode.WRITE, i, 5, abi.WRITE_IN.pack(i, 0, 1, 0, 0, 0, 0) + b"x")
        assert paused == [True]
        ops.gate.set()
        await asyncio.sleep(0.01)
        assert paused[-1] is False and len(s.replies) == 3

    asyncio.run(main())
