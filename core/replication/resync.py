"""Resynchronisation: the primary brings the secondary's tree up to date while the application runs.

Primary side: `MirrorReplicator` is what the FUSE layer hands changes to. It is in one of three
modes: `alone` (no peer: changes go to the journal, write-ahead, see journal.py), `resync` (a peer is
connected and being brought up to date), `live` (synchronous replication). Secondary side:
`ResyncApplier` applies the resync messages in stream order and answers the requests.

A resync, on every (re)connection:

1. Query: the secondary reports the lineage id its tree holds (journal.py). If it is the base of
   this node's trusted journal, a *journal resync* sends what the journal says; otherwise a
   *checksum resync* compares the trees.
2. Begin: the secondary durably forgets its lineage before anything else is applied (acknowledged
   before we go on): a resync interrupted from here on leaves it "not up to date" for good, and the
   next one compares checksums. Until this acknowledgement the journal on disk still describes
   exactly what the peer misses, so it stays write-ahead until then.
3. Namespace (phase A). New namespace changes of the application wait at a gate (only those; data
   writes go on and are marked). Journal resync: the journal's namespace log is replayed in order
   (creates, unlinks, renames, links...; a replayed operation that fails there makes its paths
   suspects); then every suspect subtree, or the whole tree for a checksum resync, is reconciled:
   the secondary lists it (type, mode, owner, size, mtime, inode, symlink target, xattr digest,
   content digest of small files, allocated blocks), the primary compares with its own listing and sends removals,
   creations, hard links, and marks: `cmp` for files on both sides (compare block checksums),
   `data` for new or different small files, `meta` for differing attributes.
4. Data (phase B). The gate opens. For each marked path: `cmp` blocks are compared by xxh3-128
   digests at two levels (64 KiB blocks, then the 4 KiB blocks of those that differ), only
   differing blocks are sent; `data` blocks are sent as they are (zeros skipped where the replica is
   known to have a hole); then the size and times; then the metadata. Bandwidth-capped.
5. Done: the secondary syncs its file system and holds a new lineage id; the primary starts the
   session in its journal and goes live.

Why no write is lost while the application writes during the resync (phase B). Invariant: for
every path and block, the replica equals the primary unless the block is marked (`data`/`cmp`), or
the path's metadata unless `meta`. The FUSE layer applies a change and hands it over with no await
in between, and the resync reads a block from the primary, sends it and clears its mark with no
await in between either: both orders are the stream order the secondary applies.
- A write touching only marked blocks is not sent (the marks stay: the resync will read the blocks
  after the write). A write touching any unmarked block is sent as usual (the replica gets the same
  bytes) and turns the `cmp` marks of the blocks it touches into `data` marks: the replica's digest
  of those blocks may predate it, so they are resent rather than compared.
- Hence a block still `cmp`-marked was touched by no operation sent since it was marked: the
  secondary's digest of it, whenever taken, is its current content, and comparing it with the
  primary's current content at the moment the mark is cleared is exact.
- Namespace changes (phase B) are sent as usual; marks follow renames exactly as the secondary's
  entries do. A truncate is sent too; the blocks past the new size become `data`.
- A file's size and `data` marks past its end are settled in one step at the end of the file.
So when no mark is left, the replica equals the primary, and `RsDone` is sent in stream order.

Holding writes. A change that is journaled instead of sent is acknowledged to the application only
once the peer can no longer take over without it: while the peer still counts itself an up-to-date
secondary (a live link just lost, before the module's new generation reached it; or the first resync
after a handover), the acknowledgement waits (`hold_writes`). The module releases it when the peer
announces its copy out of date or is lost on every heartbeat network (`release_writes`, by signal);
going live releases it too (the resync sent everything). Never on its own: a limit here released
writes while the daemon was paused or could not act, and a failover lost them (the module bounds
the wait, decide.py). `hold_limit` is for harnesses without a module. When the module leaves the primary
role instead (its node yields to a peer with newer data), what is held fails with EIO
(`refuse_held_writes`): this node's copy is about to be replaced by the peer's.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import xxhash

from . import messages as m
from .apply import Applier, open_regular, proc_path
from .exclude import Excluder
from .fuseabi import FUSEError
from .journal import (
    INF,
    NS_TYPES,
    Journal,
    Mark,
    RangeSet,
    RMarks,
    ROps,
    RPending,
    RSettle,
    RSuspect,
    State,
    coarsen,
    entries_dir,
    marks_record,
    replay_form,
)
from .paths import PathError, components, open_beneath
from .replicator import PENDING
from .sender import Sender
from .syscalls import FALLOC_FL_KEEP_SIZE, fallocate, syncfs, unwritten_extents

log = logging.getLogger(__name__)

COARSE = 16  # journal blocks per first-level compared block (64 KiB with 4 KiB blocks)
SMALL_FILE = 64 * 1024  # files up to this size are compared by one digest in the listing
REGION = m.MAX_DIGESTS  # fine blocks per region: one coarse and one fine digest request each
STEP = 256  # fine blocks read and compared in one atomic step (1 MiB with 4 KiB blocks)
LIST_TICK = 1024  # entries listed between two calls of list_tree's tick
KEEPALIVE_EVERY = 0.25  # seconds between two keepalives of a receiver busy listing a tree
AL_FIRST = 0.5  # seconds from the start of a session to the first activity-log epoch closed
AL_INTERVAL = 5.0  # then at most one epoch closed (one syncfs) per this many seconds of changes
AL_MAX_PATHS = 1000  # paths in one epoch that close it early (what a crash leaves to compare)
SUSPECTS_BYTES = 128 * 1024  # RsState.suspects bound (coarsened to directories beyond)
ENTRIES_BYTES = 192 * 1024  # RsEntries payload bound (frames stay below MAX_FRAME)

_hids = itertools.count(1 << 61)  # resync handle ids: above FUSE handles, apart from snapshot's


class LinkLost(Exception):
    pass


def digest(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0] if b"/" in path else b""


def _activity_paths(paths: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """What the activity log records for a namespace change of `paths`: the directory it changes,
    so a burst of creates in one directory costs one record per epoch (a crash then compares that
    directory's subtree). A change naming several entries (rename, link) records one subtree
    holding them all, so a file with several names is compared as one, never split in copies. At
    the top of the tree, the entries themselves: not the whole tree."""
    parents = {_parent(p) for p in paths}
    top = parents.pop() if len(parents) == 1 else _common_ancestor(parents)
    return (top,) if top else tuple(paths)


def _common_ancestor(paths: set[bytes]) -> bytes:
    split = [p.split(b"/") if p else [] for p in paths]
    common: list[bytes] = []
    for parts in zip(*split):
        if any(x != parts[0] for x in parts):
            break
        common.append(parts[0])
    return b"/".join(common)


def _renamed_files(theirs: dict[bytes, m.RsEntry], ours: dict[bytes, m.RsEntry]) -> dict[bytes, bytes]:
    """Rename detection for a reconciled subtree: a file only the replica has and a file only we
    have, with the same size, mtime (a rename keeps it) and, for small files, the same content
    digest, are taken as one file renamed. Files with several names are left to the hard-link
    logic. Returns our path -> the replica's path."""
    def key(e: m.RsEntry) -> tuple[int, int, bytes | None]:
        return e.size, e.mtime_ns, e.digest

    candidates: dict[tuple[int, int, bytes | None], list[bytes]] = {}
    for p, t in theirs.items():
        if p and t.kind == "f" and t.nlink == 1 and t.size > 0 and p not in ours:
            candidates.setdefault(key(t), []).append(p)
    out: dict[bytes, bytes] = {}
    for p, o in ours.items():
        if o.kind == "f" and o.nlink == 1 and o.size > 0 and p not in theirs:
            names = candidates.get(key(o))
            if names:
                out[p] = names.pop()
    return out


def _renamed_dirs(theirs: dict[bytes, m.RsEntry], ours: dict[bytes, m.RsEntry]) -> list[tuple[bytes, bytes]]:
    """Rename detection for directories: a directory only the replica has, the top of what it
    alone has (its parent is a directory on both sides), and a directory only we have are taken as
    one directory renamed when at least half of our files in it (and at least one) have the same
    name below it, size and mtime in theirs. Each of theirs is used once. Returns (our path, the
    replica's path) pairs, shallowest first."""
    tops = []
    for p, e in theirs.items():
        if p and e.kind == "d" and p not in ours:
            q = _parent(p)
            if q in theirs and q in ours and theirs[q].kind == "d" and ours[q].kind == "d":
                tops.append(p)
    if not tops:
        return []
    new_dirs = sorted(p for p, e in ours.items() if p and e.kind == "d" and p not in theirs)

    def files_below(side: dict[bytes, m.RsEntry], keys: list[bytes], top: bytes) -> list[tuple[bytes, int, int]]:
        lo = bisect.bisect_left(keys, top + b"/")
        hi = bisect.bisect_left(keys, top + b"0")  # "0" follows "/": the end of top's subtree
        return [(p[len(top):], side[p].size, side[p].mtime_ns) for p in keys[lo:hi] if side[p].kind == "f"]

    their_keys, our_keys = sorted(theirs), sorted(ours)
    index: dict[tuple[bytes, int, int], list[bytes]] = {}
    for t in tops:
        for sig in files_below(theirs, their_keys, t):
            index.setdefault(sig, []).append(t)
    out: list[tuple[bytes, bytes]] = []
    used: set[bytes] = set()
    for o in new_dirs:
        mine = files_below(ours, our_keys, o)
        votes: dict[bytes, int] = {}
        for sig in mine:
            for t in index.get(sig, ()):
                if t not in used:
                    votes[t] = votes.get(t, 0) + 1
        if votes:
            t, n = max(votes.items(), key=lambda kv: (kv[1], kv[0]))
            if 2 * n >= len(mine):
                out.append((o, t))
                used.add(t)
    return out


def _linked_apart(theirs: dict[bytes, m.RsEntry], ours: dict[bytes, m.RsEntry]) -> set[bytes]:
    """Files of the replica that share their data with a name not linked to them here (more
    links there, or a name of their group that is not of ours): written to as they are, the other
    name would change too. They are removed there and made again."""
    def groups(side: dict[bytes, m.RsEntry]) -> dict[int, set[bytes]]:
        out: dict[int, set[bytes]] = {}
        for p, e in side.items():
            if e.kind == "f" and e.nlink > 1:
                out.setdefault(e.ino, set()).add(p)
        return out

    their_groups, our_groups = groups(theirs), groups(ours)
    apart = set()
    for p, t in theirs.items():
        o = ours.get(p)
        if t.kind == "f" and t.nlink > 1 and o is not None and o.kind == "f" and (
                t.nlink > o.nlink or not their_groups[t.ino] <= our_groups.get(o.ino, {p})):
            apart.add(p)
    return apart


def _pairs(flat: list[int]) -> list[tuple[int, int]]:
    """[start, end, start, end, ...] as (start, end) pairs; an odd last item is left out."""
    return list(zip(flat[0::2], flat[1::2]))


def _reserved_beyond(ours: m.RsEntry, theirs: m.RsEntry) -> bool:
    """Our file holds space past its end (a fallocate KEEP_SIZE) that the replica's does not: sent
    again, which makes the reservation there too (_send_reservations); a small file costs little.
    Space within the size is not compared: a replica that stores small files inline or compressed
    would have every one of them sent at each checksum resync."""
    return ours.blocks * 512 > _ceil(ours.size, 4096) * 4096 and ours.blocks > theirs.blocks


def _valid_suspects(paths: list[bytes]) -> list[bytes] | None:
    """The secondary's suspects if every one is a plain relative path or the entries of one (None:
    a peer that sends anything else gets no benefit of the doubt, the resync compares everything)."""
    try:
        for p in paths:
            d = entries_dir(p)
            components(p if d is None else d)
    except PathError as exc:
        log.warning("resync: the secondary reported an invalid suspect path (%s): checksum resync", exc)
        return None
    return list(paths)


def _op_paths(op: m.Op) -> list[bytes]:
    out = []
    for name in ("path", "old", "new"):
        v = getattr(op, name, None)
        if isinstance(v, bytes):
            out.append(v)
    return out


# ---- listing and hashing (both sides) ------------------------------------------------------------

_KINDS = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}


