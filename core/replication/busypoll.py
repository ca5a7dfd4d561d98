"""Adaptive busy polling for the replication agents' event loops.

Why: a synchronous write crosses four sleeps and wake-ups (application -> FUSE primary -> secondary
-> primary -> application). On this VM a wake-up from epoll_wait costs ~30 us, more than the Python
work of the hop: a bare asyncio ping-pong over loopback takes 75 us when both ends sleep, 24 us when
one end polls (facts measured in docs/replication.md, "Busy polling"). So, when an answer is likely to
come soon, the loop polls (epoll_wait with a zero timeout, yielding the CPU between polls) for a
short window before it sleeps.

How long to poll is decided like KVM's halt polling (pure function `next_window`): the window grows
while events keep arriving soon after the loop starts waiting, and shrinks when a poll came to
nothing and the loop then slept long. An idle or slow stream (an event every few milliseconds)
brings the window to zero within a few waits, so polling costs CPU only while it pays.
`BusyPollSelector(max_window=0)` never polls: the plain EpollSelector behaviour.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_WINDOW = 200e-6
GROW_START = 10e-6  # a window at zero restarts at this when events come soon again


def next_window(window: float, max_window: float, waited: float, polled_hit: bool) -> float:
    """The polling window for the next wait, given this one's: `waited` seconds from the start of the
    wait until an event (or the timeout), `polled_hit` whether the event came while polling.

    - it came while polling: the window served; keep it;
    - it came after the window, but within `max_window`: a longer window would have caught it, grow
      (doubling, from GROW_START);
    - it came later than that, or never: polling was wasted, halve (below GROW_START: zero)."""
    if max_window <= 0:
        return 0.0
    if polled_hit:
        return window
    if waited <= max_window:
        return min(max_window, max(GROW_START, window * 2))
    half = window / 2
    return half if half >= GROW_START else 0.0


@dataclass
class PollStats:
    waits: int = 0  # select() calls that could block
    hits: int = 0  # ... answered while polling
    polled_s: float = 0.0  # seconds spent polling


class BusyPollSelector(selectors.EpollSelector):
    """An EpollSelector that polls for up to the current window before it blocks (see above)."""

    def __init__(self, max_window: float = DEFAULT_MAX_WINDOW) -> None:
        super().__init__()
        self.max_window = max(0.0, max_window)
        self.window = 0.0
        self.stats = PollStats()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self.max_window <= 0 or (timeout is not None and timeout <= 0):
            return super().select(timeout)
        self.stats.waits += 1
        start = time.perf_counter()
        ready: list[Any] = []
        if self.window > 0:
            deadline = start + (self.window if timeout is None else min(self.window, timeout))
            while True:
                ready = super().select(0)
                now = time.perf_counter()
                if ready or now >= deadline:
                    break
                os.sched_yield()  # the peer or the application may need this CPU to answer
            self.stats.polled_s += now - start
            if ready:
                self.stats.hits += 1
                self.window = next_window(self.window, self.max_window, now - start, True)
                return ready
            timeout = None if timeout is None else max(0.0, timeout - (now - start))
        ready = super().select(timeout)
        waited = time.perf_counter() - start
        self.window = next_window(self.window, self.max_window, waited if ready else float("inf"), False)
        return ready


def new_event_loop(max_window: float = DEFAULT_MAX_WINDOW) -> asyncio.AbstractEventLoop:
    """An event loop on a BusyPollSelector (max_window 0: a plain loop)."""
    if max_window <= 0:
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(BusyPollSelector(max_window))
