"""Heartbeats: authenticated UDP beats to the peer on every network, and what we hear back.

This module only observes: per network it knows when the peer was last heard and the round-trip time,
and it hands the engine the peer's newest payload. Deciding what a silence means is `decide`'s job.

Each `interval` one datagram goes out on every link (wire format in `heartbeat_codec`). A received
datagram is accepted only if it authenticates (HMAC-SHA256 under the cluster key), names our cluster and
our peer, comes from the peer's address on that link, belongs to the peer's newest incarnation and passes
the replay window. Everything else is counted and dropped; warnings are rate-limited per reason.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from .heartbeat_codec import (
    Beat,
    Dropped,
    HeartbeatError,
    ReplayWindow,
    decode,
    encode,
    max_payload,
)

__all__ = ["Heartbeat", "HeartbeatError", "Link", "NetworkStatus", "PeerStatus"]

log = logging.getLogger(__name__)

WARN_PERIOD = 10.0  # seconds between two warnings for the same reason
RTT_GAIN = 1 / 8  # EWMA gain, as TCP's SRTT (RFC 6298): smooth, yet follows a real change in a few beats
SENT_HISTORY = 64  # send times kept per link to match echoes; older echoes are ignored
COUNTERS = (
    "sent",
    "received",
    "dropped_auth",
    "dropped_replay",
    "dropped_stale",
    "dropped_malformed",
    "dropped_wrong_cluster",
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Link:
    """One heartbeat network."""

    network: str  # name, e.g. "default"
    local: str  # this node's address on it (IPv4 or IPv6)
    peer: str  # the peer's address on it


@dataclass(frozen=True)
class NetworkStatus:
    network: str
    alive: bool  # heard from the peer within `timeout`
    last_seen_ago: float | None  # seconds, None if never
    rtt_ms: float | None  # smoothed round-trip time, None until measured


@dataclass(frozen=True)
class PeerStatus:
    reachable: bool  # alive on at least one network
    networks: tuple[NetworkStatus, ...]
    payload: bytes | None  # payload of the newest authenticated datagram (None if never)
    incarnation: int | None  # the peer daemon's incarnation (changes when it restarts)


@dataclass(eq=False)
class _LinkState:
    """Mutable per-network state; owned by one Heartbeat."""

    link: Link
    peer_ip: IPAddress
    transport: asyncio.DatagramTransport | None = None
    closed: asyncio.Future[None] | None = None
    peer_sockaddr: tuple[Any, ...] = ()
    last_seen: float | None = None
    srtt: float | None = None  # seconds
    rx_seq: int = 0  # newest sequence received on this link, echoed back for RTT
    rx_time: float = 0.0
    sent: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=SENT_HISTORY))


class _LinkProtocol(asyncio.DatagramProtocol):
    def __init__(self, heartbeat: Heartbeat, state: _LinkState, closed: asyncio.Future[None]) -> None:
        self._hb = heartbeat
        self._state = state
        self._closed = closed

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._hb._receive_on(self._state, data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors and failed sends (network down, no route): the silence will show in the peer's
        # status; one line per period says why.
        self._hb._limited.log(
            f"socket:{self._state.link.network}",
            logging.WARNING,
            "heartbeat socket on network %s (%s): %s",
            self._state.link.network,
            self._state.link.local,
            exc,
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state.transport is not None:  # not closed by stop(): the network is now deaf and mute
            log.error("heartbeat socket on network %s closed unexpectedly: %s", self._state.link.network, exc)
            self._state.transport = None
        if not self._closed.done():
            self._closed.set_result(None)


class _RateLimitedLog:
    """One line per key and period, so a flood of bad datagrams cannot flood the log."""

    def __init__(self, period: float) -> None:
        self._period = period
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, key: str, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._period:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        if skipped:
            msg += " (%d more like this in the last %.0fs)"
            args += (skipped, self._period)
        log.log(level, msg, *args, exc_info=exc_info)


class Heartbeat:
    """Beats to one peer on one or more networks and reports what it hears. Makes no decisions."""

    def __init__(
        self,
        *,
        cluster: str,
        node: str,
        peer: str,
        links: list[Link],
        port: int,
        key: bytes,
        interval: float,
        timeout: float,
        replay_window: int,
        payload: Callable[[], bytes],
        on_change: Callable[[], None],
        incarnation: int | None = None,
    ) -> None:
        _check_settings(cluster, node, peer, links, port, key, interval, timeout)
        self._cluster, self._node, self._peer = cluster, node, peer
        self._port, self._key = port, key
        self._interval, self._timeout = interval, timeout
        self._payload_fn, self._on_change = payload, on_change
        # Wall-clock nanoseconds grow across restarts without persisting anything; the engine may pass
        # a persisted, strictly increasing value instead to be immune to a clock set back.
        self._incarnation = incarnation if incarnation is not None else time.time_ns()
        self._seq = 0
        self._links = [_LinkState(link, _ip(link.peer)) for link in links]
        self._by_network = {state.link.network: state for state in self._links}
        self._window = ReplayWindow(replay_window)
        self._peer_incarnation: int | None = None
        self._peer_payload: bytes | None = None
        # When loss detection last looked (it looks at least every interval/2): a longer gap means
        # this process did not run (a paused VM, SIGSTOP, a starved host), see _account_pause.
        self._looked_at = time.monotonic()
        self._resumed_at: float | None = None  # when the last such pause ended
        self._reported: tuple[object, ...] = (self._alive_flags(time.monotonic()), None, None)
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._limited = _RateLimitedLog(WARN_PERIOD)
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self.max_payload = max_payload(cluster, node)

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind one UDP socket per link on (local, port) and start beating. Raises HeartbeatError."""
        if self._running:
            raise HeartbeatError("heartbeat already started")
        try:
            for state in self._links:
                await self._bind(state)
        except HeartbeatError:
            await self._close_sockets()
            raise
        self._running = True
        self._tasks = [self._spawn(self._beat_loop(), "beat"), self._spawn(self._watch_loop(), "watch")]
        log.info(
            "heartbeat: node %s beating to %s every %gs on %s (port %d, incarnation %d)",
            self._node,
            self._peer,
            self._interval,
            ", ".join(f"{s.link.network} {s.link.local}->{s.link.peer}" for s in self._links),
            self._port,
            self._incarnation,
        )

    async def stop(self) -> None:
        """Cancel the tasks and close the sockets; safe to call twice or before start()."""
        self._running = False
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_sockets()

    async def _bind(self, state: _LinkState) -> None:
        loop = asyncio.get_running_loop()
        link = state.link
        family = socket.AF_INET6 if ":" in link.local else socket.AF_INET
        closed: asyncio.Future[None] = loop.create_future()
        try:
            # No SO_REUSEADDR/SO_REUSEPORT: a second daemon for the same node must fail to bind here
            # rather than silently share (and split) the peer's beats.
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _LinkProtocol(self, state, closed), local_addr=(link.local, self._port), family=family
            )
        except OSError as exc:
            raise HeartbeatError(self._bind_error(link, exc)) from exc
        state.transport, state.closed = transport, closed
        state.peer_sockaddr = _peer_sockaddr(link, self._port, family, transport)

    def _bind_error(self, link: Link, exc: OSError) -> str:
        where = (
            f"cannot bind the heartbeat socket of network {link.network!r} on {link.local} port {self._port}"
        )
        if exc.errno == errno.EADDRINUSE:
            why = f"address in use: is another safekit-cloud daemon running for node {self._node}?"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = f"{link.local} is not an address of this host: check node {self._node}'s addresses"
        elif exc.errno == errno.EACCES:
            why = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        else:
            why = exc.strerror or str(exc)
        return f"{where}: {why}"

    async def _close_sockets(self) -> None:
        waiting = []
        for state in self._links:
            transport, state.transport = state.transport, None  # None first: a close we asked for
            if transport is not None:
                transport.close()
            if state.closed is not None:
                waiting.append(state.closed)
                state.closed = None
        # The selector closes the file descriptor one loop turn later; wait, so that a restart in the
        # same process can bind the same address at once.
        if waiting:
            await asyncio.wait(waiting, timeout=1.0)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"heartbeat-{name}-{self._node}")
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "heartbeat task %s died: beats or loss detection stopped",
                task.get_name(),
                exc_info=task.exception(),
            )

    # -- sending ---------------------------------------------------------------------------------------

    def beat_now(self) -> None:
        """Send a beat on every link at once (the engine calls it after a state change)."""
        if not self._running:
            return
        payload = self._current_payload()
        for state in self._links:
            self._send_on(state, payload)

    async def _beat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            self.beat_now()
            next_at += self._interval
            # After a stall (suspended VM, overloaded loop) resume the rhythm; no burst of catch-up beats.
            next_at = max(next_at, loop.time())
            await asyncio.sleep(next_at - loop.time())

    def _current_payload(self) -> bytes:
        """The engine's payload, or b"" if it cannot be had: beats must go on whatever happens to it,
        since a silent primary would make the peer take over while this node still serves (split brain)."""
        try:
            payload = bytes(self._payload_fn())
        except Exception:  # noqa: BLE001 - the engine's bug must not stop liveness; logged, not hidden
            self._limited.log(
                "payload-error",
                logging.ERROR,
                "heartbeat payload() failed; sending an empty payload",
                exc_info=True,
            )
            return b""
        if len(payload) > self.max_payload:
            self._limited.log(
                "payload-size",
                logging.ERROR,
                "heartbeat payload of %d bytes exceeds the %d bytes a datagram can carry; sending an empty "
                "payload so that the peer sees our state as unknown",
                len(payload),
                self.max_payload,
            )
            return b""
        return payload

    def _send_on(self, state: _LinkState, payload: bytes) -> None:
        if state.transport is None or state.transport.is_closing():
            return
        self._seq += 1
        now_ns = time.monotonic_ns()
        held = now_ns - int(state.rx_time * 1e9) if state.rx_seq else 0
        beat = Beat(
            self._cluster,
            self._node,
            self._incarnation,
            self._seq,
            now_ns,
            self._peer_incarnation or 0,
            state.rx_seq,
            held,
            payload,
        )
        state.transport.sendto(encode(beat, self._key), state.peer_sockaddr)
        state.sent.append((self._seq, now_ns / 1e9))
        self._counters["sent"] += 1

    # -- receiving -------------------------------------------------------------------------------------

    def _receive(self, network: str, data: bytes, addr: tuple[Any, ...]) -> None:
        """Feed one datagram as if it arrived on `network` from `addr` (the tests' entry point)."""
        self._receive_on(self._by_network[network], data, addr)

    def _receive_on(self, state: _LinkState, data: bytes, addr: tuple[Any, ...]) -> None:
        now = time.monotonic()
        try:
            beat, newest = self._admit(state, data, addr)
        except Dropped as drop:
            self._counters[drop.counter] += 1
            self._limited.log(
                f"{drop.counter}:{state.link.network}",
                logging.WARNING,
                "heartbeat from %s on network %s dropped: %s",
                addr[0],
                state.link.network,
                drop.reason,
            )
            return
        self._counters["received"] += 1
        self._record(state, beat, newest, now)
        self._observe()

    def _admit(self, state: _LinkState, data: bytes, addr: tuple[Any, ...]) -> tuple[Beat, bool]:
        """Authenticate and check one datagram; returns it and whether it is the newest. Raises Dropped."""
        beat = decode(data, self._key, self._cluster)
        if beat.node == self._node:
            raise Dropped(
                "dropped_auth",
                f"datagram from ourselves (node {self._node}): is the peer's "
                "address our own, or do two nodes share this name?",
            )
        if beat.node != self._peer:
            raise Dropped(
                "dropped_auth", f"datagram from unknown node {beat.node!r} (peer is {self._peer!r})"
            )
        if _ip(addr[0]) != state.peer_ip:
            raise Dropped(
                "dropped_auth",
                f"datagram of node {beat.node} from {addr[0]}, not from its "
                f"address {state.link.peer} on this network",
            )
        if self._peer_incarnation is not None and beat.incarnation < self._peer_incarnation:
            raise Dropped(
                "dropped_stale",
                f"incarnation {beat.incarnation} is older than "
                f"{self._peer_incarnation} (a replay, or the peer's clock was set back)",
            )
        if beat.incarnation != self._peer_incarnation:  # newer (older ones were refused above)
            self._new_peer_incarnation(beat.incarnation)
        return beat, self._window.accept(beat.seq)

    def _new_peer_incarnation(self, incarnation: int) -> None:
        # The peer daemon restarted: its sequence numbers start again, so the window and the echoes
        # (which refer to its old numbering) start again too.
        if self._peer_incarnation is not None:
            log.info(
                "heartbeat: peer %s restarted (incarnation %d -> %d)",
                self._peer,
                self._peer_incarnation,
                incarnation,
            )
        self._peer_incarnation = incarnation
        self._window = ReplayWindow(self._window.size)
        for state in self._links:
            state.rx_seq, state.rx_time = 0, 0.0

    def _record(self, state: _LinkState, beat: Beat, newest: bool, now: float) -> None:
        state.last_seen = now
        if beat.seq > state.rx_seq:
            state.rx_seq, state.rx_time = beat.seq, now
        self._measure_rtt(state, beat, now)
        if newest:  # a late datagram proves the link works, but its payload is already outdated
            self._peer_payload = beat.payload

    def _measure_rtt(self, state: _LinkState, beat: Beat, now: float) -> None:
        if beat.echo_incarnation != self._incarnation or not beat.echo_seq:
            return  # nothing echoed yet, or an echo of our previous life's numbering
        sent_at = next((at for seq, at in state.sent if seq == beat.echo_seq), None)
        if sent_at is None:
            return
        rtt = max(0.0, now - sent_at - beat.echo_hold_ns / 1e9)
        state.srtt = rtt if state.srtt is None else state.srtt + RTT_GAIN * (rtt - state.srtt)

    # -- loss detection and reporting ------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self._next_check(time.monotonic()))
            self._observe()

    def _next_check(self, now: float) -> float:
        """Wake at the earliest expiry (loss noticed within a millisecond), and at least every interval/2."""
        delay = self._interval / 2
        for state in self._links:
            if state.last_seen is not None and now - state.last_seen < self._timeout:
                delay = min(delay, state.last_seen + self._timeout - now + 0.001)
        return delay

    def _account_pause(self, now: float) -> None:
        """Silence is counted only while this node listened. After a pause of this process longer
        than half the timeout, each link's silence resumes where it stood when the pause began: a
        primary paused past the timeout used to find its peer "lost" the moment it ran again (or to
        act on the oldest of the beats queued meanwhile), start a new generation and acknowledge
        writes alone, when the peer had taken over: a split brain where one node had simply been
        away. Now it hears the peer first (see settle), and yields to it."""
        gap = now - self._looked_at
        self._looked_at = now
        if gap <= self._timeout / 2:
            return
        self._resumed_at = now
        for state in self._links:
            if state.last_seen is not None:
                state.last_seen = min(now, state.last_seen + gap)
        log.warning("heartbeat: this process did not run for %.1fs (paused, or its host starved): the peer's "
                    "silence meanwhile is not counted", gap)

    async def settle(self) -> None:
        """Return once what the peer said is current: at once, except in the first interval after a
        pause of this process, while its beats queued meanwhile (read one per loop turn) and its next
        one arrive. The engine decides nothing on the beat it heard before the pause."""
        self._account_pause(time.monotonic())
        while self._resumed_at is not None and time.monotonic() - self._resumed_at < self._interval:
            await asyncio.sleep(self._interval / 4)

    def _alive_flags(self, now: float) -> tuple[bool, ...]:
        self._account_pause(now)
        return tuple(
            state.last_seen is not None and now - state.last_seen < self._timeout for state in self._links
        )

    def _observe(self) -> None:
        """Call on_change if reachability, a network's liveness, the payload or the incarnation changed."""
        alive = self._alive_flags(time.monotonic())
        snapshot = (alive, self._peer_payload, self._peer_incarnation)
        if snapshot == self._reported:
            return
        self._log_flips(self._reported[0], alive)  # type: ignore[arg-type]
        self._reported = snapshot
        try:
            self._on_change()
        except Exception:  # an engine bug must not kill the receive path or loss detection
            log.exception("heartbeat on_change callback failed")

    def _log_flips(self, before: tuple[bool, ...], after: tuple[bool, ...]) -> None:
        for state, was, now in zip(self._links, before, after):
            if was != now:
                level, what = (logging.INFO, "heard") if now else (logging.WARNING, "silent")
                log.log(level, "heartbeat: peer %s %s on network %s", self._peer, what, state.link.network)
        if any(before) != any(after):
            if any(after):
                log.info("heartbeat: peer %s reachable", self._peer)
            else:
                log.warning(
                    "heartbeat: peer %s lost: silent on every network for %gs", self._peer, self._timeout
                )

    def peer_status(self) -> PeerStatus:
        now = time.monotonic()
        networks = tuple(
            NetworkStatus(
                network=state.link.network,
                alive=alive,
                last_seen_ago=None if state.last_seen is None else now - state.last_seen,
                rtt_ms=None if state.srtt is None else state.srtt * 1000,
            )
            for state, alive in zip(self._links, self._alive_flags(now))
        )
        return PeerStatus(
            any(n.alive for n in networks), networks, self._peer_payload, self._peer_incarnation
        )

    @property
    def counters(self) -> dict[str, int]:
        """sent, received (accepted), and dropped_* by reason; a copy."""
        return dict(self._counters)

    @property
    def incarnation(self) -> int:
        return self._incarnation


