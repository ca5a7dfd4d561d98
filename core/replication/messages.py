"""Wire messages of the replication stream: one msgspec tagged union, encoded as msgpack.

Every operation the primary replicates carries a sequence number; the receiver applies them strictly
in sequence order and acknowledges cumulatively (`Ack`). Paths are raw bytes relative to the replicated
directory (Linux file names need not be UTF-8); the receiver validates them (see `paths`).

Limits are declared on the types so that msgspec rejects an oversized or ill-typed field while
decoding: a malformed frame never reaches the code that touches files.
"""

from __future__ import annotations

import os
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from ..decoding import DECODE_ERRORS

# 3: frames sealed after the handshake (framing.py); 4: RsState.suspects; 5: RsReserve;
# 6: RsDone.exclude (the exclusion patterns a lineage holds under); 7: RsList.children and
# suspects that stand for a directory's entries (journal.entries_of)
PROTOCOL_VERSION = 7

# Write payloads above this are split over several frames: asyncio streams degrade with megabytes
# in flight (facts.md), and a bounded frame bounds what a hostile peer makes us buffer.
MAX_CHUNK = 256 * 1024
# Room for the largest non-data part: two PATH_MAX paths (rename, link) or a 64 KiB xattr value.
MAX_FRAME = MAX_CHUNK + 16 * 1024

U63 = Annotated[int, Meta(ge=0, le=2**63 - 1)]
# Inode numbers: overlayfs with xino sets their top bits. msgpack caps them at 2**64-1 (and msgspec
# takes no bound above int64).
U64 = Annotated[int, Meta(ge=0)]
U32 = Annotated[int, Meta(ge=0, le=2**32 - 1)]
Mode = Annotated[int, Meta(ge=0, le=0o177777)]
Path = Annotated[bytes, Meta(max_length=4096)]
XattrName = Annotated[bytes, Meta(min_length=1, max_length=255)]
XattrValue = Annotated[bytes, Meta(max_length=65536)]
Data = Annotated[bytes, Meta(max_length=MAX_CHUNK)]
Nonce = Annotated[bytes, Meta(min_length=32, max_length=32)]
Mac = Annotated[bytes, Meta(min_length=32, max_length=32)]
Text = Annotated[str, Meta(max_length=4096)]
TimeNs = Annotated[int, Meta(ge=-(2**62), le=2**62)]


def wire_time(ns: int) -> int:
    """A file time clamped to what TimeNs carries (years 1823..2116): ext4 stores times beyond."""
    return min(max(ns, -(2**62)), 2**62)


def wire_times(st: os.stat_result) -> dict[str, int]:
    """`st`'s access and modification times as Close and SetAttr carry them (keyword arguments)."""
    return {"atime_ns": wire_time(st.st_atime_ns), "mtime_ns": wire_time(st.st_mtime_ns)}


class _Msg(Struct, array_like=True, tag_field="t", frozen=True, forbid_unknown_fields=True):
    pass


# ---- handshake (see auth.py) ----

class Hello(_Msg, tag="hello"):
    version: int
    module: Text
    directory: Path  # which replicated directory of the module this stream carries
    protocol: str  # "A", "B" or "C"
    nonce: Nonce
    # "stream": the operation stream of `directory`; "verify": a short connection asking for the
    # receiver's manifest of `directory` (verify.py), which leaves the running stream alone.
    purpose: Annotated[str, Meta(max_length=16)] = "stream"


class Challenge(_Msg, tag="chal"):
    nonce: Nonce
    proof: Mac  # the receiver proves it knows the key first: a wrong peer learns nothing from us


class Proof(_Msg, tag="proof"):
    proof: Mac


class Welcome(_Msg, tag="welcome"):
    next_seq: U63  # the first sequence number the receiver expects


# ---- operations (each applied in `seq` order) ----

class Noop(_Msg, tag="noop"):
    seq: U63


class Open(_Msg, tag="open"):
    """Open an existing file for writing under handle `hid` (writes then need no path lookup)."""

    seq: U63
    hid: U63
    path: Path


class Close(_Msg, tag="close"):
    seq: U63
    hid: U63
    atime_ns: TimeNs | None = None  # the primary's times when it closed, so the replica's match
    mtime_ns: TimeNs | None = None


class Write(_Msg, tag="write"):
    seq: U63
    hid: U63
    off: U63
    data: Data
    sync: bool = False  # O_SYNC/O_DSYNC on the primary: durable on the replica before the ack


