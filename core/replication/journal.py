"""What the secondary misses, durably: the primary's journal while it cannot replicate, and each
node's *lineage* (how its tree relates to the last state both nodes shared).

One file per replicated directory and node, `<state_dir>/<module>.<dir>.journal`, an append-only
sequence of records (4-byte length, 4-byte CRC-32, msgpack). Reading stops at the first record that
is short or fails its checksum: a torn tail after a crash is ignored, which is right because nothing
is done before its record is durable (write-ahead, below). A tail that a crash during one write
cannot leave (valid records or other bytes after a bad one, a file cut inside a record) is damage:
the journal is not trusted (`torn_write`).

Lineage ids. Every completed resync gets a random 16-byte id S. Both nodes persist it: the target
when it applied the resync (`target S`), the source in its journal (`session S`). While the stream
runs, "the target's tree = the source's tree at the last operation the target applied". What each
state means for the next resync:

- `alone S` + records: this node's tree = lineage S + exactly what the records say (data ranges,
  namespace log, metadata marks, suspect paths). A journal resync from it is exact.
- `session S` clean: a primary stopped with every operation acknowledged (and its tree synced to
  disk): its tree = lineage S. Unclean (crash while replicating): operations in flight at the crash
  may be applied here and not there: untrusted.
- `target S`: a secondary's tree = lineage S at its last applied operation. Trusted after a clean
  stop (syncfs) or while the machine did not reboot (same boot id: the page cache survived a crash
  of the process); after a power loss acknowledged-but-unsynced writes may be gone: untrusted.
- `invalid`: nothing known (a resync began and did not finish, a damaged or missing file, a forced
  full resync): the next resync compares checksums.

The engine's data generations (design.md §3) are recorded next to the lineage id for diagnostics;
the choice between a journal and a checksum resync is made on the lineage id, which, unlike the
generation, changes when a resync *starts* on the target: a partly resynchronised target still has
the old generation but no longer the old tree.

Activity log (a session, i.e. while replicating). Without it, a primary that crashed while
replicating knows nothing of the operations that were in flight, and the next resync must compare
every file. So, like DRBD's activity log, the replicating primary durably records each path it is
about to change (`active`, epoch e) *before* changing it, unless the path is already recorded in the
current epoch; every few seconds it starts a new epoch, waits until everything sent before is
acknowledged by the secondary, syncs its own file system (`syncfs`, so a power loss cannot take
older changes away) and closes the old epoch (`closed e`). After a crash, the paths of the epochs
not closed are the only places where the two trees can differ: the node is "lineage S except those
paths" (`crash_suspects`), whether it comes back as the source (an `alone` journal with them as
suspects) or as the target (it reports them with its lineage; the source adds them to its own
suspects). Until the first epoch of a session closes, nothing is claimed (checksum, as before).

Write-ahead. While the primary journals, every change is *marked durably before it is applied*:
a data write's blocks (a write to blocks already marked costs nothing), a metadata change's path, a
namespace change's paths (`pend`, settled by the `ops` record carrying the operation once applied,
or by `settle` if it failed). After a crash, a pending namespace change that never settled is a
*suspect* path: resync compares it (and its subtree) by checksum. So a journal is trusted after a
crash of the node too, and "the record is on disk before the call returns" holds a fortiori.
Durability is group-committed: all records appended during one event-loop tick share one fdatasync,
written into space allocated ahead (so the fdatasync has no file size to update).
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import os
import stat
import struct
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

import msgspec

from ..decoding import DECODE_ERRORS
from ..durable import fsync_directory, replace_durably
from . import messages as m

log = logging.getLogger(__name__)

INF = 1 << 62  # a block index past the end of any file: "from here to the end"
DEFAULT_BLOCK = 4096
FORMAT = 1
MAX_RANGES = 4096  # per file and kind; above, the marks are coarsened (over-marking is safe)
MAX_SUSPECTS = 2000  # activity-log paths a crashed primary claims; beyond, coarsened to directories
MAX_LOG = 200_000  # namespace operations kept for replay; above, the journal gives up (checksum resync)
COMPACT_MIN = 4 << 20  # rewrite the file when it passes this and 4x its last compacted size
# The file is allocated ahead in steps of this: a commit then writes into allocated space and its
# fdatasync has no file size to update (measured here: ~120 us instead of ~200-330 us). Zeros after
# the last record end the reading like a torn tail does.
PREALLOC = 4 << 20

_HEAD = struct.Struct(">II")


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def boot_time_ns() -> int:
    """When this boot started (/proc/stat btime, whole seconds: rounded down, which errs on the side
    of looking at more)."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1]) * 1_000_000_000
    except (OSError, ValueError):
        pass
    return 0


def writable_marker(journal_file: Path) -> Path:
    """The file whose mtime says since when the directory of `journal_file` has been writable with
    no agent of ours watching it (unwatched.py); absent while watched."""
    return journal_file.with_suffix(".writable")


def mark_writable(journal_file: Path, since_ns: int | None = None) -> None:
    """The directory is writable from now on (or since `since_ns`) and no agent watches it (a
    stopped module, a read-only bind removed behind our back). The earliest moment counts."""
    marker = writable_marker(journal_file)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    else:
        fsync_directory(marker.parent)  # lost to a power cut, the next walk would look back less far
    if since_ns is not None and since_ns < marker.stat().st_mtime_ns:
        os.utime(marker, ns=(since_ns, since_ns))
        fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # the time is what the marker says
        finally:
            os.close(fd)


