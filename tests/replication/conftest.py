"""Shared helpers for the replication tests (no pytest-asyncio here: each test runs its own loop)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from safekit_cloud.core.replication import messages as m
from safekit_cloud.core.replication.receiver import Receiver
from safekit_cloud.core.replication.sender import Sender

T = TypeVar("T")
KEY = b"k" * 32
STREAM_NAME = b"/srv/data"  # the replicated directory the stream tests name


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(primary tree, replica tree, a directory outside both that nothing may ever touch)."""
    out = []
    for name in ("primary", "replica", "outside"):
        d = tmp_path / name
        d.mkdir()
        out.append(d)
    (out[2] / "victim").write_bytes(b"untouched")
    return out[0], out[1], out[2]


def snapshot_outside(outside: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in outside.iterdir() if p.is_file()}


@pytest.fixture
def root_fd(dirs: tuple[Path, Path, Path]):
    fd = os.open(dirs[1], os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


async def stream_pair(replica: Path, protocol: str = "C", **kw: object) -> tuple[Receiver, Sender]:
    """A receiver writing into `replica` on a loopback port, and a sender connected to it."""
    receiver = Receiver("mod", {STREAM_NAME: replica}, KEY)
    port = await receiver.start("127.0.0.1", 0)
    sender = await Sender.connect("127.0.0.1", port, KEY, "mod", STREAM_NAME, protocol=protocol, **kw)  # type: ignore[arg-type]
    return receiver, sender


def replicate(replica: Path, ops: list[m.Op], protocol: str = "C") -> None:
    """Send `ops` one by one (each acknowledged as `protocol` requires), wait until every one is
    applied, then close both ends."""
    async def scenario() -> None:
        receiver, sender = await stream_pair(replica, protocol)
        for op in ops:
            assert await sender.submit(op)
        assert await sender.barrier()
        assert sender.inflight_bytes == 0
        await sender.close()
        await receiver.stop()

    run(scenario())


@pytest.fixture(autouse=True)
def _held_writes_released_without_an_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests drive ReplicationService without the engine that releases held writes (resync.py,
    "Holding writes"): the agents release them after half a second instead, as the in-process
    harness does. The integration tests run the real daemon, whose engine decides."""
    from safekit_cloud.core.replication.service import ReplicationService

    monkeypatch.setattr(ReplicationService, "hold_limit", 0.5)
