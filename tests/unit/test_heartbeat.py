"""Heartbeat: codec, receive-path checks (no sockets), and real instances on loopback."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safekit_cloud.core.heartbeat import Heartbeat, HeartbeatError, Link
from safekit_cloud.core.heartbeat_codec import (
    MAX_DATAGRAM,
    Beat,
    Dropped,
    ReplayWindow,
    decode,
    encode,
    max_payload,
)

KEY = bytes(range(32))
CLUSTER = "prod"
PEER_ADDR = ("127.0.0.2", 4800)
DROPPED = (
    "dropped_auth",
    "dropped_replay",
    "dropped_stale",
    "dropped_malformed",
    "dropped_wrong_cluster",
)


def beat(seq: int = 1, incarnation: int = 1000, payload: bytes = b"state", **kw: object) -> Beat:
    fields: dict[str, object] = {"cluster": CLUSTER, "node": "b", "sent_ns": 123}
    fields |= {"echo_incarnation": 0, "echo_seq": 0, "echo_hold_ns": 0} | kw
    return Beat(incarnation=incarnation, seq=seq, payload=payload, **fields)  # type: ignore[arg-type]


def datagram(
    seq: int = 1, incarnation: int = 1000, payload: bytes = b"state", key: bytes = KEY, **kw: object
) -> bytes:
    return encode(beat(seq, incarnation, payload, **kw), key)


class Changes:
    """on_change recorder."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def receiver(replay_window: int = 64, **kw: object) -> Heartbeat:
    """A Heartbeat of node "a" that is never started: datagrams are fed to its receive path directly."""
    settings_: dict[str, object] = {"cluster": CLUSTER, "node": "a", "peer": "b", "port": 4800, "key": KEY}
    settings_ |= {"links": [Link("default", "127.0.0.1", "127.0.0.2")], "interval": 0.5, "timeout": 3.0}
    settings_ |= {"replay_window": replay_window, "payload": lambda: b"", "on_change": Changes()} | kw
    return Heartbeat(**settings_)  # type: ignore[arg-type]


def feed(hb: Heartbeat, *datagrams: bytes, addr: tuple[str, int] = PEER_ADDR) -> None:
    for data in datagrams:
        hb._receive("default", data, addr)


def dropped(hb: Heartbeat) -> dict[str, int]:
    return {k: v for k, v in hb.counters.items() if k.startswith("dropped") and v}


# -- codec -----------------------------------------------------------------------------------------------


def test_codec_round_trip() -> None:
    original = beat(seq=7, payload=b"\x00\xffmodules", echo_incarnation=5, echo_seq=3, echo_hold_ns=42)
    assert decode(encode(original, KEY), KEY, CLUSTER) == original


def test_codec_wrong_key_rejected() -> None:
    with pytest.raises(Dropped) as info:
        decode(datagram(key=b"k" * 32), KEY, CLUSTER)
    assert info.value.counter == "dropped_auth"


def test_codec_any_flipped_bit_rejected() -> None:
    data = datagram()
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(Dropped):
            decode(bytes(tampered), KEY, CLUSTER)


def test_codec_other_cluster_rejected_before_auth() -> None:
    # Another cluster uses another key: the operator must read "wrong cluster", not "bad HMAC".
    with pytest.raises(Dropped) as info:
        decode(encode(replace(beat(), cluster="test"), b"other key" * 4), KEY, CLUSTER)
    assert info.value.counter == "dropped_wrong_cluster"


def test_codec_payload_limit() -> None:
    limit = max_payload(CLUSTER, "b")
    assert len(datagram(payload=b"x" * limit)) == MAX_DATAGRAM
    with pytest.raises(HeartbeatError, match="too large"):
        datagram(payload=b"x" * (limit + 1))


def test_replay_window_bitmap() -> None:
    window = ReplayWindow(4)
    assert window.accept(10) is True
    assert window.accept(8) is False  # late, inside the window
    with pytest.raises(Dropped, match="already"):
        window.accept(8)
    with pytest.raises(Dropped, match="older"):
        window.accept(6)  # 10 - 6 == window size
    assert window.accept(100) is True  # a jump past the window forgets everything older
    with pytest.raises(Dropped):
        window.accept(10)


# -- receive path ----------------------------------------------------------------------------------------


