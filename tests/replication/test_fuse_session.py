"""The FUSE layer over /dev/fuse, through real mounts: what is negotiated, fallocate replicated in
every mode (live, and while ALONE then resynchronised), set-user-ID cleared on writes by other users
(HANDLE_KILLPRIV_V2) exactly as a local file system does, O_TRUNC, concurrency, requests that wait
(parked on their future, or continued by a task) and get its outcome, and ending a mount with a
request in flight."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safekit_cloud.core.replication import messages as m
from safekit_cloud.core.replication.fuseabi import InitFlag
from safekit_cloud.core.replication.fusefs import ReplicatedFS
from safekit_cloud.core.replication.fusesession import umount_detach
from safekit_cloud.core.replication.mount import FuseMount, mounted_fuse_at
from safekit_cloud.core.replication.syscalls import fallocate

from .harness import (
    LoopThread,
    Mirror,
    describe_tree,
    force_unmount,
    fuse_available,
    run_in_threads,
    running_mirror,
)
from .resync_harness import ResyncMirror

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))]

KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE = 0x01, 0x02, 0x08, 0x10
NOBODY = 65534


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    with running_mirror(tmp_path_factory.mktemp("session"), Mirror) as mir:
        yield mir


def assert_same(mir: Any) -> None:
    for _ in range(20):  # RELEASE (and the times it carries) is asynchronous after close(2)
        if describe_tree(mir.primary, mir.excluder) == describe_tree(mir.replica):
            return
        time.sleep(0.05)
    a, b = describe_tree(mir.primary, mir.excluder), describe_tree(mir.replica)
    diff = {k: (str(a.get(k))[:200], str(b.get(k))[:200]) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert not diff, diff


@contextlib.contextmanager
def plain_mount(directory: Path, make: Any = None) -> Iterator[tuple[FuseMount, LoopThread]]:
    """A mount with no replication, served by its own loop thread; always removed afterwards."""
    loop = LoopThread("fuse-plain")
    mount = FuseMount(directory, make or (lambda fd: ReplicatedFS(fd)))
    try:
        loop.call(mount.start())
        yield mount, loop
    finally:
        try:
            loop.call(mount.stop(), timeout=30)
        finally:
            force_unmount(directory)
            loop.close()


# ---- negotiation ----


def test_negotiated_flags(mirror: Mirror) -> None:
    session = mirror.mount.session
    assert session is not None and session.proto_minor >= 33
    for flag in (InitFlag.HANDLE_KILLPRIV_V2, InitFlag.MAX_PAGES, InitFlag.DO_READDIRPLUS, InitFlag.ASYNC_READ,
                 InitFlag.PARALLEL_DIROPS, InitFlag.BIG_WRITES, InitFlag.POSIX_ACL):
        assert session.flags & flag, flag.name
    for flag in (InitFlag.ATOMIC_O_TRUNC, InitFlag.WRITEBACK_CACHE, InitFlag.EXPORT_SUPPORT, InitFlag.DONT_MASK,
                 InitFlag.SETXATTR_EXT):
        assert not session.flags & flag, flag.name


def test_no_capability_getxattr_per_write(mirror: Mirror) -> None:
    """HANDLE_KILLPRIV_V2: the kernel no longer asks getxattr("security.capability") before each
    cached write (pyfuse3 could not negotiate it: one extra request per write)."""
    fs = mirror.mount.fs
    calls: list[bytes] = []
    original = fs.getxattr

    async def counting(inode: int, name: bytes, ctx: Any) -> bytes:
        calls.append(name)
        return await original(inode, name, ctx)

    fs.getxattr = counting  # type: ignore[method-assign]
    try:
        with open(mirror.primary / "caps", "w+b") as f:  # O_RDWR: a cached open
            for i in range(50):
                f.write(b"%06d" % i)
                f.flush()
    finally:
        del fs.getxattr
    assert calls.count(b"security.capability") <= 1  # at most once per inode, then S_NOSEC
    assert_same(mirror)


# ---- O_TRUNC, umask ----


def test_open_with_o_trunc_truncates_an_existing_file(mirror: Mirror) -> None:
    """fusefs.open leaves O_TRUNC to the kernel's SETATTR (ATOMIC_O_TRUNC not negotiated). Under
    pyfuse3 (which negotiated it) open(O_TRUNC) of a file already looked up kept the old content."""
    p = mirror.primary / "trunc"
    p.write_bytes(b"x" * 10_000)
    assert p.stat().st_size == 10_000  # the dentry is cached: the next open is an OPEN, not a CREATE
    with open(p, "wb") as f:
        f.write(b"short")
    assert p.read_bytes() == b"short"
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert p.stat().st_size == 0
    assert_same(mirror)


def test_new_entries_get_the_umask_as_on_a_local_file_system(tmp_path: Path) -> None:
    """DONT_MASK is not negotiated: the kernel applies the caller's umask to the mode it sends, as
    it did under pyfuse3; the result must be what a local directory gives."""
    mnt, local = tmp_path / "mnt", tmp_path / "local"
    mnt.mkdir()
    local.mkdir()
    with plain_mount(mnt):
        old = os.umask(0o027)
        try:
            for root in (mnt, local):
                os.mkdir(root / "um-dir", 0o777)
                os.close(os.open(root / "um-file", os.O_CREAT | os.O_WRONLY, 0o666))
                os.mkfifo(root / "um-fifo", 0o666)
        finally:
            os.umask(old)
        for name in ("um-dir", "um-file", "um-fifo"):
            assert os.lstat(mnt / name).st_mode == os.lstat(local / name).st_mode, name


# ---- fallocate ----


def _alloc(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _holes(path: Path) -> list[tuple[int, int]]:
    """The holes of a file as (start, end) pairs (SEEK_HOLE/SEEK_DATA)."""
    out, pos = [], 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        while pos < size:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            if hole >= size:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = size
            out.append((hole, data))
            pos = data
    finally:
        os.close(fd)
    return out


def test_fallocate_in_every_mode_is_replicated(mirror: Mirror) -> None:
    p, r = mirror.primary / "falloc", mirror.replica / "falloc"
    data = random.Random(3).randbytes(512 * 1024)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        fallocate(fd, 0, 0, 1 << 20)  # allocate and grow to 1 MiB
        assert os.fstat(fd).st_size == r.stat().st_size == 1 << 20
        fallocate(fd, KEEP_SIZE, 1 << 20, 4 << 20)  # reserve 4 MiB past the end, size unchanged
        assert r.stat().st_size == 1 << 20 and _alloc(r) >= 5 << 20
        fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 64 * 1024, 128 * 1024)
        assert (64 * 1024, 192 * 1024) in _holes(r)
        fallocate(fd, ZERO_RANGE, 400 * 1024, 8 * 1024)
        fallocate(fd, ZERO_RANGE | KEEP_SIZE, (1 << 20) - 4096, 64 * 1024)  # past the end: size kept
        fallocate(fd, ZERO_RANGE, (1 << 20) + 100, 1000)  # grows the file
        assert os.fstat(fd).st_size == (1 << 20) + 1100
        with pytest.raises(OSError) as bad:
            fallocate(fd, COLLAPSE_RANGE, 0, 4096)
        assert bad.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    expected = bytearray(data + bytes((1 << 20) + 1100 - len(data)))
    expected[64 * 1024:192 * 1024] = bytes(128 * 1024)
    expected[400 * 1024:408 * 1024] = bytes(8 * 1024)
    assert p.read_bytes() == r.read_bytes() == bytes(expected)
    assert_same(mirror)


def test_fallocate_through_a_write_only_open_and_posix_fallocate(mirror: Mirror) -> None:
    p, r = mirror.primary / "falloc-wo", mirror.replica / "falloc-wo"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 3 << 20)  # glibc calls fallocate(2) now that it is served
        os.pwrite(fd, b"tail", (3 << 20) - 4)
    finally:
        os.close(fd)
    assert r.stat().st_size == 3 << 20 and _alloc(r) >= 3 << 20
    assert_same(mirror)


def test_a_fallocate_that_fails_here_is_undone_on_the_peer(tmp_path: Path) -> None:
    """Driven without a mount: the peer ran the fallocate (sent first), ours failed; the peer gets
    our content of the range and our size back."""
    from safekit_cloud.core.replication.replicator import RecordingReplicator

    (tmp_path / "f").write_bytes(b"a" * 10_000)
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        repl = RecordingReplicator()
        fs = ReplicatedFS(root, repl)
        ino = os.stat(tmp_path / "f").st_ino
        fs.inodes.lookup(ino, b"f")
        fh = fs._register(os.open(tmp_path / "f", os.O_RDONLY), ino, os.O_RDONLY, 0)  # fallocate: EBADF here
        with pytest.raises(Exception) as exc:
            asyncio.run(fs.fallocate(fh, ZERO_RANGE, 4096, 20_000))
        assert getattr(exc.value, "errno", None) == errno.EBADF
        assert isinstance(repl.ops[0], m.Open) and repl.ops[1] == m.Fallocate(0, fh, ZERO_RANGE, 4096, 20_000)
        assert repl.ops[2:] == [m.Write(0, fh, 4096, b"a" * (10_000 - 4096), False),
                                m.SetAttr(0, b"f", hid=fh, size=10_000)]
        with pytest.raises(Exception) as exc:
            asyncio.run(fs.fallocate(fh, COLLAPSE_RANGE, 0, 4096))
        assert getattr(exc.value, "errno", None) == errno.EOPNOTSUPP
    finally:
        os.close(root)


@pytest.fixture
def resync_mirror(tmp_path: Path) -> Iterator[ResyncMirror]:
    with running_mirror(tmp_path, ResyncMirror, timeout=2.0) as mir:
        yield mir


def test_fallocate_while_alone_is_brought_over_by_the_resync(resync_mirror: ResyncMirror) -> None:
    mir = resync_mirror
    p = mir.primary
    rng = random.Random(5)
    for name in ("grow", "punch", "zero", "reserve"):
        (p / name).write_bytes(rng.randbytes(256 * 1024))
    mir.start_secondary()
    mir.start_primary()
    mir.connect()
    mir.wait_mode("live")
    assert_same(mir)
    mir.stop_secondary()
    for name, mode, off, length in (("grow", 0, 0, 1 << 20), ("punch", PUNCH_HOLE | KEEP_SIZE, 4096, 65536),
                                    ("zero", ZERO_RANGE, 200 * 1024, 100 * 1024),
                                    ("reserve", KEEP_SIZE, 256 * 1024, 1 << 20)):
        fd = os.open(p / name, os.O_RDWR)
        try:
            fallocate(fd, mode, off, length)
        finally:
            os.close(fd)
    mir.wait_mode("alone")
    assert mir.status()["journal"]["trusted"]
    mir.start_secondary()
    mir.connect()
    mir.wait_mode("live")
    assert mir.status()["last_resync"]["mode"] == "journal"
    assert_same(mir)
    assert (mir.replica / "grow").stat().st_size == 1 << 20
    assert (mir.replica / "punch").read_bytes()[4096:69632] == bytes(65536)


# ---- set-user-ID cleared on writes by other users, as locally ----


def _python_for_nobody() -> str | None:
    """An interpreter the unprivileged user can run (the venv's may live under /root)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            subprocess.run([candidate, "-c", "pass"], user=NOBODY, group=NOBODY, check=True, timeout=30,
                           capture_output=True)
            return candidate
        except (OSError, subprocess.SubprocessError):
            continue
    return None


