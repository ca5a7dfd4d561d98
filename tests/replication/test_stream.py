"""Sender -> receiver over loopback TCP: ordering, acks, hostile input, peer loss."""

from __future__ import annotations

import asyncio
import os
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from safekit_cloud.core.replication import messages as m
from safekit_cloud.core.replication.apply import Applier
from safekit_cloud.core.replication.auth import client_handshake
from safekit_cloud.core.replication.framing import TAG_SIZE, FrameDecoder, frame
from safekit_cloud.core.replication.receiver import Receiver
from safekit_cloud.core.replication.sender import Sender

from .conftest import KEY, STREAM_NAME, replicate, run, snapshot_outside, stream_pair

NAME = STREAM_NAME



def test_operations_applied_in_order(dirs: tuple[Path, Path, Path]) -> None:
    _, replica, outside = dirs
    uid, gid = os.getuid(), os.getgid()
    ops: list[m.Op] = [
        m.Mkdir(0, b"d", 0o40750, uid, gid),
        m.Create(0, b"d/f", 0o100640, uid, gid, hid=1),
        m.Write(0, 1, 0, b"a" * 600_000),  # split into 3 frames
        m.Write(0, 1, 5, b"BBB", sync=True),
        m.Close(0, 1, atime_ns=1_000_000_000, mtime_ns=2_000_000_000),
        m.Symlink(0, b"d/l", b"../../etc/passwd", uid, gid),
        m.Link(0, b"d/f", b"hard"),
        m.Rename(0, b"hard", b"d/hard2"),
        m.SetAttr(0, b"d/hard2", mode=0o100600, size=10),
        m.SetXattr(0, b"d/f", b"user.k", b"v"),
        m.Mknod(0, b"fifo", stat.S_IFIFO | 0o644, 0, uid, gid),
        m.Create(0, b"gone", 0o100644, uid, gid),
        m.Unlink(0, b"gone"),
        m.Fsync(0, path=b"d"),
    ]
    replicate(replica, ops)
    f = replica / "d" / "f"
    assert f.read_bytes()[:10] == b"aaaaaBBBaa" and f.stat().st_size == 10  # truncated through the hard link
    assert stat.S_IMODE(f.stat().st_mode) == 0o600 and f.stat().st_nlink == 2
    assert os.readlink(replica / "d" / "l") == "../../etc/passwd"
    assert os.getxattr(f, "user.k") == b"v"
    assert stat.S_ISFIFO((replica / "fifo").lstat().st_mode)
    assert not (replica / "gone").exists()
    assert stat.S_IMODE((replica / "d").stat().st_mode) == 0o750
    assert snapshot_outside(outside) == {"victim": b"untouched"}


def test_times_carried_by_close(dirs: tuple[Path, Path, Path]) -> None:
    _, replica, _ = dirs

    async def scenario() -> None:
        receiver, sender = await stream_pair(replica, protocol="A")
        await sender.submit(m.Create(0, b"f", 0o100644, 0, 0, hid=9))
        await sender.submit(m.Write(0, 9, 0, b"x"))
        await sender.submit(m.Close(0, 9, atime_ns=5 * 10**9, mtime_ns=7 * 10**9))
        assert await sender.barrier()
        await sender.close()
        await receiver.stop()

    run(scenario())
    st_ = (replica / "f").stat()
    assert (st_.st_atime_ns, st_.st_mtime_ns) == (5 * 10**9, 7 * 10**9)


HOSTILE: list[m.Op] = [
    m.Create(1, b"../escape", 0o100644, 0, 0),
    m.Create(1, b"/abs", 0o100644, 0, 0),
    m.Create(1, b"dirlink/new", 0o100644, 0, 0),
    m.Open(1, 1, b"filelink"),
    m.SetAttr(1, b"filelink", size=0),
    m.SetXattr(1, b"dirlink/victim", b"user.x", b"y"),
    m.Rename(1, b"x", b"dirlink/victim"),
    m.Link(1, b"dirlink/victim", b"stolen"),
    m.Mknod(1, b"dev", stat.S_IFBLK | 0o600, os.makedev(8, 0), 0, 0),
    m.Open(1, 1, b"fifo"),
    m.Create(1, b"fifo", 0o100644, 0, 0),
    m.Write(1, 99, 0, b"no such handle"),
    m.Remove(1, b"dirlink/victim"),
    m.Unlink(1, b"dirlink/victim"),
]


def _plant(replica: Path, outside: Path) -> None:
    os.symlink(outside, replica / "dirlink")
    os.symlink(outside / "victim", replica / "filelink")
    (replica / "x").write_bytes(b"x")
    os.mkfifo(replica / "fifo")


