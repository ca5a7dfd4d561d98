"""The interception layer: a pass-through file system mounted over the replicated directory (served
over /dev/fuse by fusesession.py; request and reply types in fuseabi.py).

The real files stay where they are: a descriptor of the directory is opened (O_PATH) *before* the
mount and every backing call goes through it, beneath the mount. Each mutating operation is applied
locally first, then handed to the `Replicator` before the call returns to the application, with no
await in between (see replicator.py), so the peer sees operations in local order.

Backing I/O is done inline on the event loop: on 2 cores a thread pool measured slower (facts.md).
Nothing here may touch the mount itself, which would deadlock the loop that serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from . import fuseabi, messages as m
from .exclude import Excluder
from .inodes import Inodes, fuse_ino, is_under, join
from .limits import UserLimits, caller_is_admin
from .replicator import PENDING, NullReplicator, Replicator, Started
from .snapshot import tree_ops
from .syscalls import fallocate as backing_fallocate, renameat2
from .writebehind import WriteBehind

log = logging.getLogger(__name__)

T = TypeVar("T")
# Flags the backing open must not get: the kernel already decided the offset (O_APPEND would make
# pwrite ignore it), Python buffers are not aligned for O_DIRECT, creation is handled by create().
_STRIP = os.O_APPEND | os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY
_SYNC = os.O_SYNC | os.O_DSYNC
# fallocate(2) modes served (FALLOC_FL_*): allocate, allocate beyond EOF, punch a hole, zero a range.
_FALLOC_KEEP_SIZE, _FALLOC_PUNCH_HOLE, _FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10
_FALLOC_MODES = frozenset({0, _FALLOC_KEEP_SIZE, _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE, _FALLOC_ZERO_RANGE,
                           _FALLOC_ZERO_RANGE | _FALLOC_KEEP_SIZE})
_UNDO_CHUNK = 1 << 20  # bytes read and sent at a time when a failed fallocate is undone on the peer


def _names_of(root_fd: int, st_ino: int, but: bytes) -> list[bytes]:
    """Every path below `root_fd` naming inode `st_ino` other than `but` (a walk of the directory
    entries, d_ino only: no stat per entry)."""
    out: list[bytes] = []
    todo: list[bytes] = [b""]
    while todo:
        top = todo.pop()
        try:
            fd = os.open(top or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        except OSError:
            continue
        try:
            with os.scandir(fd) as entries:
                for e in entries:
                    path = join(top, os.fsencode(e.name))
                    if e.is_dir(follow_symlinks=False):
                        todo.append(path)
                    elif e.inode() == st_ino and path != but:
                        out.append(path)
        finally:
            os.close(fd)
    return out


@contextlib.contextmanager
def _no_such_attribute() -> Iterator[None]:
    """ENODATA from the backing file system is the kernel's ENOATTR answer to the application."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            raise fuseabi.FUSEError(fuseabi.ENOATTR) from None
        raise


WALK_TRIES = 3  # walks for a file's names while directories keep moving under them (_walk_names)
# Freed inodes kept for the kernel's nodes at once (_pin_if_freed): the kernel forgets an unlinked
# node within a few requests, so a handful is usual; the bound keeps descriptors for the
# application's opens even if FORGETs lagged behind a mass deletion.
MAX_PINS = 4096


def _direct(flags: int) -> bool:
    """Write-only opens bypass the FUSE page cache: nothing reads through them, the kernel then
    hands the application's pages straight to us (one copy less, no second cached copy of data
    that the backing file caches anyway) and skips the getxattr("security.capability") it sends
    before every cached write. Coherence with cached opens of the same file is the kernel's: it
    invalidates their pages on a direct write. +55 % sequential throughput in bench/."""
    return bool(flags & os.O_DIRECT) or flags & os.O_ACCMODE == os.O_WRONLY