_UNPRIVILEGED = """
import os, sys
fd, how = int(sys.argv[1]), sys.argv[2]
if how == "truncate":
    os.ftruncate(fd, 1)
else:
    os.pwrite(fd, b"new", 0)
"""


@pytest.fixture(scope="module")
def nobody_python() -> str:
    python = _python_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter the user nobody may run")
    return python


@pytest.mark.parametrize("how", ["cached write", "direct write", "truncate", "root write"])
@pytest.mark.parametrize("mode", [0o6777, 0o2767, 0o4777], ids=oct)
def test_setuid_is_cleared_as_on_a_local_file_system(mirror: Mirror, tmp_path: Path, nobody_python: str,
                                                     how: str, mode: int) -> None:
    """A write or truncate by a user without CAP_FSETID (through a descriptor root opened): ours
    (primary and replica) ends with the mode a local ext4 directory gives for the same calls."""
    name = f"suid-{how.replace(' ', '-')}-{mode:o}"
    results = []
    for root in (mirror.primary, tmp_path):
        path = root / name
        path.write_bytes(b"old content")
        os.chmod(path, mode)
        assert stat.S_IMODE(path.stat().st_mode) == mode
        fd = os.open(path, os.O_WRONLY if how == "direct write" else os.O_RDWR)
        try:
            if how == "root write":
                os.pwrite(fd, b"new", 0)  # root has CAP_FSETID: the bits stay
            else:
                subprocess.run([nobody_python, "-c", _UNPRIVILEGED, str(fd), how], user=NOBODY, group=NOBODY,
                               pass_fds=(fd,), check=True, timeout=30, capture_output=True)
        finally:
            os.close(fd)
        results.append(stat.S_IMODE(os.stat(path).st_mode))
    ours, local = results
    expected = local
    if how != "root write" and mode & stat.S_ISGID and not mode & stat.S_IXGRP:
        # The one documented difference (fuse.h, HANDLE_KILLPRIV_V2): set-group-ID without group
        # execute stays (it grants nothing on exec); a local file system also drops it for a writer
        # outside the file's group, which the server cannot fully tell (supplementary groups).
        expected |= stat.S_ISGID
    assert ours == expected, (oct(ours), oct(local))
    if how != "root write":
        assert not ours & stat.S_ISUID
    assert_same(mirror)
    assert stat.S_IMODE(os.stat(mirror.replica / name).st_mode) == ours