class Create(_Msg, tag="create"):
    """Create a regular file (exclusively) and, when `hid` is set, keep it open under that handle."""

    seq: U63
    path: Path
    mode: Mode
    uid: U32
    gid: U32
    hid: U63 | None = None


class Mkdir(_Msg, tag="mkdir"):
    seq: U63
    path: Path
    mode: Mode
    uid: U32
    gid: U32


class Mknod(_Msg, tag="mknod"):
    seq: U63
    path: Path
    mode: Mode
    rdev: U63
    uid: U32
    gid: U32


class Symlink(_Msg, tag="symlink"):
    seq: U63
    path: Path
    target: Path  # stored verbatim: never resolved by the receiver
    uid: U32
    gid: U32


class Link(_Msg, tag="link"):
    seq: U63
    path: Path  # existing entry
    new: Path


class Unlink(_Msg, tag="unlink"):
    seq: U63
    path: Path


class Rmdir(_Msg, tag="rmdir"):
    seq: U63
    path: Path


class Remove(_Msg, tag="remove"):
    """Remove an entry whatever it is, recursively (a tree moved out of replication, resync)."""

    seq: U63
    path: Path


class Rename(_Msg, tag="rename"):
    seq: U63
    old: Path
    new: Path
    flags: Annotated[int, Meta(ge=0, le=3)] = 0  # RENAME_NOREPLACE 1, RENAME_EXCHANGE 2


class SetAttr(_Msg, tag="setattr"):
    """chmod, chown, truncate and utimens in one message; None leaves a field alone."""

    seq: U63
    path: Path
    hid: U63 | None = None  # set when the primary's call came through an open handle (ftruncate...)
    mode: Mode | None = None
    uid: U32 | None = None
    gid: U32 | None = None
    size: U63 | None = None
    atime_ns: TimeNs | None = None
    mtime_ns: TimeNs | None = None


class SetXattr(_Msg, tag="setxattr"):
    seq: U63
    path: Path
    name: XattrName
    value: XattrValue
    flags: Annotated[int, Meta(ge=0, le=3)] = 0


class RemoveXattr(_Msg, tag="rmxattr"):
    seq: U63
    path: Path
    name: XattrName


class Fallocate(_Msg, tag="fallocate"):
    seq: U63
    hid: U63
    mode: Annotated[int, Meta(ge=0, le=0xFF)]
    off: U63
    length: U63


class Fsync(_Msg, tag="fsync"):
    """Barrier: the receiver makes the file (hid), the directory (path) or, with neither, its whole
    file system durable, then acks."""

    seq: U63
    hid: U63 | None = None
    path: Path | None = None
    datasync: bool = False
    atime_ns: TimeNs | None = None
    mtime_ns: TimeNs | None = None


# ---- verify (on a connection of purpose "verify"; see verify.py) ----

Digest = Annotated[bytes, Meta(min_length=8, max_length=16)]
MAX_ENTRY_XATTRS = 64


