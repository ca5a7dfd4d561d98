"""A mirror whose primary journals and resynchronises (resync.MirrorReplicator), in one process:
the FUSE primary and the receiver each run their own loop in a thread; the test drives the mount
from its own thread. The secondary can go away and come back (same port), the primary can reconnect,
and the primary's agent can be "crashed" (its journal left as the disk has it)."""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

from safekit_cloud.core.replication.exclude import Excluder
from safekit_cloud.core.replication.fusefs import ReplicatedFS
from safekit_cloud.core.replication.journal import Journal, journal_path
from safekit_cloud.core.replication.mount import FuseMount, unmount
from safekit_cloud.core.replication.receiver import Receiver
from safekit_cloud.core.replication.resync import MirrorReplicator
from safekit_cloud.core.replication.sender import Sender

from .harness import KEY, NAME, LoopThread


class ResyncMirror:
    def __init__(self, primary: Path, replica: Path, state: Path, exclude: list[str] = (),
                 timeout: float = 2.0, block: int = 4096, bandwidth: float | None = None,
                 hold_limit: float | None = 0.2) -> None:
        self.primary, self.replica = primary, replica
        self.state_p, self.state_s = state / "p", state / "s"
        self.state_p.mkdir(parents=True, exist_ok=True)
        self.state_s.mkdir(parents=True, exist_ok=True)
        self.excluder = Excluder(list(exclude))
        self.timeout, self.block, self.bandwidth = timeout, block, bandwidth
        # No module here to release the writes held after a live link is lost (resync.py, "Holding
        # writes"): the limit does, soon. None: held until `release_writes` (the tests of holding).
        self.hold_limit = hold_limit
        self.events: list[tuple[str, dict]] = []
        self.rx_events: list[tuple[str, dict]] = []
        self.rx_thread = LoopThread("receiver")
        self.fs_thread = LoopThread("fuse")
        self.receiver: Receiver | None = None
        self.port = 0
        self.repl: MirrorReplicator | None = None
        self.mount: FuseMount | None = None
        self.senders: list[Sender] = []

    # ---- secondary ----

    def start_secondary(self, fullsync: bool = False) -> None:
        async def up() -> int:
            self.receiver = Receiver("mod", {NAME: self.replica}, KEY, on_event=lambda e, d: self.rx_events.append((e, d)),
                                     state_dir=self.state_s, fullsync=fullsync)
            return await self.receiver.start("127.0.0.1", self.port)

        self.port = self.rx_thread.call(up())

    def stop_secondary(self) -> None:
        if self.receiver is not None:
            self.rx_thread.call(self.receiver.stop())
            self.receiver = None

    def lineage_s(self) -> Journal:
        return Journal.load(journal_path(self.state_s, "mod", NAME))

    # ---- primary ----

    def start_primary(self) -> None:
        journal = Journal.load(journal_path(self.state_p, "mod", NAME), self.block)
        journal.become_source()

        async def up() -> None:
            self.repl = MirrorReplicator(journal, self.excluder, block=self.block, bandwidth=self.bandwidth,
                                         on_event=lambda e, **d: self.events.append((e, d)),
                                         hold_limit=self.hold_limit)

            def make(fd: int) -> ReplicatedFS:
                assert self.repl is not None
                self.repl.bind(fd)
                return ReplicatedFS(fd, self.repl, self.excluder)

            self.mount = FuseMount(self.primary, make)
            await self.mount.start()

        self.fs_thread.call(up())

    def connect(self) -> Sender:
        async def go() -> Sender:
            sender = await Sender.connect("127.0.0.1", self.port, KEY, "mod", NAME, timeout=self.timeout)
            assert self.repl is not None
            self.repl.attach(sender)
            return sender

        sender = self.fs_thread.call(go())
        self.senders.append(sender)
        return sender

    def start_and_resync(self) -> dict:
        """Start the primary, connect it, wait until live; the resync it ran (last_resync)."""
        self.start_primary()
        self.connect()
        self.wait_mode("live")
        return self.status()["last_resync"]

    def wait_mode(self, mode: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.repl is not None and self.repl.mode == mode:
                return
            time.sleep(0.02)
        raise AssertionError(f"mode {self.repl.mode if self.repl else None}, wanted {mode}; events {self.events}"
                             f"{self._stuck()}")

    def _stuck(self) -> str:
        """Where the primary's tasks wait (a timed-out wait_mode says why, not only that)."""
        r = self.repl
        if r is None:
            return ""

        async def stacks() -> str:
            out = io.StringIO()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.print_stack(limit=4, file=out)
            return out.getvalue()

        return (f"; phase {r.phase!r}, intents pending {dict(r.state.pending)}, namespace gate open "
                f"{r._gate.is_set()}\n{self.call(stacks())}")

    def stop_primary(self) -> None:
        """Clean stop: unmount, end the stream, flush the journal."""
        async def down() -> None:
            if self.mount is not None:
                await self.mount.stop()
            if self.repl is not None:
                await self.repl.close()

        try:
            self.fs_thread.call(down())
        finally:
            unmount(self.primary)
            self.mount = self.repl = None

    def crash_primary(self) -> None:
        """As if the primary's agent were killed: no clean end of anything; the journal file is
        what was made durable (queued records are dropped), the link just breaks."""
        async def down() -> None:
            repl = self.repl
            assert repl is not None
            repl.journal._buf.clear()
            repl.journal.authoritative = False  # nothing more reaches the disk
            repl.journal.path = None
            for task in (repl._task, repl._al_task):
                if task is not None:
                    task.cancel()
            sender = repl.sender
            if sender is not None:
                sender.on_lost = None
                sender._lose("primary crashed")
            if self.mount is not None:
                await self.mount.stop()
            # What the process's death would close (nothing is written through them any more).
            if repl.journal._fd >= 0:
                os.close(repl.journal._fd)
                repl.journal._fd = -1
            if repl.root >= 0:
                os.close(repl.root)
                repl.root = -1

        try:
            self.fs_thread.call(down())
        finally:
            unmount(self.primary)
            self.mount = self.repl = None

    def close(self) -> None:
        try:
            if self.mount is not None:
                self.stop_primary()
        finally:
            try:
                unmount(self.primary)
            finally:
                try:
                    self.stop_secondary()
                finally:
                    self.fs_thread.close()
                    self.rx_thread.close()

    def call(self, coro, timeout: float = 30):  # type: ignore[no-untyped-def]
        return self.fs_thread.call(coro, timeout)

    def status(self) -> dict:
        async def get() -> dict:
            assert self.repl is not None
            return self.repl.status()

        return self.fs_thread.call(get())