def _ip(address: str) -> IPAddress | None:
    """Parse an address, ignoring an IPv6 zone ("%eth0"): the socket already fixes the interface."""
    try:
        return ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None


def _peer_sockaddr(
    link: Link, port: int, family: int, transport: asyncio.DatagramTransport
) -> tuple[Any, ...]:
    if family == socket.AF_INET:
        return (link.peer, port)
    # Numeric, so this never blocks on DNS. A link-local peer needs a zone: take our socket's.
    sockaddr = socket.getaddrinfo(link.peer, port, family, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)[0][4]
    if sockaddr[3] == 0 and ipaddress.IPv6Address(sockaddr[0]).is_link_local:
        sockaddr = (*sockaddr[:3], transport.get_extra_info("sockname")[3])
    return tuple(sockaddr)


def _check_settings(
    cluster: str,
    node: str,
    peer: str,
    links: list[Link],
    port: int,
    key: bytes,
    interval: float,
    timeout: float,
) -> None:
    """Refuse settings that would make heartbeats silently useless; config validation should catch these
    first, so the messages name the setting."""
    problems = []
    if not links:
        problems.append("at least one heartbeat network is needed")
    if node == peer:
        problems.append(f"the peer must be another node than {node!r}")
    if not 0 < port < 65536:
        problems.append(f"port {port} is not in 1..65535")
    if len(key) < 16:
        problems.append("the cluster key must be at least 16 bytes")
    if not 0 < interval < timeout:
        problems.append(f"interval {interval}s must be positive and below the timeout {timeout}s")
    if max(len(cluster.encode()), len(node.encode())) > 255:
        problems.append("cluster and node names must be at most 255 bytes")
    problems += _link_problems(links)
    if problems:
        raise HeartbeatError("invalid heartbeat settings: " + "; ".join(problems))


def _link_problems(links: list[Link]) -> list[str]:
    problems = []
    for kind in ("network", "local"):
        values = [getattr(link, kind) for link in links]
        problems += [f"{kind} {v!r} is used by two links" for v in sorted(set(values)) if values.count(v) > 1]
    for link in links:
        local, peer = _ip(link.local), _ip(link.peer)
        if local is None or peer is None:
            problems.append(
                f"network {link.network!r}: {link.local!r} and {link.peer!r} must be IP addresses"
            )
        elif local.version != peer.version:
            problems.append(
                f"network {link.network!r}: {link.local} and {link.peer} are not both IPv{local.version}"
            )
    return problems
