"""Write-behind and drop-behind (writebehind.py), seen from the page cache: a file streamed through
the mirror leaves few dirty pages on either node (its fsync finds little left to write), the replica
keeps little of it cached; random writes are left to the kernel; the content and order stay the
primary's whatever the hints did, on file systems that ignore them too; a write the replica cannot
store is never acknowledged."""

from __future__ import annotations

import ctypes
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from safekit_cloud.core.replication import messages as m
from safekit_cloud.core.replication.writebehind import WRITE_BEHIND, Run, Step, advance

from .conftest import replicate, run, stream_pair
from .harness import Mirror, fuse_available, running_mirror

CHUNK = m.MAX_CHUNK
MIB = 1 << 20
PAGE = 4096
_libc = ctypes.CDLL(None, use_errno=True)
_SYS_CACHESTAT = 451  # x86_64 and the generic table (Linux 6.5)


@dataclass
class CacheStat:
    cached: int  # pages of the file in the page cache
    dirty: int  # of which not yet written, nor being written
    writeback: int  # of which being written


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def cachestat(fd: int) -> CacheStat:
    """The page cache's view of a whole file, without reading it (cachestat(2))."""
    rng, st = _Range(0, 0), _Stat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cachestat: {os.strerror(err)}")
    return CacheStat(st.nr_cache, st.nr_dirty, st.nr_writeback)


def _cachestat_missing() -> str | None:
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        cachestat(fd)
    except OSError as exc:
        return f"cachestat(2) unavailable ({exc}): needs Linux 6.5"
    finally:
        os.close(fd)
    return None


def test_only_a_long_sequential_run_is_handed_to_the_disk() -> None:
    run_ = Run()
    steps: list[Step] = []
    for off in range(0, 3 * WRITE_BEHIND, MIB):  # 1 MiB writes, one after the other
        step = advance(run_, off, MIB)
        run_ = step.run
        steps.append(step)
    handed = [(s.write, s.drop) for s in steps if s.write is not None]
    assert handed == [((0, WRITE_BEHIND), None),
                      ((WRITE_BEHIND, WRITE_BEHIND), (0, WRITE_BEHIND)),
                      ((2 * WRITE_BEHIND, WRITE_BEHIND), (WRITE_BEHIND, WRITE_BEHIND))]

    rnd, run_ = random.Random(3), Run()
    for _ in range(10_000):  # 4 KiB writes at scattered offsets: a database, never a run
        step = advance(run_, rnd.randrange(0, 1 << 30, PAGE), PAGE)
        run_ = step.run
        assert step.write is None and step.drop is None

    step = advance(Run(0, WRITE_BEHIND - PAGE), 5 * MIB, MIB)  # a jump starts a new run
    assert step.write is None and step.run == Run(5 * MIB, 6 * MIB)