def test_truncate_by_path_clears_setuid_as_locally(nobody_python: str) -> None:
    """A truncate by name (SETATTR without a handle) from a user without CAP_FSETID."""
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="killpriv-"))
    try:
        os.chmod(base, 0o755)  # the unprivileged user must reach the files by name
        mnt, local = base / "mnt", base / "local"
        for d in (mnt, local):
            d.mkdir()
            os.chmod(d, 0o755)
        with plain_mount(mnt):
            modes = []
            for root in (mnt, local):
                path = root / "f"
                path.write_bytes(b"content")
                os.chmod(path, 0o6777)
                subprocess.run([nobody_python, "-c", "import os, sys; os.truncate(sys.argv[1], 2)", str(path)],
                               user=NOBODY, group=NOBODY, check=True, timeout=30, capture_output=True)
                modes.append(stat.S_IMODE(os.stat(path).st_mode))
                assert path.read_bytes() == b"co"
            assert modes[0] == modes[1] == 0o777
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_chown_clears_setuid_as_locally(mirror: Mirror, tmp_path: Path) -> None:
    results = []
    for root in (mirror.primary, tmp_path):
        path = root / "suid-chown"
        path.write_bytes(b"x")
        os.chmod(path, 0o6755)
        os.chown(path, 1000, 1000)
        results.append(stat.S_IMODE(os.stat(path).st_mode))
    assert results[0] == results[1] and not results[0] & stat.S_ISUID
    assert_same(mirror)


