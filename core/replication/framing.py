"""Length-prefixed frames: a 4-byte big-endian payload length, then one msgpack message.

`FrameDecoder` is a pure incremental parser (bytes in, payloads out) so both ends can read the socket
in large chunks and handle every complete frame of a chunk at once, which is what lets the receiver
acknowledge a whole batch with one Ack.
"""

from __future__ import annotations

import asyncio
import struct

from .messages import MAX_FRAME, Message, ProtocolError, decode, encode_into

_HEADER = struct.Struct(">I")
READ_CHUNK = 1 << 20


def frame(msg: Message) -> bytearray:
    # Encoded straight after a reserved header: one copy of a write's data, not two.
    buf = bytearray(4)
    encode_into(msg, buf, 4)
    size = len(buf) - 4
    if size > MAX_FRAME:
        raise ValueError(f"{type(msg).__name__} encodes to {size} bytes, above {MAX_FRAME}")
    _HEADER.pack_into(buf, 0, size)
    return buf


class FrameDecoder:
    """Accumulates received bytes and decodes complete frames; refuses oversized or empty ones."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

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
                if size == 0 or size > self._max:
                    raise ProtocolError(f"frame length {size} outside 1..{self._max}")
                if len(buf) - pos - 4 < size:
                    break
                # msgspec copies bytes fields out, so decoding straight from the buffer is safe.
                payload = view[pos + 4:pos + 4 + size]
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
