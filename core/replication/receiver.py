"""The secondary's end: accepts authenticated streams, applies operations in order, acknowledges.

One stream per replicated directory; a new authenticated stream for a directory replaces the old one
(the primary reconnected). Acknowledgements are cumulative and sent once per batch of frames read
from the socket, after the batch is applied (protocol C; protocol B also acks on receipt).
Anything malformed or hostile ends the stream with an Error message and a log line; the tree is
only ever touched through `Applier`, which cannot reach outside it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import messages as m, unwatched
from .auth import AuthError, UnsupportedPeer, server_handshake
from .framing import READ_CHUNK, FrameDecoder, frame
from .journal import Journal, journal_path
from .paths import open_beneath, open_replicated_dir
from .protect import marker_path as protect_marker, open_writable
from .resync import ResyncApplier
from .syscalls import syncfs
from .verify import serve_manifest

log = logging.getLogger(__name__)

LINGER_SECONDS = 2.0  # after refusing a stream: how long to wait for the primary to close first

EventCallback = Callable[[str, dict[str, object]], None]


@dataclass
class StreamStats:
    directory: str
    peer: str = ""
    connected: bool = False
    ops: int = 0
    bytes: int = 0
    last_seq: int = 0
    since: float = field(default_factory=time.time)
    last_error: str = ""


def raise_fd_limit() -> None:
    # One descriptor per file the primary has open for writing: allow as many as the system lets us.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Receiver:
    def __init__(self, module: str, directories: Mapping[bytes, str | os.PathLike[str]], key: bytes,
                 on_event: EventCallback | None = None, state_dir: Path | str | None = None,
                 generation: int | None = None, fullsync: bool = False, idle_timeout: float | None = None) -> None:
        """`directories` maps the name a primary announces (its absolute path, as bytes) to the local
        directory receiving it (the same path in production; another one in tests).
        `state_dir`: where each directory's lineage is kept (journal.py; None: no lineage, every
        resync compares checksums). `generation`: the engine's data generation of this node, reported
        to the primary. `fullsync`: forget the lineages (the next resync compares everything).
        `idle_timeout`: drop a stream silent for that long (the primary sends a Noop when idle)."""
        self.module = module
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.generation = generation
        self.fullsync = fullsync
        self.idle_timeout = idle_timeout
        self.journals: dict[bytes, Journal] = {}
        self._stopping = False
        self.key = key
        self.on_event = on_event
        self._dirs = {name: Path(path) for name, path in directories.items()}
        self._root_fds: dict[bytes, int] = {}
        self._active: dict[bytes, tuple[asyncio.Task[None], asyncio.StreamWriter]] = {}
        self.stats: dict[bytes, StreamStats] = {n: StreamStats(n.decode(errors="replace")) for n in self._dirs}
        self._server: asyncio.Server | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        raise_fd_limit()
        for name, path in self._dirs.items():
            if self.state_dir is None:
                self._root_fds[name] = open_replicated_dir(path)
                continue
            # Writable beneath a read-only bind that covers the directory already.
            self._root_fds[name] = open_writable(path, protect_marker(self.state_dir, self.module, path))
            j = self.journals[name] = Journal.load(journal_path(self.state_dir, self.module, name))
            if self.fullsync:
                j.target_invalidate("full resync requested")
            await self._look_around(j, self._root_fds[name], path)
        self._server = await asyncio.start_server(self._on_connection, host, port, limit=READ_CHUNK)
        return self._server.sockets[0].getsockname()[1]

    async def _look_around(self, j: Journal, root_fd: int, path: Path) -> None:
        """What changed in `path` while no agent watched it: reported with the lineage (unwatched.py)."""
        j.unwatched = await asyncio.to_thread(  # its progress says to the service we are alive
            unwatched.look_around, j, root_fd, where=path,
            progress=lambda n: self._emit("walking", directory=str(path), entries=n))
        if j.unwatched == [b""]:
            j.target_invalidate("the replicated directory itself changed while no agent watched it")
        if not j.unwatched:
            j.watched_again()  # nothing went around us, or the next resync compares everything

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for task in list(self._conn_tasks):
            task.cancel()
        await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        for name, j in self.journals.items():
            if j.kind == "target" and name in self._root_fds:
                try:  # a clean stop: the lineage holds even after a power loss from now on
                    fd = open_beneath(self._root_fds[name], b"", os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        syncfs(fd)
                    finally:
                        os.close(fd)
                    j.target_clean()
                except OSError as exc:
                    log.error("cannot record the clean stop of %r: %s", name, exc)
        for j in self.journals.values():
            j.close()
        for fd in self._root_fds.values():
            os.close(fd)
        self._root_fds.clear()

    def distrust(self, local: Path, why: str) -> None:
        """The replica at `local` may have been changed behind the stream (its read-only protection
        was removed from outside): forget its lineage, so that the next resync compares every file,
        and end its stream now, so that the primary reconnects and runs that resync."""
        for name, path in self._dirs.items():
            if path != Path(local):
                continue
            if name in self.journals:
                self.journals[name].target_invalidate(why)
            active = self._active.get(name)
            if active is None:
                continue
            proto = active[1].transport.get_protocol()
            if isinstance(proto, _Apply):  # ended with the reason, which the primary then shows
                proto.fail(ReplicaDistrusted(f"{why}: the next resync compares every file"))
            else:
                active[1].transport.abort()

    def status(self) -> dict[str, object]:
        out = {}
        for name, s in self.stats.items():
            out[s.directory] = vars(s).copy()
            if name in self.journals:
                out[s.directory]["lineage"] = self.journals[name].describe()
        return out

    def _emit(self, event: str, **detail: object) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, detail)
            except Exception:
                log.exception("receiver event callback failed")

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        peer = str(writer.get_extra_info("peername"))
        try:
            await self._serve(reader, writer, peer)
        except asyncio.CancelledError:
            pass
        finally:
            self._conn_tasks.discard(task)
            writer.close()  # flushes a final Error message; a replaced stream was aborted already

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        try:
            hello, decoder, backlog = await server_handshake(reader, writer, self.key)
        except (m.ProtocolError, ConnectionError, TimeoutError, OSError) as exc:
            log.warning("replication handshake from %s refused: %s", peer, exc)
            if isinstance(exc, (AuthError, UnsupportedPeer)):  # a node to fix: shown in `status` too
                for stats in self.stats.values():  # (not a port scan's garbage, which would hide the
                    if not stats.connected:  # reason the last stream ended)
                        stats.last_error = f"handshake from {peer} refused: {exc}"
            self._refuse(writer, str(exc))
            self._emit("refused", peer=peer, reason=str(exc))
            return
        if hello.module != self.module or hello.directory not in self._dirs:
            reason = f"module {hello.module!r} directory {hello.directory!r} not replicated here"
            log.warning("replication stream from %s refused: %s", peer, reason)
            self._refuse(writer, reason, decoder)
            return
        if hello.purpose == "verify":  # a manifest request: the running stream is left alone
            await serve_manifest(reader, writer, decoder, backlog, self._root_fds[hello.directory], peer)
            return
        await self._replace(hello.directory)
        task = asyncio.current_task()
        assert task is not None
        self._active[hello.directory] = (task, writer)
        stats = self.stats[hello.directory]
        # last_error stays: what ended the previous stream is worth seeing while a new one tries.
        stats.peer, stats.connected, stats.since = peer, True, time.time()
        applier = ResyncApplier(self._root_fds[hello.directory], self.journals.get(hello.directory), self.generation,
                                lambda e, d: self._emit(e, **d), stats.directory)
        log.info("replication stream for %s from %s (protocol %s)", stats.directory, peer, hello.protocol)
        self._emit("connected", directory=stats.directory, peer=peer)
        refused = False
        reason = "the receiver failed (an internal error: see its log)"  # an exception not caught below
        try:
            writer.write(decoder.frame(m.Welcome(next_seq=1)))
            await self._pump(reader, writer, decoder, backlog, applier, stats, hello.protocol == "B")
            reason = "peer closed the stream"
        except (m.ProtocolError, OSError) as exc:
            # OSError while applying: the replica diverged from the primary; either way it is out of date.
            reason = f"{type(exc).__name__}: {exc}"
            log.error("replication stream for %s from %s dropped: %s", stats.directory, peer, reason)
            self._refuse(writer, reason, decoder)
            refused = True
        except asyncio.CancelledError:
            reason = "replaced by a new stream"
            raise
        finally:
            applier.close()
            stats.connected = False
            if self._active.get(hello.directory, (None,))[0] is task:
                del self._active[hello.directory]
            stats.last_error = reason
            # Not a "lost": the replica still holds every acknowledged change (a crashed primary
            # leaves it fit to take over); it falls behind only if the primary carries on alone,
            # which the engine learns from the primary's heartbeats (new generation, ALONE).
            # `in_sync`: it was up to date; `clean`: the primary said goodbye (a stop, a swap).
            self._emit("disconnected", directory=stats.directory, reason=reason, in_sync=applier.in_sync,
                       clean=applier.bye, stopping=self._stopping)
        if refused:
            await self._linger(writer)

    async def _replace(self, directory: bytes) -> None:
        old = self._active.pop(directory, None)
        if old is not None:
            log.info("new stream for %r replaces the previous one", directory)
            old[1].transport.abort()
            old[0].cancel()
            await asyncio.gather(old[0], return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    decoder: FrameDecoder, backlog: list[m.Message], applier: ResyncApplier,
                    stats: StreamStats, ack_on_receipt: bool) -> None:
        """Apply the stream until the peer closes it (returns) or it goes wrong (raises).
        Frames are applied in the transport's data_received callback (_Apply): no reader task to
        wake and no StreamReader buffer to copy through, per batch of frames read."""
        loop = asyncio.get_running_loop()
        transport = writer.transport
        proto = _Apply(transport, transport.get_protocol(), decoder, applier, stats, ack_on_receipt, loop)
        buffered = bytes(reader._buffer)  # arrived after the handshake, before the switch
        reader._buffer.clear()
        transport.set_protocol(proto)
        if backlog:
            proto.apply(backlog)
        if buffered:
            proto.data_received(buffered)
        if reader.at_eof() and not proto.done.done():
            proto.done.set_result(None)
        while not proto.done.done():
            if not self.idle_timeout:
                await asyncio.wait([proto.done])
                break
            left = proto.last_rx + self.idle_timeout - loop.time()
            if left <= 0:
                transport.pause_reading()
                raise ConnectionError(f"nothing received for {self.idle_timeout:g} s")
            await asyncio.wait([proto.done], timeout=left)
        proto.done.result()  # raises what went wrong

    @staticmethod
    async def _linger(writer: asyncio.StreamWriter, timeout: float = LINGER_SECONDS) -> None:
        """After the final Error of a stream: half-close, and wait for the primary to close (or
        `timeout`). Closed at once while frames the primary sent are unread, the socket would reset
        the connection, and the primary, still sending, would report a broken pipe instead of the
        reason. What arrives meanwhile is not applied (the stream's protocol is done)."""
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, RuntimeError, OSError):
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while not writer.transport.is_closing() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)

    @staticmethod
    def _refuse(writer: asyncio.StreamWriter, reason: str, decoder: FrameDecoder | None = None) -> None:
        """Send a final Error (tagged when the connection is authenticated)."""
        try:
            writer.write(frame(m.Error(reason[:4000]), decoder.tx if decoder is not None else None))
        except (ConnectionError, RuntimeError, ValueError):
            pass