def test_accepts_peer_and_reports_payload() -> None:
    hb = receiver()
    feed(hb, datagram(seq=1, payload=b"p1"))
    status = hb.peer_status()
    assert status.reachable and status.payload == b"p1" and status.incarnation == 1000
    assert status.networks[0].alive and status.networks[0].last_seen_ago is not None
    assert hb.counters["received"] == 1 and not dropped(hb)


def test_identical_replay_rejected() -> None:
    hb = receiver()
    feed(hb, datagram(seq=1), datagram(seq=1))
    assert hb.counters["received"] == 1
    assert dropped(hb) == {"dropped_replay": 1}


def test_out_of_order_within_window_accepted_once_and_keeps_newest_payload() -> None:
    hb = receiver()
    feed(
        hb,
        datagram(seq=5, payload=b"five"),
        datagram(seq=3, payload=b"three"),
        datagram(seq=4, payload=b"four"),
    )
    feed(hb, datagram(seq=3, payload=b"three"))
    assert hb.counters["received"] == 3
    assert dropped(hb) == {"dropped_replay": 1}
    assert hb.peer_status().payload == b"five"  # late datagrams carry outdated state


def test_too_old_for_window_rejected() -> None:
    hb = receiver(replay_window=8)
    feed(hb, datagram(seq=20), datagram(seq=12), datagram(seq=13))
    assert hb.counters["received"] == 2
    assert dropped(hb) == {"dropped_stale": 1}


def test_older_incarnation_rejected_newer_resets_window() -> None:
    changes = Changes()
    hb = receiver(on_change=changes)
    feed(hb, datagram(seq=50, incarnation=100, payload=b"old"))
    feed(hb, datagram(seq=51, incarnation=99))
    assert dropped(hb) == {"dropped_stale": 1}
    before = changes.count
    feed(hb, datagram(seq=1, incarnation=101, payload=b"old"))  # seq 1 would be stale in the old window
    assert hb.counters["received"] == 2
    assert hb.peer_status().incarnation == 101
    assert changes.count == before + 1  # same payload, new incarnation: the engine must hear of it
    feed(hb, datagram(seq=50, incarnation=100))
    assert hb.counters["dropped_stale"] == 2


@pytest.mark.parametrize(
    ("data", "addr", "counter"),
    [
        (datagram(node="c"), PEER_ADDR, "dropped_auth"),  # unknown node
        (datagram(node="a"), PEER_ADDR, "dropped_auth"),  # ourselves
        (datagram(), ("127.0.0.9", 4800), "dropped_auth"),  # right node, wrong source address
        (b"\x01short", PEER_ADDR, "dropped_malformed"),
        (datagram()[:-1], PEER_ADDR, "dropped_malformed"),
        (b"\x02" + datagram()[1:], PEER_ADDR, "dropped_malformed"),  # future version
        (encode(replace(beat(), cluster="other"), KEY), PEER_ADDR, "dropped_wrong_cluster"),
        (datagram(seq=0), PEER_ADDR, "dropped_malformed"),
    ],
)
def test_refused_datagrams_are_counted(data: bytes, addr: tuple[str, int], counter: str) -> None:
    hb = receiver()
    feed(hb, data, addr=addr)
    assert dropped(hb) == {counter: 1}
    assert hb.counters["received"] == 0 and not hb.peer_status().reachable


def test_on_change_only_when_something_changes() -> None:
    changes = Changes()
    hb = receiver(on_change=changes)
    feed(hb, datagram(seq=1, payload=b"x"))
    assert changes.count == 1  # reachable, network alive, payload, incarnation: one call
    feed(hb, datagram(seq=2, payload=b"x"))
    assert changes.count == 1
    feed(hb, datagram(seq=3, payload=b"y"))
    assert changes.count == 2


def test_rtt_from_echo_of_our_own_incarnation_only() -> None:
    hb = receiver()
    link = hb._by_network["default"]
    link.sent.append((5, time.monotonic() - 0.030))  # we sent seq 5 on this link 30 ms ago
    feed(hb, datagram(seq=1, echo_incarnation=hb.incarnation + 1, echo_seq=5, echo_hold_ns=10_000_000))
    assert hb.peer_status().networks[0].rtt_ms is None  # an echo of another life of ours
    feed(hb, datagram(seq=2, echo_incarnation=hb.incarnation, echo_seq=5, echo_hold_ns=10_000_000))
    rtt = hb.peer_status().networks[0].rtt_ms
    assert rtt is not None and 19 < rtt < 25  # 30 ms since sending, of which the peer held it 10


