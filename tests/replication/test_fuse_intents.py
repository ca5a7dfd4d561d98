"""While an intent waits for the disk (the journal, the activity log), other requests run: a
concurrent rename of a directory above can move the entry. The change must then be made, and sent,
under the entry's new name (fusefs._settled)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from safekit_cloud.core.replication import messages as m
from safekit_cloud.core.replication.fusefs import ReplicatedFS
from safekit_cloud.core.replication.mount import FuseMount, unmount

from .harness import LoopThread, fuse_available

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))]


class GatedReplicator:
    """Records what it is sent; the first intent naming `hold` waits until the test releases it."""

    active = True
    epoch = 1
    journaling = True

    def __init__(self, hold: bytes) -> None:
        self.hold = hold
        self.ops: list[m.Op] = []
        self.intents: list[tuple[bytes, ...]] = []
        self.waiting = threading.Event()
        self.gate: asyncio.Event | None = None

    async def intend_ns(self, *paths: bytes) -> None:
        self.intents.append(paths)
        if self.hold in paths and self.gate is None:
            self.gate = asyncio.Event()
            self.waiting.set()
            await self.gate.wait()

    async def intend_meta(self, path: bytes, size: int | None = None) -> None:
        pass

    async def intend_write(self, path: bytes, off: int, length: int, extends: bool = False) -> None:
        pass

    async def submit(self, *ops: m.Op) -> None:
        self.ops.extend(ops)


def test_an_entry_moved_while_its_intent_waited_is_created_under_its_new_name(tmp_path: Path) -> None:
    primary = tmp_path / "primary"
    (primary / "d").mkdir(parents=True)
    repl = GatedReplicator(hold=b"d/x")
    loop = LoopThread("fuse")
    mount = FuseMount(primary, lambda fd: ReplicatedFS(fd, repl))  # type: ignore[arg-type]
    loop.call(mount.start())
    try:
        creator = threading.Thread(target=lambda: (primary / "d" / "x").write_bytes(b"data"))
        creator.start()
        assert repl.waiting.wait(10), "the create never reached its intent"
        renamer = threading.Thread(target=lambda: (primary / "d").rename(primary / "e"))
        renamer.start()
        renamer.join(10)  # the kernel lets a directory's rename pass a create inside it
        assert not renamer.is_alive()
        gate = repl.gate
        assert gate is not None
        loop.loop.call_soon_threadsafe(gate.set)
        creator.join(10)
        assert not creator.is_alive()
        assert (primary / "e" / "x").read_bytes() == b"data"
        named = [p for op in repl.ops for p in (getattr(op, "path", None), getattr(op, "old", None),
                                               getattr(op, "new", None)) if p]
        assert b"d/x" not in named, repl.ops  # nothing sent under the old name
        kinds = [(type(op).__name__, getattr(op, "path", None) or (op.old, op.new)) for op in repl.ops
                 if isinstance(op, (m.Rename, m.Create))]
        assert kinds == [("Rename", (b"d", b"e")), ("Create", b"e/x")], kinds
        assert repl.intents[-1] == (b"e/x",)  # recorded again under the new name
    finally:
        try:
            loop.call(mount.stop())
        finally:
            unmount(primary)
            loop.close()