@pytest.mark.parametrize("op", HOSTILE, ids=lambda o: f"{type(o).__name__}-{getattr(o, 'path', b'')!r}")
def test_hostile_ops_never_touch_outside(dirs: tuple[Path, Path, Path], root_fd: int, op: m.Op) -> None:
    _, replica, outside = dirs
    _plant(replica, outside)
    applier = Applier(root_fd)
    with pytest.raises((m.ProtocolError, OSError)):
        applier.apply(op)
    applier.close()
    assert snapshot_outside(outside) == {"victim": b"untouched"}
    assert os.listxattr(outside / "victim") == []
    assert not (replica / "stolen").exists()


def test_hostile_op_over_the_wire_drops_the_stream(dirs: tuple[Path, Path, Path],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    _, replica, outside = dirs
    _plant(replica, outside)

    async def scenario() -> tuple[bool, str | None, dict[str, object]]:
        receiver, sender = await stream_pair(replica, timeout=5)
        ok = await sender.submit(m.Create(0, b"dirlink/new", 0o100644, 0, 0))
        await asyncio.sleep(0.05)
        status = receiver.status()
        await receiver.stop()
        return ok, sender.lost_reason, status

    ok, reason, status = run(scenario())
    assert not ok and reason and "receiver error" in reason
    assert "ELOOP" in str(status) or "Too many levels" in str(status) or "symbolic" in str(status)
    assert not (outside / "new").exists()
    # The log names the operation the replica refused, payloads by size only.
    assert "applying Create(seq=1, path=b'dirlink/new'" in caplog.text


def _tagged_raw(dec: FrameDecoder, payload: bytes) -> bytes:
    """A sealed frame around arbitrary bytes (what a peer that knows the key could send)."""
    assert dec.tx is not None
    head = struct.pack(">I", len(payload) + TAG_SIZE)
    out = bytearray(len(payload) + TAG_SIZE)
    dec.tx.seal_into(head, payload, out)
    return head + bytes(out)


async def _authenticated_raw(port: int, payload: Callable[[FrameDecoder], bytes]) -> list[m.Message]:
    """Authenticate, send what `payload(decoder)` builds (tagged with the session's keys), collect replies."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    _, dec, _ = await client_handshake(reader, writer, KEY, "mod", NAME, "C")
    writer.write(payload(dec))
    out: list[m.Message] = []
    try:
        async with asyncio.timeout(5):
            while data := await reader.read(65536):
                out += dec.feed(data)
    except (m.ProtocolError, ConnectionError):
        pass
    writer.close()
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(min_size=1, max_size=512), valid_prefix=st.booleans())
@example(junk=b"\x91\xa2\x00\x80", valid_prefix=False)  # not UTF-8 where a string is expected: was a crash
def test_fuzzed_frames_drop_connection_and_receiver_survives(
    dirs: tuple[Path, Path, Path], junk: bytes, valid_prefix: bool
) -> None:
    _, replica, outside = dirs

    async def scenario() -> tuple[list[m.Message], bool]:
        receiver = Receiver("mod", {NAME: replica}, KEY)
        port = await receiver.start("127.0.0.1", 0)
        def payload(dec: FrameDecoder) -> bytes:
            prefix = dec.frame(m.Mkdir(1, b"ok", 0o40755, 0, 0)) if valid_prefix else b""
            return bytes(prefix) + _tagged_raw(dec, junk)  # junk behind a valid tag reaches the decoder

        replies = await _authenticated_raw(port, payload)
        # The receiver still serves a well-behaved sender afterwards.
        sender = await Sender.connect("127.0.0.1", port, KEY, "mod", NAME, timeout=5)
        ok = await sender.submit(m.Noop(0)) and await sender.barrier()
        await sender.close()
        await receiver.stop()
        return replies, ok

    replies, ok = run(scenario())
    assert ok
    assert any(isinstance(r, m.Error) for r in replies)
    assert snapshot_outside(outside) == {"victim": b"untouched"}
    for p in replica.iterdir():
        if p.name not in ("ok",):
            p.unlink() if not p.is_dir() else p.rmdir()


def test_wrong_key_is_refused(dirs: tuple[Path, Path, Path]) -> None:
    _, replica, _ = dirs

    async def scenario() -> str:
        receiver = Receiver("mod", {NAME: replica}, KEY)
        port = await receiver.start("127.0.0.1", 0)
        try:
            await Sender.connect("127.0.0.1", port, b"wrong" * 8, "mod", NAME, timeout=5)
        except m.ProtocolError as exc:
            return str(exc)
        finally:
            await receiver.stop()
        return "connected"

    assert "key" in run(scenario())


def test_a_refused_handshake_is_shown_in_the_receivers_status(dirs: tuple[Path, Path, Path]) -> None:
    """A sender of another protocol version (a node not yet upgraded) is refused at the handshake:
    the reason is in the receiver's status (`status` shows it as the last stream's end), not only
    in its log. Before, the status said nothing and the secondary waited in resyncing."""
    _, replica, _ = dirs

    async def scenario() -> str:
        receiver = Receiver("mod", {NAME: replica}, KEY)
        port = await receiver.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(frame(m.Hello(m.PROTOCOL_VERSION + 1, "mod", NAME, "C", os.urandom(32))))
            await reader.read()  # refused: the receiver closes
            writer.close()
            error = str(receiver.status()[NAME.decode()]["last_error"])  # type: ignore[index]
            # a stray connection (a port scan) does not hide it
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            await reader.read()
            writer.close()
            assert receiver.status()[NAME.decode()]["last_error"] == error  # type: ignore[index]
            return error
        finally:
            await receiver.stop()

    error = run(scenario())
    assert f"unsupported version {m.PROTOCOL_VERSION + 1}" in error and "refused" in error, error


def test_sequence_gap_is_protocol_error(dirs: tuple[Path, Path, Path]) -> None:
    _, replica, _ = dirs

    async def scenario() -> list[m.Message]:
        receiver = Receiver("mod", {NAME: replica}, KEY)
        port = await receiver.start("127.0.0.1", 0)
        replies = await _authenticated_raw(port, lambda dec: dec.frame(m.Noop(1)) + dec.frame(m.Noop(3)))
        await receiver.stop()
        return replies

    replies = run(scenario())
    assert isinstance(replies[-1], m.Error) and "sequence 3" in replies[-1].message


async def _silent_receiver() -> tuple[asyncio.Server, int]:
    """Authenticates like a receiver, then reads and never acknowledges (a hung peer)."""
    from safekit_cloud.core.replication.auth import server_handshake

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, dec, _ = await server_handshake(reader, writer, KEY)
        writer.write(dec.frame(m.Welcome(1)))
        while await reader.read(1 << 20):
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("protocol", ["A", "B", "C"])
def test_hung_peer_calls_return_within_timeout(protocol: str) -> None:
    lost: list[tuple[str, list[m.Op]]] = []

    async def scenario() -> tuple[bool, bool, float]:
        server, port = await _silent_receiver()
        sender = await Sender.connect("127.0.0.1", port, KEY, "mod", NAME, protocol=protocol, timeout=0.5,
                                      on_lost=lambda r, ops: lost.append((r, ops)))
        t0 = time.monotonic()
        first = await sender.submit(m.Fsync(0, path=b""))  # a barrier waits in every protocol
        elapsed = time.monotonic() - t0
        later = await sender.submit(m.Mkdir(0, b"x", 0o40755, 0, 0))
        await sender.close()
        server.close()
        return first, later, elapsed

    first, later, elapsed = run(scenario())
    assert not first and not later
    assert 0.4 < elapsed < 2.0
    assert len(lost) == 1 and "no acknowledgement" in lost[0][0]
    assert isinstance(lost[0][1][0], m.Fsync)  # handed over for the journal


def test_receiver_killed_mid_write_returns_promptly(dirs: tuple[Path, Path, Path]) -> None:
    _, replica, _ = dirs

    async def scenario() -> tuple[bool, float]:
        receiver, sender = await stream_pair(replica, timeout=3)
        assert await sender.submit(m.Create(0, b"f", 0o100644, 0, 0, hid=1))
        await receiver.stop()  # the connection resets
        t0 = time.monotonic()
        ok = True
        for i in range(50):
            ok = ok and await sender.submit(m.Write(0, 1, i * 4096, b"z" * 4096))
        return ok, time.monotonic() - t0

    ok, elapsed = run(scenario())
    assert not ok and elapsed < 3.5


def test_protocol_a_bounds_inflight(dirs: tuple[Path, Path, Path]) -> None:
    _, replica, _ = dirs

    async def scenario() -> int:
        receiver, sender = await stream_pair(replica, protocol="A", max_inflight=1 << 20)
        await sender.submit(m.Create(0, b"f", 0o100644, 0, 0, hid=1))
        peak = 0
        for i in range(64):
            await sender.submit(m.Write(0, 1, i * 65536, b"q" * 65536))
            peak = max(peak, sender.inflight_bytes)
        assert await sender.barrier()
        await sender.close()
        await receiver.stop()
        return peak

    peak = run(scenario())
    assert peak <= (1 << 20) + 65536 + 128
    assert (replica / "f").stat().st_size == 64 * 65536
