"""Adaptive busy polling of the agents' event loops (busypoll.py): the window rule, and a loop on the
selector that still delivers I/O and timers, polls while answers come quickly, and stops polling
when they do not."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time

import pytest
from safekit_cloud.core.replication.busypoll import (
    DEFAULT_MAX_WINDOW,
    GROW_START,
    BusyPollSelector,
    new_event_loop,
    next_window,
)

MAX = 200e-6


def test_a_window_at_zero_starts_growing_when_an_event_comes_soon_after_the_loop_slept() -> None:
    assert next_window(0.0, MAX, 50e-6, False) == GROW_START
    assert next_window(GROW_START, MAX, 50e-6, False) == 2 * GROW_START
    w = 0.0
    for _ in range(20):
        w = next_window(w, MAX, 150e-6, False)
    assert w == MAX  # doubles up to the cap, never past it


def test_a_window_that_caught_the_event_is_kept() -> None:
    assert next_window(80e-6, MAX, 30e-6, True) == 80e-6


def test_a_window_halves_when_the_event_came_long_after_it_and_reaches_zero() -> None:
    assert next_window(MAX, MAX, 5e-3, False) == MAX / 2
    w, steps = MAX, 0
    while w > 0:
        w = next_window(w, MAX, float("inf"), False)  # a timeout: no event at all
        steps += 1
    assert steps <= 6  # a slow stream costs a few short polls, then none


def test_polling_off_never_gets_a_window() -> None:
    assert next_window(0.0, 0.0, 1e-6, False) == 0.0
    assert not isinstance(new_event_loop(0.0)._selector, BusyPollSelector)  # type: ignore[attr-defined]


def _run(coro_factory: object, max_window: float = MAX) -> tuple[object, BusyPollSelector]:
    loop = new_event_loop(max_window)
    sel = loop._selector  # type: ignore[attr-defined]
    assert isinstance(sel, BusyPollSelector)
    try:
        return loop.run_until_complete(coro_factory()), sel  # type: ignore[operator]
    finally:
        loop.close()


def test_timers_fire_on_time_while_the_loop_polls() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        late = []
        for delay in (0.0001, 0.001, 0.02):
            t0 = loop.time()
            await asyncio.sleep(delay)
            late.append(loop.time() - t0 - delay)
        return late

    late, _ = _run(main)
    assert all(x >= -1e-3 for x in late)  # never early (the loop clock's resolution aside)


_ECHO = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    d = s.recv(65536)
    if not d:
        break
    s.sendall(d)
"""


def test_a_quick_peer_is_answered_while_polling_and_every_byte_comes_back() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    peer = subprocess.Popen([sys.executable, "-c", _ECHO, str(listener.getsockname()[1])])
    try:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def main() -> int:
            reader, writer = await asyncio.open_connection(sock=conn)
            got = 0
            for i in range(300):
                msg = i.to_bytes(4, "big") * 16
                writer.write(msg)
                assert await reader.readexactly(len(msg)) == msg
                got += 1
            writer.close()
            await writer.wait_closed()
            return got

        got, sel = _run(main)
        assert got == 300
        assert sel.stats.hits > 0  # some answers were picked up by polling, without a wake-up
    finally:
        listener.close()
        peer.wait(10)


def test_a_slow_stream_stops_the_polling() -> None:
    a, b = socket.socketpair()
    stop = threading.Event()

    def tick() -> None:  # one byte every 2 ms: far slower than any window
        while not stop.is_set():
            try:
                b.send(b"x")
            except OSError:
                return
            time.sleep(0.002)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        async def main() -> int:
            reader, writer = await asyncio.open_connection(sock=a)
            for _ in range(200):
                await reader.readexactly(1)
            writer.transport.abort()
            return 200

        _, sel = _run(main)
    finally:
        stop.set()
        ticker.join()
        b.close()
    assert sel.stats.waits >= 150
    # Without the adaptive window: 200 waits x 200 us = 40 ms of polling.
    assert sel.stats.polled_s < 0.01, sel.stats


def test_the_config_default_is_the_agents_default() -> None:
    from safekit_cloud.core.config import ReplicationConfig
    from safekit_cloud.core.replication.agent import parse

    assert ReplicationConfig().busy_poll_us == DEFAULT_MAX_WINDOW * 1e6
    assert parse(["--role", "secondary", "--module", "m"]).busy_poll_us == DEFAULT_MAX_WINDOW * 1e6


@pytest.mark.parametrize("value", ["-1", "20000"])
def test_the_config_refuses_a_bad_polling_window(value: str) -> None:
    from pydantic import ValidationError
    from safekit_cloud.core.config import ReplicationConfig

    with pytest.raises(ValidationError, match="busy_poll_us"):
        ReplicationConfig(busy_poll_us=float(value))
