"""The primary's end of one replication stream: ordered, pipelined, bounded, and never hanging.

`submit(op)` assigns the next sequence number and writes the frame *synchronously* (no await between
the caller's local system call and the frame entering the socket buffer), so the secondary applies
operations in exactly the order they were applied locally, whatever the concurrency of FUSE requests.
Only then does the caller wait, for as much as its protocol requires:

- C (default): until the secondary applied the operation;
- B: until the secondary received it;
- A: not at all, except for the bound on bytes in flight (the lag);
- in every protocol, Fsync and O_SYNC/O_DSYNC writes wait until the secondary made them durable, so a
  call the application saw complete durably survives the loss of the primary.

Peer loss (no ack within `timeout`, connection closed, protocol error): every waiting call returns
False at once and later calls return False immediately; the owner learns it once through `on_lost`
with the operations that were never acknowledged, so it can journal them for the resync.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import messages as m
from .auth import client_handshake
from .framing import READ_CHUNK, FrameDecoder

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_INFLIGHT = 8 << 20
# Don't pile more than this into the transport's own buffer before waiting for the socket to drain.
WRITE_BUFFER_HIGH = 4 << 20

LostCallback = Callable[[str, list[m.Op]], None]
_RANK = {None: 0, "received": 1, "applied": 2}
_STRONGER = {(a, b): a if _RANK[a] >= _RANK[b] else b for a in _RANK for b in _RANK}


@dataclass
class SenderStats:
    ops: int = 0
    bytes_sent: int = 0
    acked: int = 0
    connected_at: float = field(default_factory=time.time)


@dataclass
class _Pending:
    seq: int
    op: m.Op
    size: int
    sent: float


class _AckProtocol(asyncio.Protocol):
    """The connection's protocol once the sender runs: bytes go straight to the sender; write
    flow control (pause/resume, what `writer.drain()` waits on) stays with the stream protocol."""

    def __init__(self, sender: Sender, stream: asyncio.BaseProtocol) -> None:
        self._sender, self._stream = sender, stream

    def data_received(self, data: bytes) -> None:
        self._sender._on_data(data)

    def eof_received(self) -> bool:
        self._sender._lose("receiver closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stream.connection_lost(exc)  # wakes writers waiting in drain()
        self._sender._lose(f"connection lost: {exc}" if exc else "receiver closed the connection")

    def pause_writing(self) -> None:
        self._stream.pause_writing()

    def resume_writing(self) -> None:
        self._stream.resume_writing()


class Sender:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: FrameDecoder,
        *, next_seq: int = 1, protocol: str = "C", timeout: float = DEFAULT_TIMEOUT,
        max_inflight: int = DEFAULT_MAX_INFLIGHT, on_lost: LostCallback | None = None,
    ) -> None:
        self._reader, self._writer, self._decoder = reader, writer, decoder
        self.protocol = protocol
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.on_lost = on_lost
        self.stats = SenderStats()
        self._next = next_seq
        self._received = next_seq - 1
        self._applied = next_seq - 1
        self._unacked: collections.deque[_Pending] = collections.deque()
        self._inflight = 0
        self._waiters: dict[str, collections.deque[tuple[int, asyncio.Future[bool]]]] = {
            "received": collections.deque(), "applied": collections.deque(),
        }
        self._space: asyncio.Event = asyncio.Event()
        self._space.set()
        self._last_send = time.monotonic()
        self._last_rx = time.monotonic()
        # Resync replies (RsState, RsEntries...) go here; the resync driver matches them by `req`.
        self.on_reply: Callable[[m.Message], None] | None = None
        self.lost_reason: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def connect(
        cls, host: str, port: int, key: bytes, module: str, directory: bytes, *, protocol: str = "C",
        timeout: float = DEFAULT_TIMEOUT, max_inflight: int = DEFAULT_MAX_INFLIGHT,
        on_lost: LostCallback | None = None,
    ) -> Sender:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=READ_CHUNK)
        try:
            next_seq, decoder, backlog = await client_handshake(reader, writer, key, module, directory, protocol)
            if backlog:
                raise m.ProtocolError("receiver spoke before the first operation")
        except BaseException:
            writer.transport.abort()
            raise
        sender = cls(reader, writer, decoder, next_seq=next_seq, protocol=protocol, timeout=timeout,
                     max_inflight=max_inflight, on_lost=on_lost)
        sender.start()
        return sender

    def start(self) -> None:
        """Acks are handled in the transport's data_received callback (no reader task: one event
        loop turn and one future less per acknowledgement than a StreamReader loop)."""
        self._tasks = [asyncio.create_task(self._watchdog(), name="repl-watchdog")]
        transport = self._writer.transport
        stream_proto = transport.get_protocol()
        buffered = bytes(self._reader._buffer)  # arrived after the handshake, before this switch
        self._reader._buffer.clear()
        transport.set_protocol(_AckProtocol(self, stream_proto))
        if buffered:
            asyncio.get_running_loop().call_soon(self._on_data, buffered)
        if self._reader.at_eof():
            asyncio.get_running_loop().call_soon(self._lose, "receiver closed the connection")

    @property
    def connected(self) -> bool:
        return self.lost_reason is None

    @property
    def inflight_bytes(self) -> int:
        return self._inflight

    def lag_seconds(self) -> float:
        return time.monotonic() - self._unacked[0].sent if self._unacked else 0.0

    # ---- sending ----

    def send(self, op: m.Op) -> int:
        """Queue `op` (split if it is a large write) and return the sequence number of its last frame.
        Synchronous on purpose: see the module docstring. 0 if the link is already lost."""
        if self.lost_reason is not None:
            return 0
        parts = m.split_write(op) if isinstance(op, m.Write) else [op]
        now = time.monotonic()
        try:
            for part in parts:
                seq = self._next
                self._next += 1
                part = m.with_seq(part, seq)
                data = self._decoder.frame(part)  # tagged: the stream is authenticated
                self._writer.write(data)
                size = m.op_size(part)
                self._unacked.append(_Pending(seq, part, size, now))
                self._inflight += size
                self.stats.ops += 1
                self.stats.bytes_sent += len(data)
        except (ConnectionError, RuntimeError) as exc:  # transport closed under us
            self._lose(f"send failed: {exc}")
            return 0
        self._last_send = now
        if self._inflight > self.max_inflight:
            self._space.clear()
        return seq

    async def submit(self, *ops: m.Op) -> bool:
        """Send `ops` (all enqueued before the first await) and wait as the protocol requires.
        True: the peer has them as required; False: the link is lost (the caller carries on alone;
        unacknowledged ops are handed to on_lost)."""
        seq, stage = 0, None
        for op in ops:
            seq = self.send(op)
            if seq == 0:
                return False
            stage = _STRONGER[stage, self._stage(op)]
        ok = True
        if stage is not None:
            ok = await self._wait(stage, seq)
        if ok and not self._space.is_set():
            ok = await self._wait_space()
        if ok and self._writer.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
            ok = await self._drain()
        return ok and self.lost_reason is None

    async def room(self) -> bool:
        """Wait while the bytes in flight or the socket buffer are above their bounds (flow control
        for a producer of many operations, the resync). False: the link is lost."""
        if self.lost_reason is None and not self._space.is_set():
            await self._wait_space()
        if self.lost_reason is None and self._writer.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
            await self._drain()
        return self.lost_reason is None

    async def barrier(self) -> bool:
        """Wait until every operation sent so far is applied (and durable where it asked to be)."""
        if self.lost_reason is not None:
            return False
        return await self._wait("applied", self._next - 1)

    def _stage(self, op: m.Op) -> str | None:
        if isinstance(op, m.Fsync) or (isinstance(op, m.Write) and op.sync):
            return "applied"
        if isinstance(op, (m.Open, m.Close, m.Noop)):
            return None  # bookkeeping: the next real operation's ack covers them (acks are cumulative)
        return {"C": "applied", "B": "received", "A": None}[self.protocol]

    async def _wait(self, stage: str, seq: int) -> bool:
        done = self._applied if stage == "applied" else self._received
        if seq <= done:
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters[stage].append((seq, fut))
        return await fut

    async def _wait_space(self) -> bool:
        await self._space.wait()
        return self.lost_reason is None

    async def _drain(self) -> bool:
        try:
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            self._lose(f"send failed: {exc}")
        return self.lost_reason is None

    # ---- acknowledgements ----

    def _on_data(self, data: bytes) -> None:
        if self.lost_reason is not None:
            return
        self._last_rx = time.monotonic()
        try:
            for msg in self._decoder.feed(data):
                self._on_message(msg)
        except (m.ProtocolError, ConnectionError, OSError) as exc:
            self._lose(str(exc))

    def _on_message(self, msg: m.Message) -> None:
        if isinstance(msg, m.Error):
            raise m.ProtocolError(f"receiver error: {msg.message}")
        if isinstance(msg, m.RESYNC_REPLIES) and self.on_reply is not None:
            self.on_reply(msg)
            return
        if not isinstance(msg, m.Ack):
            raise m.ProtocolError(f"unexpected {type(msg).__name__} from the receiver")
        last = self._next - 1
        if not (msg.applied <= msg.received <= last and msg.received >= self._received
                and msg.applied >= self._applied):
            raise m.ProtocolError(f"ack out of range: {msg} (sent up to {last})")
        self._received = msg.received
        self._applied = msg.applied
        self._release("received", msg.received)
        self._release("applied", msg.applied)
        while self._unacked and self._unacked[0].seq <= msg.applied:
            self._inflight -= self._unacked.popleft().size
            self.stats.acked += 1
        if self._inflight <= self.max_inflight:
            self._space.set()

    def _release(self, stage: str, upto: int) -> None:
        waiters = self._waiters[stage]
        while waiters and waiters[0][0] <= upto:
            _, fut = waiters.popleft()
            if not fut.done():
                fut.set_result(True)

    # ---- liveness ----

    async def _watchdog(self) -> None:
        """Declare the peer lost when the oldest unacknowledged op waited past the timeout; send a
        Noop when idle so a silent peer is noticed even without application traffic."""
        tick = max(self.timeout / 4, 0.01)
        while self.lost_reason is None:
            await asyncio.sleep(tick)
            now = time.monotonic()
            # A receiver busy answering a resync request (listing a tree, hashing a file) keeps
            # sending replies: silence, not slowness, is what makes it lost.
            if self._unacked and now - self._unacked[0].sent > self.timeout and now - self._last_rx > self.timeout:
                self._lose(f"no acknowledgement for {self.timeout:g} s")
            elif not self._unacked and now - self._last_send > self.timeout / 2:
                self.send(m.Noop(seq=0))

    def abandon(self, reason: str) -> None:
        """Give the link up now (the engine knows the peer is gone): waiting calls complete at once
        and the replicator goes on alone, instead of waiting for the acknowledgement timeout."""
        self._lose(reason)

    def _lose(self, reason: str) -> None:
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        log.warning("replication link lost: %s", reason)
        self._writer.transport.abort()
        for waiters in self._waiters.values():
            while waiters:
                _, fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(False)
        self._space.set()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        unacked = [p.op for p in self._unacked]
        if self.on_lost is not None:
            try:
                self.on_lost(reason, unacked)
            except Exception:
                log.exception("on_lost callback failed")

    def unacknowledged(self) -> list[m.Op]:
        return [p.op for p in self._unacked]

    async def close(self) -> None:
        """Orderly end: wait briefly for outstanding acks, then close the connection."""
        if self.lost_reason is None:
            try:
                async with asyncio.timeout(self.timeout):
                    await self.barrier()
            except TimeoutError:
                pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.lost_reason is None:
            self.lost_reason = "closed"
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
