"""Wire format of the heartbeats, and the anti-replay window.

One datagram, network byte order, laid out with `struct` rather than msgpack: the layout is fixed, every
length is checked against the datagram's size before anything is read, and the MAC covers the exact bytes
on the wire, so there is nothing for a hostile datagram to exploit in a general-purpose decoder.

    version B | flags B | cluster_len B | node_len B | payload_len H
    incarnation Q | seq Q | sent_ns Q | echo_incarnation Q | echo_seq Q | echo_hold_ns Q
    cluster | node | payload | HMAC-SHA256(key, everything before it) (32 bytes)

`decode` raises nothing but `Dropped`, whose `counter` names the counter the receive path bumps.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

VERSION = 1
MAX_DATAGRAM = 1400  # UDP payload bytes; kept under common cloud/VPN MTUs so beats are not fragmented
MAC_SIZE = 32
_HEADER = struct.Struct("!BBBBHQQQQQQ")
_U64 = (1 << 64) - 1


class HeartbeatError(Exception):
    """A heartbeat problem the operator must fix (bind failure, bad settings, payload too large)."""


class Dropped(HeartbeatError):
    """A received datagram was refused. `counter` is the key of `Heartbeat.counters` it is counted in."""

    def __init__(self, counter: str, reason: str) -> None:
        super().__init__(reason)
        self.counter = counter
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Beat:
    """One heartbeat, as sent or as authenticated on reception.

    Sequence numbers start at 1 for each incarnation; 0 in `echo_seq` means "nothing to echo yet".
    The echo fields let the sender measure the round trip without comparing clocks of two hosts:
    rtt = (now - when I sent echo_seq) - echo_hold_ns.
    """

    cluster: str
    node: str
    incarnation: int
    seq: int
    sent_ns: int  # sender's monotonic clock: only comparable with other beats of the same incarnation
    echo_incarnation: int  # the receiver's incarnation the echo refers to (0: none)
    echo_seq: int
    echo_hold_ns: int  # how long the sender held echo_seq before sending this beat
    payload: bytes


def overhead(cluster: str, node: str) -> int:
    """Bytes a datagram takes besides its payload."""
    return _HEADER.size + len(cluster.encode()) + len(node.encode()) + MAC_SIZE


def max_payload(cluster: str, node: str) -> int:
    return MAX_DATAGRAM - overhead(cluster, node)


def encode(beat: Beat, key: bytes) -> bytes:
    """Serialise and sign a beat. Raises HeartbeatError if it does not fit in MAX_DATAGRAM."""
    cluster, node = beat.cluster.encode(), beat.node.encode()
    if len(cluster) > 255 or len(node) > 255:
        raise HeartbeatError("cluster and node names must be at most 255 bytes")
    size = overhead(beat.cluster, beat.node) + len(beat.payload)
    if size > MAX_DATAGRAM:
        raise HeartbeatError(
            f"heartbeat payload of {len(beat.payload)} bytes is too large: the datagram would be {size} "
            f"bytes, the limit is {MAX_DATAGRAM} (at most {max_payload(beat.cluster, beat.node)} bytes "
            "of payload)"
        )
    header = _HEADER.pack(
        VERSION,
        0,
        len(cluster),
        len(node),
        len(beat.payload),
        beat.incarnation & _U64,
        beat.seq & _U64,
        beat.sent_ns & _U64,
        beat.echo_incarnation & _U64,
        beat.echo_seq & _U64,
        min(max(beat.echo_hold_ns, 0), _U64),
    )
    body = b"".join((header, cluster, node, beat.payload))
    return body + hmac.digest(key, body, hashlib.sha256)


def decode(data: bytes, key: bytes, cluster: str) -> Beat:
    """Parse and authenticate a datagram of `cluster`. Raises only Dropped."""
    fields = _parse_header(data)
    _version, _flags, cluster_len, node_len, payload_len = fields[:5]
    start = _HEADER.size
    name = bytes(data[start : start + cluster_len])
    # Checked before the MAC on purpose: another cluster sharing the port uses another key, and
    # "wrong cluster" tells the operator far more than "authentication failed".
    if name != cluster.encode():
        shown = name.decode("utf-8", "replace")
        raise Dropped("dropped_wrong_cluster", f"datagram of cluster {shown!r}")
    body, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    if not hmac.compare_digest(hmac.digest(key, body, hashlib.sha256), mac):
        raise Dropped("dropped_auth", "bad HMAC (wrong cluster key or altered datagram)")
    start += cluster_len
    try:
        node = bytes(data[start : start + node_len]).decode()
    except UnicodeDecodeError:
        raise Dropped("dropped_malformed", "node name is not UTF-8") from None
    start += node_len
    incarnation, seq, sent_ns, echo_inc, echo_seq, hold = fields[5:]
    if seq == 0:
        raise Dropped("dropped_malformed", "sequence number 0")
    payload = bytes(data[start : start + payload_len])
    return Beat(cluster, node, incarnation, seq, sent_ns, echo_inc, echo_seq, hold, payload)


def _parse_header(data: bytes) -> tuple[int, ...]:
    if len(data) > MAX_DATAGRAM:
        raise Dropped("dropped_malformed", f"datagram of {len(data)} bytes, more than {MAX_DATAGRAM}")
    if len(data) < _HEADER.size + MAC_SIZE:
        raise Dropped("dropped_malformed", f"datagram of {len(data)} bytes is too short")
    fields = _HEADER.unpack_from(data)
    if fields[0] != VERSION:
        raise Dropped("dropped_malformed", f"unsupported heartbeat version {fields[0]}")
    expected = _HEADER.size + fields[2] + fields[3] + fields[4] + MAC_SIZE
    if len(data) != expected:
        raise Dropped("dropped_malformed", f"datagram of {len(data)} bytes, its header says {expected}")
    return fields


class ReplayWindow:
    """Sliding anti-replay window over sequence numbers, like IPsec's (RFC 4303, section 3.4.3).

    Bit i of `_seen` stands for sequence number `top - i`. Reordering within `size` numbers is
    accepted once; anything older cannot be told apart from a replay, so it is refused as stale.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise HeartbeatError(f"replay window must be at least 1, not {size}")
        self.size = size
        self.top = 0
        self._seen = 0

    def accept(self, seq: int) -> bool:
        """Record `seq`; True if it is the newest so far. Raises Dropped for a replay or a stale one."""
        if seq > self.top:
            shift = seq - self.top
            self._seen = ((self._seen << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.top = seq
            return True
        offset = self.top - seq
        if offset >= self.size:
            raise Dropped("dropped_stale", f"sequence {seq} is older than the replay window (top {self.top})")
        if self._seen >> offset & 1:
            raise Dropped("dropped_replay", f"sequence {seq} already received")
        self._seen |= 1 << offset
        return False
