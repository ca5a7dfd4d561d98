"""ReplicationService end to end: agent processes, a FUSE primary and a receiver, over loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from safekit_cloud.core.config import ReplicationConfig
from safekit_cloud.core.replication.mount import mounted_fuse_at
from safekit_cloud.core.replication.service import ReplicationService

from .harness import KEY, describe_tree, force_unmount, free_port, fuse_available

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))]


def _blocking(fn, *args):
    return asyncio.to_thread(fn, *args)


def test_service_primary_and_secondary(tmp_path: Path) -> None:
    """Both roles on one machine: the secondary receives the stream of `data` into `replica`."""
    data, replica = tmp_path / "data", tmp_path / "replica"
    data.mkdir()
    replica.mkdir()
    port = free_port()
    cfg = ReplicationConfig(directories=[data], exclude=["*.tmp"], port=port)
    lost: list[str] = []

    from safekit_cloud.core.replication.exclude import Excluder

    primary_excluder = Excluder(cfg.exclude)

    async def scenario() -> tuple[dict, dict, float, bool]:
        secondary = ReplicationService("mod", cfg, "127.0.0.1", KEY, tmp_path / "state2",
                                       listen_address="127.0.0.1", receive_into={data: replica})
        primary = ReplicationService("mod", cfg, "127.0.0.1", KEY, tmp_path / "state1",
                                     on_link_lost=lost.append, timeout=1.0)
        await secondary.become_secondary()
        try:
            await primary.become_primary()
            assert mounted_fuse_at(data)
            for _ in range(50):
                if primary.status()["connected"]:
                    break
                await asyncio.sleep(0.1)
            st_connected = primary.status()
            await _blocking((data / "f").write_bytes, b"hello")
            await _blocking(os.mkdir, data / "d")
            await _blocking((data / "d" / "x.tmp").write_bytes, b"not replicated")
            await asyncio.sleep(1.2)  # one status period
            st_after = primary.status()
            same = describe_tree(data, primary_excluder) == describe_tree(replica)
            # Kill the receiver agent abruptly: the next write returns within the timeout, alone.
            secondary._agents[0].proc.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            await _blocking((data / "g").write_bytes, b"world")
            elapsed = time.monotonic() - t0
            for _ in range(30):
                if lost:
                    break
                await asyncio.sleep(0.1)
            await primary.stop()
            assert not mounted_fuse_at(data)
            return st_connected, st_after, elapsed, same
        finally:
            await primary.stop()
            await secondary.stop()

    try:
        st_connected, st_after, elapsed, same = asyncio.run(scenario())
    finally:
        force_unmount(data)
    assert st_connected["connected"] and st_connected["role"] == "primary"
    assert st_after["bytes_sent"] > 0 and same
    assert (replica / "f").read_bytes() == b"hello" and not (replica / "d" / "x.tmp").exists()
    assert elapsed < 3.0
    assert lost
    assert (data / "f").read_bytes() == b"hello" and (data / "g").read_bytes() == b"world"
