"""How the agents' C allocator keeps the memory they free.

Every replicated write allocates large buffers and frees them a moment later: the copy of the
FUSE request (up to 1 MiB), its frames (256 KiB each, encoded then sealed), and on the receiver
each decoded payload. Whether glibc hands that memory back to the kernel at each free (a chunk
above its mmap threshold is unmapped; free space at the top of the heap above its trim threshold
is trimmed) depends on the heap's layout: its thresholds move with what was freed before, and a
long-lived allocation at the top of the heap keeps it from trimming. When it does, every buffer
is new pages, each a page fault to touch. Measured on the 1 GiB stream: the agents as they are
here took none (bench/replication_bench.py prints the count), but the same agents with per-write
timing lists added took 105,792 page faults per GiB; a 256 KiB frame then took 70 µs to frame
instead of 20, and a 1 MiB write ~870 µs end to end instead of ~660. Fixed thresholds make the
speed independent of the heap's layout, which changes with what an agent does over weeks.

The cost: memory freed by a burst stays with the agent, up to TRIM_THRESHOLD above what it uses.
Its buffers are bounded anyway (bytes in flight, frame and read sizes), so that is a few MiB.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 64 << 20  # free memory at the heap's top kept up to this much
MMAP_THRESHOLD = 32 << 20  # allocations below this come from the heap (and are reused)


def keep_freed_memory() -> bool:
    """Set both thresholds (fixed: glibc's own adjust them only after the first frees). False,
    with a debug line, on a C library without mallopt (musl): nothing changes but the speed."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in this C library: large buffers are returned to the kernel when freed")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
