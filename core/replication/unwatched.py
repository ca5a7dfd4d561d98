"""Changes made to a replicated directory while no agent of ours watched it.

While a node replicates, every change goes through its FUSE mount (primary) or its receiver behind a
read-only bind (secondary), and is journaled or sent. But a module can be stopped (its directory is
then writable, for the administrator), an agent can die, and after a reboot the directory is
writable until the daemon starts: an application started by the system rather than by the module,
a restored backup or a hand-made fix then change files that no journal knows of, and a journal
resync would leave the two nodes different, silently.

Since when the directory went unwatched is known (journal.Journal.unwatched_since_ns: the service's
marker, made when it leaves a directory writable with no agent, or the start of this boot after a
reboot). The changes since are found by their ctime, which every change of an entry sets (data,
size, mode, owner, xattrs, links, a rename of it) and which no system call can set back. A
directory's ctime also moves when an entry is created, removed or renamed in it, so a removed file
shows as its directory. Each such path becomes a suspect of the next resync (its subtree compared, as
after a crash).

A changed directory stands for its entries only (journal.entries_of), and the walk goes on below
it: its entries are compared by name and kind, and each one that changed is a suspect of its own.
That holds only if it is the directory that was there when the tree became unwatched: a directory
moved into its place keeps its entries' ctimes, and only its own ctime shows the move. So its
identity (the file system's handle of its inode) is compared with the one recorded then:
- the top directory's is recorded each time the tree is watched again (while watched it is a mount
  point, which cannot be renamed); another one, or none, means "everything" (b""), a checksum resync;
- the other directories' are recorded at a module's stop, while the read-only bind still covers the
  tree (`record_directories`); another one, or none recorded (a reboot, a dead agent), means that
  directory's whole subtree.

The walk costs one lstat per entry, only when an agent starts on a directory that went unwatched
(not at a swap or a failover, where the directory stays covered).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import msgspec

from .journal import MAX_SUSPECTS, Journal, coarsen, directories_marker, entries_of
from .syscalls import file_handle, file_handle_at

log = logging.getLogger(__name__)

# Timestamps come from the kernel's coarse clock: entries changed up to this long before the
# moment are taken too (harmless: compared for nothing).
MARGIN_NS = 50_000_000
# Beyond this many paths found, the walk coarsens them to directories (journal.coarsen) and no longer
# walks below those: its memory stays bounded whatever changed.
LIMIT = 100_000
PROGRESS_EVERY = 100_000  # entries: about 0.3 s of walking here


def root_identity(root_fd: int) -> str | None:
    """The identity of the directory `root_fd` (its inode's file handle), None where the file
    system gives none (then a change of the top directory means everything)."""
    try:
        return file_handle(root_fd).hex()
    except OSError as exc:
        log.info("no file handle for the replicated directory (%s): a change at its top will be a checksum resync",
                 exc)
        return None


def record_directories(root_fd: int, marker: Path, excluded: Callable[[bytes, bool], bool]) -> int:
    """Write the identity of every directory below `root_fd` (replicated ones) to `marker`, durably;
    returns how many. The tree must not change meanwhile (it is read-only for applications)."""
    found: dict[bytes, bytes] = {}
    base = b"/proc/self/fd/%d" % root_fd
    todo: list[bytes] = [b""]
    while todo:
        rel = todo.pop()
        try:
            entries = os.scandir(base + b"/" + rel if rel else base)
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            continue  # beyond what a path names (see changed_since): left unrecorded, so compared whole
        with entries:
            for entry in entries:
                path = rel + b"/" + entry.name if rel else entry.name
                if entry.is_dir(follow_symlinks=False) and not excluded(path, True):
                    try:
                        found[path] = file_handle_at(base + b"/" + path)
                    except OSError as exc:
                        if exc.errno != errno.ENAMETOOLONG:
                            raise
                        continue
                    todo.append(path)
    tmp = marker.with_suffix(".dirs.tmp")
    with open(tmp, "wb") as f:
        f.write(msgspec.msgpack.encode(found))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)
    return len(found)


def load_directories(marker: Path) -> dict[bytes, bytes]:
    """What record_directories wrote ({} when nothing usable: every changed directory then stands
    for its subtree)."""
    try:
        return msgspec.msgpack.decode(marker.read_bytes(), type=dict[bytes, bytes])
    except FileNotFoundError:
        return {}
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("cannot read the directories recorded in %s (%s): changed ones are compared whole", marker, exc)
        return {}


def changed_since(root_fd: int, since_ns: int, excluded: Callable[[bytes, bool], bool],
                  progress: Callable[[int], None] | None = None, same_root: bool = False,
                  directories: dict[bytes, bytes] | None = None) -> list[bytes]:
    """Relative paths below the directory `root_fd` whose ctime is later than `since_ns` minus the
    margin. A changed directory stands for its entries (entries_of), and the walk goes on inside
    it, when it is the one that was there then (for the top, `same_root`; below, the identity
    `directories` holds for its path); else for its whole subtree, not walked further. The top
    directory that is not the one watched means everything, [b""]. Beyond LIMIT paths, coarsened
    to directories. `excluded(path, is_dir)`: paths not replicated, skipped. `progress(entries)`:
    called every PROGRESS_EVERY entries looked at."""
    directories = directories or {}
    after = since_ns - MARGIN_NS
    base = b"/proc/self/fd/%d" % root_fd
    found: list[bytes] = []
    if os.stat(base).st_ctime_ns > after:
        if not same_root:
            return [b""]
        found.append(entries_of(b""))
    todo: list[bytes] = [b""]
    covered: set[bytes] = set()  # subtrees found already, once coarsened (not walked further)
    seen = 0
    while todo:
        rel = todo.pop()
        if covered and _within(rel, covered):
            continue
        try:
            entries = os.scandir(base + b"/" + rel if rel else base)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue  # gone meanwhile: its parent's ctime says so
            if exc.errno == errno.ENAMETOOLONG:
                # A directory renamed to a longer name can leave paths below it longer than a system
                # call takes (with our /proc/self/fd prefix): compared whole rather than failing the
                # agent (the failover that started it then left no node serving).
                found.append(rel)
                covered.add(rel)
                continue
            raise
        with entries:
            for entry in entries:
                seen += 1
                if progress is not None and seen % PROGRESS_EVERY == 0:
                    progress(seen)
                path = rel + b"/" + entry.name if rel else entry.name
                if covered and _within(path, covered):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.ENAMETOOLONG:
                        raise
                    found.append(path)  # as above
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                if excluded(path, is_dir):
                    continue
                if st.st_ctime_ns > after:
                    if is_dir and _same_directory(directories.get(path), base + b"/" + path):
                        found.append(entries_of(path))
                        todo.append(path)
                    else:
                        found.append(path)
                    if len(found) > LIMIT:  # bounded: to directories, as the journal would anyway
                        found = coarsen(found, MAX_SUSPECTS)
                        if found == [b""]:
                            return found
                        covered = set(found)
                elif is_dir:
                    todo.append(path)
    return sorted(found)


def _within(path: bytes, tops: set[bytes]) -> bool:
    """`path` is one of `tops` or below one."""
    while path not in tops:
        if b"/" not in path:
            return False
        path = path.rpartition(b"/")[0]
    return True


def _same_directory(recorded: bytes | None, path: bytes) -> bool:
    if recorded is None:
        return False
    try:
        return file_handle_at(path) == recorded
    except OSError:
        return False


def find(root_fd: int, since_ns: int | None, excluded: Callable[[bytes, bool], bool] = lambda p, d: False,
         where: object = "", progress: Callable[[int], None] | None = None, same_root: bool = False,
         directories: Path | None = None) -> list[bytes]:
    """`changed_since` when the directory went unwatched at `since_ns` (None: it did not), logged.
    `directories`: the file record_directories wrote when it did, if any."""
    if since_ns is None:
        return []
    recorded = load_directories(directories) if directories is not None else {}
    found = changed_since(root_fd, since_ns, excluded, progress, same_root, recorded)
    if found:
        log.warning("%s: %s changed while no agent watched it: compared at the next resync", where,
                    "the directory itself" if found == [b""] else f"{len(found)} path(s)")
    return found


def look_around(journal: Journal, root_fd: int, excluded: Callable[[bytes, bool], bool] = lambda p, d: False,
                where: object = "", progress: Callable[[int], None] | None = None) -> list[bytes]:
    """`find` with what `journal` knows of its directory `root_fd`: since when it went unwatched,
    whether it is the directory last watched, the identities recorded at the stop. Sets the
    journal's `root_id` (recorded by watched_again, once these changes are accounted for).
    Blocking: run it in a thread."""
    journal.root_id = root_identity(root_fd)
    same_root = journal.root_id is not None and journal.remembered_root() == journal.root_id
    recorded = directories_marker(journal.path) if journal.path is not None else None
    return find(root_fd, journal.unwatched_since_ns(), excluded, where, progress, same_root, recorded)