def root_marker(journal_file: Path) -> Path:
    """The file that holds the identity of the directory the journal was last watching
    (unwatched.root_identity): a directory moved into its place while unwatched is another one."""
    return journal_file.with_suffix(".root")


def directories_marker(journal_file: Path) -> Path:
    """The identities of the directories of the tree at the moment it became writable with no
    agent (unwatched.record_directories): written at a module's stop, gone once watched again."""
    return journal_file.with_suffix(".dirs")


def check_state_files(journal_file: Path) -> None:
    """Refuse to work with something other than a regular file where the journal or its companions
    go (a directory left by hand, a FIFO): every resync would otherwise end in EISDIR when it records
    its result, and be retried, whole, for ever."""
    for path in (journal_file, journal_file.with_suffix(".tmp"), writable_marker(journal_file),
                 root_marker(journal_file), root_marker(journal_file).with_name(root_marker(journal_file).name + ".tmp"),
                 directories_marker(journal_file)):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL,
                          f"{path} is {kind}, where safekit-cloud keeps a file of its own: remove it "
                          "(the next resync then compares what it needs to)")


def journal_path(state_dir: Path, module: str, directory: bytes | str) -> Path:
    name = os.fsdecode(directory).strip("/").replace("/", "_") or "root"
    return Path(state_dir) / f"{module}.{name}.journal"


# ---- block ranges --------------------------------------------------------------------------------