def test_on_change_failure_does_not_break_reception(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("engine bug")

    hb = receiver(on_change=broken)
    with caplog.at_level(logging.ERROR, logger="safekit_cloud.core.heartbeat"):
        feed(hb, datagram(seq=1, payload=b"1"), datagram(seq=2, payload=b"2"))
    assert hb.counters["received"] == 2 and hb.peer_status().payload == b"2"
    assert "on_change callback failed" in caplog.text


def test_drop_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    hb = receiver()
    with caplog.at_level(logging.WARNING, logger="safekit_cloud.core.heartbeat"):
        feed(hb, *[datagram(key=b"z" * 32, seq=i) for i in range(1, 101)])
    assert hb.counters["dropped_auth"] == 100
    assert len(caplog.records) == 1 and "bad HMAC" in caplog.records[0].getMessage()


def test_bad_payload_keeps_beating(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> bytes:
        raise RuntimeError("engine bug")

    big = receiver(payload=lambda: b"x" * MAX_DATAGRAM)
    with caplog.at_level(logging.ERROR, logger="safekit_cloud.core.heartbeat"):
        assert big._current_payload() == b""
        assert receiver(payload=broken)._current_payload() == b""
    assert "exceeds" in caplog.text and "payload() failed" in caplog.text


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"links": []}, "at least one"),
        ({"peer": "a"}, "another node"),
        ({"key": b"short"}, "16 bytes"),
        ({"interval": 3.0}, "below the timeout"),
        ({"links": [Link("n", "127.0.0.1", "::1")]}, "not both IPv4"),
        ({"links": [Link("n", "127.0.0.1", "127.0.0.2"), Link("n", "127.0.0.3", "127.0.0.4")]}, "two links"),
        ({"links": [Link("n", "127.0.0.1", "127.0.0.2"), Link("m", "127.0.0.1", "127.0.0.4")]}, "two links"),
        ({"links": [Link("n", "host", "127.0.0.2")]}, "IP addresses"),
    ],
)
def test_invalid_settings(kw: dict[str, object], message: str) -> None:
    with pytest.raises(HeartbeatError, match=message):
        receiver(**kw)


