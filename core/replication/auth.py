"""HMAC challenge/response in both directions over the cluster key, before any operation flows.

The sender (client) opens with a fresh nonce; the receiver (server) answers with its own nonce and
proves knowledge of the key first, then the client proves it. Both proofs bind the module, the
directory and both nonces, so a proof cannot be replayed on another stream or connection.
Once both proofs verified, each end derives one key per direction from the cluster key and that
transcript (`frame_keys`) and every later frame is sealed under it (framing.FrameCipher, AES-256-GCM):
the stream is kept secret and its integrity protected, not only the handshake.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os

from .framing import FrameDecoder, frame, read_message
from .messages import (
    PROTOCOL_VERSION,
    Challenge,
    Error,
    Hello,
    Message,
    Proof,
    ProtocolError,
    Welcome,
)

HANDSHAKE_TIMEOUT = 10.0


PURPOSES = ("stream", "verify")


def proof(key: bytes, role: bytes, hello: Hello, server_nonce: bytes) -> bytes:
    parts = [role, hello.module.encode(), hello.directory, hello.protocol.encode(), hello.purpose.encode(),
             hello.nonce, server_nonce]
    body = b"".join(len(p).to_bytes(4, "big") + p for p in parts)  # length-prefixed: no ambiguity
    return hmac.new(key, body, hashlib.sha256).digest()


def frame_keys(key: bytes, hello: Hello, server_nonce: bytes) -> tuple[bytes, bytes]:
    """(sender -> receiver key, receiver -> sender key) of one connection: distinct per connection
    (both nonces) and per direction (a frame cannot be reflected back to its sender)."""
    return proof(key, b"frames sender->receiver", hello, server_nonce), \
        proof(key, b"frames receiver->sender", hello, server_nonce)


class AuthError(ProtocolError):
    pass


class UnsupportedPeer(ProtocolError):
    """The sender speaks another protocol version (a node not upgraded yet): worth showing in the
    receiver's status, unlike a stray connection's garbage."""


async def client_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes, module: str,
    directory: bytes, protocol: str, purpose: str = "stream",
) -> tuple[int, FrameDecoder, list[Message]]:
    """Authenticate to the receiver. Returns the sequence number it expects next, with the decoder
    (authenticated: frame what you send with `decoder.frame(msg)`) and any message already read past
    the handshake."""
    decoder, backlog = FrameDecoder(), []
    hello = Hello(PROTOCOL_VERSION, module, directory, protocol, os.urandom(32), purpose)
    writer.write(frame(hello))
    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
        msg = await read_message(reader, decoder, backlog)
        if isinstance(msg, Error):
            raise AuthError(f"receiver refused: {msg.message}")
        if not isinstance(msg, Challenge):
            raise ProtocolError(f"expected a challenge, got {type(msg).__name__}")
        if not hmac.compare_digest(msg.proof, proof(key, b"receiver", hello, msg.nonce)):
            raise AuthError("the receiver does not know the cluster key")
        if backlog:
            raise ProtocolError("receiver spoke out of turn during the handshake")
        writer.write(frame(Proof(proof(key, b"sender", hello, msg.nonce))))
        to_receiver, to_sender = frame_keys(key, hello, msg.nonce)
        decoder.authenticate(rx_key=to_sender, tx_key=to_receiver)  # Welcome is the first tagged frame
        msg = await read_message(reader, decoder, backlog)
    if isinstance(msg, Error):
        raise AuthError(f"receiver refused: {msg.message}")
    if not isinstance(msg, Welcome):
        raise ProtocolError(f"expected welcome, got {type(msg).__name__}")
    return msg.next_seq, decoder, backlog


async def server_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes,
) -> tuple[Hello, FrameDecoder, list[Message]]:
    """Authenticate a sender. Returns its Hello (module, directory, protocol, purpose) once it proved
    the key, with the decoder switched to authenticated frames; the caller checks the module and
    directory and answers `decoder.frame(Welcome(...))` or `decoder.frame(Error(...))`."""
    decoder, backlog = FrameDecoder(), []
    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
        hello = await read_message(reader, decoder, backlog)
        if not isinstance(hello, Hello):
            raise ProtocolError(f"expected hello, got {type(hello).__name__}")
        if hello.version != PROTOCOL_VERSION or hello.protocol not in ("A", "B", "C") \
                or hello.purpose not in PURPOSES:
            raise UnsupportedPeer(f"unsupported version {hello.version} / protocol {hello.protocol!r}"
                                  f" / purpose {hello.purpose!r}")
        nonce = os.urandom(32)
        writer.write(frame(Challenge(nonce, proof(key, b"receiver", hello, nonce))))
        msg = await read_message(reader, decoder, backlog)
    if not isinstance(msg, Proof):
        raise ProtocolError(f"expected proof, got {type(msg).__name__}")
    if not hmac.compare_digest(msg.proof, proof(key, b"sender", hello, nonce)):
        raise AuthError("the sender does not know the cluster key")
    if backlog or decoder.pending:
        # Nothing may follow the proof before our Welcome: it would have been read unauthenticated.
        raise ProtocolError("sender spoke out of turn during the handshake")
    to_receiver, to_sender = frame_keys(key, hello, nonce)
    decoder.authenticate(rx_key=to_receiver, tx_key=to_sender)
    return hello, decoder, backlog
