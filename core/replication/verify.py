"""Verify: compare the two replicas of a module online, by content hash and metadata.

Each side builds a *manifest* of its tree: for every entry (the root included) its type, permission
bits, owner, and mtime; for files the size and an xxh3-128 hash of the content; symlink targets;
xattrs (name and xxh3-64 of the value); for files with several names, which earlier name they are
a link of. Directory sizes and atimes are not compared (they are not replicated, see
docs/replication.md); device nodes are never replicated and not listed; entries matching the
module's exclude patterns are left out on both sides.

How the secondary's manifest is obtained: the primary opens a *separate short connection* to the
secondary's receiver (same port, same HMAC handshake and per-frame authentication as the stream)
with `Hello.purpose = "verify"`. The receiver does not touch the running operation stream for it:
it answers `ManifestRequest` with `ManifestPart`s then `ManifestEnd`, built in a worker thread, so
operations keep being applied while it hashes (their cost is only shared CPU and disk).

Both manifests come in the same order (a depth-first walk, names sorted bytewise: components
compared bytewise), so they are compared as two sorted streams: memory stays bounded by one
batch per side (plus the differences kept for the re-check), whatever the size of the tree.
Hashing reads 1 MiB at a time into one reused buffer.

Files that change while verify runs may show up as differences. Every difference found (up to
MAX_TRACKED of them) is re-checked at the end, on both sides, path by path, in up to
RECHECK_ROUNDS rounds a growing delay apart (each round looking at the two sides in the other
order); those that vanished in any round are counted as `settled` and not reported. Differences
in `link` are kept as they were found (a single path cannot be re-checked for it).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import stat
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import xxhash

from . import messages as m
from .auth import client_handshake
from .exclude import Excluder
from .framing import READ_CHUNK, FrameDecoder, read_message
from .paths import components, parent_dir

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # read size while hashing (one reused buffer per scan)
BATCH_ENTRIES = 512
BATCH_WEIGHT = 192 * 1024  # estimated encoded bytes per ManifestPart, well below MAX_FRAME
BATCH_HASHED = 64 << 20  # end a batch after hashing this much, so entries keep flowing
KEEPALIVE = 2.0  # the receiver sends an empty part this often while a batch is being built
READ_TIMEOUT = 60.0  # the primary gives up on a receiver silent for this long
MAX_LISTED = 100  # differences listed in the report (all are counted)
MAX_TRACKED = 10_000  # differences kept for the re-check
RECHECK_ROUNDS = 4  # a difference is reported only if every round still finds it
RECHECK_DELAY = 0.1  # seconds before the second round, doubled for each one after
_XATTR_NAMES_MAX = 8192

PROBLEMS = ("missing_on_secondary", "missing_on_primary", "differs")


class VerifyError(RuntimeError):
    """Verify could not run (wrong role, peer unreachable, protocol error): no comparison result."""


# ---- manifests ----

def manifest_key(path: bytes) -> tuple[bytes, ...]:
    """Sort key of a manifest: components compared bytewise, so a directory comes right before its
    content and the order is the depth-first walk's."""
    return tuple(path.split(b"/")) if path else ()


def _xattrs(target: int | bytes) -> list[tuple[bytes, bytes]]:
    try:
        names = os.listxattr(target) if isinstance(target, int) else os.listxattr(target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOENT, errno.EPERM, errno.EACCES):
            return []
        raise
    out = []
    for name in names:
        try:
            value = os.getxattr(target, name) if isinstance(target, int) \
                else os.getxattr(target, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOENT):
                continue  # removed meanwhile
            raise
        out.append((os.fsencode(name), xxhash.xxh3_64(value).digest()))
    out.sort()
    if len(out) > m.MAX_ENTRY_XATTRS or sum(len(n) for n, _ in out) > _XATTR_NAMES_MAX:
        h = xxhash.xxh3_128()
        for name, digest in out:
            h.update(len(name).to_bytes(2, "big") + name + digest)
        out = [(b"*", h.digest())]
    return out