def xattr_digest(target: bytes | str, follow: bool) -> int:
    try:
        names = sorted(os.fsencode(n) for n in os.listxattr(target, follow_symlinks=follow))
    except OSError:
        return 0
    if not names:
        return 0
    h = xxhash.xxh3_64()
    for name in names:
        try:
            value = os.getxattr(target, name, follow_symlinks=follow)
        except OSError:
            continue
        h.update(len(name).to_bytes(4, "big") + name + len(value).to_bytes(4, "big") + value)
    return (h.intdigest() >> 1) or 1  # 63 bits: RsEntry.xattrs is a U63 (a 64-bit one failed to decode)


def _small_digest(dfd: int, name: bytes | str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return digest(os.pread(fd, SMALL_FILE + 1, 0))
    except OSError:
        return None
    finally:
        os.close(fd)


def _entry(dfd: int, name: bytes, path: bytes, st: os.stat_result, digests: bool) -> m.RsEntry | None:
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return None  # device nodes are never replicated
    xattrs = 0
    if kind != "l":
        xattrs = xattr_digest(b"/proc/self/fd/%d/%s" % (dfd, name) if name else b"/proc/self/fd/%d" % dfd,
                              follow=not name)
    dig = _small_digest(dfd, name) if kind == "f" and digests and st.st_size <= SMALL_FILE and name else None
    return m.RsEntry(path, kind, stat.S_IMODE(st.st_mode) | stat.S_IFMT(st.st_mode), st.st_uid, st.st_gid,
                     st.st_size if kind == "f" else 0, m.wire_time(st.st_mtime_ns), st.st_ino, st.st_nlink,
                     os.readlink(name, dir_fd=dfd) if kind == "l" else None, xattrs, dig,
                     st.st_blocks if kind == "f" else 0)


def list_tree(root_fd: int, path: bytes, exclude: Excluder | None = None,
              digests: bool = True, children_only: bool = False,
              tick: Callable[[], None] | None = None) -> tuple[bool, list[m.RsEntry]]:
    """(parent found, entries of the subtree at `path`, parents before children, names sorted;
    `children_only`: `path` and its own entries). Never follows a symlink; device nodes and
    excluded entries are left out. `tick()` is called every LIST_TICK entries and after each
    directory (the receiver keeps its link alive through it while it lists a large tree)."""
    exclude = exclude or Excluder()
    entries: list[m.RsEntry] = []
    if path:
        try:
            pdir = open_beneath(root_fd, _parent(path), os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return False, []
        name = path.rpartition(b"/")[2]
        try:
            st = os.stat(name, dir_fd=pdir, follow_symlinks=False)
        except OSError:
            os.close(pdir)
            return True, []
        if exclude.excluded(path, stat.S_ISDIR(st.st_mode)):
            os.close(pdir)  # an excluded suspect (a rename across the boundary): not replicated, as absent
            return True, []
        e = _entry(pdir, name, path, st, digests)
        if e is None:
            os.close(pdir)
            return True, []
        entries.append(e)
        if e.kind != "d":
            os.close(pdir)
            return True, entries
        try:
            top = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pdir)
        except OSError:
            os.close(pdir)
            return True, entries
        os.close(pdir)
    else:
        top = open_beneath(root_fd, b"", os.O_RDONLY | os.O_DIRECTORY)
        e = _entry(top, b"", b"", os.fstat(top), digests)
        assert e is not None
        entries.append(e)
    stack: list[tuple[int, bytes]] = [(top, path)]
    while stack:
        dfd, dpath = stack.pop()
        try:
            names = sorted(map(os.fsencode, os.listdir(dfd)), reverse=True)
            subdirs = []
            for name in reversed(names):
                child = dpath + b"/" + name if dpath else name
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                if exclude.excluded(child, is_dir):
                    continue
                e = _entry(dfd, name, child, st, digests)
                if e is None:
                    continue
                entries.append(e)
                if tick is not None and len(entries) % LIST_TICK == 0:
                    tick()
                if is_dir and not children_only:
                    subdirs.append((name, child))
            for name, child in reversed(subdirs):
                try:
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                except OSError:
                    continue
                stack.append((sub, child))
        finally:
            os.close(dfd)
        if tick is not None:
            tick()
    return True, entries


def block_digests(fd: int, block: int, ranges: list[tuple[int, int]], limit: int = m.MAX_DIGESTS) -> bytes:
    """Digests of the blocks of `ranges` (block indices) up to the end of the file, concatenated."""
    out = bytearray()
    chunk = max(block, 1 << 20) // block * block
    count = 0
    for s, e in ranges:
        b = s
        while b < e and count < limit:
            n = min(e - b, chunk // block, limit - count)
            data = os.pread(fd, n * block, b * block)
            if not data:
                return bytes(out)
            view = memoryview(data)
            for i in range(0, len(data), block):
                out += digest(view[i:i + block])
                count += 1
            view.release()
            if len(data) < n * block:
                return bytes(out)
            b += n
    return bytes(out)


# ---- secondary side ------------------------------------------------------------------------------

class ResyncApplier(Applier):
    """The receiver's Applier, plus the resync requests and the lineage of the tree it writes."""

    def __init__(self, root_fd: int, journal: Journal | None = None, generation: int | None = None,
                 on_event: Callable[..., None] | None = None, directory: str = "") -> None:
        super().__init__(root_fd)
        self.journal = journal
        self.generation = generation
        self.on_event = on_event
        self.directory = directory
        self.replies: list[m.Message] = []
        self.lenient = False
        self.failed: list[bytes] = []
        self.in_resync = False  # this stream started with RsBegin: what follows is the lineage's
        self.in_sync = False  # RsDone applied: the replica is up to date while the stream lasts
        self.bye = False  # RsBye: the primary stopped cleanly
        # Set by the stream: tells the primary this receiver is alive while one request keeps it
        # busy (listing a tree of a million files takes longer than the replication timeout).
        self.keepalive: Callable[[], None] | None = None
        self._kept_alive = 0.0
        self._dispatch.update({
            m.RsQuery: self._rs_query, m.RsBegin: self._rs_begin, m.RsReplay: self._rs_replay,
            m.RsList: self._rs_list, m.RsHash: self._rs_hash, m.RsXattrs: self._rs_xattrs,
            m.RsReserve: self._rs_reserve, m.RsDone: self._rs_done, m.RsBye: self._rs_bye,
        })

    def _emit(self, event: str, **detail: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, dict(detail, directory=self.directory))
            except Exception:
                log.exception("resync event callback failed")

    def apply(self, op: m.Op) -> None:
        if not self.in_resync and self.journal is not None and self.journal.kind != "invalid" \
                and not isinstance(op, (m.Noop, m.RsQuery, m.RsBegin, m.RsBye)):
            # Changes from a stream that did not start with a resync: the lineage no longer holds.
            self.journal.target_invalidate("changes applied outside a resync")
        if self.lenient and isinstance(op, NS_TYPES):
            try:
                super().apply(op)
            except PathError:
                raise
            except OSError as exc:
                log.info("replayed %s failed on the replica (%s): compared afterwards", type(op).__name__, exc)
                if len(self.failed) < 60000:
                    self.failed.extend(_op_paths(op))
            return
        super().apply(op)

    def _rs_query(self, op: m.RsQuery) -> None:
        j = self.journal
        sync, suspects = j.lineage_with_suspects() if j is not None else (None, [])
        while suspects and sum(len(p) + 3 for p in suspects) > SUSPECTS_BYTES:
            suspects = coarsen(suspects, len(suspects) // 2)  # must fit one frame
        if suspects == [b""]:
            sync, suspects = None, []  # everything is suspect: nothing to claim
        self.replies.append(m.RsState(op.req, sync, self.generation, (j.reason if j else "no journal")[:200],
                                      suspects))

    def _rs_begin(self, op: m.RsBegin) -> None:
        if self.journal is not None:
            self.journal.target_invalidate(f"{op.mode} resync in progress")
        self.in_resync = True
        self._emit("resync_started", mode=op.mode)

    def _rs_replay(self, op: m.RsReplay) -> None:
        if not op.end:
            self.lenient, self.failed = True, []
            return
        self.lenient = False
        failed = sorted(set(self.failed))
        self.failed = []
        total = 0
        keep = []
        for p in failed:  # bounded by the frame: beyond, the whole tree is compared
            total += len(p) + 8
            if total > ENTRIES_BYTES:
                keep = [b""]
                break
            keep.append(p)
        self.replies.append(m.RsReplayed(op.req, keep))

    def _tick(self) -> None:
        now = time.monotonic()
        if self.keepalive is not None and now - self._kept_alive >= KEEPALIVE_EVERY:
            self._kept_alive = now
            self.keepalive()

    def _rs_list(self, op: m.RsList) -> None:
        # Synchronous on purpose (what follows in the stream must not be applied before the tree
        # is listed): the link is kept alive from inside the walk instead.
        found, entries = list_tree(self.root, op.path, Excluder(list(op.exclude)), not op.children, op.children,
                                   tick=self._tick)
        batch: list[m.RsEntry] = []
        size = 0
        for e in entries:
            w = len(e.path) + len(e.target or b"") + 96
            if batch and (size + w > ENTRIES_BYTES or len(batch) >= 8192):
                self.replies.append(m.RsEntries(op.req, found, batch, last=False))
                batch, size = [], 0
            batch.append(e)
            size += w
        self.replies.append(m.RsEntries(op.req, found, batch, last=True))

    def _rs_hash(self, op: m.RsHash) -> None:
        try:
            fd = open_regular(self.root, op.path, os.O_RDONLY)
        except (OSError, PathError):
            self.replies.append(m.RsDigests(op.req, -1))
            return
        try:
            ranges = _pairs(op.ranges)
            self.replies.append(m.RsDigests(op.req, os.fstat(fd).st_size, block_digests(fd, op.block, ranges)))
        finally:
            os.close(fd)

    def _rs_xattrs(self, op: m.RsXattrs) -> None:
        pfd = open_beneath(self.root, op.path, os.O_PATH | os.O_NOFOLLOW)
        try:
            target = proc_path(pfd)
            keep = set(op.keep)
            for name in os.listxattr(target):
                if os.fsencode(name) not in keep:
                    try:
                        os.removexattr(target, name)
                    except OSError as exc:
                        if exc.errno not in (errno.ENODATA, errno.EPERM, errno.EOPNOTSUPP):
                            raise
        finally:
            os.close(pfd)

    def _rs_reserve(self, op: m.RsReserve) -> None:
        fd = self._fd(op.hid)
        ranges = _pairs(op.ranges)
        if len(op.ranges) % 2 or any(s >= e for s, e in ranges):
            raise m.ProtocolError("RsReserve ranges must be pairs of start < end")
        for s, e in ranges:
            try:
                fallocate(fd, FALLOC_FL_KEEP_SIZE, s, e - s)
            except OSError as exc:
                # Only allocation is at stake, never content: the replica stays identical.
                log.warning("cannot reserve %d bytes at %d of a file on the replica (%s): its content is "
                            "the same, but writes there after a failover may find the disk full",
                            e - s, s, exc.strerror or exc)
                return

    def _rs_done(self, op: m.RsDone) -> None:
        fd = open_beneath(self.root, b"", os.O_RDONLY | os.O_DIRECTORY)
        try:
            syncfs(fd)  # the new lineage is recorded only once the tree it names is durable
        finally:
            os.close(fd)
        if self.journal is not None:
            self.journal.target_done(op.sync, op.generation if op.generation is not None else self.generation,
                                     op.exclude)
        self.in_sync = True
        self._emit("resync_done", lineage=op.sync.hex())

    def _rs_bye(self, op: m.RsBye) -> None:
        self.bye = True


# ---- primary side --------------------------------------------------------------------------------

class TokenBucket:
    """Bytes per second with a small burst; None: no cap."""

    def __init__(self, rate: float | None, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(256 * 1024, (rate or 0) * 0.1)
        self.tokens = self.burst
        self.at = time.monotonic()

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


@dataclass
class Progress:
    mode: str
    started: float = field(default_factory=time.time)
    phase: str = "query"
    bytes_total: int = 0  # bytes to send or compare (marked blocks within the files)
    bytes_done: int = 0
    bytes_sent: int = 0  # file data actually sent
    digests_received: int = 0
    files_total: int = 0
    files_done: int = 0
    namespace_ops: int = 0
    entries_listed: int = 0
    cap: float | None = None

    def snapshot(self) -> dict[str, Any]:
        """The totals are estimated when the data phase starts; the application's writes meanwhile
        add to the work or take from it. Past the estimate, the total shown follows what is done
        and the ETA is unknown (None), never 0 while work goes on; `finish()` sets the totals to
        what was done."""
        elapsed = max(time.time() - self.started, 1e-6)
        rate = self.bytes_done / elapsed
        left = self.bytes_total - self.bytes_done
        return {
            "mode": self.mode, "phase": self.phase, "started_at": self.started, "elapsed": round(elapsed, 3),
            "bytes_total": max(self.bytes_total, self.bytes_done), "bytes_done": self.bytes_done,
            "bytes_sent": self.bytes_sent, "files_total": max(self.files_total, self.files_done),
            "files_done": self.files_done, "namespace_ops": self.namespace_ops,
            "entries_listed": self.entries_listed, "digests_received": self.digests_received,
            "rate_bytes_per_s": round(rate),
            "eta_seconds": round(left / rate, 1) if rate > 0 and left > 0 and self.phase == "data" else None,
            "bandwidth_cap_bytes_per_s": self.cap,
        }

    def finish(self) -> None:
        """The resync is done: its totals are what it did (the estimate may have been above it,
        when the application truncated or deleted what was to be sent)."""
        self.phase = "done"
        self.bytes_total, self.files_total = self.bytes_done, self.files_done


class MirrorReplicator:
    """The primary's replicator: journal (alone), resync, then synchronous replication (live).
    See the module docstring; the FUSE layer's contract is in replicator.py."""

    active = True

    def __init__(self, journal: Journal, exclude: Excluder | None = None, *, block: int | None = None,
                 bandwidth: float | None = None, generation: int | None = None,
                 on_event: Callable[..., None] | None = None, hold_limit: float | None = None) -> None:
        self.journal = journal
        self.exclude = exclude or Excluder()
        self.block = block or journal.block
        self.bucket = TokenBucket(bandwidth)
        self.generation = generation
        self.on_event = on_event
        self.epoch = 0
        self.sender: Sender | None = None
        self.mode = "alone"
        self.phase = ""
        self.root = -1
        self.progress: Progress | None = None
        self.last_resync: dict[str, Any] | None = None
        self._hids: dict[int, bytes | None] = {}
        self._gate = asyncio.Event()
        self._gate.set()
        self._tokens: set[int] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._req = itertools.count(1)
        self._waiting: dict[int, tuple[list[m.Message], asyncio.Future[list[m.Message]]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._known_paths: set[bytes] = set()  # paths the replayed log touched (hard link search)
        self.lost_event = asyncio.Event()
        self.live_at: float | None = None  # monotonic time the current connection went live
        self.last_live_seconds: float | None = None  # how long the last lost connection was live (None: never)
        # The secondary ended the last lost connection itself, refusing a change (its disk full...):
        # retrying at once would only repeat the resync and the refusal.
        self.last_refused = False
        # Activity log while live (journal.py): the current epoch (its paths: `_al_paths`).
        self._al_epoch = 0
        self._al_wake = asyncio.Event()
        self._al_task: asyncio.Task[None] | None = None
        # Holding writes (module docstring): changes the peer does not have are acknowledged only
        # once it can no longer count itself an up-to-date secondary without them.
        self.hold_limit = hold_limit
        self._released = asyncio.Event()
        self._released.set()
        self.held_since: float | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        self._refusing = False  # leaving the primary role: held writes fail instead (refuse_held_writes)

    # ---- plumbing ----

    def bind(self, root_fd: int) -> None:
        """The directory descriptor the FUSE layer uses (duplicated: ours outlives the mount's)."""
        self.root = os.dup(root_fd)

    @property
    def state(self) -> State:
        return self.journal.state

    @property
    def journaling(self) -> bool:
        """Tell me before each change (see replicator.py): while alone with a journal worth keeping,
        during a resync until the data phase (for the namespace gate and the marks), and while live
        for the activity log (the paths about to change)."""
        if self.mode == "alone":
            return self.journal.authoritative
        if self.mode == "live":
            return self.journal.kind == "session" and self.journal.path is not None
        return self.mode == "resync" and self.phase not in ("data", "done")

    @property
    def _disk(self) -> bool:
        return self.journal.authoritative and self.mode != "live"

    def _emit(self, event: str, **detail: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, **detail)
            except Exception:
                log.exception("replication event callback failed")

    def status(self) -> dict[str, Any]:
        s = self.sender
        return {
            "connected": s is not None, "mode": self.mode, "dirty": self.mode != "live",
            "bytes_sent": s.stats.bytes_sent if s else 0, "inflight": s.inflight_bytes if s else 0,
            "lag": s.lag_seconds() if s else None,
            "resync": self.progress.snapshot() if self.progress is not None and self.mode == "resync" else None,
            "last_resync": self.last_resync, "journal": self.journal.describe(),
            "writes_held": None if self.held_since is None else round(time.monotonic() - self.held_since, 3),
        }

    # ---- holding writes ----

    def hold_writes(self, why: str) -> None:
        """From now on, a change the peer does not have is acknowledged only after release_writes()."""
        if self.held_since is not None:
            return
        self._released.clear()
        self.held_since = time.monotonic()
        if self.hold_limit is not None:
            self._hold_timer = asyncio.get_running_loop().call_later(self.hold_limit, self._hold_expired)
        log.warning("holding the application's writes: %s", why)
        self._emit("holding", reason=why)

    def release_writes(self, why: str) -> None:
        if self.held_since is None:
            return
        held = time.monotonic() - self.held_since
        self.held_since = None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._released.set()
        log.info("writes released after %.2f s: %s", held, why)
        self._emit("released", reason=why, seconds=round(held, 3))

    def refuse_held_writes(self, why: str) -> None:
        """The module leaves the primary role (its node yields to a peer with newer data, or stops):
        what is held, and any later change, fails with EIO rather than being acknowledged, since this
        node's copy is about to be replaced by the peer's."""
        if self.held_since is None or self._refusing:
            return
        self._refusing = True
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._released.set()
        log.warning("held writes refused (EIO): %s", why)
        self._emit("refused", reason=why)

    def _hold_expired(self) -> None:
        self._hold_timer = None
        self.release_writes(f"held {self.hold_limit:g} s (hold_limit): writes go on, journaled for the resync")

    async def _unless_held(self) -> None:
        """The end of every acknowledgement that did not wait for the peer."""
        if self.held_since is not None:
            await self._released.wait()
            if self._refusing:
                raise FUSEError(errno.EIO)

    # ---- intents (write-ahead) ----

    async def intend_write(self, path: bytes, off: int, length: int, extends: bool = False) -> None:
        if self.mode == "live":
            await self._note_active((path,))
            return
        b = self.block
        s, e = off // b, (INF if extends else _ceil(off + length, b))
        if self.state.add_data(path, s, e) and self._disk:
            self.journal.append(RMarks(path, [s, e]))
        if self._disk:
            await self.journal.commit()  # also when already marked: that mark may not be durable yet

    async def intend_meta(self, path: bytes, size: int | None = None) -> None:
        if self.mode == "live":
            await self._note_active((path,))
            return
        new = self.state.add_meta(path)
        data: list[int] = []
        if size is not None and self.state.add_data(path, size // self.block, INF):
            data = [size // self.block, INF]
            new = True
        if new and self._disk:
            self.journal.append(RMarks(path, data, meta=True))
        if self._disk:
            await self.journal.commit()

    def marked(self, path: bytes) -> bool:
        """Something of `path` is still to be sent to the secondary (never while live)."""
        mk = self.state.marks.get(path)
        return self.mode != "live" and mk is not None and not mk.empty

    def marked_under(self, top: bytes) -> list[bytes]:
        """The paths below directory `top` with something still to send (never while live)."""
        if self.mode == "live":
            return []
        prefix = top + b"/"
        return [p for p, mk in self.state.marks.items() if p.startswith(prefix) and not mk.empty]

    async def carry_marks(self, victim: bytes, others: list[bytes]) -> None:
        """`victim` is about to lose this name (unlink, rename over it) while its file keeps
        `others`: what is marked to send for it is marked for them too, or it would go with the
        name (the replica's other names still share the old data). Made durable before the
        change, like an intent."""
        if victim not in self.state.marks or self.mode == "live":
            return
        for p in others:
            if self.state.share_marks(victim, p) and self._disk:
                self.journal.append(marks_record(self.state.marks[p]))
        if self._disk:
            await self.journal.commit()

    async def intend_ns(self, *paths: bytes) -> None:
        prev = PENDING.get()
        if prev is not None:
            # This request's earlier intent, whose names moved while it was made (fusefs._settled):
            # nothing was done under them. Settled now: a replay waiting for every intent to end
            # would otherwise wait for it, while this request waits for the replay.
            PENDING.set(None)
            self.settle(prev)
        while not self._gate.is_set():  # a resync is replaying the namespace: wait for it
            await self._gate.wait()
        if self.mode == "live":
            await self._note_active(_activity_paths(paths))
            return
        if not self.journaling:
            return
        tok = self.journal.new_id()
        self.state.pending[tok] = list(paths)
        self._tokens.add(tok)
        self._idle.clear()
        PENDING.set(tok)
        if self._disk:
            self.journal.append(RPending(tok, list(paths)))
            await self.journal.commit()

    async def _note_active(self, paths: tuple[bytes, ...]) -> None:
        """Activity log: `paths` are recorded in the current epoch, durably, before the change.
        Also waits when another request recorded them and its record is not on disk yet. If the
        epoch moved on meanwhile (it may close without this change), they go in the new one."""
        j = self.journal
        while True:
            epoch = self._al_epoch
            new = [p for p in paths if not self._al_covers(p)]
            if new:
                j.note_active(epoch, new)
                if len(self._al_paths) > AL_MAX_PATHS:
                    self._al_wake.set()  # close this epoch early: it bounds what a crash leaves to compare
            await j.commit()  # at once when everything appended is durable
            if self._al_epoch == epoch:
                return

    @property
    def _al_paths(self) -> set[bytes]:
        """The paths recorded in the current epoch (held by the journal's activity log)."""
        return self.journal.active.get(self._al_epoch, set())

    def _al_covers(self, path: bytes) -> bool:
        """`path` or a directory above it is recorded in the current epoch."""
        seen = self._al_paths
        if path in seen or b"" in seen:
            return True
        while b"/" in path:
            path = path.rpartition(b"/")[0]
            if path in seen:
                return True
        return False

    async def _activity_epochs(self, sender: Sender) -> None:
        """Closes activity-log epochs while live: soon after the session starts (until then a
        crash claims nothing), then every AL_INTERVAL seconds that saw changes, or sooner when an
        epoch grows past AL_MAX_PATHS. Closing epoch e: start e+1, wait until every operation sent
        so far is applied on the secondary, sync our file system, record `closed e`."""
        delay = AL_FIRST
        while self.sender is sender and self.mode == "live":
            try:
                async with asyncio.timeout(delay):
                    await self._al_wake.wait()
            except TimeoutError:
                pass
            self._al_wake.clear()
            if delay == AL_INTERVAL and not self._al_paths:
                continue  # nothing changed since the last close
            epoch = self._al_epoch
            self._al_epoch = epoch + 1
            if not await sender.barrier():
                return  # the link is lost: the journal takes over (alone_from_session)
            if not await asyncio.to_thread(self._sync_tree):
                continue  # epoch stays open (its paths stay suspect) until a later close covers it
            if self.sender is not sender or self.mode != "live":
                return
            self.journal.close_epoch(epoch)  # closes every earlier epoch too
            await self.journal.commit()
            delay = AL_INTERVAL

    def _sync_tree(self) -> bool:
        try:
            dfd = open_beneath(self.root, b"", os.O_RDONLY | os.O_DIRECTORY)
            try:
                syncfs(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            log.warning("activity log: cannot sync the tree (%s): epochs stay open (a crash compares more)", exc)
            return False
        return True

    def _stop_activity_log(self) -> None:
        if self._al_task is not None and self._al_task is not asyncio.current_task():
            self._al_task.cancel()
        self._al_task = None

    def settle(self, tok: int) -> None:
        """The change of intent `tok` did not happen (or was not replicated)."""
        if self.state.pending.pop(tok, None) is not None and self._disk:
            self.journal.append(RSettle(tok))
        self._token_done(tok)

    def _token_done(self, tok: int) -> None:
        self._tokens.discard(tok)
        if not self._tokens:
            self._idle.set()

    # ---- the FUSE layer's changes ----

    async def submit(self, *ops: m.Op) -> None:
        tok = PENDING.get()
        if tok is not None:
            PENDING.set(None)
        if self.mode == "live" or (self.mode == "resync" and self.phase in ("data", "done")):
            if tok is not None:
                self.state.pending.pop(tok, None)
                self._token_done(tok)
            send = self._route(ops) if self.mode == "resync" else self._track(ops)
            sender = self.sender
            if sender is not None and send and await sender.submit(*send):
                return
            if sender is None or send:
                await self._after_loss(ops)
            await self._unless_held()  # only marked (a resync sends them later), or the link lost
            return
        self._track_hids(ops)
        if self.mode == "resync" or self.journal.authoritative:
            if self._journal_ops(ops, tok) and self._disk:
                await self.journal.commit()
        elif tok is not None:
            self._token_done(tok)
        await self._unless_held()

    def _track_hids(self, ops: tuple[m.Op, ...] | list[m.Op]) -> None:
        for op in ops:
            self._track_hid(op)

    def _track_hid(self, op: m.Op) -> None:
        hids = self._hids
        if isinstance(op, m.Open):
            hids[op.hid] = op.path
        elif isinstance(op, m.Create):
            if op.hid is not None:
                hids[op.hid] = op.path
        elif isinstance(op, m.Close):
            hids.pop(op.hid, None)
        elif isinstance(op, m.Rename) and hids:
            a, b = op.old, op.new
            for h, p in hids.items():
                if p is None:
                    continue
                if p == a or p.startswith(a + b"/"):
                    hids[h] = b + p[len(a):]
                elif op.flags & 2 and (p == b or p.startswith(b + b"/")):
                    hids[h] = a + p[len(b):]
                elif p == b or p.startswith(b + b"/"):
                    hids[h] = None  # replaced: the open file has no name any more
        elif isinstance(op, (m.Unlink, m.Rmdir, m.Remove)) and hids:
            for h, p in hids.items():
                if p is not None and (p == op.path or p.startswith(op.path + b"/")):
                    hids[h] = None

    def _track(self, ops: tuple[m.Op, ...]) -> tuple[m.Op, ...]:
        self._track_hids(ops)
        return ops

    def _path_of(self, op: m.Op) -> bytes | None:
        hid = getattr(op, "hid", None)
        if hid is not None and hid in self._hids:
            return self._hids[hid]
        return getattr(op, "path", None)

    def _journal_ops(self, ops: tuple[m.Op, ...], tok: int | None) -> bool:
        """Record `ops` (applied locally) in the journal; True if something new must be made
        durable before the call returns (a change that came without its intent)."""
        st, b = self.state, self.block
        need = False
        ns: list[m.Op] = []
        for op in ops:
            if isinstance(op, NS_TYPES):
                st.apply_ns(op)
                rf = replay_form(op)
                if rf is not None:
                    ns.append(rf)
                continue
            path = self._path_of(op)
            if path is None:
                continue
            changed = False
            if isinstance(op, m.Write):
                changed = st.add_data(path, op.off // b, _ceil(op.off + len(op.data), b))
            elif isinstance(op, m.Fallocate):
                changed = st.add_data(path, op.off // b, _ceil(op.off + op.length, b))
            elif isinstance(op, m.SetAttr):
                changed = st.add_meta(path)
                if op.size is not None:
                    changed |= st.add_data(path, op.size // b, INF)
            elif isinstance(op, (m.SetXattr, m.RemoveXattr)):
                changed = st.add_meta(path)
            if changed:
                need = True
                self.journal.append(marks_record(st.marks[path]))
        if tok is not None:
            self.state.pending.pop(tok, None)
            self.journal.append(ROps(tok, ns))
            self._token_done(tok)
        elif ns:
            self.journal.append(ROps(0, ns))
            need = True
        return need

    def _route(self, ops: tuple[m.Op, ...]) -> list[m.Op]:
        """Data phase: which of `ops` go to the secondary now (module docstring, the invariant)."""
        st, b = self.state, self.block
        out: list[m.Op] = []
        for op in ops:
            self._track_hid(op)
            if isinstance(op, (m.Write, m.Fallocate)):
                path = self._path_of(op)
                mk = st.marks.get(path) if path is not None else None
                if mk is not None:
                    length = len(op.data) if isinstance(op, m.Write) else op.length
                    s, e = op.off // b, _ceil(op.off + length, b)
                    if mk.covered(s, e):
                        continue  # the resync reads these blocks later, this write included
                    for a, z in mk.cmp.within(s, e):
                        mk.data.add(a, z)
                    mk.cmp.remove(s, e)
                    mk.fresh.remove(s, e)
            elif isinstance(op, m.SetAttr) and op.size is not None:
                path = self._path_of(op)
                mk = st.marks.get(path) if path is not None else None
                if mk is not None:
                    k = op.size // b
                    for a, z in mk.cmp.within(k, INF):
                        mk.data.add(a, z)
                    mk.cmp.remove(k, INF)
                    mk.fresh.add(_ceil(op.size, b), INF)
            elif isinstance(op, NS_TYPES):
                st.apply_ns(op, log_it=False)
            out.append(op)
        return out

    async def _after_loss(self, ops: tuple[m.Op, ...]) -> None:
        """`ops` were applied here but the link was lost before the peer had them."""
        if self.mode != "alone" or not self.journal.authoritative:
            return
        self._record_unacked(ops)
        await self.journal.commit()

    def _unacked_state(self, ops: list[m.Op] | tuple[m.Op, ...]) -> State:
        """What operations the peer may or may not have applied leave uncertain: their data blocks
        and metadata are marked, their namespace paths become suspects (compared at the resync)."""
        tmp, b = State(), self.block
        for op in ops:
            if isinstance(op, NS_TYPES):
                for p in _op_paths(op):
                    tmp.add_suspect(p)
                continue
            path = self._path_of(op)
            if path is None:
                continue
            if isinstance(op, m.Write):
                tmp.add_data(path, op.off // b, _ceil(op.off + len(op.data), b))
            elif isinstance(op, m.Fallocate):
                tmp.add_data(path, op.off // b, _ceil(op.off + op.length, b))
            elif isinstance(op, m.SetAttr):
                tmp.add_meta(path)
                if op.size is not None:
                    tmp.add_data(path, op.size // b, INF)
            elif isinstance(op, (m.SetXattr, m.RemoveXattr)):
                tmp.add_meta(path)
        return tmp

    def _record_unacked(self, ops: list[m.Op] | tuple[m.Op, ...]) -> None:
        tmp = self._unacked_state(ops)
        st = self.state
        for mk in tmp.marks.values():
            cur = st.mark(mk.path)
            cur.data.update(mk.data)
            cur.meta |= mk.meta
            self.journal.append(marks_record(cur))
        for p in tmp.suspects:
            if st.add_suspect(p):
                self.journal.append(RSuspect(p))

    # ---- the link ----

    def attach(self, sender: Sender) -> None:
        sender.on_lost = self._lost
        sender.on_reply = self._on_reply
        self.sender = sender
        self.epoch += 1  # the new peer holds none of our handles open
        self.lost_event.clear()
        self.mode, self.phase = "resync", "query"
        self.progress = None  # until the secondary answered and the mode is known
        self._task = asyncio.create_task(self._resync(sender), name="resync")

    def detach(self) -> Sender | None:
        sender, self.sender = self.sender, None
        self.epoch += 1
        self._stop_activity_log()
        return sender

    def _lost(self, reason: str, unacked: list[m.Op]) -> None:
        if self.sender is None:
            return
        self.sender = None
        self.last_live_seconds = None if self.live_at is None else time.monotonic() - self.live_at
        self.last_refused = reason.startswith("receiver error")
        self.live_at = None
        self.epoch += 1
        self._stop_activity_log()
        if self.mode == "live":
            self.hold_writes(f"the replication link to the up-to-date secondary was lost ({reason}): until "
                             "the module marks that copy out of date")
            tmp = self._unacked_state(unacked)
            self.journal.alone_from_session(tmp.marks.values(), tmp.suspects)
            if self.journal.authoritative:
                asyncio.get_running_loop().create_task(self.journal.commit())
        elif self.mode == "resync":
            self._abort_resync()
        self.mode, self.phase = "alone", ""
        self.lost_event.set()
        self._emit("lost", reason=reason)

    def _abort_resync(self) -> None:
        for _, fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(LinkLost())
        self._waiting.clear()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        self._gate.set()
        if self.progress is not None:
            self.last_resync = dict(self.progress.snapshot(), result="interrupted")

    def _on_reply(self, msg: m.Message) -> None:
        entry = self._waiting.get(msg.req)  # type: ignore[union-attr]
        if entry is None:
            raise m.ProtocolError(f"unexpected {type(msg).__name__} for request {msg.req}")  # type: ignore[union-attr]
        got, fut = entry
        got.append(msg)
        if not isinstance(msg, m.RsEntries) or msg.last:
            del self._waiting[msg.req]  # type: ignore[union-attr]
            if not fut.done():
                fut.set_result(got)

    def _send(self, *ops: m.Op) -> None:
        sender = self.sender
        if sender is None:
            raise LinkLost()
        for op in ops:
            if sender.send(op) == 0:
                raise LinkLost()

    def _ask(self, make: Callable[[int], m.Op]) -> asyncio.Future[list[m.Message]]:
        req = next(self._req)
        fut: asyncio.Future[list[m.Message]] = asyncio.get_running_loop().create_future()
        self._waiting[req] = ([], fut)
        self._send(make(req))
        return fut

    async def _room(self) -> None:
        sender = self.sender
        if sender is None or not await sender.room():
            raise LinkLost()

    async def _barrier(self) -> None:
        sender = self.sender
        if sender is None or not await sender.barrier():
            raise LinkLost()

    # ---- the resync ----

    async def _resync(self, sender: Sender) -> None:
        try:
            await self._run_resync()
        except (LinkLost, asyncio.CancelledError):
            pass
        except Exception as exc:  # a bug or a local I/O error: drop the link, the next try starts over
            log.exception("resync failed")
            if self.sender is sender:
                sender._lose(f"resync failed: {type(exc).__name__}: {exc}")
        finally:
            self._gate.set()

    async def _run_resync(self) -> None:
        [reply] = await self._ask(lambda req: m.RsQuery(0, req))
        assert isinstance(reply, m.RsState)
        j = self.journal
        same = j.trusted and reply.sync is not None and reply.sync == j.sync
        # The trees equal each other under the exclusion patterns of their lineage: under others
        # they may differ wherever the two sets disagree (a directory no longer excluded was never
        # sent). Patterns not recorded (an older journal) are taken as unchanged.
        patterns_changed = j.exclude is not None and sorted(j.exclude) != sorted(self.exclude.patterns)
        theirs = _valid_suspects(reply.suspects) if same and not patterns_changed else []
        if theirs is None or patterns_changed:
            same, theirs = False, []
        mode = "journal" if same else "checksum"
        if same and theirs:
            why = (f"journal trusted, secondary at its base lineage except {len(theirs)} path(s) it had in "
                   "flight when it crashed as primary")
        elif same:
            why = "journal trusted, secondary at its base lineage"
        elif patterns_changed:
            why = (f"exclusion patterns changed since lineage {j.sync.hex()[:8] if j.sync else '?'} "
                   f"({j.exclude} -> {sorted(self.exclude.patterns)})")
        else:
            why = (f"journal: {j.reason if not j.trusted else 'trusted'}; secondary: "
                   f"{'lineage ' + reply.sync.hex()[:8] if reply.sync else reply.detail or 'no lineage'}")
        if reply.generation is not None and j.generation is not None and reply.generation != j.generation:
            log.warning("resync: secondary at generation %x, journal based on %x (lineage %s)",
                        reply.generation, j.generation, "matches" if same else "differs")
        self.progress = prog = Progress(mode, cap=self.bucket.rate)
        log.info("resync (%s): %s", mode, why)
        self._emit("resync_started", mode=mode, reason=why)
        new_sync = os.urandom(16)
        self.phase = "begin"
        self._send(m.RsBegin(0, mode, new_sync))
        await self._barrier()
        # The secondary forgot its lineage: the journal on disk describes nothing useful any more;
        # its in-memory state is this resync's work list.
        j.invalidate(f"{mode} resync in progress", keep_state=(mode == "journal"))
        prog.phase = self.phase = "replay"
        self._gate.clear()
        await self._idle.wait()  # namespace changes already past the gate finish first
        st = self.state
        st.settle_pending()
        if mode == "journal":
            log_ops, st.log = st.log, []
            prog.namespace_ops = len(log_ops)
            self._known_paths = {p for op in log_ops for p in _op_paths(op)}
            fut: asyncio.Future[list[m.Message]] | None = None
            self._send(m.RsReplay(0, 0))
            for i, op in enumerate(log_ops):
                self._send(op)
                if i % 256 == 255:
                    await self._room()
            fut = self._ask(lambda req: m.RsReplay(0, req, end=True))
            [done] = await fut
            assert isinstance(done, m.RsReplayed)
            for p in done.failed:
                st.add_suspect(p)
            for p in theirs:  # the secondary's activity log: compared like our own suspects
                st.add_suspect(p)
        else:
            st.log = []
            st.suspects = {b""}
        prog.phase = self.phase = "reconcile"
        await self._reconcile_all()
        await self._estimate()
        prog.phase = self.phase = "data"
        # Handles opened or created since the connection had their Open journaled, not sent: a new
        # epoch makes the FUSE layer send an Open before their next operation.
        self.epoch += 1
        self._gate.set()
        await self._drain()
        prog.finish()
        self.phase = "done"
        patterns = sorted(self.exclude.patterns)
        self._send(m.RsDone(0, new_sync, self.generation, patterns))
        await self._barrier()
        j.start_session(new_sync, self.generation, patterns)
        self.mode, self.phase = "live", ""
        self.release_writes("the resync is done: the secondary has every change")
        self.live_at = time.monotonic()
        self._al_epoch = 0  # start_session emptied the journal's activity log
        if self.sender is not None:
            self._al_task = asyncio.create_task(self._activity_epochs(self.sender), name="activity-log")
        snap = prog.snapshot()
        self.last_resync = dict(snap, result="done", finished_at=time.time())
        log.info("resync (%s) done in %.2f s: %d bytes sent, %d files", mode, snap["elapsed"], prog.bytes_sent,
                 prog.files_done)
        self._emit("resync_done", mode=mode, seconds=snap["elapsed"], bytes_sent=prog.bytes_sent,
                   files=prog.files_done)

    # -- phase A: namespace --

    async def _reconcile_all(self) -> None:
        st = self.state
        done: list[bytes] = []
        while st.suspects:
            tops = sorted(st.suspects)
            st.suspects = set()
            in_doubt = set(tops)
            for p in tops:
                if any(p == d or p.startswith(d + b"/") or not d for d in done):
                    continue
                directory = entries_dir(p)
                if directory is not None:
                    await self._reconcile_entries(directory, in_doubt)
                    continue
                top = await self._reconcile(p)
                done.append(top)
                if top:  # the change in doubt also changed its directory's times: resend them
                    st.add_meta(_parent(top))

    async def _reconcile_entries(self, directory: bytes, suspects: set[bytes]) -> None:
        """Only the entries of `directory` are in doubt (journal.entries_of): one present on one
        side only, or of another kind (or symlink target) there, becomes a suspect of its own, its
        subtree reconciled in the next round; an entry on both sides is compared only if it is a
        suspect itself (what it holds changed on one side). A new name of a file with several
        names, or `directory` not a directory on both sides: its whole subtree instead."""
        found, theirs, ours_found, ours = await self._list_both(directory, children=True)
        tmap = {e.path: e for e in theirs}
        omap = {e.path: e for e in ours}
        t_top, o_top = tmap.pop(directory, None), omap.pop(directory, None)
        if not (found and ours_found) or t_top is None or o_top is None or t_top.kind != "d" or o_top.kind != "d":
            self.state.add_suspect(directory)
            return
        differ = sorted(p for p in tmap.keys() | omap.keys()
                        if p not in tmap or p not in omap or tmap[p].kind != omap[p].kind
                        or tmap[p].target != omap[p].target)
        if any(omap[p].kind == "f" and omap[p].nlink > 1 for p in differ + sorted(suspects & omap.keys())
               if p in omap):
            self.state.add_suspect(directory)  # its other names are found in one subtree (_other_names)
            return
        for p in differ:
            self.state.add_suspect(p)
        self.state.add_meta(directory)

    async def _list_both(self, path: bytes, children: bool = False
                         ) -> tuple[bool, list[m.RsEntry], bool, list[m.RsEntry]]:
        """The secondary's listing of `path` and ours (list_tree; `children`: one level, no
        content digests), each with whether its parent was found; counted in the progress."""
        excl = list(self.exclude.patterns)
        replies = await self._ask(lambda req: m.RsList(0, req, path, excl, children=children))
        found = all(r.found for r in replies)  # type: ignore[union-attr]
        theirs = [e for r in replies for e in r.entries]  # type: ignore[union-attr]
        ours_found, ours = await asyncio.to_thread(list_tree, self.root, path, self.exclude, not children, children)
        if self.progress is not None:
            self.progress.entries_listed += len(theirs) + len(ours)
        return found, theirs, ours_found, ours

    async def _reconcile(self, path: bytes) -> bytes:
        """Make the secondary's subtree at `path` match ours in structure; mark what to compare.
        Returns the path actually reconciled (a parent when `path`'s is missing on either side)."""
        while True:
            found, theirs, ours_found, ours = await self._list_both(path)
            if (found and ours_found) or not path:
                break
            path = _parent(path)
        ops = self._compare_trees(path, theirs, ours, self._other_names(path, ours))
        for i, op in enumerate(ops):
            self._send(op)
            if i % 256 == 255:
                await self._room()
        return path

    def _other_names(self, top: bytes, ours: list[m.RsEntry]) -> dict[bytes, bytes]:
        """Files of the subtree with more names than it holds: another name outside it, among the
        paths the journal knows (a link made just before a crash is a suspect on its own)."""
        counts: dict[int, int] = {}
        for o in ours:
            if o.kind == "f" and o.nlink > 1:
                counts[o.ino] = counts.get(o.ino, 0) + 1
        lonely = {o.ino: o.path for o in ours if o.kind == "f" and o.nlink > counts.get(o.ino, 0) and o.ino in counts}
        if not lonely:
            return {}
        out: dict[bytes, bytes] = {}
        suspects = self.state.suspects
        for cand in sorted(set(self.state.marks) | self._known_paths):
            if not cand or cand == top or cand.startswith(top + b"/") or not top \
                    or any(cand == s or cand.startswith(s + b"/") for s in suspects):
                continue
            st = self._lstat(cand)
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_ino in lonely:
                out[lonely.pop(st.st_ino)] = cand
                if not lonely:
                    break
        return out

    def _compare_trees(self, top: bytes, theirs: list[m.RsEntry], ours: list[m.RsEntry],
                       outside: dict[bytes, bytes] | None = None) -> list[m.Op]:
        st, b = self.state, self.block
        tmap = {e.path: e for e in theirs if not self.exclude.excluded(e.path, e.kind == "d") or not e.path}
        omap = {e.path: e for e in ours}
        ops: list[m.Op] = []
        removed: list[bytes] = []

        def gone(p: bytes) -> bool:
            return any(p == r or p.startswith(r + b"/") for r in removed)

        for o_dir, t_dir in _renamed_dirs(tmap, omap):
            # Renamed there rather than removed and sent again: what it holds is then compared
            # under its new name like anything else (block by block, metadata, removals). Its new
            # parents are made first; a pair an earlier rename made moot is left out.
            missing, q = [], _parent(o_dir)
            while q not in tmap and q and q in omap:
                missing.append(q)
                q = _parent(q)
            oq = omap.get(q)
            if o_dir in tmap or t_dir not in tmap or q not in tmap or tmap[q].kind != "d" or oq is None or oq.kind != "d":
                continue
            for a in reversed(missing):
                o = omap[a]
                ops.append(m.Mkdir(0, a, o.mode, o.uid, o.gid))
                st.add_meta(a)  # xattrs, and its times once its entries are made
                tmap[a] = o  # there now, as ours
            ops.append(m.Rename(0, t_dir, o_dir))
            for p in [x for x in tmap if x == t_dir or x.startswith(t_dir + b"/")]:
                new = o_dir + p[len(t_dir):]
                tmap[new] = msgspec.structs.replace(tmap.pop(p), path=new)
        moved = _renamed_files(tmap, omap)  # our path -> the replica's path it was probably renamed from
        keep = set(moved.values())
        linked_apart = _linked_apart(tmap, omap)
        for p in sorted(tmap):
            if not p or gone(p) or p in keep:
                continue
            t, o = tmap[p], omap.get(p)
            if o is None or o.kind != t.kind or (t.kind == "l" and t.target != o.target) or p in linked_apart:
                ops.append(m.Remove(0, p))
                removed.append(p)
                st._drop(p, True)
        groups: dict[int, list[bytes]] = {}
        for o in ours:
            if o.kind == "f" and o.nlink > 1:
                groups.setdefault(o.ino, []).append(o.path)
        carrier = {p: g[0] for g in groups.values() for p in g[1:]}
        for first, other in (outside or {}).items():  # linked to a name outside this subtree
            for p in groups.get(next(o.ino for o in ours if o.path == first), []):
                carrier[p] = other
        created: set[bytes] = set()
        for o in ours:
            p = o.path
            t = None if gone(p) else tmap.get(p)
            if p in carrier:
                c = carrier[p]
                tc = None if gone(c) or c in created else tmap.get(c)
                if t is not None and tc is not None and t.ino == tc.ino:
                    continue  # already one file on the secondary: its data is synchronised through c
                if t is not None:
                    ops.append(m.Remove(0, p))
                ops.append(m.Link(0, c, p))
                st.carry(p, c)  # a change made through p after the listings goes through c
                continue
            if t is None and p in moved and not gone(moved[p]):
                # Renamed there rather than sent again: then compared block by block like any
                # file in doubt (a small one's equal digest already proved its content).
                src = moved.pop(p)
                ops.append(m.Rename(0, src, p))
                if o.digest is None:
                    st.mark(p).cmp.add(0, _ceil(o.size, b))
                st.add_meta(p)
                continue
            if t is None:
                created.add(p)
                if o.kind == "f":
                    ops.append(m.Create(0, p, o.mode, o.uid, o.gid))
                    mk = st.mark(p)
                    mk.data.add(0, INF)
                    mk.fresh.add(0, INF)
                    mk.meta = True
                elif o.kind == "d":
                    ops.append(m.Mkdir(0, p, o.mode, o.uid, o.gid))
                    st.add_meta(p)  # xattrs, and its times once its entries are made
                elif o.kind == "l":
                    ops.append(m.Symlink(0, p, o.target or b"", o.uid, o.gid))
                    st.add_meta(p)  # its mtime
                else:
                    ops.append(m.Mknod(0, p, o.mode, 0, o.uid, o.gid))
                    st.add_meta(p)  # its mtime (made with the resync's own), and xattrs
                continue
            if (o.kind != "l" and o.mode != t.mode) or o.uid != t.uid or o.gid != t.gid or o.xattrs != t.xattrs \
                    or (o.kind != "f" and o.mtime_ns != t.mtime_ns):  # a file's: with its data, below
                st.add_meta(p)
            if o.kind != "f":
                continue
            if o.digest is not None and t.digest is not None:
                if o.digest != t.digest or o.size != t.size or _reserved_beyond(o, t):
                    st.add_data(p, 0, INF)
                elif o.mtime_ns != t.mtime_ns:
                    st.add_meta(p)
                continue
            mk = st.mark(p)
            mk.cmp.add(0, _ceil(o.size, b))
            if t.size > o.size:
                mk.data.add(_ceil(o.size, b), INF)  # the replica's extra tail goes, whatever happens
        for op in ops:  # these change their directories there: their times are sent afterwards
            for q in _op_paths(op):
                st.add_meta(_parent(q))
        return ops

    async def _estimate(self) -> None:
        prog = self.progress
        assert prog is not None
        total = 0
        marks = list(self.state.marks.values())
        for i, mk in enumerate(marks):
            if mk.data or mk.cmp:
                try:
                    size = os.stat(mk.path, dir_fd=self.root, follow_symlinks=False).st_size if mk.path else 0
                except OSError:
                    size = 0
                nb = _ceil(size, self.block)
                either = mk.data.copy()
                either.update(mk.cmp)  # a block marked both ways is read once, not twice
                total += either.count(nb) * self.block
            if i % 2000 == 1999:
                await asyncio.sleep(0)
        prog.bytes_total, prog.files_total = total, len(marks)

    # -- phase B: data --

    async def _drain(self) -> None:
        st = self.state
        while st.marks:
            mk = next(iter(st.marks.values()))
            await self._sync_mark(mk)
            if st.marks.get(mk.path) is mk and mk.empty:
                del st.marks[mk.path]
            if self.progress is not None:
                self.progress.files_done += 1

    def _lstat(self, path: bytes) -> os.stat_result | None:
        try:
            return os.stat(path or b".", dir_fd=self.root, follow_symlinks=False)
        except OSError:
            return None

    async def _sync_mark(self, mk: Mark) -> None:
        st = self._lstat(mk.path)
        if st is not None and stat.S_ISREG(st.st_mode) and (mk.data or mk.cmp):
            await self._sync_file(mk)
        else:
            mk.data.clear()
            mk.cmp.clear()
        if mk.alive and mk.meta:
            await self._room()
            self._send_meta(mk)
        if not mk.alive:
            mk.data.clear()
            mk.cmp.clear()
            mk.meta = False

    def _send_meta(self, mk: Mark) -> None:
        mk.meta = False
        st = self._lstat(mk.path)
        if st is None:
            return
        p = mk.path
        if stat.S_ISLNK(st.st_mode):
            self._send(m.SetAttr(0, p, uid=st.st_uid, gid=st.st_gid, mtime_ns=m.wire_time(st.st_mtime_ns)))
            return
        if stat.S_ISDIR(st.st_mode):
            # After the namespace phases: the directory's own changes there are done (live changes
            # during the data phase carry their own times, see ReplicatedFS._dir_times).
            self._send(m.SetAttr(0, p, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                                 mtime_ns=m.wire_time(st.st_mtime_ns)))
        else:
            self._send(m.SetAttr(0, p, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                                 **m.wire_times(st)))
        target = b"/proc/self/fd/%d/%s" % (self.root, p) if p else b"/proc/self/fd/%d" % self.root
        follow = not p
        try:
            names = [os.fsencode(n) for n in os.listxattr(target, follow_symlinks=follow)]
        except OSError:
            names = []
        ops: list[m.Op] = [m.RsXattrs(0, p, names)]
        for name in names:
            try:
                value = os.getxattr(target, name, follow_symlinks=follow)
            except OSError:
                continue
            if len(value) <= 65536:
                ops.append(m.SetXattr(0, p, name, value))
        self._send(*ops)

    async def _sync_file(self, mk: Mark) -> None:
        b = self.block
        try:
            fd = os.open(mk.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.root)
        except OSError:
            mk.data.clear()
            mk.cmp.clear()
            return
        hid = next(_hids)
        opened = False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                mk.data.clear()
                mk.cmp.clear()
                return
            self._send(m.Open(0, hid, mk.path))
            opened = True
            # A tail marked to the end whose content on the replica is unknown: cut the replica
            # there first, then the blocks beyond that are zeros need not be sent (holes stay holes).
            tail = self._tail(mk.data)
            if tail is not None:
                if not mk.fresh.covers(tail, INF):
                    self._send(m.SetAttr(0, mk.path, hid=hid, size=tail * b))
                    mk.cmp.remove(tail, INF)
                    mk.fresh.add(tail, INF)
                # Past our end of file there is nothing on either side now (the replica's file is
                # no longer than the tail's start): the tail stops here, later appends go live.
                end = max(tail, _ceil(os.fstat(fd).st_size, b))
                mk.data.remove(end, INF)
                mk.cmp.remove(end, INF)
            ahead: dict[int, tuple[list[int], RangeSet, asyncio.Future[list[m.Message]]]] = {}
            while mk.alive:
                nb = _ceil(os.fstat(fd).st_size, b)
                start = self._first_marked(mk, 0, nb)
                if start is None:
                    # Everything below the end is synchronised: settle the size and whatever is
                    # marked past it in one step (see the module docstring).
                    mk.data.clear()
                    mk.cmp.clear()
                    mk.fresh.clear()
                    self._send(m.SetAttr(0, mk.path, hid=hid, size=os.fstat(fd).st_size))
                    self._send_reservations(fd, hid)
                    break
                lo = start // REGION * REGION
                hi = min(lo + REGION, nb)
                asked = ahead.pop(lo, None)
                if asked is None and mk.cmp.overlaps(lo, hi):
                    asked = self._ask_coarse(mk, lo, hi)
                if hi < nb and hi not in ahead and mk.cmp.overlaps(hi, min(hi + REGION, nb)):
                    # The secondary hashes the next region while we compare this one.
                    ahead[hi] = self._ask_coarse(mk, hi, min(hi + REGION, nb))
                if asked is not None:
                    await self._compare_region(fd, mk, asked)
                await self._send_region(fd, mk, hid, lo, hi)
        finally:
            try:
                if opened and self.sender is not None:
                    if mk.alive:
                        st = os.fstat(fd)
                        self._send(m.Close(0, hid, **m.wire_times(st)))
                    else:
                        self._send(m.Close(0, hid))
            except LinkLost:
                pass
            finally:
                os.close(fd)

    def _send_reservations(self, fd: int, hid: int) -> None:
        """Space our file has allocated and never written (fallocate), past its end of file too:
        reserved on the replica as well, so that what fitted here fits there after a failover.
        Sent whole: re-reserving what the replica already holds changes nothing."""
        try:
            extents = unwritten_extents(fd)
        except OSError as exc:
            log.info("cannot list the reserved space of a file (%s): not reserved on the replica", exc)
            return
        for i in range(0, len(extents), m.MAX_FLAT // 2):
            self._send(m.RsReserve(0, hid, [x for ext in extents[i:i + m.MAX_FLAT // 2] for x in ext]))

    @staticmethod
    def _tail(rs: RangeSet) -> int | None:
        r = rs.ranges()
        return r[-1][0] if r and r[-1][1] >= INF else None

    @staticmethod
    def _first_marked(mk: Mark, lo: int, hi: int) -> int | None:
        firsts = [p[0][0] for p in (mk.data.within(lo, hi), mk.cmp.within(lo, hi)) if p]
        return min(firsts) if firsts else None

    def _ask_coarse(self, mk: Mark, lo: int, hi: int) -> tuple[list[int], RangeSet, asyncio.Future[list[m.Message]]]:
        """Ask the digests of the first-level blocks of [lo, hi) still to compare."""
        coarse = [c for c in range(lo // COARSE, _ceil(hi, COARSE)) if mk.cmp.overlaps(c * COARSE, (c + 1) * COARSE)]
        ranges = RangeSet()
        for c in coarse:
            ranges.add(c, c + 1)
        flat = ranges.flat()
        return coarse, ranges, self._ask(lambda req: m.RsHash(0, req, mk.path, self.block * COARSE, flat))

    async def _compare_region(self, fd: int, mk: Mark,
                              asked: tuple[list[int], RangeSet, asyncio.Future[list[m.Message]]]) -> None:
        b, cb = self.block, self.block * COARSE
        prog = self.progress
        coarse, ranges, fut = asked
        [rep] = await fut
        assert isinstance(rep, m.RsDigests)
        if not coarse:
            return
        theirs = self._digest_map(ranges, rep)
        fine = RangeSet()
        for i in range(0, len(coarse), STEP // COARSE):
            if not mk.alive:
                return
            for c in coarse[i:i + STEP // COARSE]:  # atomic: read, compare, clear
                fs, fe = c * COARSE, (c + 1) * COARSE
                parts = mk.cmp.within(fs, fe)
                if not parts:
                    continue
                t = theirs.get(c)
                if t is not None and parts == [(fs, fe)] and digest(os.pread(fd, cb, c * cb)) == t:
                    mk.cmp.remove(fs, fe)
                    if prog is not None:
                        prog.bytes_done += cb
                elif t is None:  # nothing there on the replica: send what we have
                    for a, z in parts:
                        mk.data.add(a, z)
                    mk.cmp.remove(fs, fe)
                else:
                    for a, z in parts:
                        fine.add(a, z)
            await asyncio.sleep(0)
        if prog is not None:
            prog.digests_received += len(rep.digests)
        if not fine:
            return
        flat = fine.flat()
        [rep] = await self._ask(lambda req: m.RsHash(0, req, mk.path, b, flat))
        assert isinstance(rep, m.RsDigests)
        theirs = self._digest_map(fine, rep)
        if prog is not None:
            prog.digests_received += len(rep.digests)
        blocks = [x for s, e in fine.ranges() for x in range(s, e)]
        for i in range(0, len(blocks), STEP):
            if not mk.alive:
                return
            for x in blocks[i:i + STEP]:  # atomic: read, compare, clear or convert
                if not mk.cmp.covers(x, x + 1):
                    continue
                mk.cmp.remove(x, x + 1)
                t = theirs.get(x)
                if t is None or digest(os.pread(fd, b, x * b)) != t:
                    mk.data.add(x, x + 1)
                elif prog is not None:
                    prog.bytes_done += b
            await asyncio.sleep(0)

    @staticmethod
    def _digest_map(ranges: RangeSet, rep: m.RsDigests) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        if rep.size < 0:
            return out
        d, k = rep.digests, 0
        for s, e in ranges.ranges():
            for x in range(s, e):
                if (k + 1) * m.DIGEST_SIZE > len(d):
                    return out
                out[x] = d[k * m.DIGEST_SIZE:(k + 1) * m.DIGEST_SIZE]
                k += 1
        return out

    async def _send_region(self, fd: int, mk: Mark, hid: int, lo: int, hi: int) -> None:
        b = self.block
        chunk = max(1, m.MAX_CHUNK // b)
        prog = self.progress
        while mk.alive:
            nb = min(hi, _ceil(os.fstat(fd).st_size, b))
            parts = mk.data.within(lo, nb)
            if not parts:
                return
            a, z = parts[0]
            if mk.fresh.covers(a, a + 1):
                # A hole here on the replica: skip our holes too without reading them (sparse files).
                try:
                    data_at = os.lseek(fd, a * b, os.SEEK_DATA) // b
                except OSError:  # ENXIO: no data past this offset
                    data_at = nb
                hole_end = min(data_at, z)
                if hole_end > a and mk.fresh.covers(a, hole_end):
                    mk.data.remove(a, hole_end)
                    if prog is not None:
                        prog.bytes_done += (hole_end - a) * b
                    lo = hole_end
                    continue
            z = min(z, a + chunk)
            await self.bucket.take((z - a) * b)
            await self._room()
            if not mk.alive:
                return
            # atomic from here: read the blocks as they are now, send them, clear their marks
            parts = mk.data.within(a, z)
            if not parts:
                continue
            a, z = parts[0]
            data = os.pread(fd, (z - a) * b, a * b)
            if data and not (mk.fresh.covers(a, z) and data.count(0) == len(data)):
                self._send(m.Write(0, hid, a * b, data))
                if prog is not None:
                    prog.bytes_sent += len(data)
            mk.data.remove(a, z)
            mk.fresh.remove(a, z)
            if prog is not None:
                prog.bytes_done += (z - a) * b
            lo = z

    # ---- shutdown ----

    async def close(self, timeout: float = 10.0) -> None:
        """After the unmount: end the stream cleanly (a live session is closed cleanly in the
        journal when every operation was acknowledged and the tree is synced) and flush."""
        al = self._al_task
        self._stop_activity_log()
        if al is not None:
            await asyncio.gather(al, return_exceptions=True)
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        sender = self.sender
        if sender is not None:
            if self.mode == "live":
                try:
                    async with asyncio.timeout(timeout):
                        ok = await sender.barrier()
                except TimeoutError:
                    ok = False
                if ok and self.sender is sender:
                    try:
                        dfd = open_beneath(self.root, b"", os.O_RDONLY | os.O_DIRECTORY)
                        try:
                            syncfs(dfd)  # "closed cleanly" must also hold after a power loss
                        finally:
                            os.close(dfd)
                        self.journal.close_session()
                        sender.send(m.RsBye(0))
                    except OSError as exc:
                        log.error("cannot record the clean end of the session: %s", exc)
            self.detach()
            await sender.close()
        self.journal.close()
        if self.root >= 0:
            os.close(self.root)
            self.root = -1