@pytest.mark.fuse
@pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))
@pytest.mark.skipif(_cachestat_missing() is not None, reason=str(_cachestat_missing()))
def test_a_streamed_file_leaves_little_to_write_at_fsync_and_little_cached_on_the_replica(tmp_path: Path) -> None:
    backing: list[int] = []

    def keep_backing(primary: Path, replica: Path) -> None:  # the primary's real files, under the mount
        backing.append(os.open(primary, os.O_PATH | os.O_DIRECTORY))

    size = 64 * MIB
    data = random.Random(5).randbytes(size)
    try:
        with running_mirror(tmp_path, Mirror, keep_backing) as mir:
            fd = os.open(mir.primary / "video.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for off in range(0, size, MIB):
                    assert os.write(fd, data[off:off + MIB]) == MIB
                local = os.open("video.bin", os.O_RDONLY, dir_fd=backing[0])
                replica = os.open(mir.replica / "video.bin", os.O_RDONLY)
                try:
                    on_primary, on_replica = cachestat(local), cachestat(replica)
                finally:
                    os.close(local)
                    os.close(replica)
                os.fsync(fd)
            finally:
                os.close(fd)
            assert (mir.replica / "video.bin").read_bytes() == data
    finally:
        for d in backing:
            os.close(d)
    pages = size // PAGE
    # Without write-behind every page would still be dirty: nothing else writes 64 MiB this soon.
    assert on_primary.dirty <= WRITE_BEHIND // PAGE, on_primary
    assert on_replica.dirty <= WRITE_BEHIND // PAGE, on_replica
    # The application may read it back: kept (a CI run once saw 224 of the 16,384 pages reclaimed
    # by the kernel after an hour of soaks on this VM; dropping behind would leave at most half).
    assert on_primary.cached >= pages - pages // 16, on_primary
    assert on_replica.cached <= pages // 2, on_replica  # nothing reads the replica: dropped behind


def _mixed_ops(model: bytearray) -> list[m.Op]:
    """Sequential runs long enough to be handed to the disk and dropped from the replica's cache,
    interleaved with what comes back over them: small and unaligned writes over dropped ranges,
    a second handle on the same file, a truncation, a sync write, a rename."""
    rnd = random.Random(7)
    ops: list[m.Op] = [m.Create(0, b"f", 0o100644, os.getuid(), os.getgid(), hid=1)]

    def write(off: int, data: bytes, sync: bool = False, hid: int = 1) -> None:
        ops.append(m.Write(0, hid, off, data, sync))
        end = off + len(data)
        if end > len(model):
            model.extend(bytes(end - len(model)))
        model[off:end] = data

    for i in range(80):  # 20 MiB in one run: handed to the disk twice, the first part dropped
        write(i * CHUNK, rnd.randbytes(CHUNK))
    write(CHUNK + 100, b"small, over a dropped range")
    write(3 * CHUNK, rnd.randbytes(CHUNK))
    write(5 * CHUNK + 7, rnd.randbytes(CHUNK))  # large but unaligned
    write(7 * CHUNK, rnd.randbytes(CHUNK - 100))  # ragged end
    write(7 * CHUNK + 9000, b"over the ragged end's neighbour")
    ops.append(m.Open(0, 2, b"f"))  # a second handle on the same file: a different descriptor
    write(8 * CHUNK, rnd.randbytes(CHUNK))
    write(8 * CHUNK + 5, b"same bytes through the other handle", hid=2)
    write(9 * CHUNK, rnd.randbytes(CHUNK), hid=2)
    write(9 * CHUNK + CHUNK - 10, b"and back through the first", hid=1)
    ops.append(m.Close(0, 2))
    ops.append(m.SetAttr(0, b"f", hid=1, size=10 * CHUNK + 4096))  # shrink
    del model[10 * CHUNK + 4096:]
    write(12 * CHUNK, rnd.randbytes(CHUNK), sync=True)  # grows it again with a hole
    for i in range(40):  # a second long run, starting in the hole
        write(11 * CHUNK + i * CHUNK // 2, rnd.randbytes(CHUNK // 2))
    ops.append(m.Close(0, 1))
    ops.append(m.Rename(0, b"f", b"g"))
    return ops


@pytest.mark.parametrize("protocol", ["A", "B", "C"])
def test_runs_handed_to_the_disk_keep_the_primarys_content_and_order(dirs: tuple[Path, Path, Path],
                                                                      protocol: str) -> None:
    _, replica, _ = dirs
    model = bytearray()
    replicate(replica, _mixed_ops(model), protocol)
    assert (replica / "g").read_bytes() == bytes(model)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[object]:
    """mount(kind, size) -> a fresh file system of that kind, unmounted at the end."""
    mounted: list[Path] = []

    def mount(kind: str, size: str = "") -> Path:
        where = tmp_path / f"{kind}{len(mounted)}"
        where.mkdir()
        opts = ["-o", f"size={size}"] if size else []
        subprocess.run(["mount", "-t", kind, *opts, kind, str(where)], check=True)
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("kind", ["tmpfs", "ramfs"])
def test_file_systems_without_writeback_still_get_every_byte(small_fs, kind: str) -> None:
    replica = small_fs(kind)  # nothing to hand to a disk, nothing dropped: the hints do nothing
    model = bytearray()
    replicate(replica, _mixed_ops(model))
    assert (replica / "g").read_bytes() == bytes(model)


def test_write_the_replica_cannot_store_is_not_acknowledged(small_fs, caplog: pytest.LogCaptureFixture) -> None:
    replica = small_fs("tmpfs", "1m")

    async def scenario() -> list[bool]:
        receiver, sender = await stream_pair(replica, timeout=5)
        acked = [await sender.submit(m.Create(0, b"f", 0o100644, 0, 0, hid=1))]
        for i in range(8):  # 2 MiB into 1 MiB
            acked.append(await sender.submit(m.Write(0, 1, i * CHUNK, b"x" * CHUNK)))
        await sender.close()
        await receiver.stop()
        return acked

    acked = run(scenario())
    stored = (replica / "f").stat().st_size
    assert acked[0] and not all(acked)
    assert sum(acked[1:]) * CHUNK <= stored <= 1 << 20  # every acknowledged write is there
    assert all(not a for a in acked[1 + acked[1:].index(False):])  # nothing after the failure either
    assert "No space left on device" in caplog.text
