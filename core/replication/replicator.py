"""What the FUSE layer hands every mutating operation to: the sender in PRIM, a journal in ALONE,
nothing in tests.

Contract of `submit(*ops)`: every op is *enqueued before the first suspension point* of the call.
The FUSE layer applies an operation locally and calls `submit` without awaiting anything in between,
so operations reach the secondary in the order they happened here, whatever runs concurrently.
"""

from __future__ import annotations

import contextvars
from collections.abc import Generator
from typing import Any, Protocol

from .messages import Op

# The namespace intent (see journal.py, write-ahead) made by the FUSE request running in this task:
# set by `intend_ns`, consumed by the `submit` that follows the local change, settled as failed by
# the FUSE layer when the handler ends without submitting (the change failed or was not replicated).
PENDING: contextvars.ContextVar[int | None] = contextvars.ContextVar("replication_pending", default=None)


class Replicator(Protocol):
    @property
    def active(self) -> bool:
        """False: the FUSE layer does not even build messages (fast path)."""

    @property
    def epoch(self) -> int:
        """Changes whenever the peer forgot our open handles (new stream): handles are reopened."""

    async def submit(self, *ops: Op) -> None:
        """Replicate `ops` in order; returns when the protocol is satisfied or the peer is lost
        (never raises for a lost peer: the caller's system call must complete)."""

    # Optional (journaling replicators, resync.MirrorReplicator): told *before* a change is applied
    # locally while `journaling` is true, so the journal is write-ahead. The FUSE layer checks
    # `getattr(repl, "journaling", False)` and calls, before the local change:
    #   intend_write(path, off, length, extends)  a data write (extends: it grows the file)
    #   intend_meta(path, size=None)              chmod/chown/utimens/xattrs; size: a truncate
    #   intend_ns(*paths)                          a namespace change (may wait while a resync
    #                                              replays the namespace); then settle(token) if the
    #                                              handler ends without submitting
    #   marked(path) -> bool                       the journal holds something to send for path
    #   carry_marks(victim, others)                victim's file loses that name but keeps others


class Started:
    """A coroutine already run up to its first suspension point; awaiting it runs the rest.

    `Started(repl.submit(op))` enqueues `op` at once (the submit contract), so the caller can do
    something else before it waits: the FUSE layer sends a Write or an Fsync to the peer, then
    writes or fsyncs locally while the peer does the same, then waits for the peer. Await it
    exactly once."""

    __slots__ = ("_coro", "_done", "_first", "_value")

    def __init__(self, coro: Any) -> None:
        self._coro = coro
        self._done = False
        try:
            self._first = coro.send(None)
        except StopIteration as stop:
            self._done, self._value, self._first = True, stop.value, None

    def __await__(self) -> Generator[Any, Any, Any]:
        if self._done:
            return self._value
        coro, fut = self._coro, self._first
        self._first = None
        while True:
            try:
                sent = yield fut
            except BaseException as exc:  # noqa: BLE001 - cancellation and errors go to the coroutine
                try:
                    fut = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    fut = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class NullReplicator:
    active = False
    epoch = 0

    async def submit(self, *ops: Op) -> None:
        return None


class RecordingReplicator:
    """Keeps what it is given (tests)."""

    active = True
    epoch = 1

    def __init__(self) -> None:
        self.ops: list[Op] = []

    async def submit(self, *ops: Op) -> None:
        self.ops.extend(ops)
