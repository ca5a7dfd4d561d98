"""Length-prefixed frames: a 4-byte big-endian length, then one msgpack message; once the handshake
is done, the message is encrypted and followed by a 16-byte authentication tag.

`FrameDecoder` is a pure incremental parser (bytes in, payloads out) so both ends can read the socket
in large chunks and handle every complete frame of a chunk at once, which is what lets the receiver
acknowledge a whole batch with one Ack. It also holds the per-connection cipher state of both
directions (`rx` for what we read, `tx` for what we write, see `FrameCipher`), so `decoder.frame(msg)`
is how a connection frames what it sends once authenticated.

Frame protection: after the HMAC handshake (auth.py) both ends derive one key per direction from
the cluster key and both nonces; every frame is then sealed with AES-256-GCM (the length header as
associated data, the frame's number in its direction as the nonce). A frame read, altered, injected,
dropped, replayed or reordered by a man in the middle gives him nothing or fails to open, which is a
protocol error (connection dropped, logged). AES-GCM runs at ~10 GB/s here: encryption is not an
option to turn off.
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


class FrameCipher:
    """AES-256-GCM of the frames of one direction of one connection. The nonce is the frame
    counter: unique per key because every connection and direction has its own key, and it makes
    each frame open at exactly one position of the stream."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("frame key must be 32 bytes")
        self._aead = AESGCM(key)
        self._counter = 0

    def _nonce(self) -> bytes:
        n = self._counter
        self._counter += 1
        return n.to_bytes(12, "big")

    def seal_into(self, header: bytes | memoryview, plain: bytes | bytearray | memoryview,
                  out: bytearray | memoryview) -> None:
        """Write ciphertext + tag of `plain` (len(plain) + TAG_SIZE bytes) into `out`."""
        self._aead.encrypt_into(self._nonce(), plain, header, out)

    def open(self, header: bytes | memoryview, sealed: bytes | bytearray | memoryview) -> bytearray:
        plain = bytearray(len(sealed) - TAG_SIZE)
        try:
            self._aead.decrypt_into(self._nonce(), sealed, header, plain)
        except InvalidTag:
            raise ProtocolError("frame failed authentication (altered, injected, replayed or reordered)") from None
        return plain


def frame(msg: Message, cipher: FrameCipher | None = None) -> bytearray:
    # Encoded straight after a reserved header: one copy of a write's data, not two.
    buf = bytearray(4)
    encode_into(msg, buf, 4)
    size = len(buf) - 4
    if size > MAX_FRAME:
        raise ValueError(f"{type(msg).__name__} encodes to {size} bytes, above {MAX_FRAME}")
    if cipher is None:
        _HEADER.pack_into(buf, 0, size)
        return buf
    out = bytearray(4 + size + TAG_SIZE)
    _HEADER.pack_into(out, 0, size + TAG_SIZE)
    with memoryview(buf) as plain, memoryview(out) as view:
        cipher.seal_into(view[:4], plain[4:], view[4:])
    return out


class FrameDecoder:
    """Accumulates received bytes and decodes complete frames; refuses oversized or empty ones, and
    once `rx` is set, any frame whose tag does not verify."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self.rx: FrameCipher | None = None  # opens what we read (set at the end of the handshake)
        self.tx: FrameCipher | None = None  # seals what we write on the same connection

    def frame(self, msg: Message) -> bytearray:
        """`msg` framed for sending on this decoder's connection (sealed once authenticated)."""
        return frame(msg, self.tx)

    def authenticate(self, rx_key: bytes, tx_key: bytes) -> None:
        """Switch both directions to sealed frames (the handshake calls this)."""
        self.rx, self.tx = FrameCipher(rx_key), FrameCipher(tx_key)

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
                cipher = self.rx
                tag = TAG_SIZE if cipher is not None else 0
                if size <= tag or size > self._max + tag:
                    raise ProtocolError(f"frame length {size} outside {tag + 1}..{self._max + tag}")
                if len(buf) - pos - 4 < size:
                    break
                end = pos + 4 + size
                if cipher is not None:
                    header, sealed = view[pos:pos + 4], view[pos + 4:end]
                    try:
                        out.append(decode(cipher.open(header, sealed)))
                    finally:  # released even when a traceback references them (see below)
                        header.release()
                        sealed.release()
                else:
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
