"""Large aligned writes on the secondary go to the disk with O_DIRECT, from a writer thread.

The replica's page cache is of no use to anyone (nothing reads the secondary's tree until a
failover), and filling it costs a copy of every byte plus, at the application's fsync, a flush of all
of it at once. Writing large aligned ranges straight to the disk, as a block replicator does, spreads
that flush over the stream and leaves fsync only the metadata. The writes run on one thread, in
order, while the event loop decrypts the next frames: the receiver acknowledges a batch only when its
writes are done (`Applier.when_written`).

Order. Direct writes among themselves keep their order (one thread). A buffered write waits for the
direct writes under way that overlap its byte range in the same file (same inode, whatever the
descriptor: two handles may name one file), and only for those: disjoint ranges end the same in any
order, and as direct ranges are whole pages, disjoint bytes are disjoint pages too. Any other
operation (truncate, fsync, rename, close...) waits for all of them (`drain`).

A write whose offset is aligned but whose length is not goes direct for its aligned part and
through the page cache for the rest (an application buffer that does not start on a page makes
the kernel split a 1 MiB write into such a pair of requests). Small, unaligned or O_SYNC writes, and
file systems that refuse O_DIRECT, keep the ordinary path; data is never lost to the choice: a
refused direct write is done again through the page cache.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .messages import MAX_CHUNK

log = logging.getLogger(__name__)

ALIGN = 4096  # memory, offset and length: what O_DIRECT asks of every file system we know
MIN_DIRECT = 128 * 1024  # below this the page cache is as cheap and keeps small writes merged
SLOTS = 8  # aligned buffers, so up to 8 x 256 KiB being written while the next frames are decoded
MAX_TWINS = 256  # O_DIRECT descriptors kept; writes to further files take the page cache


@dataclass
class _Pending:
    future: Future[None]
    slot: memoryview
    inode: tuple[int, int]
    start: int
    end: int


class DirectWriter:
    """O_DIRECT twins of the applier's descriptors, aligned buffers, and the thread that writes."""

    def __init__(self) -> None:
        self._twins: dict[int, int] = {}  # buffered fd -> its O_DIRECT twin, or -1 when refused
        self._inodes: dict[int, tuple[int, int]] = {}  # fd -> (st_dev, st_ino)
        self._mem = mmap.mmap(-1, SLOTS * MAX_CHUNK)  # page-aligned, as O_DIRECT needs the memory
        self._view = memoryview(self._mem)
        self._free = [self._view[i * MAX_CHUNK:(i + 1) * MAX_CHUNK] for i in range(SLOTS)]
        self._pending: deque[_Pending] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._enabled = True
        self._error: BaseException | None = None  # the first write that failed (the stream then ends)

    def submit(self, fd: int, data: bytes | memoryview, off: int) -> int:
        """Start writing the aligned part of `data` at `off` of `fd` directly. Returns how many
        bytes of `data` were taken (0: none, the whole write takes the ordinary path)."""
        size = len(data) - len(data) % ALIGN
        if not self._enabled or off % ALIGN or not MIN_DIRECT <= size <= MAX_CHUNK:
            return 0
        twin = self._twins.get(fd)
        if twin is None:
            if len(self._twins) >= MAX_TWINS:
                return 0
            twin = self._twins[fd] = _open_twin(fd)
        if twin < 0:
            return 0
        inode = self._inode(fd)
        self._reap(wait_all=False)  # frees what is done, waits for the oldest if none is free
        slot = self._free.pop()
        slot[:size] = memoryview(data)[:size]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="direct-write")
        future = self._pool.submit(self._write, twin, fd, slot, size, off)
        self._pending.append(_Pending(future, slot, inode, off, off + size))
        return size

    def before_buffered(self, fd: int, start: int, end: int) -> None:
        """A buffered write of [start, end) of `fd` is next: wait for the direct writes under way
        that overlap it in the same file (raises the first that failed)."""
        if not self._pending:
            return
        inode = self._inode(fd)
        last = -1
        for i, p in enumerate(self._pending):
            if p.inode == inode and p.start < end and start < p.end:
                last = i
        if last >= 0:
            self._reap(wait_all=False, through=last)

    def _inode(self, fd: int) -> tuple[int, int]:
        ino = self._inodes.get(fd)
        if ino is None:
            st = os.fstat(fd)
            ino = self._inodes[fd] = (st.st_dev, st.st_ino)
        return ino

    def _write(self, twin: int, fd: int, slot: memoryview, size: int, off: int) -> None:
        try:
            self._write_direct(twin, fd, slot, size, off)
        except BaseException as exc:
            self._error = self._error or exc  # what `when_written` reports, even if later ones succeed
            raise

    def _write_direct(self, twin: int, fd: int, slot: memoryview, size: int, off: int) -> None:
        with slot[:size] as data:
            try:
                done = os.pwrite(twin, data, off)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._enabled = False  # refused after all (alignment rules of this file system)
                done = os.pwrite(fd, data, off)
        if done != size:
            raise OSError(errno.EIO, f"short write ({done} of {size} bytes)")

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def _reap(self, wait_all: bool, through: int = -1) -> None:
        """Release the buffers of finished writes; wait for them all (`wait_all`), or for the
        first `through + 1`, or for the oldest when no buffer is free. Raises the first write that
        failed (after waiting for the rest when `wait_all`)."""
        error: BaseException | None = None
        while self._pending:
            p = self._pending[0]
            if not (wait_all or through >= 0 or p.future.done() or not self._free):
                break
            exc = p.future.exception()  # waits for it
            self._pending.popleft()
            self._free.append(p.slot)
            through -= 1
            if exc is not None and error is None:
                error = exc
                if not wait_all:
                    break
        if error is not None:
            raise error

    def drain(self) -> None:
        """Wait for every write under way (raises the first that failed)."""
        self._reap(wait_all=True)

    def when_written(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call `callback` (from the writer thread) once every write under way is done."""
        future = self._pending[-1].future  # one thread, in order: when it is done, all are
        future.add_done_callback(lambda f: callback(f.exception() or self._error))

    def forget(self, fd: int) -> None:
        """`fd` is about to be closed (a later descriptor may get the same number): close its
        twin. Only once no write of it is under way (the caller drained)."""
        self._inodes.pop(fd, None)
        twin = self._twins.pop(fd, -1)
        if twin >= 0:
            os.close(twin)

    def close(self) -> None:
        """Wait for the writes under way, then release everything. A write that failed here was
        never acknowledged: the primary holds it as not replicated, nothing is lost by logging it."""
        try:
            self.drain()
        except OSError as exc:
            log.warning("a direct write failed as the stream ended (not acknowledged): %s", exc)
        finally:
            for fd in list(self._twins):
                self.forget(fd)
            if self._pool is not None:
                self._pool.shutdown()
            self._free.clear()
            self._view.release()
            self._mem.close()


def _open_twin(fd: int) -> int:
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return -1
        raise