class Scanner:
    """Builds manifest entries beneath a directory descriptor, never following a symlink out of it.
    Not thread-safe: one thread at a time drives it (batches run in a worker thread)."""

    def __init__(self, root_fd: int, exclude: Excluder | None = None) -> None:
        # Our own descriptor: the caller's may be closed while a worker thread still runs.
        self.root = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
        self.exclude = exclude or Excluder()
        self.entries = 0
        self.bytes_hashed = 0
        self._buf = bytearray(CHUNK)
        self._links: dict[tuple[int, int], bytes] = {}

    def close(self) -> None:
        if self.root >= 0:
            os.close(self.root)
            self.root = -1

    # -- one entry --

    def _hash(self, fd: int) -> bytes:
        h = xxhash.xxh3_128()
        buf, view, off = self._buf, memoryview(self._buf), 0
        try:
            while n := os.preadv(fd, [buf], off):
                h.update(view[:n])
                off += n
        finally:
            view.release()
        self.bytes_hashed += off
        return h.digest()

    def _entry(self, dfd: int, name: bytes, path: bytes, st: os.stat_result, walking: bool) -> m.Entry | None:
        """Entry of `name` in directory `dfd` (stat `st` taken with lstat); None if it is gone, is a
        device node, or became a directory meanwhile (the walk handles directories itself)."""
        kind = stat.S_IFMT(st.st_mode)
        link = None
        if kind != stat.S_IFDIR and st.st_nlink > 1 and walking:
            first = self._links.setdefault((st.st_dev, st.st_ino), path)
            link = None if first == path else first
        proc = b"/proc/self/fd/%d/%s" % (dfd, name)
        if kind == stat.S_IFREG:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # replaced by a symlink meanwhile
                    return None
                raise
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return None  # replaced by something else meanwhile: the re-check sees it
                digest = self._hash(fd)
                xattrs = _xattrs(fd)
            finally:
                os.close(fd)
            mtime = m.wire_time(st.st_mtime_ns)
            entry = m.Entry(path, "f", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size=st.st_size,
                            mtime_ns=mtime, digest=digest, xattrs=xattrs, link=link)
        elif kind == stat.S_IFLNK:
            try:
                target = os.readlink(name, dir_fd=dfd)
            except (FileNotFoundError, OSError):
                return None
            entry = m.Entry(path, "l", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                            mtime_ns=m.wire_time(st.st_mtime_ns), target=target, xattrs=_xattrs(proc), link=link)
        elif kind in (stat.S_IFIFO, stat.S_IFSOCK):
            entry = m.Entry(path, "p" if kind == stat.S_IFIFO else "s", stat.S_IMODE(st.st_mode),
                            st.st_uid, st.st_gid, mtime_ns=m.wire_time(st.st_mtime_ns), xattrs=_xattrs(proc),
                            link=link)
        else:
            return None  # directories are handled by the caller; device nodes are never replicated
        self.entries += 1
        return entry

    def _dir_entry(self, fd: int, path: bytes) -> m.Entry:
        st = os.fstat(fd)
        self.entries += 1
        return m.Entry(path, "d", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                       mtime_ns=m.wire_time(st.st_mtime_ns), xattrs=_xattrs(fd))

    @staticmethod
    def _open_dir(dfd: int, name: bytes) -> int | None:
        try:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None
            raise

    # -- the whole tree --

    def walk(self) -> Iterator[m.Entry]:
        """Every entry, in manifest order. Entries that vanish during the walk are skipped."""
        yield self._dir_entry(self.root, b"")
        # An explicit stack: no recursion limit on deep trees. Each level: (fd, path, names left).
        stack: list[tuple[int, bytes, list[bytes]]] = [(self.root, b"", self._names(self.root))]
        try:
            while stack:
                dfd, prefix, names = stack[-1]
                if not names:
                    stack.pop()
                    if dfd != self.root:
                        os.close(dfd)
                    continue
                name = names.pop()  # names are sorted in reverse: pop() takes the smallest
                path = prefix + b"/" + name if prefix else name
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                if self.exclude and self.exclude.excluded(path, is_dir):
                    continue
                if not is_dir:
                    entry = self._entry(dfd, name, path, st, walking=True)
                    if entry is not None:
                        yield entry
                    continue
                sub = self._open_dir(dfd, name)
                if sub is None:
                    continue
                try:
                    entry = self._dir_entry(sub, path)
                    names_below = self._names(sub)
                except BaseException:
                    os.close(sub)
                    raise
                stack.append((sub, path, names_below))
                yield entry
        finally:
            for dfd, _, _ in stack:
                if dfd != self.root:
                    os.close(dfd)

    @staticmethod
    def _names(fd: int) -> list[bytes]:
        return sorted((os.fsencode(n) for n in os.listdir(fd)), reverse=True)

    def lookup(self, path: bytes) -> m.Entry | None:
        """The entry of one path now (None: absent, excluded or a device). Used by the re-check;
        `link` is not computed (it needs the whole walk)."""
        parts = components(path)
        if not parts:
            return self._dir_entry(self.root, b"")
        try:
            with parent_dir(self.root, path) as (pfd, name):
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                is_dir = stat.S_ISDIR(st.st_mode)
                if self.exclude and self.exclude.excluded(path, is_dir):
                    return None
                if not is_dir:
                    return self._entry(pfd, name, path, st, walking=False)
                sub = self._open_dir(pfd, name)
                if sub is None:
                    return None
                try:
                    return self._dir_entry(sub, path)
                finally:
                    os.close(sub)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a parent is (now) a symlink: no entry at this path
                return None
            raise