class RangeSet:
    """Disjoint, sorted, coalesced half-open ranges of block indices."""

    __slots__ = ("_e", "_s")

    def __init__(self, flat: Iterable[int] = ()) -> None:
        self._s: list[int] = []
        self._e: list[int] = []
        it = iter(flat)
        for s in it:
            self.add(s, next(it))

    def __bool__(self) -> bool:
        return bool(self._s)

    def __len__(self) -> int:
        return len(self._s)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self._s == other._s and self._e == other._e

    def __repr__(self) -> str:
        return f"RangeSet({list(zip(self._s, self._e))})"

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._s, self._e))

    def flat(self) -> list[int]:
        out: list[int] = []
        for s, e in zip(self._s, self._e):
            out += (s, e)
        return out

    def copy(self) -> RangeSet:
        r = RangeSet()
        r._s, r._e = self._s[:], self._e[:]
        return r

    def clear(self) -> None:
        self._s.clear()
        self._e.clear()

    def first(self) -> int | None:
        return self._s[0] if self._s else None

    def add(self, s: int, e: int) -> bool:
        """Add [s, e); True if any block was not in the set before."""
        if s >= e:
            return False
        i = bisect.bisect_left(self._e, s)  # first range ending at or after s (touching merges)
        j = bisect.bisect_right(self._s, e)  # ranges starting at or before e
        if i < j:
            if j - i == 1 and self._s[i] <= s and self._e[i] >= e:
                return False
            s, e = min(s, self._s[i]), max(e, self._e[j - 1])
        self._s[i:j] = [s]
        self._e[i:j] = [e]
        if len(self._s) > MAX_RANGES:
            self.coarsen()
        return True

    def remove(self, s: int, e: int) -> bool:
        if s >= e:
            return False
        i = bisect.bisect_right(self._e, s)  # first range ending after s
        j = bisect.bisect_left(self._s, e)  # ranges starting before e
        if i >= j:
            return False
        new_s, new_e = [], []
        if self._s[i] < s:
            new_s.append(self._s[i])
            new_e.append(s)
        if self._e[j - 1] > e:
            new_s.append(e)
            new_e.append(self._e[j - 1])
        self._s[i:j] = new_s
        self._e[i:j] = new_e
        return True

    def covers(self, s: int, e: int) -> bool:
        i = bisect.bisect_right(self._s, s) - 1
        return i >= 0 and self._e[i] >= e

    def overlaps(self, s: int, e: int) -> bool:
        i = bisect.bisect_right(self._e, s)
        return i < len(self._s) and self._s[i] < e

    def within(self, s: int, e: int) -> list[tuple[int, int]]:
        """The parts of the set inside [s, e)."""
        out = []
        i = bisect.bisect_right(self._e, s)
        while i < len(self._s) and self._s[i] < e:
            out.append((max(s, self._s[i]), min(e, self._e[i])))
            i += 1
        return out

    def count(self, limit: int = INF) -> int:
        """Blocks in the set below `limit`."""
        return sum(min(e, limit) - s for s, e in zip(self._s, self._e) if s < limit)

    def update(self, other: RangeSet) -> bool:
        changed = False
        for s, e in other.ranges():
            changed |= self.add(s, e)
        return changed

    def coarsen(self) -> None:
        """Merge the ranges separated by the smallest gaps until at most MAX_RANGES // 2 remain."""
        gaps = sorted(self._s[k + 1] - self._e[k] for k in range(len(self._s) - 1))
        limit = gaps[len(self._s) - MAX_RANGES // 2 - 1] if len(gaps) >= MAX_RANGES // 2 else 0
        s_out, e_out = [self._s[0]], [self._e[0]]
        for s, e in zip(self._s[1:], self._e[1:]):
            if s - e_out[-1] <= limit:
                e_out[-1] = e
            else:
                s_out.append(s)
                e_out.append(e)
        self._s, self._e = s_out, e_out


# ---- what is marked ------------------------------------------------------------------------------

class Mark:
    """What may differ on the replica at one path.

    data:  blocks to send as they are on the primary (unconditionally);
    cmp:   blocks to compare by checksum (send only those that differ);
    fresh: blocks known to be holes on the replica (a zero block there need not be sent);
    meta:  mode, owner, times and xattrs to resend."""

    __slots__ = ("alive", "cmp", "data", "fresh", "meta", "path")

    def __init__(self, path: bytes) -> None:
        self.path = path
        self.data = RangeSet()
        self.cmp = RangeSet()
        self.fresh = RangeSet()
        self.meta = False
        self.alive = True

    def __repr__(self) -> str:
        return f"Mark({self.path!r}, data={self.data}, cmp={self.cmp}, fresh={self.fresh}, meta={self.meta})"

    @property
    def empty(self) -> bool:
        return not (self.data or self.cmp or self.meta)

    def covered(self, s: int, e: int) -> bool:
        """Every block of [s, e) is still to be synchronised by the resync (data or cmp)."""
        pos = s
        for a, b in sorted(self.data.within(s, e) + self.cmp.within(s, e)):
            if a > pos:
                return False
            pos = max(pos, b)
            if pos >= e:
                return True
        return pos >= e


def _under(path: bytes, top: bytes) -> bool:
    return not top or path == top or path.startswith(top + b"/")


def _moved(path: bytes, old: bytes, new: bytes) -> bytes:
    return new + path[len(old):]


NS_TYPES = (m.Mkdir, m.Create, m.Symlink, m.Mknod, m.Link, m.Unlink, m.Rmdir, m.Remove, m.Rename)


def replay_form(op: m.Op) -> m.Op | None:
    """The namespace part of an operation as the journal replays it: structure only (attributes are
    resent from the primary's current state through a metadata mark), no handle."""
    if isinstance(op, m.Create):
        return m.Create(0, op.path, 0o100600, 0, 0)
    if isinstance(op, m.Mkdir):
        return m.Mkdir(0, op.path, 0o40700, 0, 0)
    if isinstance(op, m.Symlink):
        return m.Symlink(0, op.path, op.target, 0, 0)
    if isinstance(op, m.Mknod):
        return m.Mknod(0, op.path, (op.mode & 0o170000) | 0o600, 0, 0, 0)
    if isinstance(op, (m.Link, m.Unlink, m.Rmdir, m.Remove, m.Rename)):
        return msgspec.structs.replace(op, seq=0)
    return None


class State:
    """The in-memory journal: marks by path, suspect subtrees, the namespace log, pending intents."""

    def __init__(self) -> None:
        self.marks: dict[bytes, Mark] = {}
        self.suspects: set[bytes] = set()
        self.log: list[m.Op] = []
        self.pending: dict[int, list[bytes]] = {}
        self.overflow = False

    @property
    def empty(self) -> bool:
        return not (self.marks or self.suspects or self.log or self.pending)

    def mark(self, path: bytes) -> Mark:
        mk = self.marks.get(path)
        if mk is None:
            mk = self.marks[path] = Mark(path)
        return mk

    def add_data(self, path: bytes, s: int, e: int) -> bool:
        return self.mark(path).data.add(s, e)

    def add_meta(self, path: bytes) -> bool:
        mk = self.mark(path)
        if mk.meta:
            return False
        mk.meta = True
        return True

    def add_suspect(self, path: bytes) -> bool:
        if any(_under(path, s) for s in self.suspects):
            return False
        self.suspects = {s for s in self.suspects if not _under(s, path)}
        self.suspects.add(path)
        return True

    # -- namespace effects --

    def _drop(self, path: bytes, subtree: bool) -> None:
        for p in [p for p in self.marks if p == path or (subtree and _under(p, path))]:
            self.marks.pop(p).alive = False

    def share_marks(self, path: bytes, to: bytes) -> bool:
        """What is marked for `path` is marked to send for `to` too, another name of the same file
        (compared or not: sent, the replica's `to` may not hold what `path` held). True if that
        marked anything new."""
        mk = self.marks.get(path)
        if mk is None:
            return False
        new = False
        for s, e in mk.data.ranges() + mk.cmp.ranges():
            new |= self.add_data(to, s, e)
        if mk.meta:
            new |= self.add_meta(to)
        return new

    def carry(self, path: bytes, to: bytes) -> None:
        """`path` becomes, on the replica, another name of the file synchronised through `to`:
        what is marked for `path` (changes the application made through that name) goes to `to`."""
        self.share_marks(path, to)
        self._drop(path, False)

    def _move(self, old: bytes, new: bytes) -> None:
        moved = [(p, mk) for p, mk in self.marks.items() if _under(p, old)]
        for p, _ in moved:
            del self.marks[p]
        for p, mk in moved:
            mk.path = _moved(p, old, new)
            prev = self.marks.get(mk.path)
            if prev is not None:
                prev.alive = False
            self.marks[mk.path] = mk
        self.suspects = {_moved(s, old, new) if _under(s, old) else s for s in self.suspects}
        for paths in self.pending.values():
            paths[:] = [_moved(p, old, new) if _under(p, old) else p for p in paths]

    def apply_ns(self, op: m.Op, log_it: bool = True) -> None:
        """The effect of a namespace operation on marks. Journaled (`log_it`): it goes to the replay
        log and what it creates is marked (the replay creates it empty). Sent live (`log_it` False,
        the resync's data phase): marks only move or go; the secondary gets the entry as it is."""
        if isinstance(op, m.Rename):
            if op.flags & 2:  # RENAME_EXCHANGE: swap through a name no real path can take
                tmp = b"\0exchange"
                self._move(op.old, tmp)
                self._move(op.new, op.old)
                self._move(tmp, op.new)
            else:
                self._drop(op.new, True)
                self.suspects = {s for s in self.suspects if not _under(s, op.new)}
                self._move(op.old, op.new)
        elif isinstance(op, (m.Unlink, m.Rmdir, m.Remove)):
            self._drop(op.path, not isinstance(op, m.Unlink))
            if isinstance(op, (m.Rmdir, m.Remove)):
                self.suspects = {s for s in self.suspects if not _under(s, op.path)}
        elif isinstance(op, m.Create):
            self._drop(op.path, False)
            if log_it:
                mk = self.mark(op.path)
                mk.data.add(0, INF)
                mk.fresh.add(0, INF)  # the replayed create leaves an empty file there
                mk.meta = True
        elif isinstance(op, (m.Mkdir, m.Symlink, m.Mknod)) and log_it:
            self.mark(op.path).meta = True
        if log_it:
            if len(self.log) >= MAX_LOG:
                self.overflow = True
            else:
                rf = replay_form(op)
                if rf is not None:
                    self.log.append(rf)

    def settle_pending(self) -> None:
        """Pending intents whose outcome is unknown (a crash): their paths become suspects."""
        for paths in self.pending.values():
            for p in paths:
                self.add_suspect(p)
        self.pending.clear()


# ---- records -------------------------------------------------------------------------------------

class _Rec(msgspec.Struct, array_like=True, tag_field="t", frozen=True):
    pass


class RMarks(_Rec, tag="marks"):
    path: bytes
    data: list[int] = []
    meta: bool = False
    fresh: list[int] = []


class RState(_Rec, tag="state"):
    """Resets the journal: what this node's tree is relative to lineage `sync` (see module doc).
    Marks and suspects given here are part of the same atomic record."""

    kind: str  # alone | session | target | invalid
    sync: bytes | None = None
    generation: int | None = None
    boot: str = ""
    clean: bool = False
    block: int = DEFAULT_BLOCK
    at: float = 0.0
    marks: list[RMarks] = []
    suspects: list[bytes] = []
    reason: str = ""
    # The exclusion patterns under which lineage `sync` was established (None: unknown, written
    # before they were recorded): other patterns make the trees differ where they differ.
    exclude: list[str] | None = None
    # The replay log given with it (in ROps records) is capped: it overflowed, the journal cannot
    # be replayed. A capped log reloads as MAX_LOG operations, which alone would not say so.
    overflow: bool = False


class RSuspect(_Rec, tag="suspect"):
    path: bytes


class RPending(_Rec, tag="pend"):
    id: int
    paths: list[bytes]


class ROps(_Rec, tag="ops"):
    """Namespace operations applied (in this order), settling intent `id` (0: none). In a snapshot
    (`effects` False) they only refill the replay log: their effect on marks is in the snapshot."""

    id: int
    ops: list[m.Op]
    effects: bool = True


class RSettle(_Rec, tag="settle"):
    id: int


class RActive(_Rec, tag="active"):
    """Activity log of a session: `paths` are about to change, in epoch `epoch`."""

    epoch: int
    paths: list[bytes]


class RClosed(_Rec, tag="closed"):
    """Activity log: every change of epochs <= `epoch` is on both nodes, and durable here."""

    epoch: int


Record = RState | RMarks | RSuspect | RPending | ROps | RSettle | RActive | RClosed
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Record)