# ---- concurrency ----


def test_concurrent_writers(mirror: Mirror) -> None:
    errors: list[BaseException] = []
    shared = mirror.primary / "shared-conc"
    shared.write_bytes(bytes(8 * 64 * 4096))

    def writer(i: int) -> None:
        try:
            rng = random.Random(i)
            own = mirror.primary / f"conc-{i}"
            with open(own, "wb") as f:
                for _ in range(64):  # one write(2) each, of various sizes
                    f.write(rng.randbytes(rng.randrange(1, 70_000)))
                    f.flush()
                os.fsync(f.fileno())
            fd = os.open(shared, os.O_WRONLY)
            try:
                for k in range(64):  # disjoint blocks of one file from every thread
                    os.pwrite(fd, rng.randbytes(4096), (k * 8 + i) * 4096)
            finally:
                os.close(fd)
            os.rename(own, mirror.primary / f"conc-{i}.done")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    assert not run_in_threads(writer, 8, timeout=60), "a writer hung on the mount"
    assert not errors, errors
    assert mirror.repl.sender is not None, mirror.lost
    assert_same(mirror)


def test_large_directory_listing_spans_several_readdir_replies(tmp_path: Path) -> None:
    d = tmp_path / "big"
    d.mkdir()
    names = {f"entry-{i:05d}-{'n' * (i % 40)}" for i in range(3000)}
    for name in names:
        (d / name).touch()
    with plain_mount(d):
        assert set(os.listdir(d)) == names
        with os.scandir(d) as it:
            assert all(e.is_file() for e in it)


