"""Large aligned writes on the secondary go to the disk with O_DIRECT, from a writer thread.

The replica's page cache is of no use to anyone (nothing reads the secondary's tree until a
failover), and filling it costs a copy of every byte plus, at the application's fsync, a flush of all
of it at once. Writing large aligned ranges straight to the disk, as a block replicator does, spreads
that flush over the stream and leaves fsync only the metadata. The writes run on one thread, in
order, while the event loop decrypts the next frame: the receiver acknowledges a batch only when its
writes are done (`Applier.when_written`), and applies any other operation only after them (`drain`).

Small, unaligned or O_SYNC writes, and file systems that refuse O_DIRECT, keep the ordinary path;
data is never lost to the choice: a refused direct write is done again through the page cache.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .messages import MAX_CHUNK

log = logging.getLogger(__name__)

ALIGN = 4096  # memory, offset and length: what O_DIRECT asks of every file system we know
MIN_DIRECT = 128 * 1024  # below this the page cache is as cheap and keeps small writes merged
SLOTS = 8  # aligned buffers, so up to 8 x 256 KiB being written while the next frames are decoded
MAX_TWINS = 256  # O_DIRECT descriptors kept; writes to further files take the page cache


class DirectWriter:
    """O_DIRECT twins of the applier's descriptors, aligned buffers, and the thread that writes."""

    def __init__(self) -> None:
        self._twins: dict[int, int] = {}  # buffered fd -> its O_DIRECT twin, or -1 when refused
        self._mem = mmap.mmap(-1, SLOTS * MAX_CHUNK)  # page-aligned, as O_DIRECT needs the memory
        self._view = memoryview(self._mem)
        self._free = [self._view[i * MAX_CHUNK:(i + 1) * MAX_CHUNK] for i in range(SLOTS)]
        self._pending: deque[tuple[Future[None], memoryview]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._enabled = True
        self._error: BaseException | None = None  # the first write that failed (the stream then ends)

    def eligible(self, size: int, off: int) -> bool:
        return self._enabled and MIN_DIRECT <= size <= MAX_CHUNK and not off % ALIGN and not size % ALIGN

    def submit(self, fd: int, data: bytes | memoryview, off: int) -> bool:
        """Start writing `data` at `off` of `fd` directly; False when it must take the ordinary path
        (the caller then drains first, so the writes stay in order)."""
        size = len(data)
        if not self.eligible(size, off):
            return False
        twin = self._twins.get(fd)
        if twin is None:
            if len(self._twins) >= MAX_TWINS:
                return False
            twin = self._twins[fd] = _open_twin(fd)
        if twin < 0:
            return False
        self._reap(wait_all=False)  # frees what is done, waits for the oldest if none is free
        slot = self._free.pop()
        slot[:size] = data
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="direct-write")
        self._pending.append((self._pool.submit(self._write, twin, fd, slot, size, off), slot))
        return True

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

    def _reap(self, wait_all: bool) -> None:
        """Release the buffers of finished writes: the oldest at least, or all when `wait_all`.
        Raises the first write that failed, after waiting for the rest when `wait_all`."""
        error: BaseException | None = None
        while self._pending:
            future, slot = self._pending[0]
            if not (wait_all or future.done() or not self._free):
                break
            exc = future.exception()  # waits for it
            self._pending.popleft()
            self._free.append(slot)
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
        future = self._pending[-1][0]  # one thread, in order: when it is done, all are
        future.add_done_callback(lambda f: callback(f.exception() or self._error))

    def forget(self, fd: int) -> None:
        """`fd` is about to be closed: close its twin (a later descriptor may get the same number)."""
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
