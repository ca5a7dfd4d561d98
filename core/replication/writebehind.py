"""Write-behind for files written sequentially, and drop-behind on the replica.

A replicated stream is paced by the peer: each write returns only once the secondary has it, so
the local disk sits idle while the page cache fills, and the application's fsync at the end then
writes everything at once (0.5 s of a 1 GiB stream here, with the disk busy on nothing before).
Once a file has been written sequentially for WRITE_BEHIND bytes, the disk is asked to start
writing that run (sync_file_range WRITE: no waiting, no durability claim); the fsync then finds
little left to do. Random writes never make a run that long, so databases and small files are
left to the kernel's own writeback.

On the replica, nothing reads the files until a failover, so the page cache of a streamed file is
of no use: the run handed to the disk last time is dropped from it the next time
(POSIX_FADV_DONTNEED, which keeps pages still dirty or being written). The primary keeps its cache:
its application reads it.

Both calls are hints: a file system that ignores or refuses them (tmpfs, ramfs) loses nothing.
They run inline, like the pwrite before them: sync_file_range can wait when the device's queue is
full, as the pwrite itself waits when the kernel throttles dirty pages; a thread per 8 MiB would
cost more than it could save, and the descriptor could be closed under it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .syscalls import SYNC_FILE_RANGE_WRITE, sync_file_range

WRITE_BEHIND = 8 << 20  # bytes of a sequential run handed to the disk at a time


@dataclass(frozen=True)
class Run:
    """A file's current run of contiguous writes."""

    start: int = -1  # the first byte not yet handed to the disk
    end: int = -1  # where the run ends: the next sequential write starts here
    handed: int = -1  # the start of the range handed to the disk last time (-1: none in this run)


@dataclass(frozen=True)
class Step:
    run: Run
    write: tuple[int, int] | None = None  # (offset, length) to hand to the disk now
    drop: tuple[int, int] | None = None  # (offset, length) handed last time, to drop from the cache


def advance(run: Run, off: int, length: int) -> Step:
    """The decision for `length` bytes just written at `off`: a write elsewhere starts a new run;
    a run that reached WRITE_BEHIND is handed to the disk, and the range handed before it becomes
    droppable."""
    if off != run.end:
        run = Run(off, off)
    end = off + length
    if end - run.start < WRITE_BEHIND:
        return Step(Run(run.start, end, run.handed))
    drop = (run.handed, run.start - run.handed) if run.handed >= 0 else None
    return Step(Run(end, end, run.start), write=(run.start, end - run.start), drop=drop)


class WriteBehind:
    """The runs of open descriptors. `drop`: also drop what was written from the page cache
    (the replica)."""

    def __init__(self, drop: bool) -> None:
        self._drop = drop
        self._runs: dict[int, Run] = {}

    def wrote(self, fd: int, off: int, length: int) -> None:
        step = advance(self._runs.get(fd, Run()), off, length)
        self._runs[fd] = step.run
        try:
            if step.write is not None:
                sync_file_range(fd, *step.write, SYNC_FILE_RANGE_WRITE)
            if step.drop is not None and self._drop:
                os.posix_fadvise(fd, *step.drop, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # a hint refused: the kernel's own writeback still writes the data

    def forget(self, fd: int) -> None:
        """`fd` is being closed (its number may come back for another file)."""
        self._runs.pop(fd, None)
