"""Superseded in production by resync.MirrorReplicator (journal, resync, reconnection): the agents
no longer use this module. Kept as the minimal replicator of the in-process test harness
(tests/replication/harness.py), which exercises the stream without resynchronisation.

The primary's replicator: the sender while the link is up, the dirty marker once it is lost.

When the link breaks, the calls in flight complete (the sender resolves them within its timeout),
every unacknowledged operation and every later one marks the directory dirty, durably, before the
call returns to the application: the secondary is then known to be out of date and must be
resynchronised before it may take over. (The fine-grained journal of ranges is still to come; until
then a dirty directory means a checksum resync.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from . import messages as m
from .sender import Sender

log = logging.getLogger(__name__)


class DirtyMarker:
    """A file whose presence says: the replica misses changes made here since `since`."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._set = bool(path and path.exists())
        self.ops = 0

    @property
    def dirty(self) -> bool:
        return self._set

    def record(self, ops: list[m.Op] | tuple[m.Op, ...]) -> None:
        self.ops += len(ops)
        if self._set or not ops:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)  # the marker itself must survive a crash of this node
            finally:
                os.close(dfd)
        self._set = True

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self._set = False


class LinkReplicator:
    active = True

    def __init__(self, marker: DirtyMarker, on_lost: Callable[[str], None] | None = None) -> None:
        self.marker = marker
        self.on_lost = on_lost
        self.epoch = 0
        self.sender: Sender | None = None

    def attach(self, sender: Sender) -> None:
        sender.on_lost = self._lost
        self.sender = sender
        self.epoch += 1  # the new peer holds none of our handles open

    def detach(self) -> Sender | None:
        sender, self.sender = self.sender, None
        self.epoch += 1
        return sender

    async def submit(self, *ops: m.Op) -> None:
        sender = self.sender
        if sender is None:
            self.marker.record(ops)
            return
        if not await sender.submit(*ops):
            # Either never sent (already lost) or unacknowledged (handed to _lost): mark both ways.
            self.marker.record(ops)

    def _lost(self, reason: str, unacked: list[m.Op]) -> None:
        if self.sender is not None:
            self.sender = None
            self.epoch += 1
        self.marker.record(unacked)
        if self.on_lost is not None:
            self.on_lost(reason)