class ReplicaDistrusted(OSError):
    """The replica may have been changed behind the stream: the stream ends, a full compare follows."""


class _Apply(asyncio.BufferedProtocol):
    """The connection's protocol once the stream is authenticated: the socket reads straight into
    the decoder's buffer; every complete frame is applied as it arrives, then the batch is
    acknowledged (cumulative Ack). Write flow control: while the acks and replies cannot be
    sent, reading stops. `done` ends with None (the peer closed the stream) or the error that
    ended it (nothing is applied after it)."""

    def __init__(self, transport: asyncio.BaseTransport, stream: asyncio.BaseProtocol, decoder: FrameDecoder,
                 applier: ResyncApplier, stats: StreamStats, ack_on_receipt: bool,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._stream = stream
        self._decoder, self._applier, self._stats = decoder, applier, stats
        self._ack_on_receipt = ack_on_receipt
        self._loop = loop
        self.expected = 1
        self.last_rx = loop.time()
        self.done: asyncio.Future[None] = loop.create_future()
        self._last_ack = (0, 0)  # (received, applied) of the last Ack sent
        # While one request keeps the applier busy (a large tree listed), the last Ack again: the
        # primary hears this receiver is alive (no protocol change: an Ack may repeat).
        applier.keepalive = self._ack_again

    def _ack(self, received: int, applied: int) -> None:
        self._last_ack = (received, applied)
        self.transport.write(self._decoder.frame(m.Ack(received=received, applied=applied)))  # type: ignore[attr-defined]

    def _ack_again(self) -> None:
        try:
            self._ack(*self._last_ack)
        except (ConnectionError, RuntimeError):
            pass  # the transport is closing: the stream ends anyway

    def fail(self, exc: BaseException) -> None:
        """End the stream with `exc` (the receiver sends its reason to the primary)."""
        if not self.done.done():
            self.done.set_exception(exc)
        try:
            self.transport.pause_reading()  # type: ignore[attr-defined]
        except RuntimeError:
            pass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._received(nbytes, lambda: self._decoder.buffer_updated(nbytes))

    def data_received(self, data: bytes) -> None:
        """Bytes the handshake's reader had already buffered."""
        self._received(len(data), lambda: self._decoder.feed(data))

    def _received(self, nbytes: int, decode: Callable[[], list[m.Message]]) -> None:
        if self.done.done():
            return
        self.last_rx = self._loop.time()
        self._stats.bytes += nbytes
        try:
            batch = decode()
            if batch:
                self.apply(batch)
        except (m.ProtocolError, OSError) as exc:
            self.fail(exc)

    def apply(self, batch: list[m.Message]) -> None:
        transport, decoder, applier = self.transport, self._decoder, self._applier
        expected = self.expected
        try:
            if self._ack_on_receipt:
                self._ack(expected - 1 + len(batch), expected - 1)
            for msg in batch:
                if not isinstance(msg, m.OP_TYPES):
                    raise m.ProtocolError(f"unexpected {type(msg).__name__} in the operation stream")
                if msg.seq != expected:
                    raise m.ProtocolError(f"sequence {msg.seq} where {expected} was expected")
                try:
                    applier.apply(msg)
                except (m.ProtocolError, OSError) as exc:
                    # Which operation the replica refused: what an operator (or a test) needs to see.
                    log.error("%s: applying %s failed: %s", self._stats.directory, m.describe(msg), exc)
                    raise
                expected += 1
                if applier.replies:  # answers to resync requests, before the Ack that covers them
                    for reply in applier.replies:
                        transport.write(decoder.frame(reply))  # type: ignore[attr-defined]
                    applier.replies.clear()
        finally:
            self._stats.ops += expected - self.expected
            self._stats.last_seq = expected - 1
            self.expected = expected
        self._ack(expected - 1, expected - 1)

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stream.connection_lost(exc)
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)

    def pause_writing(self) -> None:
        self._stream.pause_writing()
        self.transport.pause_reading()  # type: ignore[attr-defined]

    def resume_writing(self) -> None:
        self._stream.resume_writing()
        if not self.done.done():
            self.transport.resume_reading()  # type: ignore[attr-defined]