def encode_record(rec: Record) -> bytes:
    payload = _enc.encode(rec)
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def torn_write(tail: bytes) -> bool:
    """Whether `tail`, the bytes after the last valid record, is what a crash during one append
    leaves: zeros (the file is allocated ahead), or one record whose header may be written while its
    payload is not, and zeros after it. Anything else (a valid record after a bad one, bytes past the
    bad record's end, a file that ends inside a record it could not hold) is damage to bytes that were
    durable, which the records before it do not account for. A loaded journal is rewritten whole
    before anything is appended to it (`_reset`), so no remnant of a torn write stays behind a later
    record."""
    if not tail.strip(b"\0"):
        return True
    if len(tail) < _HEAD.size:
        return False
    size, _ = _HEAD.unpack_from(tail)
    end = _HEAD.size + size
    return end <= len(tail) and not tail[end:].strip(b"\0")


def read_records(data: bytes) -> tuple[list[Record], int]:
    """Every valid record from the start, and the number of bytes after the last one (torn tail)."""
    out: list[Record] = []
    pos = 0
    while len(data) - pos >= _HEAD.size:
        size, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + size
        if end > len(data):
            break
        payload = data[pos + _HEAD.size:end]
        if zlib.crc32(payload) != crc:
            break
        try:
            out.append(_dec.decode(payload))
        except DECODE_ERRORS:
            break
        pos = end
    return out, len(data) - pos


# A suspect of the form "<directory>/\0" (b"\0" for the top) stands for that directory's entries
# only: their names and kinds are compared, not what they hold (resync.py). NUL is never in a
# name, and as a path below the directory it follows every rule of the subtree (a rename of the
# directory carries it, a removal drops it, the directory as a suspect covers it).
ENTRIES = b"\0"