def _weight(entry: m.Entry) -> int:
    return (96 + len(entry.path) + len(entry.target or b"") + len(entry.link or b"")
            + sum(len(n) + 24 for n, _ in entry.xattrs))


def next_batch(entries: Iterator[m.Entry], scanner: Scanner) -> list[m.Entry]:
    """The next entries (an empty list once exhausted), bounded in count, size and hashing work."""
    out: list[m.Entry] = []
    weight, start = 0, scanner.bytes_hashed
    for entry in entries:
        out.append(entry)
        weight += _weight(entry)
        if len(out) >= BATCH_ENTRIES or weight >= BATCH_WEIGHT or scanner.bytes_hashed - start >= BATCH_HASHED:
            break
    return out


def _lookups(scanner: Scanner, paths: Iterable[bytes]) -> Iterator[m.Entry]:
    for path in paths:
        entry = scanner.lookup(path)
        if entry is not None:
            yield entry


def _excluder(patterns: list[str]) -> Excluder:
    try:
        return Excluder(list(patterns))
    except (ValueError, re.error) as exc:
        raise m.ProtocolError(f"bad exclude pattern: {exc}") from None


# ---- the receiver's side ----

async def serve_manifest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: FrameDecoder,
                         backlog: list[m.Message], root_fd: int, peer: str = "") -> None:
    """Answer ManifestRequests on an authenticated verify connection until the peer closes it."""
    writer.write(decoder.frame(m.Welcome(next_seq=0)))
    try:
        while True:
            try:
                msg = await read_message(reader, decoder, backlog)
            except ConnectionError:
                return  # the primary is done
            if not isinstance(msg, m.ManifestRequest):
                raise m.ProtocolError(f"unexpected {type(msg).__name__} on a verify connection")
            excluder = _excluder(msg.exclude)
            if msg.paths is not None:
                for path in msg.paths:
                    components(path)  # PathError before anything is looked up
            scanner = Scanner(root_fd, excluder)
            entries = scanner.walk() if msg.paths is None else _lookups(scanner, msg.paths)
            await _send_manifest(writer, decoder, scanner, entries)
    except (m.ProtocolError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("verify request from %s failed: %s", peer, reason)
        try:
            writer.write(decoder.frame(m.Error(reason[:4000])))
        except (ConnectionError, RuntimeError, ValueError):
            pass


async def _send_manifest(writer: asyncio.StreamWriter, decoder: FrameDecoder, scanner: Scanner,
                         entries: Iterator[m.Entry]) -> None:
    task: asyncio.Future[list[m.Entry]] | None = None
    try:
        while True:
            task = asyncio.ensure_future(asyncio.to_thread(next_batch, entries, scanner))
            while True:
                done, _ = await asyncio.wait({task}, timeout=KEEPALIVE)
                if done:
                    break
                writer.write(decoder.frame(m.ManifestPart([])))  # still hashing: still alive
                await writer.drain()
            batch = task.result()
            task = None
            if not batch:
                break
            writer.write(decoder.frame(m.ManifestPart(batch)))
            await writer.drain()  # flow control: the primary compares at its own pace
        writer.write(decoder.frame(m.ManifestEnd(scanner.entries, scanner.bytes_hashed)))
        await writer.drain()
    finally:
        _close_after(task, scanner, entries)


def _close_after(task: asyncio.Future[Any] | None, scanner: Scanner, entries: Iterator[m.Entry]) -> None:
    """Close the scanner once no worker thread uses it any more."""
    def close(_: object = None) -> None:
        close_gen = getattr(entries, "close", None)
        if close_gen is not None:
            try:
                close_gen()
            except (ValueError, OSError):  # ValueError: generator already executing (cannot be here)
                pass
        scanner.close()

    if task is None or task.done():
        close()
    else:
        task.add_done_callback(close)


# ---- the primary's side ----

@dataclass
class _Diff:
    problem: str
    fields: list[str] = field(default_factory=list)


def compare_entries(a: m.Entry, b: m.Entry) -> list[str]:
    """Names of the fields in which two entries of the same path differ ([] if equal)."""
    if a.kind != b.kind:
        return ["type"]
    out = []
    if a.kind == "f":
        if a.digest != b.digest:
            out.append("content")
        if a.size != b.size:
            out.append("size")
        if a.mtime_ns != b.mtime_ns:
            out.append("mtime")
    if a.kind == "d" and a.mtime_ns != b.mtime_ns:
        out.append("mtime")
    # A node of an earlier release sends no symlink (or FIFO, socket) mtime: not a difference.
    if a.kind in ("l", "p", "s") and None not in (a.mtime_ns, b.mtime_ns) and a.mtime_ns != b.mtime_ns:
        out.append("mtime")
    if a.kind == "l" and a.target != b.target:
        out.append("target")
    for name in ("mode", "uid", "gid", "xattrs", "link"):
        if getattr(a, name) != getattr(b, name):
            out.append(name)
    return out


class _Connection:
    """The primary's end of a verify connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: FrameDecoder,
                 backlog: list[m.Message], read_timeout: float) -> None:
        self.reader, self.writer, self.decoder, self.backlog = reader, writer, decoder, backlog
        self.read_timeout = read_timeout
        self.end: m.ManifestEnd | None = None

    @classmethod
    async def open(cls, host: str, port: int, key: bytes, module: str, directory: bytes,
                   timeout: float, read_timeout: float) -> _Connection:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=READ_CHUNK)
        except (OSError, TimeoutError) as exc:
            raise VerifyError(f"cannot reach the secondary's receiver at {host}:{port}: {exc}") from None
        try:
            _, decoder, backlog = await client_handshake(reader, writer, key, module, directory, "C",
                                                         purpose="verify")
        except (m.ProtocolError, ConnectionError, TimeoutError, OSError) as exc:
            writer.transport.abort()
            raise VerifyError(f"the secondary's receiver refused verify: {exc}") from None
        return cls(reader, writer, decoder, backlog, read_timeout)

    async def request(self, paths: list[bytes] | None, exclude: list[str]) -> AsyncIterator[m.Entry]:
        self.writer.write(self.decoder.frame(m.ManifestRequest(paths, list(exclude))))
        self.end = None
        last: tuple[bytes, ...] | None = None
        while True:
            try:
                async with asyncio.timeout(self.read_timeout):
                    msg = await read_message(self.reader, self.decoder, self.backlog)
            except TimeoutError:
                raise VerifyError(f"the secondary sent nothing for {self.read_timeout:g} s") from None
            except (ConnectionError, OSError) as exc:
                raise VerifyError(f"verify connection lost: {exc}") from None
            if isinstance(msg, m.ManifestPart):
                for entry in msg.entries:
                    key = manifest_key(entry.path)
                    if paths is None and last is not None and key <= last:
                        raise m.ProtocolError(f"manifest out of order at {entry.path!r}")
                    last = key
                    yield entry
            elif isinstance(msg, m.ManifestEnd):
                self.end = msg
                return
            elif isinstance(msg, m.Error):
                raise VerifyError(f"the secondary failed: {msg.message}")
            else:
                raise m.ProtocolError(f"unexpected {type(msg).__name__} on a verify connection")

    def close(self) -> None:
        self.writer.close()


async def _local_entries(scanner: Scanner, entries: Iterator[m.Entry]) -> AsyncIterator[m.Entry]:
    """Local entries, built in a worker thread one batch ahead of the comparison."""
    pending: asyncio.Future[list[m.Entry]] | None = asyncio.ensure_future(asyncio.to_thread(next_batch, entries, scanner))
    try:
        while True:
            assert pending is not None
            batch = await asyncio.shield(pending)  # cancelled or not, the thread finishes its batch
            pending = None
            if not batch:
                return
            pending = asyncio.ensure_future(asyncio.to_thread(next_batch, entries, scanner))
            for entry in batch:
                yield entry
    finally:
        _close_after(pending, scanner, entries)


@dataclass
class DirectoryResult:
    directory: str
    primary_entries: int = 0
    secondary_entries: int = 0
    primary_bytes_hashed: int = 0
    secondary_bytes_hashed: int = 0
    tracked: dict[bytes, _Diff] = field(default_factory=dict)  # re-checked at the end
    untracked: Counter[str] = field(default_factory=Counter)  # problems beyond MAX_TRACKED
    untracked_fields: Counter[str] = field(default_factory=Counter)
    rechecked: int = 0
    settled: int = 0

    def record(self, path: bytes, problem: str, fields: list[str] | None = None) -> None:
        if len(self.tracked) < MAX_TRACKED:
            self.tracked[path] = _Diff(problem, fields or [])
        else:
            self.untracked[problem] += 1
            self.untracked_fields.update(fields or [])


async def verify_directory(local_root_fd: int, host: str, port: int, key: bytes, module: str, directory: bytes,
                           exclude: list[str], timeout: float = 10.0, read_timeout: float = READ_TIMEOUT,
                           recheck: bool = True) -> DirectoryResult:
    """Compare the tree beneath `local_root_fd` with the secondary's copy of `directory`."""
    result = DirectoryResult(os.fsdecode(directory))
    excluder = Excluder(list(exclude))
    conn = await _Connection.open(host, port, key, module, directory, timeout, read_timeout)
    try:
        scanner = Scanner(local_root_fd, excluder)
        local = _local_entries(scanner, scanner.walk())
        remote = conn.request(None, exclude)
        try:
            a = await anext(local, None)
            b = await anext(remote, None)
            while a is not None or b is not None:
                ka = manifest_key(a.path) if a is not None else None
                kb = manifest_key(b.path) if b is not None else None
                if b is None or (a is not None and ka < kb):  # type: ignore[operator]
                    result.record(a.path, "missing_on_secondary")  # type: ignore[union-attr]
                    a = await anext(local, None)
                elif a is None or kb < ka:  # type: ignore[operator]
                    result.record(b.path, "missing_on_primary")
                    b = await anext(remote, None)
                else:
                    fields = compare_entries(a, b)
                    if fields:
                        result.record(a.path, "differs", fields)
                    a, b = await anext(local, None), await anext(remote, None)
        finally:
            await local.aclose()
            await remote.aclose()
        result.primary_entries, result.primary_bytes_hashed = scanner.entries, scanner.bytes_hashed
        if conn.end is not None:
            result.secondary_entries, result.secondary_bytes_hashed = conn.end.entries, conn.end.bytes_hashed
        if recheck and result.tracked:
            await _recheck(result, conn, local_root_fd, excluder, exclude)
    finally:
        conn.close()
    return result


async def _recheck(result: DirectoryResult, conn: _Connection, local_root_fd: int, excluder: Excluder,
                   exclude: list[str]) -> None:
    """Re-check the differences found, in up to RECHECK_ROUNDS rounds a growing delay apart; one
    that is gone in any round is settled. A file that the application keeps making and renaming
    (a temporary file) exists on each side only part of the time, and the two sides are looked at
    a moment apart: one look can catch it on one side only, several in a row do not."""
    result.rechecked = len(result.tracked)
    for round_ in range(RECHECK_ROUNDS):
        if not result.tracked:
            return
        if round_:
            await asyncio.sleep(RECHECK_DELAY * 2 ** (round_ - 1))
        await _recheck_round(result, conn, local_root_fd, excluder, exclude, remote_first=bool(round_ % 2))


async def _recheck_round(result: DirectoryResult, conn: _Connection, local_root_fd: int, excluder: Excluder,
                         exclude: list[str], remote_first: bool) -> None:
    paths = list(result.tracked)

    async def look_local() -> dict[bytes, m.Entry]:
        scanner = Scanner(local_root_fd, excluder)
        try:
            return {e.path: e for e in await asyncio.to_thread(lambda: list(_lookups(scanner, paths)))}
        finally:
            scanner.close()

    async def look_remote() -> dict[bytes, m.Entry]:
        out: dict[bytes, m.Entry] = {}
        for chunk in _path_chunks(paths):
            async for entry in conn.request(chunk, exclude):
                out[entry.path] = entry
        return out

    if remote_first:
        remote = await look_remote()
        local = await look_local()
    else:
        local = await look_local()
        remote = await look_remote()
    for path in paths:
        old = result.tracked[path]
        a, b = local.get(path), remote.get(path)
        if a is None and b is None:
            new = None
        elif a is None:
            new = _Diff("missing_on_primary")
        elif b is None:
            new = _Diff("missing_on_secondary")
        else:
            fields = compare_entries(a, b)
            if "link" in old.fields and "link" not in fields:
                fields.append("link")  # not re-checkable path by path: keep what the walk found
            new = _Diff("differs", fields) if fields else None
        if new is None:
            del result.tracked[path]
            result.settled += 1
        else:
            result.tracked[path] = new


def _path_chunks(paths: list[bytes]) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    weight = 0
    for path in paths:
        if chunk and (len(chunk) >= 4096 or weight + len(path) + 8 > BATCH_WEIGHT):
            yield chunk
            chunk, weight = [], 0
        chunk.append(path)
        weight += len(path) + 8
    if chunk:
        yield chunk


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace") or "."


def build_report(results: list[DirectoryResult], *, started: float, exclude: list[str],
                 notes: list[str] | None = None) -> dict[str, Any]:
    """The verify report (JSON-ready)."""
    counts: Counter[str] = Counter()
    field_counts: Counter[str] = Counter()
    listed: list[dict[str, Any]] = []
    for r in results:
        counts.update(r.untracked)
        field_counts.update(r.untracked_fields)
        for path, diff in r.tracked.items():
            counts[diff.problem] += 1
            field_counts.update(diff.fields)
            if len(listed) < MAX_LISTED:
                item: dict[str, Any] = {"directory": r.directory, "path": _show(path), "problem": diff.problem}
                if diff.fields:
                    item["fields"] = diff.fields
                listed.append(item)
    total = sum(counts.values())
    settled = sum(r.settled for r in results)
    not_rechecked = sum(sum(r.untracked.values()) for r in results)
    all_notes = list(notes or [])
    if settled:
        all_notes.append(f"{settled} difference(s) seen during the walk were gone when re-checked at the end "
                         "(files changing while verify ran): not reported")
    if not_rechecked:
        all_notes.append(f"{not_rechecked} difference(s) beyond the first {MAX_TRACKED} per directory were "
                         "counted but not re-checked")
    return {
        "identical": total == 0,
        "differences": listed,
        "total_differences": total,
        "truncated": total > len(listed),
        "counts": {p: counts.get(p, 0) for p in PROBLEMS},
        "fields": dict(sorted(field_counts.items())),
        "rechecked": sum(r.rechecked for r in results),
        "settled": settled,
        "directories": [
            {"directory": r.directory, "primary_entries": r.primary_entries,
             "secondary_entries": r.secondary_entries, "primary_bytes_hashed": r.primary_bytes_hashed,
             "secondary_bytes_hashed": r.secondary_bytes_hashed}
            for r in results
        ],
        "excluded": list(exclude),
        "compared": "type, content (xxh3-128), size, mode, owner, file, directory and symlink mtime, symlink target, xattrs, hard links",
        "notes": all_notes,
        "duration_s": round(time.monotonic() - started, 3),
        "finished_at": time.time(),
    }


async def verify_module(module: str, directories: list[tuple[bytes, int]], host: str, port: int, key: bytes,
                        exclude: list[str], timeout: float = 10.0, notes: list[str] | None = None,
                        read_timeout: float = READ_TIMEOUT) -> dict[str, Any]:
    """Verify every (replicated directory name, local root descriptor) of a module; the report."""
    started = time.monotonic()
    results = []
    for directory, fd in directories:
        try:
            results.append(await verify_directory(fd, host, port, key, module, directory, exclude,
                                                  timeout=timeout, read_timeout=read_timeout))
        except m.ProtocolError as exc:
            raise VerifyError(f"verify of {os.fsdecode(directory)}: protocol error: {exc}") from None
        except OSError as exc:
            raise VerifyError(f"verify of {os.fsdecode(directory)}: reading the local tree: {exc}") from None
    return build_report(results, started=started, exclude=exclude, notes=notes)
