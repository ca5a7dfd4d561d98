"""Large aligned writes reach the replica with O_DIRECT, from the receiver's writer thread
(directio.py): the content and the order stay the primary's, the replica's page cache is left alone,
a write the replica cannot store is never acknowledged, and a file system that refuses O_DIRECT
still gets every byte."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from safekit_cloud.core.replication import messages as m

from .conftest import STREAM_NAME, replicate, run, stream_pair

NAME = STREAM_NAME
CHUNK = m.MAX_CHUNK
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


def cached_pages(path: Path) -> int:
    """Pages of `path` in the page cache: mincore of a shared read-only mapping (reads nothing)."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, ctypes.c_size_t(size), mmap.PROT_READ, mmap.MAP_SHARED, fd, ctypes.c_long(0))
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec):
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            _libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec)


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



def _mixed_ops(model: bytearray) -> list[m.Op]:
    """Large aligned writes (direct on the replica) interleaved with what must wait for them:
    small and unaligned writes over the same ranges, a truncation, a sync write, a rename."""
    rnd = random.Random(7)
    ops: list[m.Op] = [m.Create(0, b"f", 0o100644, os.getuid(), os.getgid(), hid=1)]

    def write(off: int, data: bytes, sync: bool = False, hid: int = 1) -> None:
        ops.append(m.Write(0, hid, off, data, sync))
        end = off + len(data)
        if end > len(model):
            model.extend(bytes(end - len(model)))
        model[off:end] = data

    for i in range(16):  # 4 MiB of direct writes
        write(i * CHUNK, rnd.randbytes(CHUNK))
    write(CHUNK + 100, b"small over a direct range")  # buffered, after the direct one below it
    write(3 * CHUNK, rnd.randbytes(CHUNK))  # direct again, over what the small write left cached
    write(5 * CHUNK + 7, rnd.randbytes(CHUNK))  # large but unaligned: the page cache
    write(7 * CHUNK, rnd.randbytes(CHUNK - 100))  # aligned start, ragged end: direct, then its tail
    write(7 * CHUNK + 9000, b"over the direct part, through the tail's neighbour")
    ops.append(m.Open(0, 2, b"f"))  # a second handle on the same file: a different descriptor
    write(8 * CHUNK, rnd.randbytes(CHUNK))
    write(8 * CHUNK + 5, b"same bytes through the other handle", hid=2)
    write(9 * CHUNK, rnd.randbytes(CHUNK), hid=2)
    write(9 * CHUNK + CHUNK - 10, b"and back through the first", hid=1)
    ops.append(m.Close(0, 2))
    ops.append(m.SetAttr(0, b"f", hid=1, size=10 * CHUNK + 4096))  # shrink
    del model[10 * CHUNK + 4096:]
    write(12 * CHUNK, rnd.randbytes(CHUNK), sync=True)  # grows it again with a hole
    write(6 * CHUNK, rnd.randbytes(CHUNK // 2))  # 128 KiB: the smallest direct write
    ops.append(m.Close(0, 1))
    ops.append(m.Rename(0, b"f", b"g"))
    return ops


@pytest.mark.parametrize("protocol", ["A", "B", "C"])
def test_direct_and_buffered_writes_keep_the_primarys_order(dirs: tuple[Path, Path, Path], protocol: str) -> None:
    _, replica, _ = dirs
    model = bytearray()
    replicate(replica, _mixed_ops(model), protocol)
    assert (replica / "g").read_bytes() == bytes(model)


def test_large_aligned_writes_leave_the_replicas_page_cache_alone(dirs: tuple[Path, Path, Path]) -> None:
    _, replica, _ = dirs
    data = random.Random(1).randbytes(32 * CHUNK)  # 8 MiB

    async def scenario() -> None:
        receiver, sender = await stream_pair(replica)
        assert await sender.submit(m.Create(0, b"big", 0o100644, os.getuid(), os.getgid(), hid=1),
                                   m.Create(0, b"small", 0o100644, os.getuid(), os.getgid(), hid=2))
        for off in range(0, len(data), CHUNK):
            assert await sender.submit(m.Write(0, 1, off, data[off:off + CHUNK]),
                                       m.Write(0, 2, off // 64, data[off:off + CHUNK // 64]))
        assert await sender.submit(m.Close(0, 1), m.Close(0, 2))
        await sender.close()
        await receiver.stop()

    run(scenario())
    big, small = replica / "big", replica / "small"
    assert cached_pages(big) == 0  # straight to the disk
    assert cached_pages(small) == small.stat().st_size // 4096  # 4 KiB writes: the page cache
    assert big.read_bytes() == data


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


def test_file_system_refusing_direct_io_still_gets_every_byte(small_fs) -> None:
    replica = small_fs("ramfs")  # refuses O_DIRECT at open
    model = bytearray()
    ops = _mixed_ops(model)

    async def scenario() -> None:
        receiver, sender = await stream_pair(replica)
        assert await sender.submit(*ops)
        assert await sender.barrier()
        await sender.close()
        await receiver.stop()

    run(scenario())
    assert (replica / "g").read_bytes() == bytes(model)
