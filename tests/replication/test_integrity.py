"""Confidentiality and integrity of the replication stream after the handshake: every frame is sealed
with AES-256-GCM under a per-connection, per-direction key; a man in the middle reads nothing of the
data and can neither alter, inject, drop, replay nor reflect frames without the connection being
dropped."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from safekit_cloud.core.replication import messages as m
from safekit_cloud.core.replication.framing import FrameDecoder, frame
from safekit_cloud.core.replication.receiver import Receiver
from safekit_cloud.core.replication.sender import Sender

from .conftest import KEY, run

NAME = b"/srv/data"


def _pair() -> tuple[FrameDecoder, FrameDecoder]:
    a2b, b2a = os.urandom(32), os.urandom(32)
    a, b = FrameDecoder(), FrameDecoder()
    a.authenticate(rx_key=b2a, tx_key=a2b)
    b.authenticate(rx_key=a2b, tx_key=b2a)
    return a, b


def test_sealed_frames_hide_the_data() -> None:
    a, b = _pair()
    secret = b"account 4711 balance 1000000 " * 40
    sealed = bytes(a.frame(m.Write(1, 1, 0, secret)))
    assert secret[:16] not in sealed and b"4711" not in sealed
    assert bytes(frame(m.Write(1, 1, 0, secret))).count(secret[:16]) == 40  # unsealed: in clear
    assert b.feed(sealed) == [m.Write(1, 1, 0, secret)]


def test_tagged_frames_roundtrip() -> None:
    a, b = _pair()
    msgs = [m.Noop(1), m.Write(2, 1, 0, b"x" * m.MAX_CHUNK), m.Ack(2, 2)]
    stream = b"".join(bytes(a.frame(x)) for x in msgs)
    out = []
    for i in range(0, len(stream), 7777):  # arbitrary chunking
        out += b.feed(stream[i:i + 7777])
    assert out == msgs


@pytest.mark.parametrize("attack", ["flip", "replay", "drop", "reorder", "reflect", "untagged", "truncate-tag"])
def test_tampering_is_detected(attack: str) -> None:
    a, b = _pair()
    f1, f2 = bytes(a.frame(m.Write(1, 1, 0, b"data" * 100))), bytes(a.frame(m.Noop(2)))
    if attack == "flip":
        bad = f1[:50] + bytes([f1[50] ^ 1]) + f1[51:]
        stream = bad
    elif attack == "replay":
        stream = f1 + f1
    elif attack == "drop":
        stream = f2
    elif attack == "reorder":
        stream = f2 + f1
    elif attack == "reflect":  # a's own frame sent back to a
        with pytest.raises(m.ProtocolError, match="authentication"):
            a.feed(f1)
        return
    elif attack == "untagged":
        stream = bytes(frame(m.Unlink(1, b"victim")))
    else:
        stream = f1[:-16] + f2[:16]
    with pytest.raises(m.ProtocolError):
        b.feed(stream)


class _Proxy:
    """A man in the middle between sender and receiver that may rewrite sender -> receiver bytes."""

    def __init__(self, upstream_port: int, rewrite: Callable[[bytes], bytes]) -> None:
        self.upstream_port, self.rewrite = upstream_port, rewrite
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, fn: Callable[[bytes], bytes]) -> None:
            try:
                while data := await r.read(1 << 16):
                    w.write(fn(data))
                    await w.drain()
            except ConnectionError:
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(cr, uw, self.rewrite), pipe(ur, cw, lambda d: d))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_man_in_the_middle_cannot_alter_written_data(tmp_path: Path) -> None:
    replica = tmp_path / "replica"
    replica.mkdir()

    def flip(data: bytes) -> bytes:  # one bit of the (encrypted) written data, in the middle of it
        if len(data) < 10_000:
            return data
        i = len(data) // 2
        return data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:]

    async def scenario() -> tuple[bool, str | None, dict[str, object]]:
        receiver = Receiver("mod", {NAME: replica}, KEY)
        port = await receiver.start("127.0.0.1", 0)
        proxy = _Proxy(port, flip)
        pport = await proxy.start()
        sender = await Sender.connect("127.0.0.1", pport, KEY, "mod", NAME, timeout=3)
        ok = await sender.submit(m.Create(0, b"f", 0o100644, 0, 0, hid=1))
        ok = ok and await sender.submit(m.Write(0, 1, 0, b"A" * 100_000))
        await asyncio.sleep(0.1)
        status = receiver.status()
        await sender.close()
        proxy.close()
        await receiver.stop()
        return ok, sender.lost_reason, status

    ok, reason, status = run(scenario())
    assert not ok and reason
    assert "authentication" in str(status)
    data = (replica / "f").read_bytes() if (replica / "f").exists() else b""
    assert b"B" not in data  # the altered write was never applied


def test_man_in_the_middle_cannot_inject(tmp_path: Path) -> None:
    replica = tmp_path / "replica"
    replica.mkdir()
    (replica / "victim").write_bytes(b"keep me")
    injected = bytes(frame(m.Unlink(2, b"victim")))

    def inject(data: bytes) -> bytes:
        # After the first operation frame (a tagged Noop), add an untagged Unlink of our own.
        return data + injected if inject.armed else data

    inject.armed = False  # type: ignore[attr-defined]

    async def scenario() -> bool:
        receiver = Receiver("mod", {NAME: replica}, KEY)
        port = await receiver.start("127.0.0.1", 0)
        proxy = _Proxy(port, inject)
        pport = await proxy.start()
        sender = await Sender.connect("127.0.0.1", pport, KEY, "mod", NAME, timeout=3)
        inject.armed = True  # type: ignore[attr-defined]
        ok = await sender.submit(m.Mkdir(0, b"d", 0o40755, 0, 0))
        await asyncio.sleep(0.1)
        ok = ok and await sender.submit(m.Mkdir(0, b"e", 0o40755, 0, 0))
        await sender.close()
        proxy.close()
        await receiver.stop()
        return ok

    assert not run(scenario())
    assert (replica / "victim").read_bytes() == b"keep me"


def test_old_protocol_version_is_refused(tmp_path: Path) -> None:
    async def scenario() -> list[m.Message]:
        receiver = Receiver("mod", {NAME: tmp_path}, KEY)
        port = await receiver.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(frame(m.Hello(1, "mod", NAME, "C", os.urandom(32))))
        dec, out = FrameDecoder(), []
        async with asyncio.timeout(5):
            while data := await reader.read(65536):
                out += dec.feed(data)
        writer.close()
        await receiver.stop()
        return out

    replies = run(scenario())
    assert isinstance(replies[-1], m.Error) and "version" in replies[-1].message
