"""Length-prefixed frames: a 4-byte big-endian length, then one msgpack message, then (once the
handshake is done) a 16-byte authentication tag.

`FrameDecoder` is a pure incremental parser (bytes in, payloads out) so both ends can read the socket
in large chunks and handle every complete frame of a chunk at once, which is what lets the receiver
acknowledge a whole batch with one Ack. It also holds the per-connection authentication state of both
directions (`rx` for what we read, `tx` for what we write, see `FrameMac`), so `decoder.frame(msg)`
is how a connection frames what it sends once authenticated.

Frame authentication: after the HMAC handshake (auth.py) both ends derive one key per direction from
the cluster key and both nonces; every frame then carries an AES-GMAC tag over its length and payload,
with the frame's number in its direction as the nonce. A frame altered, injected, dropped, replayed
or reordered by a man in the middle fails verification, which is a protocol error (connection
dropped, logged). The payload is not encrypted (see docs/replication.md, threat model).
"""

from __future__ import annotations

import asyncio
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .messages import MAX_FRAME, Message, ProtocolError, decode, encode_into

_HEADER = struct.Struct(">I")
READ_CHUNK = 1 << 20
TAG_SIZE = 16


class FrameMac:
    """AES-GMAC (AES-GCM with no plaintext) of the frames of one direction of one connection.
    The nonce is the frame counter: unique per key because every connection and direction has its
    own key, and it makes each tag valid at exactly one position of the stream."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("frame MAC key must be 32 bytes")
        self._aead = AESGCM(key)
        self._counter = 0

    def _nonce(self) -> bytes:
        n = self._counter
        self._counter += 1
        return n.to_bytes(12, "big")

    def tag(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._aead.encrypt(self._nonce(), b"", data)

    def verify(self, data: bytes | bytearray | memoryview, tag: bytes | memoryview) -> None:
        try:
            self._aead.decrypt(self._nonce(), bytes(tag), data)
        except InvalidTag:
            raise ProtocolError("frame failed authentication (altered, injected, replayed or reordered)") from None


def frame(msg: Message, mac: FrameMac | None = None) -> bytearray:
    # Encoded straight after a reserved header: one copy of a write's data, not two.
    buf = bytearray(4)
    encode_into(msg, buf, 4)
    size = len(buf) - 4
    if size > MAX_FRAME:
        raise ValueError(f"{type(msg).__name__} encodes to {size} bytes, above {MAX_FRAME}")
    if mac is None:
        _HEADER.pack_into(buf, 0, size)
    else:
        _HEADER.pack_into(buf, 0, size + TAG_SIZE)
        buf += mac.tag(buf)
    return buf


class FrameDecoder:
    """Accumulates received bytes and decodes complete frames; refuses oversized or empty ones, and
    once `rx` is set, any frame whose tag does not verify."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self.rx: FrameMac | None = None  # verifies what we read (set at the end of the handshake)
        self.tx: FrameMac | None = None  # tags what we write on the same connection

    def frame(self, msg: Message) -> bytearray:
        """`msg` framed for sending on this decoder's connection (tagged once authenticated)."""
        return frame(msg, self.tx)

    def authenticate(self, rx_key: bytes, tx_key: bytes) -> None:
        """Switch both directions to authenticated frames (the handshake calls this)."""
        self.rx, self.tx = FrameMac(rx_key), FrameMac(tx_key)

    def feed(self, data: bytes) -> list[Message]:
        """Decoded messages of every frame completed by `data` (ProtocolError on a bad one)."""
        buf = self._buf
        buf += data
        out: list[Message] = []
        pos = 0
        view = memoryview(buf)
        try:
            while len(buf) - pos >= 4:
                (size,) = _HEADER.unpack_from(buf, pos)
                mac = self.rx
                tag = TAG_SIZE if mac is not None else 0
                if size <= tag or size > self._max + tag:
                    raise ProtocolError(f"frame length {size} outside {tag + 1}..{self._max + tag}")
                if len(buf) - pos - 4 < size:
                    break
                end = pos + 4 + size - tag
                if mac is not None:
                    signed, tag_view = view[pos:end], view[end:end + tag]
                    try:
                        mac.verify(signed, tag_view)
                    finally:  # released even when a traceback references them (see below)
                        signed.release()
                        tag_view.release()
                # msgspec copies bytes fields out, so decoding straight from the buffer is safe.
                payload = view[pos + 4:end]
                try:
                    out.append(decode(payload))
                finally:
                    payload.release()  # even if a traceback still references it
                pos += 4 + size
        finally:
            view.release()
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


async def read_message(reader: asyncio.StreamReader, decoder: FrameDecoder,
                       backlog: list[Message]) -> Message:
    """Next message from `reader` (used during the handshake, where messages come one at a time)."""
    while not backlog:
        data = await reader.read(READ_CHUNK)
        if not data:
            raise ConnectionError("peer closed the connection")
        backlog.extend(decoder.feed(data))
    return backlog.pop(0)