class Entry(Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One entry of a manifest: what verify compares. `xattrs` are (name, xxh3_64 of the value);
    an entry with more than MAX_ENTRY_XATTRS of them (or very long names) carries one ("*", digest
    of them all) instead. `link`: for a file with several names, the first of its names in the
    manifest's order (None on that first name itself)."""

    path: Path
    kind: Annotated[str, Meta(min_length=1, max_length=1)]  # f d l p s
    mode: Mode
    uid: U32
    gid: U32
    size: U63 | None = None
    mtime_ns: TimeNs | None = None
    digest: Digest | None = None  # files: xxh3_128 of the content
    target: Path | None = None  # symlinks
    xattrs: Annotated[list[tuple[XattrName, Digest]], Meta(max_length=MAX_ENTRY_XATTRS)] = []
    link: Path | None = None


class ManifestRequest(_Msg, tag="mreq"):
    """Send the manifest of the whole tree (`paths` None) or of just these entries (a re-check),
    leaving out what `exclude` matches; answered by ManifestPart* then ManifestEnd."""

    paths: Annotated[list[Path], Meta(max_length=4096)] | None = None
    exclude: Annotated[list[Text], Meta(max_length=256)] = []


class ManifestPart(_Msg, tag="mpart"):
    """Entries in manifest order (components compared bytewise, a directory before its content);
    an empty part is a keepalive while a large file is hashed."""

    entries: Annotated[list[Entry], Meta(max_length=4096)]


class ManifestEnd(_Msg, tag="mend"):
    entries: U63
    bytes_hashed: U63


# ---- resync (in the operation stream: sequenced, applied in order, acknowledged; see resync.py) ----
# The primary drives; requests carry `req`, the receiver answers with the Rs* replies below, written
# before the Ack that covers the request.

SyncId = Annotated[bytes, Meta(min_length=16, max_length=16)]
MAX_FLAT = 8192
Flat = Annotated[list[U63], Meta(max_length=MAX_FLAT)]  # block ranges as [start, end, start, end, ...]
MAX_DIGESTS = 16384  # per RsHash request / RsDigests reply
DIGEST_SIZE = 16  # xxh3_128


class RsQuery(_Msg, tag="rsq"):
    """What lineage does your tree hold? (answered by RsState)"""

    seq: U63
    req: U63


class RsBegin(_Msg, tag="rsbegin"):
    """A resync starts: the receiver durably forgets its lineage before anything else is applied
    (an interrupted resync leaves a tree that is neither the old state nor the new one)."""

    seq: U63
    mode: Annotated[str, Meta(max_length=16)]  # "journal" or "checksum"
    sync: SyncId  # the lineage id this resync will establish


class RsReplay(_Msg, tag="rsreplay"):
    """Brackets the journal's namespace log. Between start (end False) and end, a namespace operation
    that fails on the replica is recorded instead of ending the stream; the end is answered by
    RsReplayed with the paths that failed."""

    seq: U63
    req: U63
    end: bool = False


class RsList(_Msg, tag="rslist"):
    """List the subtree at `path` (answered by RsEntries, the last one with `last`); with
    `children`, only `path` and its entries, without content digests."""

    seq: U63
    req: U63
    path: Path
    exclude: Annotated[list[Text], Meta(max_length=256)] = []
    children: bool = False


class RsHash(_Msg, tag="rshash"):
    """Digests of the blocks of `block` bytes in `ranges` of the file at `path` (answered by RsDigests)."""

    seq: U63
    req: U63
    path: Path
    block: Annotated[int, Meta(ge=512, le=1 << 24)]
    ranges: Flat


class RsXattrs(_Msg, tag="rsxattrs"):
    """Remove every xattr of `path` whose name is not in `keep` (SetXattr ops follow for the values)."""

    seq: U63
    path: Path
    keep: Annotated[list[XattrName], Meta(max_length=4096)] = []


class RsReserve(_Msg, tag="rsreserve"):
    """Allocate byte ranges [start, end, ...] of open file `hid` without changing what it reads or
    its size (fallocate KEEP_SIZE): the space the primary's file has reserved and never written.
    The replica does what it can: a reservation it cannot make is logged, not an error."""

    seq: U63
    hid: U63
    ranges: Flat


class RsDone(_Msg, tag="rsdone"):
    """The replica now equals the primary: make it durable (syncfs) and hold lineage `sync`."""

    seq: U63
    sync: SyncId
    generation: U63 | None = None
    # The exclusion patterns the two trees now equal each other under (recorded with the lineage).
    exclude: Annotated[list[Text], Meta(max_length=256)] | None = None


class RsBye(_Msg, tag="rsbye"):
    """The primary stops cleanly: every operation it applied came before this one (a swap, a planned
    stop). The receiver reports whether a stream ended with it ("disconnected", clean)."""

    seq: U63


class RsEntry(Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    path: Path
    kind: Annotated[str, Meta(min_length=1, max_length=1)]  # f d l p s
    mode: Mode
    uid: U32
    gid: U32
    size: U63 = 0
    mtime_ns: TimeNs = 0
    ino: U64 = 0
    nlink: U32 = 1
    target: Path | None = None  # symlinks
    xattrs: U63 = 0  # xxh3_64 of the sorted (name, value) pairs, 0 without xattrs
    digest: Annotated[bytes, Meta(max_length=DIGEST_SIZE)] | None = None  # small files: whole content
    blocks: U63 = 0  # files: space allocated (st_blocks, 512-byte units), reservations included


class RsState(_Msg, tag="rsstate"):
    """The secondary's lineage; `suspects`: it equals `sync` except under these subtrees (it was
    the primary and crashed while replicating: its activity log, journal.py)."""

    req: U63
    sync: SyncId | None = None
    generation: U63 | None = None
    detail: Text = ""
    suspects: Annotated[list[Path], Meta(max_length=4096)] = []


class RsReplayed(_Msg, tag="rsreplayed"):
    req: U63
    failed: Annotated[list[Path], Meta(max_length=65536)] = []


class RsEntries(_Msg, tag="rsentries"):
    req: U63
    found: bool
    entries: Annotated[list[RsEntry], Meta(max_length=8192)]
    last: bool = True


class RsDigests(_Msg, tag="rsdigests"):
    req: U63
    size: Annotated[int, Meta(ge=-1, le=2**63 - 1)]  # -1: no regular file at that path
    digests: Annotated[bytes, Meta(max_length=MAX_DIGESTS * DIGEST_SIZE)] = b""


RESYNC_REPLIES = (RsState, RsReplayed, RsEntries, RsDigests)


# ---- replies ----

class Ack(_Msg, tag="ack"):
    """Cumulative: every operation up to `received` is in the receiver's hands, up to `applied` applied
    (and, for Fsync and sync writes, durable)."""

    received: U63
    applied: U63


class Error(_Msg, tag="error"):
    """Fatal: the sender of this message closes the connection after it."""

    message: Text


Op = (
    Noop | Open | Close | Write | Create | Mkdir | Mknod | Symlink | Link | Unlink | Rmdir | Remove
    | Rename | SetAttr | SetXattr | RemoveXattr | Fallocate | Fsync
    | RsQuery | RsBegin | RsReplay | RsList | RsHash | RsXattrs | RsReserve | RsDone | RsBye
)
Message = (Hello | Challenge | Proof | Welcome | Ack | Error | ManifestRequest | ManifestPart | ManifestEnd
           | RsState | RsReplayed | RsEntries | RsDigests | Op)
OP_TYPES: tuple[type, ...] = Op.__args__  # type: ignore[attr-defined]

# Operations after which the receiver must be durable before acknowledging.
BARRIERS = (Fsync,)


class ProtocolError(Exception):
    """The peer sent something we must not act on: the connection is dropped and the cause logged."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def encode_into(msg: Message, buf: bytearray, offset: int) -> None:
    _encoder.encode_into(msg, buf, offset)


def decode(payload: bytes | memoryview) -> Message:
    try:
        return _decoder.decode(payload)
    except DECODE_ERRORS as exc:
        raise ProtocolError(f"malformed message: {exc}") from None


def with_seq(op: Op, seq: int) -> Op:
    return msgspec.structs.replace(op, seq=seq)


def split_write(op: Write) -> list[Write]:
    """Split a write whose data exceeds MAX_CHUNK into consecutive chunks (seq filled in later)."""
    data = op.data
    if len(data) <= MAX_CHUNK:
        return [op]
    view = memoryview(data)  # slices share the caller's buffer: the frame encoder copies them once
    return [
        Write(seq=0, hid=op.hid, off=op.off + i, data=view[i:i + MAX_CHUNK], sync=op.sync)  # type: ignore[arg-type]
        for i in range(0, len(data), MAX_CHUNK)
    ]


def describe(op: Op) -> str:
    """One line naming an operation for a log: its type and fields, payloads by their size only."""
    parts = []
    for name in op.__struct_fields__:
        value = getattr(op, name)
        if name in ("data", "value") and isinstance(value, (bytes, bytearray, memoryview)):
            parts.append(f"{name}=<{len(value)} bytes>")
        elif isinstance(value, (list, tuple)) and len(value) > 8:
            parts.append(f"{name}=<{len(value)} items>")
        else:
            parts.append(f"{name}={value!r}")
    return f"{type(op).__name__}({', '.join(parts)})"


def symlink_ops(path: bytes, target: bytes, st: os.stat_result) -> list[Op]:
    """What makes symlink `path` on the replica as it is here (`st` its lstat): the link, then its
    mtime (set there with utimensat(AT_SYMLINK_NOFOLLOW); the atime is not replicated)."""
    return [Symlink(0, path, target, st.st_uid, st.st_gid), SetAttr(0, path, mtime_ns=wire_time(st.st_mtime_ns))]


def op_size(op: Op) -> int:
    """Bytes an operation weighs in the in-flight bound (data plus a fixed overhead)."""
    return (len(op.data) if isinstance(op, Write) else 0) + 64