def entries_of(directory: bytes) -> bytes:
    return directory + b"/" + ENTRIES if directory else ENTRIES


def entries_dir(path: bytes) -> bytes | None:
    """The directory whose entries `path` stands for (entries_of), or None for a plain path."""
    if path == ENTRIES:
        return b""
    if path.endswith(b"/" + ENTRIES):
        return path[:-2]
    return None


def coarsen(paths: Iterable[bytes], limit: int) -> list[bytes]:
    """At most `limit` subtrees covering every path of `paths` (the deepest paths are replaced by
    their parent directory until they fit; [b""], the whole tree, at worst)."""
    tops = _minimal(set(paths))
    while len(tops) > limit:
        depth = max(p.count(b"/") for p in tops)
        tops = _minimal({(p.rpartition(b"/")[0] if p.count(b"/") == depth else p) for p in tops})
    return sorted(tops)


def _minimal(paths: set[bytes]) -> set[bytes]:
    """`paths` without those inside another of them (b"" is the whole tree)."""
    if b"" in paths:
        return {b""}
    out: set[bytes] = set()
    for p in sorted(paths, key=lambda p: p.count(b"/")):  # parents first
        if not any(q in out for q in _ancestors(p)):
            out.add(p)
    return out


def _ancestors(path: bytes) -> list[bytes]:
    parts = path.split(b"/")
    return [b"/".join(parts[:i]) for i in range(1, len(parts))]


def marks_record(mk: Mark) -> RMarks:
    return RMarks(mk.path, mk.data.flat(), mk.meta, mk.fresh.flat())


# ---- the journal file ----------------------------------------------------------------------------