# ---- errors, several mounts, ending a mount ----


def test_a_handler_bug_fails_one_call_and_the_mount_goes_on(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_bytes(b"x")
    with plain_mount(d) as (mount, _):
        async def broken(*args: Any) -> bytes:
            raise RuntimeError("bug")

        mount.fs.listxattr = broken  # type: ignore[union-attr, method-assign]
        with pytest.raises(OSError) as exc:
            os.listxattr(d / "f")
        assert exc.value.errno == errno.EIO
        assert (d / "f").read_bytes() == b"x"  # still served


def test_several_mounts_in_one_process(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with plain_mount(a), plain_mount(b):
        (a / "f").write_bytes(b"A")
        (b / "f").write_bytes(b"B")
        assert mounted_fuse_at(a) and mounted_fuse_at(b)
        assert (a / "f").read_bytes() == b"A" and (b / "f").read_bytes() == b"B"
    assert not mounted_fuse_at(a) and not mounted_fuse_at(b)


def test_unmounted_from_outside_ends_the_session(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    with plain_mount(d) as (mount, loop):
        (d / "f").write_bytes(b"x")
        umount_detach(d)
        loop.call(asyncio.wait_for(mount.wait(), 10))
        assert mount.session is not None and mount.session.ended
    assert not mounted_fuse_at(d)


class _Stuck:
    """A replicator whose peer never answers."""

    active = True
    epoch = 1

    def __init__(self) -> None:
        self.entered = threading.Event()

    async def submit(self, *ops: Any) -> None:
        self.entered.set()
        await asyncio.Event().wait()


_STUCK_WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
try:
    os.pwrite(fd, b"y", 0)
except OSError as exc:
    sys.exit(exc.errno)
"""


def test_stopping_with_a_request_in_flight_does_not_hang(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_bytes(b"x" * 100)
    stuck = _Stuck()
    with plain_mount(d, lambda fd: ReplicatedFS(fd, stuck)) as (mount, loop):  # type: ignore[arg-type]
        writer = subprocess.Popen([sys.executable, "-c", _STUCK_WRITER, str(d / "f")])
        try:
            assert stuck.entered.wait(10), "the write never reached the replicator"
            deadline = time.monotonic() + 10
            while mount.session is not None and mount.session.in_flight != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert mount.session is not None and mount.session.in_flight == 1  # suspended: parked
            started = time.monotonic()
            loop.call(mount.stop(), timeout=20)
            assert time.monotonic() - started < 10
            assert writer.wait(10) in (errno.ECONNABORTED, errno.ENOTCONN)  # an error, not a hang
        finally:
            loop.call(mount.stop(), timeout=20)  # first: a request already read is not killable
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    assert not mounted_fuse_at(d)


class _Answering:
    """A replicator whose peer answers each operation later, on the event loop: with `outcome`
    (an exception set on the future the handler waits on, or success), optionally after a bare
    `await asyncio.sleep(0)` first (a suspension that is not a future: continued by a task)."""

    active = True
    epoch = 1

    def __init__(self, outcome: BaseException | None, yield_first: bool = False) -> None:
        self.outcome, self.yield_first = outcome, yield_first
        self.answered = 0

    async def submit(self, *ops: Any) -> bool:
        if self.yield_first:
            await asyncio.sleep(0)
        fut = asyncio.get_running_loop().create_future()
        if self.outcome is None:
            asyncio.get_running_loop().call_later(0.01, fut.set_result, True)
        else:
            asyncio.get_running_loop().call_later(0.01, fut.set_exception, self.outcome)
        try:
            return await fut
        finally:
            self.answered += 1


@pytest.mark.parametrize("yield_first", [False, True], ids=["parked", "task"])
def test_a_request_resumed_after_waiting_gets_the_outcome_of_what_it_waited_for(
        tmp_path: Path, yield_first: bool) -> None:
    from safekit_cloud.core.replication.fuseabi import FUSEError

    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_bytes(b"x" * 10)
    failing = _Answering(FUSEError(errno.EDQUOT), yield_first)
    with plain_mount(d, lambda fd: ReplicatedFS(fd, failing)) as (mount, _):  # type: ignore[arg-type]
        fd = os.open(d / "f", os.O_WRONLY)
        try:
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"y", 0)
            assert exc.value.errno == errno.EDQUOT
            assert failing.answered >= 1
            failing.outcome = None  # the peer answers again: writes succeed
            for i in range(20):
                assert os.pwrite(fd, bytes([65 + i]), i) == 1
        finally:
            os.close(fd)
        assert (d / "f").read_bytes()[:10] == bytes(range(65, 75))
        assert _settles_to_zero(mount)  # the RELEASE after close(2) waits for its answer too


def test_more_waiting_requests_than_the_session_takes_at_once_all_complete(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    n = 40
    for i in range(n):
        (d / f"f{i}").write_bytes(b"-")
    slow = _Answering(None)
    with plain_mount(d, lambda fd: ReplicatedFS(fd, slow)) as (mount, _):  # type: ignore[arg-type]
        assert mount.session is not None
        mount.session.max_tasks = 4  # beyond 4 suspended requests, /dev/fuse is not read

        written: list[int] = []

        def write(i: int) -> None:
            fd = os.open(d / f"f{i}", os.O_WRONLY)
            try:
                written.append(os.pwrite(fd, str(i % 10).encode(), 0))
            finally:
                os.close(fd)

        assert run_in_threads(write, n, 20) == []  # none hung
        assert written == [1] * n
        assert [(d / f"f{i}").read_bytes() for i in range(n)] == [str(i % 10).encode() for i in range(n)]
        assert _settles_to_zero(mount)


def _settles_to_zero(mount: FuseMount) -> bool:
    deadline = time.monotonic() + 10
    while mount.session is not None and mount.session.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    return mount.session is not None and mount.session.in_flight == 0


def test_trusted_xattr_names_are_listed_to_privileged_callers_only(mirror: Mirror, tmp_path: Path,
                                                                    nobody_python: str) -> None:
    """The agent lists a file's xattrs as root; an unprivileged caller must not see trusted.*
    names through the mount, as a local file system hides them from it (root still sees them)."""
    lister = "import os, sys; print(sorted(os.listxattr(int(sys.argv[1]))))"
    seen = {}
    for where, root in (("mount", mirror.primary), ("local", tmp_path)):
        f = root / "tagged"
        f.write_bytes(b"x")
        os.setxattr(f, "trusted.secret", b"s")
        os.setxattr(f, "user.plain", b"p")
        fd = os.open(f, os.O_RDONLY)
        try:
            seen[where] = subprocess.run([nobody_python, "-c", lister, str(fd)], user=NOBODY, group=NOBODY,
                                         extra_groups=[], pass_fds=[fd], capture_output=True, text=True,
                                         check=True, timeout=30).stdout.strip()
        finally:
            os.close(fd)
        assert sorted(os.listxattr(f)) == ["trusted.secret", "user.plain"]
    assert seen["mount"] == seen["local"] == "['user.plain']"