# -- fuzz ------------------------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.binary(max_size=1600), min_size=1, max_size=5))
def test_fuzz_arbitrary_bytes_dropped(blobs: list[bytes]) -> None:
    hb = receiver()
    feed(hb, *blobs)
    assert hb.counters["received"] == 0
    assert sum(dropped(hb).values()) == len(blobs)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    how = draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if how == "flip":
        for i in draw(st.lists(st.integers(0, len(out) - 1), min_size=1, max_size=4)):
            out[i] = draw(st.integers(0, 255))
    elif how == "truncate":
        del out[draw(st.integers(0, len(out) - 1)) :]
    elif how == "extend":
        out += draw(st.binary(min_size=1, max_size=40))
    else:
        at = draw(st.integers(0, len(out)))
        out[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(out)


VALID = datagram(seq=9, payload=b"valid payload", echo_seq=3, echo_hold_ns=77)


@FUZZ
@given(st.lists(mutated(VALID), min_size=1, max_size=5))
def test_fuzz_mutated_datagrams_dropped(variants: list[bytes]) -> None:
    hb = receiver()
    feed(hb, VALID)  # accepted once; a mutation that changes nothing is then a replay
    feed(hb, *variants)
    assert hb.counters["received"] == 1
    assert sum(dropped(hb).values()) == len(variants)
    assert hb.peer_status().payload == b"valid payload"


# -- real sockets on loopback ----------------------------------------------------------------------------

INTERVAL, TIMEOUT = 0.05, 0.3


def free_port(*hosts: str) -> int:
    """A UDP port free on every host address (picked by binding, then released)."""
    for _ in range(50):
        socks = []
        try:
            for host in hosts:
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind((host, socks[0].getsockname()[1] if len(socks) > 1 else 0))
            return socks[0].getsockname()[1]
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no common free port")


def pair(
    port: int, interval: float = INTERVAL, timeout: float = TIMEOUT
) -> tuple[Heartbeat, Heartbeat, dict[str, Changes]]:
    """Nodes a and b, on network n1 (127.0.0.1 <-> .2) and n2 (127.0.0.3 <-> .4)."""
    changes = {"a": Changes(), "b": Changes()}
    payloads = {"a": b"state of a", "b": b"state of b"}

    def make(node: str, peer: str, links: list[Link]) -> Heartbeat:
        return Heartbeat(
            cluster=CLUSTER,
            node=node,
            peer=peer,
            links=links,
            port=port,
            key=KEY,
            interval=interval,
            timeout=timeout,
            replay_window=64,
            payload=lambda: payloads[node],
            on_change=changes[node],
        )

    a = make("a", "b", [Link("n1", "127.0.0.1", "127.0.0.2"), Link("n2", "127.0.0.3", "127.0.0.4")])
    b = make("b", "a", [Link("n1", "127.0.0.2", "127.0.0.1"), Link("n2", "127.0.0.4", "127.0.0.3")])
    a.test_payloads = b.test_payloads = payloads  # type: ignore[attr-defined]
    return a, b, changes


async def until(condition: Callable[[], bool], within: float = 2.0) -> float:
    """Poll until true; returns how long it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 8))


def heartbeat_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("heartbeat-")]


def test_two_nodes_on_loopback() -> None:
    async def scenario() -> None:
        a, b, changes = pair(free_port("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"))
        await a.start()
        await b.start()
        try:
            await both_see_each_other(a, b, changes)
            await one_network_silenced(a, b)
            await peer_stopped(a, b)
        finally:
            await a.stop()
            await b.stop()
        assert heartbeat_tasks() == []

    run(scenario)


async def both_see_each_other(a: Heartbeat, b: Heartbeat, changes: dict[str, Changes]) -> None:
    def measured(hb: Heartbeat) -> bool:
        status = hb.peer_status()
        return status.reachable and all(n.alive and n.rtt_ms is not None for n in status.networks)

    await until(lambda: measured(a) and measured(b))
    assert a.peer_status().payload == b"state of b" and b.peer_status().payload == b"state of a"
    assert a.peer_status().incarnation == b.incarnation
    assert all(0 <= n.rtt_ms < 50 for n in a.peer_status().networks)  # type: ignore[operator]
    assert changes["a"].count >= 1 and changes["b"].count >= 1
    a.test_payloads["a"] = b"a changed"  # type: ignore[attr-defined]
    await until(lambda: b.peer_status().payload == b"a changed", within=4 * INTERVAL)
    for hb in (a, b):
        assert not dropped(hb) and hb.counters["sent"] > 0 and hb.counters["received"] > 0


async def one_network_silenced(a: Heartbeat, b: Heartbeat) -> None:
    b._by_network["n2"].transport.close()  # type: ignore[union-attr]  # b is deaf and mute on n2
    await until(lambda: not a.peer_status().networks[1].alive, within=TIMEOUT + 0.2)
    await until(lambda: not b.peer_status().networks[1].alive, within=TIMEOUT + 0.2)
    for hb in (a, b):
        status = hb.peer_status()
        assert status.reachable and status.networks[0].alive  # one network suffices


async def peer_stopped(a: Heartbeat, b: Heartbeat) -> None:
    await b.stop()
    took = await until(lambda: not a.peer_status().reachable, within=TIMEOUT + 0.3)
    assert took <= TIMEOUT + INTERVAL / 2 + 0.1  # the bound is timeout + interval/2; 0.1 s for a busy CI
    assert not any(n.alive for n in a.peer_status().networks)


def test_beat_now_delivers_at_once() -> None:
    async def scenario() -> None:
        a, b, _ = pair(free_port("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"), interval=5, timeout=15)
        await a.start()
        await b.start()
        try:
            await until(lambda: b.peer_status().payload == b"state of a", within=0.5)
            a.test_payloads["a"] = b"after a transition"  # type: ignore[attr-defined]
            a.beat_now()
            # The next periodic beat is 5 s away: arriving within a second proves beat_now sent it.
            await until(lambda: b.peer_status().payload == b"after a transition", within=1.0)
        finally:
            await a.stop()
            await b.stop()

    run(scenario)


def test_ipv6_link() -> None:
    """Only ::1 exists on loopback, so the peer is a plain socket on ::1 and our own beats loop back
    to us: they must be refused as coming from ourselves, while the peer's are accepted."""

    async def scenario() -> None:
        port = free_port("::1")
        hb = receiver(links=[Link("v6", "::1", "::1")], port=port, interval=0.05, timeout=0.3)
        await hb.start()
        peer = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            peer.bind(("::1", 0))
            peer.sendto(datagram(seq=1, payload=b"over v6"), ("::1", port))
            await until(lambda: hb.peer_status().reachable and hb.counters["dropped_auth"] > 0, within=1)
            assert hb.peer_status().payload == b"over v6"
        finally:
            peer.close()
            await hb.stop()

    run(scenario)


def test_binding_conflict_is_clear_and_leaves_nothing_bound() -> None:
    async def scenario() -> None:
        port = free_port("127.0.0.1", "127.0.0.3")
        squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        squatter.bind(("127.0.0.3", port))
        try:
            hb = receiver(
                links=[Link("n1", "127.0.0.1", "127.0.0.2"), Link("n2", "127.0.0.3", "127.0.0.4")], port=port
            )
            with pytest.raises(
                HeartbeatError, match="address in use: is another safekit-cloud daemon running for node a"
            ):
                await hb.start()
            assert heartbeat_tasks() == []
        finally:
            squatter.close()
        again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        again.bind(("127.0.0.1", port))  # the first link's socket was released
        again.close()

    run(scenario)


def test_second_daemon_for_same_node_refused() -> None:
    async def scenario() -> None:
        port = free_port("127.0.0.1", "127.0.0.3")
        first, second = (receiver(links=[Link("n1", "127.0.0.1", "127.0.0.2")], port=port) for _ in range(2))
        await first.start()
        try:
            with pytest.raises(HeartbeatError, match="address in use"):
                await second.start()
        finally:
            await first.stop()
        await second.start()  # stop() released the address at once
        await second.stop()
        await second.stop()  # idempotent

    run(scenario)


def test_address_not_on_host() -> None:
    async def scenario() -> None:
        hb = receiver(links=[Link("n1", "192.0.2.1", "192.0.2.2")], port=free_port("127.0.0.1"))
        with pytest.raises(HeartbeatError, match="not an address of this host"):
            await hb.start()

    run(scenario)


def test_announce_carries_the_whole_history_kept_and_shortens_it_only_to_fit_a_datagram() -> None:
    import msgspec
    from safekit_cloud.core.engine import Announce, announce_payload
    from safekit_cloud.core.module import HISTORY_KEPT

    def module(name: str) -> dict:
        return {"name": name, "state": 3, "data": "uptodate", "gen": 2**62 + 1,
                "history": [2**62 + i for i in range(2, 2 + HISTORY_KEPT)], "intent": "none", "eligible": True}

    one = msgspec.msgpack.decode(announce_payload([module("web")], True, 1300), type=Announce)
    assert len(one.modules[0].history) == HISTORY_KEPT
    many = announce_payload([module(f"module-{i}") for i in range(10)], True, 1300)
    assert len(many) <= 1300  # one that does not fit is sent empty: the peer would see no module
    decoded = msgspec.msgpack.decode(many, type=Announce)
    assert len(decoded.modules) == 10 and 1 <= len(decoded.modules[0].history) < HISTORY_KEPT


def test_a_pause_of_this_process_does_not_make_the_peer_lost_the_silence_while_listening_does() -> None:
    """A primary paused (SIGSTOP, a frozen VM) past the timeout used to find its peer lost the
    moment it ran again, and go on alone beside a peer that had taken over: a split brain where it
    had only been away. Only the silence while this node looked counts."""
    hb = receiver(interval=0.25, timeout=1.0)  # a pause: more than timeout/2 without looking
    feed(hb, datagram(seq=1))
    time.sleep(2.5)  # this node does not run: nothing looks (a blocked loop, as when paused)
    assert hb.peer_status().reachable, "a pause of this node was counted as the peer's silence"
    listening = time.monotonic()  # now it listens (looking every 50 ms), and hears nothing
    while time.monotonic() < listening + 0.7:
        assert hb.peer_status().reachable
        time.sleep(0.05)
    while time.monotonic() < listening + 1.2:
        hb.peer_status()
        time.sleep(0.05)
    assert not hb.peer_status().reachable  # silent for a whole timeout while this node listened


def test_after_a_pause_the_engine_waits_an_interval_for_current_beats_before_deciding() -> None:
    """The peer's beats queued during the pause are read one per loop turn: deciding on the first,
    the oldest, made a paused primary go on alone beside the node that had taken over."""
    hb = receiver(interval=0.25, timeout=1.0)
    started = time.monotonic()
    asyncio.run(hb.settle())
    assert time.monotonic() - started < 0.1  # no pause: at once
    time.sleep(1.0)  # paused
    started = time.monotonic()
    asyncio.run(hb.settle())
    assert time.monotonic() - started >= 0.25