class Journal:
    """The journal of one replicated directory on one node (see the module docstring)."""

    def __init__(self, path: Path | None, block: int = DEFAULT_BLOCK) -> None:
        self.path = path
        self.block = block
        self.kind = "invalid"
        self.sync: bytes | None = None
        self.generation: int | None = None
        self.boot = ""
        self.clean = False
        self.reason = "no journal yet"
        self.state = State()
        self.authoritative = False  # records matter: the disk journal describes what the peer misses
        self._fd = -1
        self._buf: list[bytes] = []
        self._appended = 0
        self._durable = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._size = 0  # end of the last record written (appends go there)
        self._alloc = 0  # bytes allocated in the file
        self._compacted = 0
        self._next_id = 1
        self.failed = ""
        self.torn = 0
        self.active: dict[int, set[bytes]] = {}  # activity log: epoch -> paths (epochs not closed)
        self.closed = -1  # last closed epoch of this session (-1: none yet, nothing claimed)
        self.exclude: list[str] | None = None  # the lineage's exclusion patterns (RState.exclude)
        # A target's paths changed while no agent watched (unwatched.py): reported with its lineage.
        self.unwatched: list[bytes] = []
        # The identity of the directory the agent works on (unwatched.root_identity), recorded
        # once what went around the agents is accounted for (watched_again).
        self.root_id: str | None = None

    # -- loading --

    @classmethod
    def load(cls, path: Path | None, block: int = DEFAULT_BLOCK) -> Journal:
        j = cls(path, block)
        if path is None:
            return j
        check_state_files(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            j.reason = "no journal file"
            return j
        except OSError as exc:
            j.reason = f"unreadable journal: {exc}"
            return j
        records, j.torn = read_records(data)
        if not records or not isinstance(records[0], RState):
            j.reason = "damaged journal"
            return j
        if not torn_write(data[len(data) - j.torn:]):
            # Trusting the records before the damage would leave out what the rest said changed.
            j.reason = (f"damaged journal: the {j.torn} bytes after its last valid record (offset "
                        f"{len(data) - j.torn}) are not what a crash during a write leaves")
            return j
        for rec in records:
            j._apply(rec)
        if j.block != block and j.kind == "alone":
            # Marks are in units of the block size they were recorded with.
            j._rescale(block)
        j._size = j._compacted = len(data) - j.torn
        j._alloc = len(data)
        return j

    def _rescale(self, block: int) -> None:
        old = self.block
        for mk in self.state.marks.values():
            for name in ("data", "cmp"):
                rs = RangeSet()
                for s, e in getattr(mk, name).ranges():
                    rs.add(s * old // block, INF if e >= INF else -(-e * old // block))
                setattr(mk, name, rs)
            fresh = RangeSet()
            for s, e in mk.fresh.ranges():
                a, b = -(-s * old // block), (INF if e >= INF else e * old // block)
                fresh.add(a, b)
            mk.fresh = fresh
        self.block = block

    def _apply(self, rec: Record) -> None:
        st = self.state
        if isinstance(rec, RState):
            self.kind, self.sync, self.generation = rec.kind, rec.sync, rec.generation
            self.boot, self.clean, self.block, self.reason = rec.boot, rec.clean, rec.block, rec.reason
            self.exclude = rec.exclude
            self.state = st = State()
            st.overflow = rec.overflow
            self.active, self.closed = {}, -1
            for r in rec.marks:
                self._apply(r)
            for p in rec.suspects:
                st.add_suspect(p)
        elif isinstance(rec, RMarks):
            mk = st.mark(rec.path)
            mk.data.update(RangeSet(rec.data))
            mk.fresh.update(RangeSet(rec.fresh))
            mk.meta |= rec.meta
        elif isinstance(rec, RSuspect):
            st.add_suspect(rec.path)
        elif isinstance(rec, RPending):
            st.pending[rec.id] = list(rec.paths)
            self._next_id = max(self._next_id, rec.id + 1)
        elif isinstance(rec, ROps):
            st.pending.pop(rec.id, None)
            if rec.effects:
                for op in rec.ops:
                    st.apply_ns(op)
            else:
                st.log.extend(rec.ops)
        elif isinstance(rec, RSettle):
            st.pending.pop(rec.id, None)
        elif isinstance(rec, RActive):
            self.active.setdefault(rec.epoch, set()).update(rec.paths)
        elif isinstance(rec, RClosed):
            self.closed = max(self.closed, rec.epoch)
            for e in [e for e in self.active if e <= rec.epoch]:
                del self.active[e]

    # -- what this node is --

    def lineage(self) -> bytes | None:
        """The lineage id this node's tree provably equals (what a target reports), or None."""
        if self.kind == "target" and self.sync and (self.clean or self.boot == boot_id()):
            return self.sync
        if self.kind == "session" and self.sync and self.clean:
            return self.sync
        if self.kind == "alone" and self.sync and self.state.empty and not self.state.overflow:
            return self.sync
        return None

    def crash_suspects(self) -> list[bytes] | None:
        """A session that ended without a clean stop, with an activity log: the paths where this
        tree may differ from lineage `sync` (coarsened to at most MAX_SUSPECTS subtrees). None
        when nothing can be claimed (no session, a clean one, or no epoch closed yet)."""
        if self.kind != "session" or self.clean or not self.sync or self.closed < 0:
            return None
        return coarsen(set().union(*self.active.values()), MAX_SUSPECTS)

    def lineage_with_suspects(self) -> tuple[bytes | None, list[bytes]]:
        """What a target reports: a lineage it equals, or one it equals except under `suspects`
        (its activity log's after a crash, and paths changed while no agent watched)."""
        sync = self.lineage()
        if sync is not None:
            suspects = coarsen(set(self.unwatched), MAX_SUSPECTS) if self.unwatched else []
        else:
            crashed = self.crash_suspects()
            if crashed is None:
                return None, []
            sync, suspects = self.sync, coarsen(set(crashed) | set(self.unwatched), MAX_SUSPECTS)
        if b"" in suspects:
            return None, []
        return sync, suspects

    def unwatched_since_ns(self) -> int | None:
        """Since when changes to the directory may have gone around every agent of ours: the
        service's marker (made writable with no agent: a stopped module, a dead agent's mount or
        read-only bind removed), else the start of this boot when the journal was written in an
        earlier one (the mount and the read-only bind went with the reboot). None: watched all
        along, or nothing trusted to protect (the next resync compares everything anyway)."""
        if not self.could_be_trusted():
            return None
        if self.path is not None:
            try:
                return writable_marker(self.path).stat().st_mtime_ns
            except OSError:
                pass
        if self.boot and self.boot != boot_id():
            return boot_time_ns()
        return None

    def could_be_trusted(self) -> bool:
        """A resync could rely on this journal (so what went around it matters): an alone journal,
        or a lineage this node equals, perhaps except a crash's suspects."""
        if self.kind == "alone":
            return self.sync is not None and not self.state.overflow
        return self.lineage() is not None or self.crash_suspects() is not None

    def watched_again(self) -> None:
        """What went around us is now in the journal (source) or resynchronised (target): the
        directory's identity is recorded, then the marker goes."""
        self.unwatched = []
        if self.path is None:
            return
        directories_marker(self.path).unlink(missing_ok=True)  # describes the moment the marker says
        if self.root_id is not None and self.remembered_root() != self.root_id:
            marker = root_marker(self.path)
            try:
                replace_durably(marker, self.root_id + "\n")
            except OSError as exc:  # the next walk then takes the top directory as changed
                log.warning("cannot record the identity of the replicated directory in %s: %s", marker, exc)
        writable_marker(self.path).unlink(missing_ok=True)

    def remembered_root(self) -> str | None:
        """The identity recorded by the last watched_again (None: none recorded)."""
        if self.path is None:
            return None
        marker = root_marker(self.path)
        try:
            return marker.read_text().strip() or None
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8, so not what we wrote
            # None: no identity to match, so the directory counts as another one (compared whole).
            log.warning("the identity recorded in %s cannot be read (%s): the replicated directory is "
                        "compared whole; the file is rewritten after the resync", marker, exc)
            return None

    def describe(self) -> dict[str, object]:
        st = self.state
        return {
            "kind": self.kind, "lineage": self.sync.hex() if self.sync else None, "generation": self.generation,
            "trusted": self.trusted, "files": len(st.marks), "suspects": len(st.suspects),
            "namespace_ops": len(st.log), "reason": self.reason, "failed": self.failed,
            # while replicating: the last activity-log epoch closed (-1: none yet), paths recorded since
            "activity_closed": self.closed, "activity_paths": sum(len(ps) for ps in self.active.values()),
        }

    @property
    def trusted(self) -> bool:
        """A source can send exactly this journal (given a target at lineage `sync`)."""
        return self.kind == "alone" and self.sync is not None and not self.state.overflow and not self.failed

    # -- transitions (each rewrites the file: one atomic, durable record) --

    def become_source(self, generation: int | None = None, unwatched: Iterable[bytes] = ()) -> None:
        """At the start of a primary agent: from whatever this node was, to journaling.
        `unwatched`: paths changed while no agent watched (unwatched.py), suspects from now on."""
        unwatched = list(unwatched)
        if unwatched and b"" in coarsen(set(unwatched), MAX_SUSPECTS):
            self.invalidate("the replicated directory itself changed while no agent watched it")
            return
        note = f"; {len(unwatched)} path(s) changed while unwatched" if unwatched else ""
        if self.kind == "alone" and self.sync and self.state.overflow:
            self.invalidate("journal overflowed (too many namespace changes): checksum resync")
            return
        if self.kind == "alone" and self.sync:
            self.state.settle_pending()  # a crash left intents unsettled: compare those paths
            gen = self.generation if self.generation is not None else generation
            self._reset(RState("alone", self.sync, gen, boot_id(), block=self.block, at=time.time(),
                               marks=[marks_record(mk) for mk in self.state.marks.values()],
                               suspects=coarsen(self.state.suspects | set(unwatched), MAX_SUSPECTS),
                               exclude=self.exclude, reason="alone (continued)" + note),
                        keep_log=True)
            return
        sync = self.lineage()
        suspects = self.crash_suspects()
        if sync is not None:
            why = {"target": "was an up-to-date secondary", "session": "stopped cleanly while replicating"}.get(
                self.kind, "alone")
            self._reset(RState("alone", sync, generation, boot_id(), block=self.block, at=time.time(),
                               suspects=coarsen(set(unwatched), MAX_SUSPECTS),
                               exclude=self.exclude, reason=f"alone since lineage {sync.hex()[:8]} ({why}{note})"))
        elif suspects is not None and self.sync is not None:
            sync = self.sync
            suspects = coarsen(set(suspects) | set(unwatched), MAX_SUSPECTS)
            self._reset(RState("alone", sync, self.generation if self.generation is not None else generation,
                               boot_id(), block=self.block, at=time.time(), suspects=suspects,
                               exclude=self.exclude, reason=f"alone since lineage {sync.hex()[:8]} (crash while replicating: "
                                      f"{len(suspects)} path(s) possibly in flight, compared at the resync{note})"))
        else:
            why = self.reason if self.kind == "invalid" else {
                "session": "crash while replicating: operations in flight unknown",
                "target": "secondary not stopped cleanly and the machine rebooted",
            }.get(self.kind, self.kind)
            self.invalidate(why)

    def alone_from_session(self, marks: Iterable[Mark], suspects: Iterable[bytes]) -> None:
        """The link broke while replicating in session `sync`: from now on journal, starting with
        what the peer never acknowledged. One record, so a crash leaves either the clean session
        (untrusted) or the whole start of the alone journal."""
        if self.kind != "session" or not self.sync:
            return
        recs = [marks_record(mk) for mk in marks]
        self.kind, self.clean, self.reason = "alone", False, "replication link lost"
        self.state = State()
        rec = RState("alone", self.sync, self.generation, boot_id(), block=self.block, at=time.time(),
                     marks=recs, suspects=sorted(set(suspects)), exclude=self.exclude, reason=self.reason)
        self._apply(rec)
        self.authoritative = True
        self.append(rec)

    def start_session(self, sync: bytes, generation: int | None, exclude: list[str] | None = None) -> None:
        self._reset(RState("session", sync, generation, boot_id(), block=self.block, at=time.time(),
                           exclude=exclude, reason="replicating"))

    def note_active(self, epoch: int, paths: list[bytes]) -> None:
        """Activity log: `paths` are about to change in `epoch` (durable once `commit()` returns)."""
        if self.kind != "session" or self.path is None:
            return
        self.active.setdefault(epoch, set()).update(paths)
        self._buf.append(encode_record(RActive(epoch, paths)))
        self._appended += 1

    def close_epoch(self, epoch: int) -> None:
        """Activity log: every change of epochs <= `epoch` is on both nodes and durable here.
        The file is rewritten (the session plus the open epochs) when it has grown."""
        if self.kind != "session" or self.path is None:
            return
        self._apply(RClosed(epoch))
        if self._size <= max(COMPACT_MIN, 4 * self._compacted):
            self._buf.append(encode_record(RClosed(epoch)))
            self._appended += 1
            return
        rec = RState("session", self.sync, self.generation, self.boot, block=self.block, at=time.time(),
                     exclude=self.exclude, reason=self.reason)
        body = [encode_record(rec), encode_record(RClosed(epoch))]
        body += [encode_record(RActive(e, sorted(ps))) for e, ps in sorted(self.active.items())]
        self._buf.clear()  # reflected in self.active, hence in the rewrite
        self._rewrite(b"".join(body))
        self._all_durable()

    def close_session(self) -> None:
        if self.kind == "session":
            self._reset(RState("session", self.sync, self.generation, boot_id(), clean=True, block=self.block,
                               at=time.time(), exclude=self.exclude, reason="stopped cleanly"))

    def target_invalidate(self, why: str) -> None:
        if self.kind != "invalid":
            self.invalidate(why)

    def target_done(self, sync: bytes, generation: int | None, exclude: list[str] | None = None) -> None:
        self._reset(RState("target", sync, generation, boot_id(), block=self.block, at=time.time(),
                           exclude=exclude, reason="resynchronised"))
        self.watched_again()

    def target_clean(self) -> None:
        if self.kind == "target":
            self._reset(RState("target", self.sync, self.generation, boot_id(), clean=True, block=self.block,
                               at=time.time(), exclude=self.exclude, reason="secondary stopped cleanly"))

    def invalidate(self, why: str, keep_state: bool = False) -> None:
        """Nothing is known any more (durably). `keep_state`: the in-memory state stays (a resync
        that just started works from it)."""
        state = self.state
        self._reset(RState("invalid", None, self.generation, boot_id(), block=self.block, at=time.time(), reason=why))
        if keep_state:
            self.state = state

    def _reset(self, rec: RState, keep_log: bool = False) -> None:
        log_ops, pending = (self.state.log, self.state.pending) if keep_log else ([], {})
        if keep_log and self.state.overflow:
            rec = msgspec.structs.replace(rec, overflow=True)
        self._apply(rec)
        self.state.log = list(log_ops)
        self.state.pending = dict(pending)
        self.authoritative = rec.kind == "alone"
        self._buf.clear()
        if self.path is None:
            self._all_durable()
            return
        body = encode_record(rec)
        if keep_log:
            body += b"".join(encode_record(ROps(0, log_ops[i:i + 1000], False)) for i in range(0, len(log_ops), 1000))
            body += b"".join(encode_record(RPending(i, p)) for i, p in pending.items())
        self._rewrite(body)
        self._all_durable()

    def _all_durable(self) -> None:
        """Everything appended so far is reflected in what the file now holds."""
        self._durable = self._appended
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters = []

    def _rewrite(self, body: bytes) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, body)
            self._alloc = self._preallocate(fd, len(body), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_directory(self.path.parent)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        self._size = self._compacted = len(body)

    # -- appending and group commit --

    def new_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def append(self, rec: Record) -> None:
        """Queue a record (durable once `commit()` returns). Only while authoritative: otherwise
        the file says `invalid` and nothing appended would change that."""
        if not self.authoritative or self.path is None:
            return
        self._buf.append(encode_record(rec))
        self._appended += 1

    async def commit(self) -> None:
        """Return once every record appended so far is on disk (group commit)."""
        target = self._appended
        if self._durable >= target:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="journal-flush")
        await asyncio.shield(fut)

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the rest of this tick append its records: one fsync for all
        while self._buf:
            data, upto = b"".join(self._buf), self._appended
            self._buf.clear()
            try:
                # Inline, not in a thread: the thread hop measured ~160 us per commit on this VM,
                # more than the fdatasync itself (~120 us). Requests that arrive meanwhile wait in
                # the kernel and form the next group.
                self._write(data)
            except OSError as exc:
                # The change goes on locally but its record may be lost: trust nothing, on disk too
                # (a restart must not find an "alone" journal with records missing).
                log.error("journal %s: cannot write (%s): the next resync compares checksums", self.path, exc)
                self._buf.clear()
                upto = self._appended
                state = self.state
                try:
                    self.invalidate(f"journal write failed: {exc}")
                except OSError:
                    try:
                        if self.path is not None:
                            self.path.unlink(missing_ok=True)  # missing: untrusted as well
                    except OSError as exc2:
                        log.error("journal %s: cannot invalidate it either: %s", self.path, exc2)
                self.state = state
                self.failed = str(exc)
                self.authoritative = False
            self._durable = upto
            keep = []
            for target, fut in self._waiters:
                if target <= upto:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    keep.append((target, fut))
            self._waiters = keep
            if self.authoritative and self._size > max(COMPACT_MIN, 4 * self._compacted):
                self.compact()

    @staticmethod
    def _preallocate(fd: int, end: int, alloc: int) -> int:
        """Make sure [0, end) plus room ahead is allocated; returns the new allocated size."""
        if end <= alloc:
            return alloc
        want = (end // PREALLOC + 1) * PREALLOC
        try:
            os.posix_fallocate(fd, 0, want)
        except OSError:
            return alloc  # not supported here: plain appends
        return want

    def _write(self, data: bytes) -> None:
        if self._fd < 0:
            assert self.path is not None
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._alloc = self._preallocate(self._fd, self._size + len(data), self._alloc)
        view = memoryview(data)
        off = self._size
        while view:
            n = os.pwrite(self._fd, view, off)
            view = view[n:]
            off += n
        os.fdatasync(self._fd)
        self._size = off

    def compact(self) -> None:
        """Rewrite the file as one snapshot of the current state (same meaning, fewer bytes)."""
        if self.path is None or self.kind != "alone":
            return
        st = self.state
        rec = RState("alone", self.sync, self.generation, self.boot, block=self.block, at=time.time(),
                     suspects=sorted(st.suspects), exclude=self.exclude, reason=self.reason, overflow=st.overflow)
        body = [encode_record(rec)]
        body += [encode_record(marks_record(mk)) for mk in st.marks.values()]
        body += [encode_record(ROps(0, st.log[i:i + 1000], False)) for i in range(0, len(st.log), 1000)]
        body += [encode_record(RPending(i, p)) for i, p in st.pending.items()]
        # Records still queued are already reflected in the in-memory state, hence in the snapshot.
        self._buf.clear()
        self._rewrite(b"".join(body))
        self._all_durable()

    def flush_sync(self) -> None:
        """Write what is queued now (shutdown)."""
        if self._buf and self.path is not None:
            data = b"".join(self._buf)
            self._buf.clear()
            try:
                self._write(data)
            except OSError as exc:
                log.error("journal %s: cannot write at shutdown: %s", self.path, exc)
            self._durable = self._appended

    def close(self) -> None:
        self.flush_sync()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

