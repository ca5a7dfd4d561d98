"""Messages, framing and the HMAC handshake."""

from __future__ import annotations

import asyncio
import os
import random
import struct
from collections.abc import Awaitable, Callable

import msgspec
import pytest
from hypothesis import given, settings, strategies as st
from safekit_cloud.core.replication import messages as m
from safekit_cloud.core.replication.auth import AuthError, client_handshake, server_handshake
from safekit_cloud.core.replication.framing import FrameDecoder, frame, read_message

from .conftest import KEY, run

SAMPLES: list[m.Message] = [
    m.Write(seq=1, hid=3, off=2**40, data=b"x" * 100, sync=True),
    m.Create(seq=2, path=b"a/\xffb", mode=0o100644, uid=1000, gid=1000, hid=7),
    m.Rename(seq=3, old=b"a", new=b"b", flags=1),
    m.SetAttr(seq=4, path=b"f", size=5, mtime_ns=-10),
    m.SetXattr(seq=5, path=b"f", name=b"user.k", value=b"\0" * 65536),
    m.Fsync(seq=6, hid=None, path=b"d"),
    m.Ack(received=10, applied=9),
    m.Error("boom"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_roundtrip(msg: m.Message) -> None:
    assert FrameDecoder().feed(frame(msg)) == [msg]


def test_decoder_handles_arbitrary_chunking() -> None:
    stream = b"".join(frame(x) for x in SAMPLES)
    for step in (1, 3, 7, 1000):
        dec, out = FrameDecoder(), []
        for i in range(0, len(stream), step):
            out += dec.feed(stream[i:i + step])
        assert out == SAMPLES and dec.pending == 0


def test_sealed_stream_read_into_the_decoders_buffer_in_any_sizes() -> None:
    """What a receiving connection does (BufferedProtocol): reads of random sizes straight into
    `get_buffer()`, frames of up to MAX_FRAME opened in place, the buffer compacted many times."""
    rnd = random.Random(3)
    msgs: list[m.Message] = [m.Write(seq=i, hid=1, off=i * m.MAX_CHUNK, data=rnd.randbytes(rnd.choice(
        [1, 4096, m.MAX_CHUNK - 1, m.MAX_CHUNK]))) for i in range(1, 40)] + SAMPLES
    tx, rx = FrameDecoder(), FrameDecoder()
    tx.authenticate(b"a" * 32, b"b" * 32)
    rx.authenticate(b"b" * 32, b"a" * 32)
    stream = b"".join(tx.frame(x) for x in msgs)
    out: list[m.Message] = []
    i = 0
    while i < len(stream):
        room = rx.get_buffer()
        assert len(room) >= m.MAX_FRAME + 20  # a whole frame always fits
        n = min(len(room), len(stream) - i, rnd.choice([1, 5, 4096, 300_000, 1 << 21]))
        room[:n] = stream[i:i + n]
        room.release()
        i += n
        out += rx.buffer_updated(n)
    assert out == msgs and rx.pending == 0
    altered = bytearray(tx.frame(SAMPLES[0]))
    altered[-1] ^= 1
    with pytest.raises(m.ProtocolError, match="authentication"):
        rx.feed(altered)


def test_listing_carries_64_bit_inode_numbers() -> None:
    """overlayfs (xino) puts the layer in an inode number's top bits: a listing must carry it."""
    entry = m.RsEntry(b"a", "f", 0o100644, 0, 0, 1, 0, 2**64 - 1, 1)
    listing = m.RsEntries(req=1, found=True, entries=[entry])
    assert FrameDecoder().feed(frame(listing)) == [listing]


def test_split_write() -> None:
    big = m.Write(seq=0, hid=1, off=10, data=bytes(range(256)) * (m.MAX_CHUNK // 64) + b"tail")  # 4 chunks + 4
    parts = m.split_write(big)
    assert [p.off for p in parts] == [10 + i * m.MAX_CHUNK for i in range(5)]
    assert len(parts[-1].data) == 4
    assert b"".join(p.data for p in parts) == big.data
    assert all(len(frame(m.with_seq(p, 1))) <= m.MAX_FRAME + 4 for p in parts)


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", msgspec.msgpack.encode(["write", 1, 2]),  # too few fields
    msgspec.msgpack.encode(["write", -1, 1, 0, b"", False]),  # negative seq
    msgspec.msgpack.encode(["nope", 1]),
    msgspec.msgpack.encode(["create", 1, "str-not-bytes", 0, 0, 0, None]),
    msgspec.msgpack.encode(["write", 1, 1, 0, b"x" * (m.MAX_CHUNK + 1), False]),
    msgspec.msgpack.encode(["rename", 1, b"a", b"b", 99]),
    msgspec.msgpack.encode({"t": "ack", "received": 1}),
    b"\x91\xa2\x00\x80",  # a string that is not UTF-8 (msgspec raises UnicodeDecodeError): found by fuzzing
    b"\x92\xa5error\xa2\xff\xfe",  # an Error whose message is not UTF-8
])
def test_malformed_payloads_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(m.ProtocolError):
        FrameDecoder().feed(struct.pack(">I", len(payload)) + payload if payload else b"\0\0\0\0")


def test_oversized_length_refused_before_buffering() -> None:
    with pytest.raises(m.ProtocolError):
        FrameDecoder().feed(struct.pack(">I", m.MAX_FRAME + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_decoder_never_crashes(data: bytes) -> None:
    try:
        for msg in FrameDecoder().feed(data):
            assert isinstance(msg, m.Message.__args__)  # type: ignore[attr-defined]
    except m.ProtocolError:
        pass


def _serve_handshake(key: bytes, results: dict[str, object]) -> Callable[..., Awaitable[None]]:
    """A receiver's side of the handshake: its Hello (or the exception) goes to results["server"]."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello, dec, _ = await server_handshake(reader, writer, key)
            writer.write(dec.frame(m.Welcome(next_seq=1)))
            results["server"] = hello
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            results["server"] = exc
            writer.write(frame(m.Error(str(exc))))
        await writer.drain()
        writer.close()

    return serve


async def _handshake(server_key: bytes, client_key: bytes) -> tuple[object, object]:
    results: dict[str, object] = {}
    server = await asyncio.start_server(_serve_handshake(server_key, results), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        results["client"] = (await client_handshake(reader, writer, client_key, "mod", b"/data", "C"))[0]
    except Exception as exc:  # noqa: BLE001
        results["client"] = exc
    writer.close()
    await asyncio.sleep(0.05)
    server.close()
    return results["client"], results.get("server")


def test_handshake_ok() -> None:
    client, server = run(_handshake(KEY, KEY))
    assert client == 1
    assert isinstance(server, m.Hello) and server.directory == b"/data"


def test_handshake_wrong_key_both_ways() -> None:
    client, server = run(_handshake(KEY, b"other" * 8))
    assert isinstance(client, AuthError)  # the receiver's proof does not verify with our key
    assert not isinstance(server, m.Hello)


def test_a_sender_of_another_protocol_version_is_refused_with_the_reason() -> None:
    """A node not yet upgraded (protocol version 4, which has no RsReserve) is refused at the
    handshake, with a reason that names the versions, instead of streams dropped later on a
    message it does not know."""
    async def go() -> tuple[object, object]:
        results: dict[str, object] = {}
        server = await asyncio.start_server(_serve_handshake(KEY, results), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(frame(m.Hello(m.PROTOCOL_VERSION - 1, "mod", b"/data", "C", os.urandom(32))))
        results["client"] = await read_message(reader, FrameDecoder(), [])
        writer.close()
        server.close()
        return results["client"], results["server"]

    client, server = run(go())
    assert isinstance(server, m.ProtocolError) and f"unsupported version {m.PROTOCOL_VERSION - 1}" in str(server)
    assert isinstance(client, m.Error) and "unsupported version" in client.message