def _fuse_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """OSError -> FUSEError (its errno); anything else is a bug: logged here with its handler's name, EIO."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> T:
        token = PENDING.set(None)
        try:
            return await fn(*args)
        except OSError as exc:
            raise fuseabi.FUSEError(exc.errno or errno.EIO) from None
        except fuseabi.FUSEError:
            raise
        except Exception:  # a bug must fail one call, not unmount the application's directory
            log.exception("FUSE %s failed", fn.__name__)
            raise fuseabi.FUSEError(errno.EIO) from None
        finally:
            # A namespace intent the handler did not consume: its change failed or was not replicated.
            pending = PENDING.get()
            if pending is not None:
                settle = getattr(args[0].repl, "settle", None)
                if settle is not None:
                    settle(pending)
            PENDING.reset(token)

    return wrapper


@dataclass
class _File:
    fd: int
    ino: int
    sync: bool
    writable: bool
    epoch: int = -1  # the replicator epoch in which the peer holds this handle open (-1: never)
    # No name of its file in the tree (deleted while open, or named only outside the replicated
    # directory): not looked for again. A name given later through the mount is learnt as usual.
    nameless: bool = False
    uid: int = 0  # who opened it: its writes are held to that user's space limits (limits.py)


class ReplicatedFS(fuseabi.Operations):
    enable_writeback_cache = False  # facts.md: hurts fsync-heavy loads
    # The kernel enforces POSIX ACLs (fusesession.WANTED); the backing file system keeps modes and
    # ACLs in step, and gives new entries their default ACL (_inherits_acl).
    enable_posix_acl = True

    def __init__(self, root_fd: int, replicator: Replicator | None = None,
                 exclude: Excluder | None = None, timeout: float = 10.0) -> None:
        super().__init__()
        self.root = root_fd
        self.repl: Replicator = replicator or NullReplicator()
        self.exclude = exclude or Excluder()
        self.timeout = timeout  # kernel attribute/entry cache: we are the only writer of the tree
        self.inodes = Inodes(prefer=lambda path: not self.exclude.excluded(path))
        self._root_ino = os.fstat(root_fd).st_ino
        self._proc_root = b"/proc/self/fd/%d" % root_fd
        self._files: dict[int, _File] = {}
        self._behind = WriteBehind(drop=False)  # the application may read what it wrote: keep it cached
        self.limits = UserLimits()
        self._open_by_ino: dict[int, set[int]] = {}
        self._pins: dict[int, int] = {}  # node id -> O_PATH descriptor of a freed inode (_pin_if_freed)
        self._dirs: dict[int, list[tuple[bytes, os.stat_result]]] = {}
        self._dir_ino: dict[int, int] = {}
        self._next_dir = 1
        self._next_fh = 1

    # ---- helpers ----

    def _abs(self, path: bytes) -> tuple[bytes, bool]:
        """A path usable without dir_fd (xattrs, the root itself) through the directory descriptor,
        and the follow_symlinks to use with it: the root is the /proc magic link, which must be
        followed; anything below must not be."""
        return (self._proc_root + b"/" + path, False) if path else (self._proc_root, True)

    def _path(self, ino: int) -> bytes:
        path = self.inodes.path(ino)
        if path is None:
            raise fuseabi.FUSEError(errno.ENOENT)
        return path

    def _lstat(self, path: bytes) -> os.stat_result:
        if not path:
            return os.fstat(self.root)
        return os.stat(path, dir_fd=self.root, follow_symlinks=False)

    def _dir_times(self, *paths: bytes) -> list[m.Op]:
        """The mtime of the replicated parents of `paths`, read after a namespace change here: the
        replica's directories changed at its own clock when it applied the change (or not at all,
        for an excluded entry), this makes them equal."""
        if not self.repl.active:
            return []
        ops: list[m.Op] = []
        for parent in dict.fromkeys(p.rpartition(b"/")[0] for p in paths):
            if parent and self.exclude.excluded(parent, True):
                continue
            try:
                mtime = self._lstat(parent).st_mtime_ns
            except OSError:
                continue  # gone meanwhile: its removal is replicated too
            ops.append(m.SetAttr(0, parent, mtime_ns=m.wire_time(mtime)))
        return ops

    async def _submit_ns(self, ops: list[m.Op], *paths: bytes) -> None:
        """Replicate a namespace change at `paths`: `ops` (none for an excluded entry), then the
        times of the parent directories, which changed either way."""
        ops = ops + self._dir_times(*paths)
        if ops:
            await self.repl.submit(*ops)

    def _attrs(self, st: os.stat_result) -> fuseabi.EntryAttributes:
        e = fuseabi.EntryAttributes()
        e.st_ino = fuse_ino(st.st_ino, self._root_ino)
        e.generation = 0
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _learn(self, st: os.stat_result, path: bytes) -> fuseabi.EntryAttributes:
        attrs = self._attrs(st)
        self.inodes.lookup(attrs.st_ino, path)
        return attrs

    def _replicated(self, path: bytes | None, is_dir: bool = False) -> bool:
        return path is not None and self.repl.active and not self.exclude.excluded(path, is_dir)

    # ---- write-ahead intents (journaling replicators only; see replicator.py) ----

    async def _intend_ns(self, *paths: bytes) -> None:
        if getattr(self.repl, "journaling", False):
            await self.repl.intend_ns(*paths)  # type: ignore[attr-defined]

    async def _settled(self, names: Callable[[], tuple[Any, ...]],
                       intend: Callable[[tuple[Any, ...]], Awaitable[None]]) -> tuple[Any, ...]:
        """Record the intent for what `names()` gives, then ask again: while the intent waited for
        the disk, a concurrent rename of a directory above may have moved the entry, and a change
        made or sent under its old name would miss it (or, sent to the secondary, be refused
        there). So record again under the new names until they hold; the change that follows runs
        with no await in between."""
        got = names()
        while True:
            await intend(got)
            now = names()
            if now == got:
                return got
            got = now

    async def _intend_meta(self, path: bytes | None, is_dir: bool | None = None, size: int | None = None) -> None:
        if path is None or not getattr(self.repl, "journaling", False):
            return
        if is_dir is None:
            try:
                is_dir = stat.S_ISDIR(self._lstat(path).st_mode)
            except OSError:
                return  # the call itself will fail
        if self._replicated(path, is_dir):
            await self.repl.intend_meta(path, size)  # type: ignore[attr-defined]

    async def _carry_marks(self, victim_name: Callable[[], bytes]) -> None:
        """Before the entry `victim_name()` gives loses that name (unlink, rename over it, a move
        to an excluded name) while alone or resynchronising: if its file has other names, what is
        marked to send for this one is marked for them (replicator `carry_marks`). A directory
        moving to an excluded name takes every name below it away: the same for each marked entry
        below it, towards its names outside it."""
        marked = getattr(self.repl, "marked", None)  # journaling replicators, also in a resync's data phase
        if marked is None:
            return
        try:
            is_dir = stat.S_ISDIR(self._lstat(victim_name()).st_mode)
        except OSError:
            return  # the call itself will fail
        if not is_dir:
            await self._carry_marks_of(victim_name)
            return
        top = victim_name()
        for below in self.repl.marked_under(top):  # type: ignore[attr-defined]
            rel = below[len(top):]
            await self._carry_marks_of(lambda rel=rel: victim_name() + rel, leaving=victim_name)

    async def _carry_marks_of(self, victim_name: Callable[[], bytes],
                              leaving: Callable[[], bytes] | None = None) -> None:
        """`_carry_marks` for one entry (any kind but a directory: a FIFO or a symlink may have
        hard links too, and marks of their metadata). Its other names come from the kernel's
        lookups, else from a walk of the tree (rare: a file with several names, changed alone,
        losing one); the names are asked again after the walk, which a rename of a directory above
        may have moved (its marks moved with it). `leaving`: the directory whose names all go
        (names below it are not others)."""
        victim = victim_name()
        if not self.repl.marked(victim):  # type: ignore[attr-defined]
            return
        try:
            st = self._lstat(victim)
        except OSError:
            return
        if stat.S_ISDIR(st.st_mode) or st.st_nlink < 2:
            return
        others = [p for p in self.inodes.paths(fuse_ino(st.st_ino, self._root_ino)) if p != victim]
        if len(others) < st.st_nlink - 1:
            others, _ = await self._walk_names(st, victim)
            victim = victim_name()
            others = [p for p in others if p != victim]
        gone = leaving() if leaving is not None else None
        others = [p for p in others if self._replicated(p) and (gone is None or not is_under(p, gone))]
        await self.repl.carry_marks(victim, others)  # type: ignore[attr-defined]

    async def _walk_names(self, st: os.stat_result, but: bytes) -> tuple[list[bytes], bool]:
        """Every name of file `st` in the tree other than `but`, as the tree stands when this
        returns (no await after), and whether that is all of them. The walk runs in a thread beside
        the loop, and renaming a directory waits for none of the files below it: a name the walk
        found may have moved meanwhile (and another entry taken it). Each is checked again here,
        and the walk made again when one moved."""
        for _ in range(WALK_TRIES):
            found = await asyncio.to_thread(_names_of, self.root, st.st_ino, but)
            names = [name for name in found if self._still_names(name, st)]
            if len(names) == len(found):
                return names, True
        return names, False

    def _still_names(self, path: bytes, st: os.stat_result) -> bool:
        try:
            return os.path.samestat(self._lstat(path), st)
        except OSError:
            return False

    def _open_op(self, f: _File, fh: int) -> list[m.Op] | None:
        """The ops to put before one through handle `fh`: [] if the peer has it open, [Open] if not,
        None if this file is not replicated (excluded, or no name left to open it by)."""
        if not self.repl.active:
            return None
        if f.epoch == self.repl.epoch:
            return []
        path = self.inodes.path(f.ino)
        if not self._replicated(path):
            return None
        f.epoch = self.repl.epoch
        return [m.Open(0, fh, path)]  # type: ignore[arg-type]

    async def _know_a_name(self, f: _File) -> None:
        """Before a change through `f`: if the inode table knows no name of its file, learn one,
        when the file still has one. The table holds the names the kernel looked up through the
        mount; a file opened by one name and also named by a hard link never looked up (made
        before the mount) has, once the name it was opened by is gone, no known name, and a
        change through the handle would then reach the peer by none (the peer opens a handle by
        name after a reconnection, or the first time it is written) and be journaled under none.
        Found by a walk of the tree, once per file in that state; a file deleted while open is
        recognised by one fstat."""
        if f.nameless or self.inodes.path(f.ino) is not None or not self.repl.active:
            return
        try:
            st = os.fstat(f.fd)
        except OSError:
            return
        if st.st_nlink == 0:
            f.nameless = True  # no name on either side: its changes are not replicated
            return
        names, complete = await self._walk_names(st, b"")
        if self.inodes.path(f.ino) is None:  # (a lookup meanwhile may have taught it one)
            for name in names:
                self.inodes.add_path(f.ino, name)
            # No name in the tree: its other names are outside it (one walk, not one per write).
            f.nameless = complete and not names

    def _nameless_fh(self, inode: int) -> int | None:
        """An open handle of `inode` when the mount knows no name of it: calls that come by inode
        without a handle (fchmod, fsetxattr...) go through it, as a local file system allows (the
        file's names may all be gone, or be hard links the mount never looked up)."""
        if self.inodes.path(inode) is not None:
            return None
        fhs = self._open_by_ino.get(inode)
        return min(fhs) if fhs else None

    def _new_owner(self, ctx: fuseabi.RequestContext, parent: bytes) -> tuple[int, int, bool]:
        """uid, gid of a new entry as the kernel would pick them for the caller, and whether the parent
        is set-group-ID (its gid and, for directories, the bit are inherited)."""
        pst = self._lstat(parent)
        setgid = bool(pst.st_mode & stat.S_ISGID)
        return ctx.uid, (pst.st_gid if setgid else ctx.gid), setgid

    def _inherits_acl(self, parent: bytes) -> bool:
        """`parent` has a default ACL: an entry made in it takes the ACL's permissions, masked by
        the mode asked for (acl(5)). It is then made with that mode, not made private and then
        chmod-ed to it, which would set its owner, mask and other entries to the mode alone (a
        default `other::---` would not keep a new file private)."""
        target, follow = self._abs(parent)
        try:
            os.getxattr(target, b"system.posix_acl_default", follow_symlinks=follow)
        except OSError:
            return False
        return True

    def _fix_owner_mode(self, path: bytes, uid: int, gid: int, mode: int, fd: int | None = None,
                        chmod: bool = True) -> os.stat_result:
        st = os.fstat(fd) if fd is not None else self._lstat(path)
        if (st.st_uid, st.st_gid) != (uid, gid):
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(path, uid, gid, dir_fd=self.root, follow_symlinks=False)
        if chmod and not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
            if fd is not None:
                os.fchmod(fd, mode)
            else:
                os.chmod(path, mode, dir_fd=self.root, follow_symlinks=False)
        return os.fstat(fd) if fd is not None else self._lstat(path)

    # ---- lookups and attributes ----

    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: fuseabi.RequestContext) -> fuseabi.EntryAttributes:
        if name in (b".", b".."):
            raise fuseabi.FUSEError(errno.ENOENT)
        path = join(self._path(parent_inode), name)
        return self._learn(self._lstat(path), path)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)
            if not self.inodes.known(ino):
                pin = self._pins.pop(ino, None)
                if pin is not None:
                    os.close(pin)

    def _to_keep(self, ino: int) -> bool:
        """Whether freeing node `ino`'s inode now would let its number go to a new entry while the
        kernel may still ask for the node: the kernel knows it, and nothing keeps the inode yet
        (a pin, or one of our open files). False too past MAX_PINS."""
        return (ino not in self._pins and self.inodes.known(ino) and not self._open_by_ino.get(ino)
                and len(self._pins) < MAX_PINS)

    def release_pins(self) -> None:
        """The mount is gone: the kernel knows no node any more."""
        for pin in self._pins.values():
            os.close(pin)
        self._pins.clear()

    def _pin_if_freed(self, path: bytes) -> None:
        """Right before `path` is unlinked, removed or replaced: if that frees its inode while the
        kernel still knows its node id, keep the inode (an O_PATH descriptor) until the kernel
        forgets it. Node ids are the backing inode numbers, and ext4 gives a freed number to the
        very next file or directory made: a request the kernel sends for the old node meanwhile
        (an OPEN racing with an unlink, a SETATTR) would otherwise reach the new entry, and an
        application write land in a file it never opened (or, on the replica, in a directory:
        a refused stream). The old node then has no name: such a request fails with ENOENT,
        as if the unlink had come first."""
        try:
            st = self._lstat(path)
        except OSError:
            return  # the call itself will fail
        ino = fuse_ino(st.st_ino, self._root_ino)
        if (st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode)) or not self._to_keep(ino):
            return  # not freed (other names), or nothing to keep it for
        try:
            self._pins[ino] = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.root)
        except OSError:
            pass  # the call itself will say why

    @_fuse_errors
    async def getattr(self, inode: int, ctx: fuseabi.RequestContext | None = None) -> fuseabi.EntryAttributes:
        fhs = self._open_by_ino.get(inode)
        if fhs:
            return self._attrs(os.fstat(self._files[next(iter(fhs))].fd))
        return self._attrs(self._lstat(self._path(inode)))

    @_fuse_errors
    async def setattr(self, inode: int, attr: fuseabi.EntryAttributes, fields: fuseabi.SetattrFields,
                      fh: int | None, ctx: fuseabi.RequestContext) -> fuseabi.EntryAttributes:
        f = self._files.get(fh) if fh is not None else None
        if f is None and self.inodes.path(inode) is None:
            # fchmod, fchown, futimens come by inode, without the handle (see _nameless_fh).
            fh = self._nameless_fh(inode)
            if fh is None:
                raise fuseabi.FUSEError(errno.ENOENT)
            f = self._files[fh]
        if f is not None:
            await self._know_a_name(f)
        size = attr.st_size if fields.update_size else None
        path, _ = await self._settled(
            lambda: (self.inodes.path(inode), None if f is None else self.inodes.path(f.ino)),
            lambda ps: self._intend_meta(ps[0] if f is None else ps[1], None, size))
        if f is None and path is None:
            raise fuseabi.FUSEError(errno.ENOENT)
        # Through the open handle when the call came with one (ftruncate, fchmod...), else by name
        # beneath the root descriptor without following a final symlink (lchown, utimensat).
        kw: dict[str, Any]
        if f is not None:
            target, kw = f.fd, {}
        elif path:
            target, kw = path, {"dir_fd": self.root, "follow_symlinks": False}
        else:
            target, kw = self._proc_root, {}
        if fields.update_uid or fields.update_gid:
            os.chown(target, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, **kw)
        if fields.update_mode:
            os.chmod(target, stat.S_IMODE(attr.st_mode), **kw)
        if fields.update_size:
            if f is not None:
                os.ftruncate(f.fd, attr.st_size)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.root)  # type: ignore[arg-type]
                try:
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
        if fields.kill_suidgid and self._kill_suidgid_at(target, kw):
            fields.update_mode = True  # the peer gets the cleared bits as a chmod
        if fields.update_atime or fields.update_mtime:
            cur = os.stat(target, **kw)
            os.utime(target, ns=(attr.st_atime_ns if fields.update_atime else cur.st_atime_ns,
                                 attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns), **kw)
        st = os.stat(target, **kw)
        await self._replicate_setattr(f, fh, path, st, fields)
        return self._attrs(st)

    @staticmethod
    def _kill_suidgid_at(target: int | bytes, kw: dict[str, Any]) -> bool:
        """FATTR_KILL_SUIDGID (a truncate by a caller without CAP_FSETID, or a chown): clear the
        bits as the local VFS would; our backing calls run with CAP_FSETID and would keep them."""
        st = os.stat(target, **kw)
        mode = fuseabi.killed_mode(st.st_mode)
        if mode == st.st_mode or not stat.S_ISREG(st.st_mode):
            return False
        os.chmod(target, stat.S_IMODE(mode), **kw)
        return True

    @_fuse_errors
    async def kill_suidgid(self, fh: int) -> fuseabi.EntryAttributes | None:
        """A write (or an open that truncates) by a caller without CAP_FSETID, under
        HANDLE_KILLPRIV_V2: clear set-user-ID, and set-group-ID if group-executable, before the data
        goes in, and replicate it as a chmod. None when there was nothing to clear (the usual case:
        one fstat)."""
        f = self._files[fh]
        st = os.fstat(f.fd)
        if fuseabi.killed_mode(st.st_mode) == st.st_mode:
            return None
        await self._know_a_name(f)
        (path,) = await self._settled(lambda: (self.inodes.path(f.ino),),
                                      lambda ps: self._intend_meta(ps[0], False))
        st = os.fstat(f.fd)
        os.fchmod(f.fd, stat.S_IMODE(fuseabi.killed_mode(st.st_mode)))
        st = os.fstat(f.fd)
        fields = fuseabi.SetattrFields()
        fields.update_mode = True
        await self._replicate_setattr(f, fh, path, st, fields)
        return self._attrs(st)

    async def _replicate_setattr(self, f: _File | None, fh: int | None, path: bytes | None,
                                 st: os.stat_result, fields: fuseabi.SetattrFields) -> None:
        pre = self._open_op(f, fh) if f is not None and fh is not None else None
        if pre is None and not self._replicated(path, stat.S_ISDIR(st.st_mode)):
            return
        times = fields.update_atime or fields.update_mtime or fields.update_size
        op = m.SetAttr(
            0, path or b"", hid=fh if pre is not None else None,
            mode=st.st_mode if fields.update_mode else None,
            uid=st.st_uid if fields.update_uid else None, gid=st.st_gid if fields.update_gid else None,
            size=st.st_size if fields.update_size else None,
            atime_ns=m.wire_time(st.st_atime_ns) if times else None,
            mtime_ns=m.wire_time(st.st_mtime_ns) if times else None,
        )
        await self.repl.submit(*(pre or []), op)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: fuseabi.RequestContext) -> bytes:
        return os.readlink(self._path(inode), dir_fd=self.root)

    @_fuse_errors
    async def statfs(self, ctx: fuseabi.RequestContext) -> fuseabi.StatvfsData:
        sv = os.statvfs(self._abs(b"")[0])
        out = fuseabi.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail", "f_namemax"):
            setattr(out, name, getattr(sv, name))
        return out

    # ---- namespace ----

    async def _new_entry(self, parent_inode: int, name: bytes, ctx: fuseabi.RequestContext, is_dir: bool,
                         make: Callable[[bytes, int | None], None], mode: int,
                         replicate: Callable[[bytes, os.stat_result], list[m.Op]]) -> fuseabi.EntryAttributes:
        """mkdir, mknod, symlink: `make` the entry here (with `mode` under a default ACL, else
        private: None), give it the owner and mode the kernel's rules give a new entry (a
        set-group-ID parent passes its bit on to directories), then replicate it and the parent
        directory's new time."""
        def names() -> tuple[bytes, bytes]:
            parent = self._path(parent_inode)
            return parent, join(parent, name)

        parent, path = names()
        if self._replicated(path, is_dir):
            parent, path = await self._settled(names, lambda ps: self._intend_ns(ps[1]))
        uid, gid, setgid = self._new_owner(ctx, parent)
        replicated = self._replicated(path, is_dir)
        acl = self._inherits_acl(parent)
        make(path, mode if acl else None)
        st = self._fix_owner_mode(path, uid, gid, mode | (stat.S_ISGID if setgid and is_dir else 0), chmod=not acl)
        attrs = self._learn(st, path)
        await self._submit_ns(replicate(path, st) if replicated else [], path)
        return attrs

    @_fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: fuseabi.RequestContext) -> fuseabi.EntryAttributes:
        return await self._new_entry(
            parent_inode, name, ctx, True, lambda path, made: os.mkdir(path, 0o700 if made is None else made, dir_fd=self.root),
            stat.S_IMODE(mode),
            lambda path, st: [m.Mkdir(0, path, st.st_mode, st.st_uid, st.st_gid),
                              m.SetAttr(0, path, mtime_ns=m.wire_time(st.st_mtime_ns))])

    @_fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: fuseabi.RequestContext) -> fuseabi.EntryAttributes:
        if stat.S_IFMT(mode) not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFREG):
            raise fuseabi.FUSEError(errno.EPERM)  # device nodes are refused: the replica would refuse them
        return await self._new_entry(
            parent_inode, name, ctx, False,
            lambda path, made: os.mknod(path, stat.S_IFMT(mode) | (0o600 if made is None else made), dir_fd=self.root),
            stat.S_IMODE(mode),
            lambda path, st: [m.Mknod(0, path, st.st_mode, 0, st.st_uid, st.st_gid),
                              m.SetAttr(0, path, mtime_ns=m.wire_time(st.st_mtime_ns))])

    @_fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: fuseabi.RequestContext) -> fuseabi.EntryAttributes:
        return await self._new_entry(
            parent_inode, name, ctx, False, lambda path, _: os.symlink(target, path, dir_fd=self.root), 0o777,
            lambda path, st: m.symlink_ops(path, target, st))

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: fuseabi.RequestContext) -> None:
        def names() -> tuple[bytes]:
            return (join(self._path(parent_inode), name),)

        (path,) = names()
        if self._replicated(path):
            await self._carry_marks(lambda: names()[0])
            (path,) = await self._settled(names, lambda ps: self._intend_ns(*ps))
        self._pin_if_freed(path)
        os.unlink(path, dir_fd=self.root)
        self.inodes.remove_path(path)
        await self._submit_ns([m.Unlink(0, path)] if self._replicated(path) else [], path)

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: fuseabi.RequestContext) -> None:
        def names() -> tuple[bytes]:
            return (join(self._path(parent_inode), name),)

        (path,) = names()
        if self._replicated(path, True):
            (path,) = await self._settled(names, lambda ps: self._intend_ns(*ps))
        self._pin_if_freed(path)
        os.rmdir(path, dir_fd=self.root)
        self.inodes.remove_path(path, is_dir=True)
        await self._submit_ns([m.Rmdir(0, path)] if self._replicated(path, True) else [], path)

    @_fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: fuseabi.RequestContext) -> None:
        if flags & ~(fuseabi.RENAME_NOREPLACE | fuseabi.RENAME_EXCHANGE):
            # RENAME_WHITEOUT (overlayfs's) would leave a device node here that the replica
            # refuses: refused, as a file system without whiteouts does.
            raise fuseabi.FUSEError(errno.EINVAL)
        exchange = bool(flags & fuseabi.RENAME_EXCHANGE)

        def names() -> tuple[bytes, bytes]:
            return join(self._path(parent_inode_old), name_old), join(self._path(parent_inode_new), name_new)

        def views(old: bytes, new: bytes) -> tuple[bool, list[bool]]:
            # Exclusion can depend on the type ("tmp/" only matches directories): look at every
            # name with the entry it held before and the one it holds after.
            old_dir = stat.S_ISDIR(self._lstat(old).st_mode)
            new_dir = stat.S_ISDIR(self._lstat(new).st_mode) if exchange else False
            ex = self.exclude.excluded
            seen = [ex(old, old_dir), ex(new, old_dir)]
            if exchange:
                seen += [ex(new, new_dir), ex(old, new_dir)]
            return old_dir, seen

        old, new = names()
        old_dir, seen = views(old, new)
        if self.repl.active and not all(seen):
            # A file that loses a replicated name here may keep others: its journal marks go to
            # them first (_carry_marks). Its name goes when it moves to an excluded one, or when
            # another file replaces it.
            if seen[1] and not seen[0]:
                await self._carry_marks(lambda: names()[0])
            if exchange:
                if seen[3] and not seen[2]:
                    await self._carry_marks(lambda: names()[1])
            elif self._replaces(*names()):
                with contextlib.suppress(OSError):
                    await self._carry_marks(lambda: names()[1])
            old, new = await self._settled(names, lambda ps: self._intend_ns(*ps))
            old_dir, seen = views(old, new)
        if not exchange and self._replaces(old, new):
            self._pin_if_freed(new)
        renameat2(self.root, old, self.root, new, flags)
        if exchange:
            self.inodes.exchange(old, new)
        else:
            self.inodes.rename(old, new, old_dir)
        if not self.repl.active:
            return
        if not any(seen):
            # The entries below a renamed directory keep their names within it, but a pattern that
            # matches whole paths (`data/*.bin`) may treat them differently under the new name.
            moved = [(old, new), (new, old)] if exchange else [(old, new)]
            gone: list[bytes] = []
            came: list[bytes] = []
            for src, dst in moved:
                self._crossing_below(src, dst, gone, came)
            # Those now excluded leave the replica; those now replicated (it never had them) are
            # copied to it whole.
            fixes = [m.Remove(0, p) for p in gone] + self._resend(*came)
            await self._submit_ns([m.Rename(0, old, new, flags), *fixes], old, new, *gone, *came)
        else:
            await self._submit_ns(self._resend(old, new) if not all(seen) else [], old, new)

    def _crossing_below(self, src: bytes, dst: bytes, gone: list[bytes], came: list[bytes]) -> None:
        """A directory moved from `src` to `dst`, both replicated: the entries below it (at their
        new paths) excluded under the new name and not the old (added to `gone`), or the reverse
        (`came`). Nothing to look at unless some pattern matches whole paths."""
        if not self.exclude.path_dependent:
            return
        try:
            if not stat.S_ISDIR(self._lstat(dst).st_mode):
                return
        except OSError:
            return
        ex = self.exclude.excluded
        todo = [b""]
        while todo:
            rel = todo.pop()
            try:
                fd = os.open(join(dst, rel) if rel else dst, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, dir_fd=self.root)
            except OSError:
                continue
            try:
                entries = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in os.scandir(fd)]
            finally:
                os.close(fd)
            for name, is_dir in entries:
                below = join(rel, name)
                before, after = ex(join(src, below), is_dir), ex(join(dst, below), is_dir)
                if before != after:
                    (gone if after else came).append(join(dst, below))
                elif is_dir and not after:
                    todo.append(below)  # its own entries may still cross

    def _replaces(self, old: bytes, new: bytes) -> bool:
        """A rename of `old` to `new` replaces another entry (not another name of the same file)."""
        try:
            return not os.path.samestat(self._lstat(old), self._lstat(new))
        except OSError:
            return False  # nothing at `new` (or `old` gone: the rename itself will fail)

    def _resend(self, *paths: bytes) -> list[m.Op]:
        """An entry crossed the exclusion boundary: the replica's copy at each replicated path is
        replaced by a copy of ours (or just removed when nothing is there any more)."""
        tops = [p for p in paths if not (self.exclude.excluded(p, True) and self.exclude.excluded(p, False))]
        return [m.Remove(0, p) for p in tops] + self._copy_ops(*tops)

    def _copy_ops(self, *tops: bytes) -> list[m.Op]:
        """Ops that recreate `tops` (and their subtrees) on the replica. A file that also has a
        replicated name the replica already holds is linked to it, not copied: a copy would split
        the hard link, and later writes through either name would reach only one of them there."""

        def linked_name(path: bytes, st: os.stat_result) -> bytes | None:
            for other in self.inodes.paths(fuse_ino(st.st_ino, self._root_ino)):
                if not any(is_under(other, top) for top in tops) and not self.exclude.excluded(other):
                    return other
            return None

        copied: dict[int, bytes] = {}
        return [op for top in tops for op in tree_ops(self.root, top, self.exclude, linked_name, copied)]

    @_fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: fuseabi.RequestContext) -> fuseabi.EntryAttributes:
        def names() -> tuple[bytes, bytes]:
            return self._path(inode), join(self._path(new_parent_inode), new_name)

        src, dst = names()
        if self._replicated(dst):  # src too: its link count changes (a crash compares both)
            src, dst = await self._settled(names, lambda ps: self._intend_ns(ps[1], ps[0]))
        os.link(src, dst, src_dir_fd=self.root, dst_dir_fd=self.root, follow_symlinks=False)
        attrs = self._learn(self._lstat(dst), dst)
        ops: list[m.Op] = []
        if self._replicated(dst):
            # An excluded source is unknown there: linked from another name, or copied.
            ops = self._copy_ops(dst) if self.exclude.excluded(src) else [m.Link(0, src, dst)]
        await self._submit_ns(ops, dst)
        return attrs

    # ---- files ----

    def _new_fh(self) -> int:
        # Handles are numbered, not the backing descriptors: create() names its handle to the peer
        # before the local open gives a descriptor, and a number is never reused.
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _register(self, fd: int, ino: int, flags: int, uid: int, fh: int | None = None) -> int:
        if fh is None:
            fh = self._new_fh()
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        self._files[fh] = _File(fd, ino, bool(flags & _SYNC), writable, uid=uid)
        self._open_by_ino.setdefault(ino, set()).add(fh)
        return fh

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: fuseabi.RequestContext) -> fuseabi.FileInfo:
        path = self.inodes.path(inode)
        if path is not None:
            fd = os.open(path, (flags & ~_STRIP) | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.root)
        elif self._open_by_ino.get(inode):  # every name is gone but the file is still open
            other = self._files[next(iter(self._open_by_ino[inode]))].fd
            fd = os.open(f"/proc/self/fd/{other}", (flags & ~_STRIP) | os.O_CLOEXEC)
        else:
            raise fuseabi.FUSEError(errno.ENOENT)
        fh = self._register(fd, inode, flags, ctx.uid)
        # keep_cache: nobody but us changes the files, so cached pages stay valid across opens.
        return fuseabi.FileInfo(fh=fh, direct_io=_direct(flags), keep_cache=True)

    @_fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: fuseabi.RequestContext) -> tuple[fuseabi.FileInfo, fuseabi.EntryAttributes]:
        def names() -> tuple[bytes, bytes]:
            parent = self._path(parent_inode)
            return parent, join(parent, name)

        parent, path = names()
        if self._replicated(path):
            parent, path = await self._settled(names, lambda ps: self._intend_ns(ps[1]))
        uid, gid, _ = self._new_owner(ctx, parent)
        bflags = (flags & ~_STRIP) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        replicated = self._replicated(path)
        if flags & os.O_EXCL:
            bflags |= os.O_EXCL
        fh = self._new_fh()
        want = stat.S_IFREG | stat.S_IMODE(mode)
        epoch = self.repl.epoch
        peer: Started | None = None
        if replicated:
            # The peer creates while we do: enqueued first, our create right after with nothing
            # in between (order kept); the call returns when both are done. If ours fails, the
            # peer's copy of the path is made equal to ours again.
            peer = Started(self.repl.submit(m.Create(0, path, want, uid, gid, hid=fh)))
        try:
            acl = self._inherits_acl(parent)
            fd = os.open(path, bflags | (flags & os.O_TRUNC), stat.S_IMODE(mode) if acl else 0o600, dir_fd=self.root)
            try:
                st = self._fix_owner_mode(path, uid, gid, stat.S_IMODE(mode), fd, chmod=not acl)
            except OSError:
                os.close(fd)
                raise
        except OSError:
            if peer is not None:
                undo = Started(self.repl.submit(m.Close(0, fh), *self._resend(path)))
                await peer
                await undo
            raise
        attrs = self._learn(st, path)
        self._register(fd, attrs.st_ino, flags, ctx.uid, fh)
        if peer is not None:
            self._files[fh].epoch = epoch
            fixes = self._dir_times(path)
            if (st.st_mode, st.st_uid, st.st_gid) != (want, uid, gid):
                fixes.insert(0, m.SetAttr(0, path, hid=fh, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid))
            fix = Started(self.repl.submit(*fixes))
            await peer
            await fix
        else:
            await self._submit_ns([], path)  # an excluded file: its directory's times still changed
        return fuseabi.FileInfo(fh=fh, direct_io=_direct(flags), keep_cache=True), attrs

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return os.pread(self._files[fh].fd, size, off)
        except OSError as exc:
            raise fuseabi.FUSEError(exc.errno or errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        f = self._files[fh]
        if not f.nameless and self.inodes.path(f.ino) is None:
            await self._know_a_name(f)
        if getattr(self.repl, "journaling", False):
            await self._intend_write(f, off, len(buf))
        pre = self._open_op(f, fh)
        if pre is None:
            try:
                done = self._backing_write(f, buf, off)
            except OSError as exc:
                raise fuseabi.FUSEError(exc.errno or errno.EIO) from None
            self._behind.wrote(f.fd, off, done)
            return done
        # The peer writes while we do: the Write is enqueued first and our pwrite follows with
        # nothing in between (so operations keep their order), and the call returns only when
        # both are done. A local write that fails or comes up short is undone on the peer.
        peer = Started(self.repl.submit(*pre, m.Write(0, fh, off, buf, f.sync)))
        err: OSError | None = None
        try:
            done = self._backing_write(f, buf, off)
        except OSError as exc:
            done, err = 0, exc
        fix = self._undo_write(f, fh, off, len(buf), done) if done != len(buf) else None
        self._behind.wrote(f.fd, off, done)
        await peer
        if fix is not None:
            await fix
        if err is not None:
            raise fuseabi.FUSEError(err.errno or errno.EIO)
        return done

    def _backing_write(self, f: _File, buf: bytes, off: int) -> int:
        limited = self.limits.enter(f.uid)
        try:
            return os.pwrite(f.fd, buf, off)
        finally:
            if limited:
                self.limits.leave()

    def _backing_fallocate(self, f: _File, mode: int, off: int, length: int) -> None:
        limited = self.limits.enter(f.uid)
        try:
            backing_fallocate(f.fd, mode, off, length)
        finally:
            if limited:
                self.limits.leave()

    def _undo_write(self, f: _File, fh: int, off: int, length: int, done: int) -> Started:
        """The peer wrote [off, off+length) but we wrote only `done` bytes: send it our content of
        the rest of that range, and our size if the write would have grown the file."""
        ops: list[m.Op] = []
        try:
            size = os.fstat(f.fd).st_size
            start, end = off + done, min(off + length, size)
            if end > start:
                data = os.pread(f.fd, end - start, start)
                if data:
                    ops.append(m.Write(0, fh, start, data, f.sync))
            if size < off + length:
                ops.append(m.SetAttr(0, self.inodes.path(f.ino) or b"", hid=fh, size=size))
        except OSError:
            log.exception("cannot undo a failed write on the peer")  # followed by a failed call anyway
        return Started(self.repl.submit(*ops))

    async def _intend_write(self, f: _File, off: int, length: int) -> None:
        async def intend(ps: tuple[bytes | None]) -> None:
            path = ps[0]
            if path is None or not self._replicated(path):
                return
            try:
                extends = off + length > os.fstat(f.fd).st_size
                await self.repl.intend_write(path, off, length, extends)  # type: ignore[attr-defined]
            except OSError:
                pass  # the write itself reports the error

        await self._settled(lambda: (self.inodes.path(f.ino),), intend)

    @_fuse_errors
    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        if mode not in _FALLOC_MODES:
            raise fuseabi.FUSEError(errno.EOPNOTSUPP)
        f = self._files[fh]
        await self._know_a_name(f)
        if getattr(self.repl, "journaling", False):
            await self._intend_fallocate(f, mode, off, length)
        pre = self._open_op(f, fh)
        if pre is None:
            self._backing_fallocate(f, mode, off, length)
            return
        # As a write: the peer's fallocate is enqueued first and ours follows with nothing in
        # between (order kept), the call returns when both are done. If ours fails, the peer's copy
        # of the range and its size are made ours again before the error is returned.
        peer = Started(self.repl.submit(*pre, m.Fallocate(0, fh, mode, off, length)))
        try:
            self._backing_fallocate(f, mode, off, length)
        except OSError:
            await peer
            await self._undo_fallocate(f, fh, mode, off, length)
            raise
        await peer

    async def _intend_fallocate(self, f: _File, mode: int, off: int, length: int) -> None:
        """Write-ahead marks for a fallocate that changes what the file reads: a punched or zeroed
        range, or a size that grows. Reserving space alone changes neither and needs none."""
        async def intend(ps: tuple[bytes | None]) -> None:
            path = ps[0]
            if path is None or not self._replicated(path):
                return
            try:
                extends = not mode & _FALLOC_KEEP_SIZE and off + length > os.fstat(f.fd).st_size
            except OSError:
                return  # the fallocate itself reports the error
            if extends or mode & (_FALLOC_PUNCH_HOLE | _FALLOC_ZERO_RANGE):
                await self.repl.intend_write(path, off, length, extends)  # type: ignore[attr-defined]

        await self._settled(lambda: (self.inodes.path(f.ino),), intend)

    async def _undo_fallocate(self, f: _File, fh: int, mode: int, off: int, length: int) -> None:
        """The peer ran a fallocate that failed here: send it our content of the range it may have
        punched or zeroed (read and sent a chunk at a time: the range can be huge), then our size
        if it may have grown the file. Each chunk is read and enqueued with nothing in between, so
        writes made meanwhile are included and keep their order."""
        try:
            if mode & (_FALLOC_PUNCH_HOLE | _FALLOC_ZERO_RANGE):
                pos = off
                while pos < min(off + length, os.fstat(f.fd).st_size):
                    data = os.pread(f.fd, min(_UNDO_CHUNK, off + length - pos), pos)
                    if not data:
                        break
                    await self.repl.submit(m.Write(0, fh, pos, data, f.sync))
                    pos += len(data)
            if not mode & _FALLOC_KEEP_SIZE:
                size = os.fstat(f.fd).st_size
                await self.repl.submit(m.SetAttr(0, self.inodes.path(f.ino) or b"", hid=fh, size=size))
        except OSError:
            log.exception("cannot undo a failed fallocate on the peer")  # followed by a failed call anyway

    # No flush(): every write was replicated when it returned, close adds nothing. Without the
    # handler the first FLUSH gets ENOSYS and the kernel sends no more (one request less per
    # close); it still writes dirty mmap pages back before close returns.

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        f = self._files[fh]
        if f.epoch != self.repl.epoch:  # the peer will need a name to open it by
            await self._know_a_name(f)
        pre = self._open_op(f, fh)
        if pre is None:
            (os.fdatasync if datasync else os.fsync)(f.fd)
            return
        # The peer's fsync runs while ours does: the Fsync is on the wire (every earlier write is
        # ahead of it) before we block in our own, and the call returns only once both are durable.
        st = os.fstat(f.fd)
        times = {"atime_ns": m.wire_time(st.st_atime_ns), "mtime_ns": m.wire_time(st.st_mtime_ns)}
        peer = Started(self.repl.submit(*pre, m.Fsync(0, fh, datasync=datasync, **times)))
        try:
            (os.fdatasync if datasync else os.fsync)(f.fd)
        finally:
            await peer

    async def release(self, fh: int) -> None:
        f = self._files.pop(fh)
        fhs = self._open_by_ino.get(f.ino)
        if fhs is not None:
            fhs.discard(fh)
            if not fhs:
                del self._open_by_ino[f.ino]
        try:
            if f.epoch == self.repl.epoch and self.repl.active:
                st = os.fstat(f.fd)
                await self.repl.submit(m.Close(0, fh, **m.wire_times(st)))
            elif f.epoch >= 0 and self.repl.active:
                # Changed through this handle while the peer held it, which a lost link made it
                # forget: our times would never reach it by the Close. Sent by name instead
                # (recorded in the journal while alone).
                await self._know_a_name(f)
                (path,) = await self._settled(lambda: (self.inodes.path(f.ino),),
                                              lambda ps: self._intend_meta(ps[0], False))
                if self._replicated(path):
                    st = os.fstat(f.fd)
                    await self.repl.submit(m.SetAttr(0, path, **m.wire_times(st)))
        except (OSError, fuseabi.FUSEError):  # a close cannot fail: not even refused held writes
            pass
        finally:
            self._behind.forget(f.fd)
            self._close_or_keep(f)

    async def release_all(self) -> None:
        """The mount is gone while the application still had files open (a stop, a swap): release
        them as the kernel would have. Their last times reach the peer with each Close, where they
        would otherwise stay as the replica's own (verify reports them); our descriptors close."""
        for fh in list(self._files):
            await self.release(fh)

    def _close_or_keep(self, f: _File) -> None:
        """The last handle of a file unlinked while open: closing it frees the inode, whose number
        ext4 gives to the next entry made, while the kernel may not have forgotten the node yet.
        Kept as the node's pin until it does (_pin_if_freed)."""
        try:
            freed = os.fstat(f.fd).st_nlink == 0
        except OSError:
            freed = False
        if freed and self._to_keep(f.ino):
            self._pins[f.ino] = f.fd
        else:
            os.close(f.fd)

    # ---- directories ----

    @_fuse_errors
    async def opendir(self, inode: int, ctx: fuseabi.RequestContext) -> int:
        path = self._path(inode)
        fd = os.open(path or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root)
        try:
            entries = []
            for name in map(os.fsencode, os.listdir(fd)):  # listdir(fd) gives str: back to raw bytes
                try:
                    entries.append((name, os.stat(name, dir_fd=fd, follow_symlinks=False)))
                except FileNotFoundError:
                    continue
        finally:
            os.close(fd)
        handle = self._next_dir
        self._next_dir += 1
        self._dirs[handle] = sorted(entries)
        self._dir_ino[handle] = inode
        return handle

    async def readdir(self, fh: int, start_id: int, token: fuseabi.ReaddirToken) -> None:
        entries = self._dirs[fh]
        parent = None
        for i in range(start_id, len(entries)):
            name, st = entries[i]
            attrs = self._attrs(st)
            if not fuseabi.readdir_reply(token, name, attrs, i + 1):
                return
            if parent is None:
                parent = self.inodes.path(self._dir_ino[fh]) or b""
            self.inodes.lookup(attrs.st_ino, join(parent, name))

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)
        self._dir_ino.pop(fh, None)

    @_fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        path = self.inodes.path(self._dir_ino.get(fh, -1))
        if path is None:
            return
        fd = os.open(path or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._replicated(path, True):
            await self.repl.submit(m.Fsync(0, None, path=path))

    # ---- extended attributes ----

    async def _nameless_fd(self, inode: int) -> int | None:
        """For a change by inode (fsetxattr...): the descriptor to make it through when the file
        has no name left (deleted while open), after learning one if it has a name the mount
        never looked up; None: go by name."""
        fh = self._nameless_fh(inode)
        if fh is None:
            return None
        f = self._files[fh]
        await self._know_a_name(f)
        return f.fd if self.inodes.path(inode) is None else None

    @_fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: fuseabi.RequestContext,
                       flags: int = 0) -> None:
        """`flags`: XATTR_CREATE / XATTR_REPLACE, checked by the backing file system itself (the
        replica then just takes the value: it follows the primary's outcome)."""
        if (fd := await self._nameless_fd(inode)) is not None:
            os.setxattr(fd, name, value, flags)  # no name on either node: nothing to replicate
            return
        (path,) = await self._settled(lambda: (self._path(inode),), lambda ps: self._intend_meta(ps[0]))
        target, follow = self._abs(path)
        os.setxattr(target, name, value, flags, follow_symlinks=follow)
        if self._replicated(path, stat.S_ISDIR(self._lstat(path).st_mode)):
            await self.repl.submit(m.SetXattr(0, path, name, value))

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: fuseabi.RequestContext) -> bytes:
        with _no_such_attribute():
            if (fh := self._nameless_fh(inode)) is not None:
                return os.getxattr(self._files[fh].fd, name)
            target, follow = self._abs(self._path(inode))
            return os.getxattr(target, name, follow_symlinks=follow)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: fuseabi.RequestContext) -> list[bytes]:
        if (fh := self._nameless_fh(inode)) is not None:
            names = os.listxattr(self._files[fh].fd)
        else:
            target, follow = self._abs(self._path(inode))
            names = os.listxattr(target, follow_symlinks=follow)
        if not caller_is_admin(ctx.pid):
            # We list as root; a local file system shows trusted.* names only to CAP_SYS_ADMIN.
            names = [n for n in names if not n.startswith("trusted.")]
        return [os.fsencode(n) for n in names]

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: fuseabi.RequestContext) -> None:
        if (fd := await self._nameless_fd(inode)) is not None:
            with _no_such_attribute():
                os.removexattr(fd, name)  # no name on either node: nothing to replicate
            return
        (path,) = await self._settled(lambda: (self._path(inode),), lambda ps: self._intend_meta(ps[0]))
        target, follow = self._abs(path)
        with _no_such_attribute():
            os.removexattr(target, name, follow_symlinks=follow)
        if self._replicated(path, stat.S_ISDIR(self._lstat(path).st_mode)):
            await self.repl.submit(m.RemoveXattr(0, path, name))
