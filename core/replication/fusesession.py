"""Mounting and serving a FUSE file system from asyncio, straight over /dev/fuse (no libfuse).

`FuseSession(ops, mountpoint)` mounts with mount(2) and serves the requests of the kernel with the
handler methods of `ops` (fusefs.ReplicatedFS; the method names and types are those of pyfuse3,
see fuseabi.py). Design, for the per-request cost (facts.md: the Python layer's cost per request is
where the time goes):

- one `loop.add_reader` for the whole session; on readable, requests are read with `os.readv` into
  one preallocated buffer until EAGAIN (the kernel hands out one request per read);
- each request's handler coroutine runs its first step inline, in its own `contextvars` context
  (fusefs keeps per-request state in a ContextVar): most requests (getattr, lookup, read, release...)
  complete there and are answered at once, with no task. One that suspends on a future (a write
  waiting for the peer's acknowledgement) is parked on it: the future's done callback runs the next
  step, in the same context, and replies when the coroutine returns. No Task: a Task would cost two
  more event-loop turns per request (its first step and its done callback are each scheduled with
  call_soon), and each turn is an epoll_wait. A handler that suspends on anything else (a bare
  `await asyncio.sleep(0)`) is continued by a Task owned by the session. Parked steps run outside
  any Task: handlers must not use `asyncio.timeout()` or `asyncio.current_task()` directly (wrap
  such code in a task);
- replies go out with one `os.writev` (header + payload). An ENOENT from the kernel on reply means
  the request was interrupted or aborted meanwhile: normal.

Handler contract: raise `FUSEError(errno)` to fail a request; any other exception fails it with EIO
and is logged (a bug fails one call, never the session). FORGET, BATCH_FORGET and INTERRUPT get no
reply; a request whose handler method is missing gets ENOSYS (the kernel then stops sending most of
them, e.g. FLUSH, ACCESS).
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Generator
from pathlib import Path
from typing import Any

from . import fuseabi as abi
from .fuseabi import FUSEError, InitFlag, Opcode, RequestContext
from .syscalls import MNT_DETACH, MS_NODEV, MS_NOSUID, UMOUNT_NOFOLLOW, mount, umount2

log = logging.getLogger(__name__)

MAX_PAGES = 256  # the kernel's cap (/proc/sys/fs/fuse/max_pages_limit) here: 1 MiB requests
MAX_WRITE = MAX_PAGES * abi.PAGE_SIZE
BUFFER_SIZE = MAX_WRITE + 64 * 1024  # a full write (header + write_in + data), or a setxattr of 64 KiB

# What we ask for, when the kernel offers it (each flag is granted only if offered):
#   ASYNC_READ          several reads (readahead) of a file in flight, not one at a time
#   BIG_WRITES          writes above 4 KiB (implied by MAX_PAGES on recent kernels)
#   MAX_PAGES           requests up to MAX_PAGES pages: 1 MiB writes and reads
#   HANDLE_KILLPRIV_V2  we clear set-user-ID/set-group-ID on write, truncate and chown ourselves
#                       (ops.kill_suidgid, SetattrFields.kill_suidgid); in exchange the kernel no
#                       longer sends getxattr("security.capability") before every cached write
#   PARALLEL_DIROPS     lookups and readdirs of one directory are not serialised by the kernel
#   DO_READDIRPLUS      readdir returns attributes too (no LOOKUP per entry); always, not "auto"
#   AUTO_INVAL_DATA, ASYNC_DIO  what libfuse asked for under pyfuse3: cache behaviour unchanged
#   POSIX_ACL           (if ops.enable_posix_acl) the kernel enforces POSIX ACLs, read through our
#                       getxattr and cached: without it, default_permissions checks the mode bits
#                       alone, which denies a user an ACL entry grants and lets the owning group do
#                       what the mask allows named entries only. The file system must keep modes
#                       and ACLs in step and apply default ACLs to new entries (fusefs: the backing
#                       file system does both); the kernel still applies the caller's umask to a
#                       new entry's mode (no DONT_MASK), as under libfuse
# Not asked for: ATOMIC_O_TRUNC (fusefs.open does not truncate: the kernel then sends the truncate
# as a SETATTR, which is journaled and replicated like any other), EXPORT_SUPPORT (no "."/".."
# lookups), DONT_MASK (the kernel applies the caller's umask to the mode it sends, as before),
# WRITEBACK_CACHE (unless ops.enable_writeback_cache: facts.md, it hurts fsync-heavy loads),
# POSIX_ACL unless ops.enable_posix_acl, SETXATTR_EXT (its larger setxattr_in is not parsed here),
# SPLICE_*, INIT_EXT (no flags2 bit is wanted).
WANTED = (InitFlag.ASYNC_READ | InitFlag.BIG_WRITES | InitFlag.MAX_PAGES | InitFlag.HANDLE_KILLPRIV_V2
          | InitFlag.PARALLEL_DIROPS | InitFlag.DO_READDIRPLUS | InitFlag.AUTO_INVAL_DATA | InitFlag.ASYNC_DIO)

Payload = bytes | bytearray | memoryview | None
Encoder = Callable[[Any], Payload]
Started = tuple[Coroutine[Any, Any, Any], Encoder] | None


def mount_fuse(fd: int, mountpoint: Path, fsname: str, subtype: str) -> None:
    """mount(2) of a FUSE file system served through /dev/fuse descriptor `fd` (root only)."""
    data = (f"fd={fd},rootmode={stat.S_IFDIR:o},user_id={os.getuid()},group_id={os.getgid()},"
            "default_permissions,allow_other").encode()
    # nosuid,nodev: what libfuse mounted with (no set-user-ID programs or devices from the mirror)
    mount(fsname.encode(), os.fsencode(mountpoint), f"fuse.{subtype}".encode(), MS_NOSUID | MS_NODEV, data)


def umount_detach(mountpoint: Path) -> None:
    """Lazy unmount: gone from the namespace at once, even with files open or requests in flight."""
    umount2(os.fsencode(mountpoint), MNT_DETACH | UMOUNT_NOFOLLOW)


def _is_future(obj: Any) -> bool:
    """What asyncio's Task accepts as a suspension point: a future yielded by `await`."""
    return bool(getattr(obj, "_asyncio_future_blocking", None))


class _Parked:
    """A handler coroutine suspended on a future; `resume` (that future's done callback, run in the
    request's context) is where the session takes it up again."""

    __slots__ = ("coro", "ctx", "encode", "fut", "opcode", "session", "unique")

    def __init__(self, session: FuseSession, coro: Coroutine[Any, Any, Any], ctx: contextvars.Context,
                 unique: int | None, encode: Encoder, opcode: int) -> None:
        self.session, self.coro, self.ctx = session, coro, ctx
        self.unique, self.encode, self.opcode = unique, encode, opcode
        self.fut: asyncio.Future[Any] | None = None

    def park(self, fut: asyncio.Future[Any]) -> None:
        fut._asyncio_future_blocking = False  # taken, as a Task does
        self.fut = fut
        fut.add_done_callback(self.resume, context=self.ctx)

    def resume(self, fut: asyncio.Future[Any]) -> None:
        self.fut = None
        self.session._resume(self, fut)


class _Resumed(collections.abc.Coroutine):  # type: ignore[type-arg]
    """A coroutine already run to its first suspension (inline, by the reader) and continued by a
    Task: the Task's first step gets the future that the coroutine already waits on."""

    __slots__ = ("_coro", "_first", "_started")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro, self._first, self._started = coro, first, False

    def send(self, value: Any) -> Any:
        if not self._started:
            self._started, first = True, self._first
            self._first = None
            return first
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._started, self._first = True, None  # the coroutine gets it where it waits
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __next__(self) -> Any:
        return self.send(None)

    def __await__(self) -> Generator[Any, None, Any]:
        return self  # type: ignore[return-value]


def _cstrings(body: memoryview, count: int) -> list[bytes]:
    """The `count` NUL-terminated strings at the start of `body`, plus what follows them."""
    return bytes(body).split(b"\0", count)


def _name(body: memoryview) -> bytes:
    return _cstrings(body, 1)[0]


def _empty(_: Any) -> Payload:
    return None


def _raw(data: Any) -> Payload:
    return data  # type: ignore[no-any-return]


def _write_out(n: int) -> bytes:
    return abi.WRITE_OUT.pack(n, 0)


def _create_out(result: tuple[abi.FileInfo, abi.EntryAttributes]) -> bytes:
    fi, attrs = result
    return abi.encode_entry_out(attrs) + abi.encode_open_out(fi)


def _opendir_out(fh: int) -> bytes:
    return abi.OPEN_OUT.pack(fh, 0, 0)


def _xattr_out(size: int, value: bytes) -> Payload:
    """getxattr/listxattr: with size 0 the caller asks how large the value is."""
    if size == 0:
        return abi.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise FUSEError(errno.ERANGE)
    return value


def _xattr_list_out(size: int, names: list[bytes]) -> Payload:
    return _xattr_out(size, b"".join(n + b"\0" for n in names))


def _access_out(allowed: bool) -> Payload:
    if not allowed:
        raise FUSEError(errno.EACCES)
    return None


class FuseSession:
    """One mount of `ops` at `mountpoint`, served on the running event loop until `close()` or
    until the kernel ends the connection (unmounted from outside: `wait()` returns)."""

    def __init__(self, ops: Any, mountpoint: Path, *, fsname: str = "safekit", subtype: str = "safekit",
                 max_tasks: int = 64) -> None:
        self.ops = ops
        self.mountpoint = Path(mountpoint)
        self.fsname, self.subtype = fsname, subtype
        self.max_tasks = max_tasks  # suspended requests at most; beyond, /dev/fuse is not read
        self.fd = -1
        self.proto_minor = 0
        self.kernel_flags = 0  # offered by the kernel in INIT
        self.flags = 0  # negotiated
        self._buf = bytearray(BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._draining = False  # drain(): no new request is read
        self._closing = False
        self._mounted = False
        self._initialized: asyncio.Future[None] | None = None
        self._ended: asyncio.Future[None] | None = None
        self._tasks: dict[asyncio.Task[Any], tuple[int | None, Encoder]] = {}
        self._parked: set[_Parked] = set()
        self._reported: set[int] = set()
        self._table = self._handlers()

    # ---- lifecycle ----

    async def start(self, timeout: float = 10.0) -> None:
        """Mount, serve, and return once the kernel's INIT is answered."""
        loop = self._loop = asyncio.get_running_loop()
        self._initialized, self._ended = loop.create_future(), loop.create_future()
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            mount_fuse(self.fd, self.mountpoint, self.fsname, self.subtype)
            self._mounted = True
            self._resume_reading()
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._initialized)
        except BaseException:
            await self.close()
            raise

    async def wait(self) -> None:
        if self._ended is not None:
            await asyncio.shield(self._ended)

    @property
    def ended(self) -> bool:
        return self._ended is not None and self._ended.done()

    @property
    def in_flight(self) -> int:
        """Requests suspended (parked or continued by a task)."""
        return len(self._tasks) + len(self._parked)

    async def drain(self, timeout: float) -> bool:
        """Read no more requests and let those in progress finish, for up to `timeout` seconds. A
        clean stop then leaves no operation half done (a create whose mode and directory times, or a
        short write whose undo, were still to be sent to the peer). True when none is left."""
        self._draining = True
        self._stop_reading()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline and not self.ended:
            await asyncio.sleep(0.005)
        return not self.in_flight

    async def close(self, timeout: float = 5.0) -> None:
        """Stop serving: cancel the requests in progress (their callers get an error when the
        connection is closed), detach the mount, close /dev/fuse (which aborts the connection, so
        nothing can hang on it)."""
        self._closing = True
        self._stop_reading()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            for parked in list(self._parked):
                if parked.fut is not None and parked.fut.remove_done_callback(parked.resume):
                    # Not resumed yet: handed to a task, which cancellation reaches like any other.
                    self._parked.discard(parked)
                    parked.fut._asyncio_future_blocking = True
                    self._continue_in_task(parked.coro, parked.ctx, parked.unique, parked.encode,
                                           parked.opcode, parked.fut)
            # (a parked request whose future is already done resumes on its own; if it suspends
            # again, it gets a task, cancelled at once while closing)
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
            else:
                await asyncio.sleep(0)
        if self._mounted:
            self._mounted = False
            try:
                umount_detach(self.mountpoint)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
                    log.warning("%s", exc)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._end()

    def _end(self, reason: BaseException | None = None) -> None:
        self._stop_reading()
        if self._initialized is not None and not self._initialized.done() and not self._closing:
            # start() is waiting for it (when closing, start's own error is what counts)
            self._initialized.set_exception(ConnectionError(f"FUSE session ended before INIT: {reason}"))
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
            log.info("FUSE session of %s ended%s", self.mountpoint, f" ({reason})" if reason else "")

    def _resume_reading(self) -> None:
        if not self._reading and self.fd >= 0 and not self._closing and not self._draining and not self.ended:
            assert self._loop is not None
            self._loop.add_reader(self.fd, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            assert self._loop is not None
            self._loop.remove_reader(self.fd)
            self._reading = False

    # ---- requests in ----

    def _on_readable(self) -> None:
        bufs, view = [self._buf], self._view
        while self._reading:
            try:
                n = os.readv(self.fd, bufs)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # interrupted before we read it: gone
                    continue
                self._end(exc)  # ENODEV: unmounted and the connection closed
                return
            self._dispatch(view, n)

    def _dispatch(self, view: memoryview, n: int) -> None:
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = abi.IN_HEADER.unpack_from(view)
        body = view[abi.IN_HEADER.size:min(length, n) - 8 * extlen]  # extensions are never asked for
        if opcode == Opcode.INIT:
            self._init(unique, body)
            return
        if opcode == Opcode.DESTROY:
            self._send(unique, None)
            self._end()
            return
        handler = self._table.get(opcode)
        if handler is None:
            self._unhandled(unique, opcode)
            return
        try:
            started = handler(nodeid, uid, gid, pid, body)
        except Exception as exc:  # noqa: BLE001 - a malformed or refused request, not the session
            self._reply_exception(unique, exc, opcode)
            return
        if started is not None:
            no_reply = opcode in (Opcode.FORGET, Opcode.BATCH_FORGET)
            self._start(None if no_reply else unique, started[0], started[1], opcode)

    def _unhandled(self, unique: int, opcode: int) -> None:
        if opcode not in self._reported:
            self._reported.add(opcode)
            try:
                name = Opcode(opcode).name
            except ValueError:
                name = "unknown"
            log.info("FUSE opcode %d (%s) not handled: ENOSYS", opcode, name)
        self._send_error(unique, errno.ENOSYS)

    def _start(self, unique: int | None, coro: Coroutine[Any, Any, Any], encode: Encoder, opcode: int) -> None:
        """Run the handler to its first suspension here; park it or continue it only if it suspends."""
        ctx = contextvars.copy_context()
        self._advance(coro, ctx, unique, encode, opcode, lambda: ctx.run(coro.send, None), resumed=False)

    def _advance(self, coro: Coroutine[Any, Any, Any], ctx: contextvars.Context, unique: int | None,
                 encode: Encoder, opcode: int, step: Callable[[], Any], resumed: bool) -> None:
        """Run one step of a handler (`step` sends into or throws into `coro`): reply if it ended,
        else park it or hand it to a task. `resumed`: a parked request, counted in flight until now."""
        try:
            yielded = step()
        except StopIteration as stop:
            self._ended_request(resumed)
            self._reply_result(unique, encode, stop.value, opcode)
            return
        except Exception as exc:  # noqa: BLE001 - FUSEError or a bug: this request fails, not the session
            self._ended_request(resumed)
            self._reply_exception(unique, exc, opcode)
            return
        except asyncio.CancelledError:
            self._ended_request(resumed)
            if not self._closing:
                self._send_error(unique, errno.EINTR)
            return
        self._suspended(coro, ctx, unique, encode, opcode, yielded)

    def _ended_request(self, resumed: bool) -> None:
        if resumed:
            self._finished()

    def _suspended(self, coro: Coroutine[Any, Any, Any], ctx: contextvars.Context, unique: int | None,
                   encode: Encoder, opcode: int, yielded: Any) -> None:
        """`coro` gave `yielded` up: park it on that future, or continue it in a task."""
        if _is_future(yielded) and not self._closing:
            parked = _Parked(self, coro, ctx, unique, encode, opcode)
            self._parked.add(parked)
            parked.park(yielded)
        else:
            task = self._continue_in_task(coro, ctx, unique, encode, opcode, yielded)
            if self._closing:
                task.cancel()
        if self.in_flight >= self.max_tasks:
            self._stop_reading()

    def _continue_in_task(self, coro: Coroutine[Any, Any, Any], ctx: contextvars.Context, unique: int | None,
                          encode: Encoder, opcode: int, yielded: Any) -> asyncio.Task[Any]:
        assert self._loop is not None
        task = self._loop.create_task(_Resumed(coro, yielded), context=ctx)  # type: ignore[arg-type]
        self._tasks[task] = (unique, encode)
        task.add_done_callback(functools.partial(self._task_done, opcode))
        return task

    def _resume(self, parked: _Parked, fut: asyncio.Future[Any]) -> None:
        """The next step of a parked handler, as a Task's would be: the future's exception (a
        cancellation included) is thrown in, else the coroutine is sent None and takes the result
        from the future itself."""
        self._parked.discard(parked)
        coro = parked.coro

        def step() -> Any:
            if fut.cancelled():
                return coro.throw(asyncio.CancelledError())
            if fut.exception() is not None:
                return coro.throw(fut.exception())  # type: ignore[arg-type]
            return coro.send(None)

        self._advance(coro, parked.ctx, parked.unique, parked.encode, parked.opcode, step, resumed=True)

    def _finished(self) -> None:
        if self.in_flight < self.max_tasks:
            self._resume_reading()

    def _task_done(self, opcode: int, task: asyncio.Task[Any]) -> None:
        unique, encode = self._tasks.pop(task)
        self._finished()
        if task.cancelled():
            if not self._closing:  # cancelled by someone else: the caller must not wait forever
                self._send_error(unique, errno.EINTR)
            return
        exc = task.exception()
        if exc is None:
            self._reply_result(unique, encode, task.result(), opcode)
        else:
            self._reply_exception(unique, exc, opcode)

    # ---- replies out ----

    def _reply_result(self, unique: int | None, encode: Encoder, value: Any, opcode: int) -> None:
        try:
            payload = encode(value)
        except Exception as exc:  # noqa: BLE001 - e.g. ERANGE, or a handler that returned garbage
            self._reply_exception(unique, exc, opcode)
            return
        self._send(unique, payload)

    def _reply_exception(self, unique: int | None, exc: BaseException, opcode: int) -> None:
        if isinstance(exc, FUSEError) and 0 < exc.errno < 512:
            self._send_error(unique, exc.errno)
            return
        log.error("FUSE %s failed", _op_name(opcode), exc_info=exc)
        self._send_error(unique, errno.EIO)

    def _send(self, unique: int | None, payload: Payload) -> None:
        if unique is None:
            return
        if payload is None or not len(payload):
            self._write([abi.OUT_HEADER.pack(abi.OUT_HEADER.size, 0, unique)])
        else:
            self._write([abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), 0, unique), payload])

    def _send_error(self, unique: int | None, err: int) -> None:
        if unique is not None:
            self._write([abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -err, unique)])

    def _write(self, parts: list[Any]) -> None:
        if self.fd < 0:
            return
        try:
            os.writev(self.fd, parts)
        except OSError as exc:
            # ENOENT: the request was interrupted or aborted meanwhile. ENODEV/ECONNABORTED: the
            # connection is gone (the reader notices it too).
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.ECONNABORTED):
                log.error("FUSE reply failed: %s", exc)

    # ---- INIT ----

    def _init(self, unique: int, body: memoryview) -> None:
        init = abi.decode_init_in(body)
        if init.major != abi.KERNEL_VERSION:
            # A newer major: answer ours, the kernel retries with it (fuse.h, version negotiation).
            self._send(unique, abi.encode_init_out(abi.InitOut(abi.KERNEL_VERSION, abi.KERNEL_MINOR,
                                                               0, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
            return
        if init.minor < abi.MIN_KERNEL_MINOR:
            self._send_error(unique, errno.EPROTO)
            self._end(ConnectionError(f"FUSE protocol 7.{init.minor} is too old"))
            return
        want = int(WANTED)
        if getattr(self.ops, "enable_writeback_cache", False):
            want |= InitFlag.WRITEBACK_CACHE
        if getattr(self.ops, "enable_posix_acl", False):
            want |= InitFlag.POSIX_ACL
        if getattr(self.ops, "kill_suidgid", None) is None:
            want &= ~InitFlag.HANDLE_KILLPRIV_V2  # the kernel must keep doing it then
        granted = init.flags & want
        self.proto_minor, self.kernel_flags, self.flags = min(init.minor, abi.KERNEL_MINOR), init.flags, granted
        out = abi.InitOut(abi.KERNEL_VERSION, self.proto_minor, init.max_readahead, granted & 0xFFFFFFFF,
                          0, 0, MAX_WRITE, 1, MAX_PAGES, 0, 0, 0)
        self._send(unique, abi.encode_init_out(out))
        log.info("FUSE 7.%d (kernel 7.%d) at %s: %s", self.proto_minor, init.minor, self.mountpoint,
                 " ".join(abi.flag_names(granted)))
        if self._initialized is not None and not self._initialized.done():
            self._initialized.set_result(None)

    # ---- handlers: decode (here, before the buffer is reused), then the ops coroutine ----

    def _handlers(self) -> dict[int, Callable[..., Started]]:
        """Opcode -> handler, for the ops methods that exist (a missing one: ENOSYS)."""
        needs: dict[Opcode, tuple[str, Callable[..., Started]]] = {
            Opcode.LOOKUP: ("lookup", self._lookup), Opcode.FORGET: ("forget", self._forget),
            Opcode.BATCH_FORGET: ("forget", self._batch_forget), Opcode.GETATTR: ("getattr", self._getattr),
            Opcode.SETATTR: ("setattr", self._setattr), Opcode.READLINK: ("readlink", self._readlink),
            Opcode.SYMLINK: ("symlink", self._symlink), Opcode.MKNOD: ("mknod", self._mknod),
            Opcode.MKDIR: ("mkdir", self._mkdir), Opcode.UNLINK: ("unlink", self._unlink),
            Opcode.RMDIR: ("rmdir", self._rmdir), Opcode.RENAME: ("rename", self._rename),
            Opcode.RENAME2: ("rename", self._rename2), Opcode.LINK: ("link", self._link),
            Opcode.OPEN: ("open", self._open), Opcode.READ: ("read", self._read),
            Opcode.WRITE: ("write", self._write_req), Opcode.STATFS: ("statfs", self._statfs),
            Opcode.RELEASE: ("release", self._release), Opcode.FSYNC: ("fsync", self._fsync),
            Opcode.SETXATTR: ("setxattr", self._setxattr), Opcode.GETXATTR: ("getxattr", self._getxattr),
            Opcode.LISTXATTR: ("listxattr", self._listxattr),
            Opcode.REMOVEXATTR: ("removexattr", self._removexattr), Opcode.FLUSH: ("flush", self._flush),
            Opcode.OPENDIR: ("opendir", self._opendir), Opcode.READDIR: ("readdir", self._readdir),
            Opcode.READDIRPLUS: ("readdir", self._readdirplus),
            Opcode.RELEASEDIR: ("releasedir", self._releasedir), Opcode.FSYNCDIR: ("fsyncdir", self._fsyncdir),
            Opcode.ACCESS: ("access", self._access), Opcode.CREATE: ("create", self._create),
            Opcode.FALLOCATE: ("fallocate", self._fallocate),
        }
        table: dict[int, Callable[..., Started]] = {
            op: handler for op, (method, handler) in needs.items() if callable(getattr(self.ops, method, None))}
        table[Opcode.INTERRUPT] = self._interrupt  # INIT and DESTROY: see _dispatch
        return table

    def _interrupt(self, *_: Any) -> Started:
        return None  # handlers run to completion quickly or wait for the peer, which has a timeout

    def _lookup(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        return self.ops.lookup(nodeid, _name(body), RequestContext(uid, gid, pid)), abi.encode_entry_out

    def _forget(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        (nlookup,) = abi.FORGET_IN.unpack_from(body)
        return self.ops.forget([(nodeid, nlookup)]), _empty

    def _batch_forget(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        count, _ = abi.BATCH_FORGET_IN.unpack_from(body)
        base, size = abi.BATCH_FORGET_IN.size, abi.FORGET_ONE.size
        items = [abi.FORGET_ONE.unpack_from(body, base + i * size) for i in range(count)]
        return self.ops.forget(items), _empty

    def _getattr(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        return self.ops.getattr(nodeid, RequestContext(uid, gid, pid)), abi.encode_attr_out

    def _setattr(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        attr, fields, fh = abi.decode_setattr(body, time.time_ns())
        return self.ops.setattr(nodeid, attr, fields, fh, RequestContext(uid, gid, pid)), abi.encode_attr_out

    def _readlink(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        return self.ops.readlink(nodeid, RequestContext(uid, gid, pid)), _raw

    def _symlink(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        name, target, _ = _cstrings(body, 2)
        return self.ops.symlink(nodeid, name, target, RequestContext(uid, gid, pid)), abi.encode_entry_out

    def _mknod(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        mode, rdev, umask, _ = abi.MKNOD_IN.unpack_from(body)
        name = _name(body[abi.MKNOD_IN.size:])
        return self.ops.mknod(nodeid, name, mode, rdev, RequestContext(uid, gid, pid, umask)), abi.encode_entry_out

    def _mkdir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        mode, umask = abi.MKDIR_IN.unpack_from(body)
        mode = stat.S_IFDIR | stat.S_IMODE(mode)  # the kernel sends the permission bits only
        name = _name(body[abi.MKDIR_IN.size:])
        return self.ops.mkdir(nodeid, name, mode, RequestContext(uid, gid, pid, umask)), abi.encode_entry_out

    def _unlink(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        return self.ops.unlink(nodeid, _name(body), RequestContext(uid, gid, pid)), _empty

    def _rmdir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        return self.ops.rmdir(nodeid, _name(body), RequestContext(uid, gid, pid)), _empty

    def _rename(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        (newdir,) = abi.RENAME_IN.unpack_from(body)
        old, new, _ = _cstrings(body[abi.RENAME_IN.size:], 2)
        return self.ops.rename(nodeid, old, newdir, new, 0, RequestContext(uid, gid, pid)), _empty

    def _rename2(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        newdir, flags, _ = abi.RENAME2_IN.unpack_from(body)
        old, new, _ = _cstrings(body[abi.RENAME2_IN.size:], 2)
        return self.ops.rename(nodeid, old, newdir, new, flags, RequestContext(uid, gid, pid)), _empty

    def _link(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        (old,) = abi.LINK_IN.unpack_from(body)
        name = _name(body[abi.LINK_IN.size:])
        return self.ops.link(old, nodeid, name, RequestContext(uid, gid, pid)), abi.encode_entry_out

    def _open(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        flags, open_flags = abi.OPEN_IN.unpack_from(body)
        coro = self.ops.open(nodeid, flags, RequestContext(uid, gid, pid))
        if open_flags & abi.OPEN_KILL_SUIDGID:  # only with ATOMIC_O_TRUNC, never asked for
            return self._killing_open(coro), abi.encode_open_out
        return coro, abi.encode_open_out

    async def _killing_open(self, coro: Coroutine[Any, Any, abi.FileInfo]) -> abi.FileInfo:
        fi = await coro
        await self._kill(fi.fh)
        return fi

    def _create(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        flags, mode, umask, open_flags = abi.CREATE_IN.unpack_from(body)
        name = _name(body[abi.CREATE_IN.size:])
        coro = self.ops.create(nodeid, name, mode, flags, RequestContext(uid, gid, pid, umask))
        if open_flags & abi.OPEN_KILL_SUIDGID:  # O_TRUNC of a file that turned out to exist
            return self._killing_create(coro), _create_out
        return coro, _create_out

    async def _killing_create(self, coro: Coroutine[Any, Any, Any]) -> tuple[abi.FileInfo, abi.EntryAttributes]:
        fi, attrs = await coro
        return fi, (await self._kill(fi.fh)) or attrs

    async def _kill(self, fh: int) -> abi.EntryAttributes | None:
        """Clear set-user/group-ID of a file just opened with O_TRUNC; the open itself succeeded, so
        a failure here is logged, not returned."""
        try:
            return await self.ops.kill_suidgid(fh)  # type: ignore[no-any-return]
        except FUSEError as exc:
            log.warning("cannot clear set-user/group-ID of handle %d: %s", fh, exc)
            return None

    def _read(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(body)
        return self.ops.read(fh, offset, size), _raw

    def _write_req(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        fh, offset, size, write_flags, _, _, _ = abi.WRITE_IN.unpack_from(body)
        # One copy: the read buffer is reused, and the replicator keeps the data until acknowledged.
        data = bytes(body[abi.WRITE_IN.size:abi.WRITE_IN.size + size])
        if write_flags & abi.WRITE_KILL_SUIDGID:
            return self._killing_write(fh, offset, data), _write_out
        return self.ops.write(fh, offset, data), _write_out

    async def _killing_write(self, fh: int, offset: int, data: bytes) -> int:
        await self.ops.kill_suidgid(fh)  # before the data, as the local VFS does
        return await self.ops.write(fh, offset, data)  # type: ignore[no-any-return]

    def _statfs(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        return self.ops.statfs(RequestContext(uid, gid, pid)), abi.encode_statfs

    def _release(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        fh, _, _, _ = abi.RELEASE_IN.unpack_from(body)
        return self.ops.release(fh), _empty

    def _flush(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        fh, _, _, _ = abi.FLUSH_IN.unpack_from(body)
        return self.ops.flush(fh), _empty

    def _fsync(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        fh, flags, _ = abi.FSYNC_IN.unpack_from(body)
        return self.ops.fsync(fh, bool(flags & abi.FSYNC_FDATASYNC)), _empty

    def _setxattr(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        size, flags = abi.SETXATTR_IN.unpack_from(body)
        name, rest = _cstrings(body[abi.SETXATTR_IN.size:], 1)
        ctx = RequestContext(uid, gid, pid)
        if flags & ~(abi.XATTR_CREATE | abi.XATTR_REPLACE):
            raise FUSEError(errno.EINVAL)
        # XATTR_CREATE / XATTR_REPLACE go to the backing file's setxattr: checked atomically there.
        return self.ops.setxattr(nodeid, name, rest[:size], ctx, flags), _empty

    def _getxattr(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        name = _name(body[abi.GETXATTR_IN.size:])
        return self.ops.getxattr(nodeid, name, RequestContext(uid, gid, pid)), functools.partial(_xattr_out, size)

    def _listxattr(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        return self.ops.listxattr(nodeid, RequestContext(uid, gid, pid)), functools.partial(_xattr_list_out, size)

    def _removexattr(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        return self.ops.removexattr(nodeid, _name(body), RequestContext(uid, gid, pid)), _empty

    def _opendir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        return self.ops.opendir(nodeid, RequestContext(uid, gid, pid)), _opendir_out

    def _readdir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview, plus: bool = False) -> Started:
        # Plain READDIR only comes from a kernel that did not grant DO_READDIRPLUS.
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(body)
        token = abi.ReaddirToken(size, plus)
        return self.ops.readdir(fh, offset, token), lambda _: token.buf

    def _readdirplus(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        return self._readdir(nodeid, uid, gid, pid, body, plus=True)

    def _releasedir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        fh, _, _, _ = abi.RELEASE_IN.unpack_from(body)
        return self.ops.releasedir(fh), _empty

    def _fsyncdir(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        fh, flags, _ = abi.FSYNC_IN.unpack_from(body)
        return self.ops.fsyncdir(fh, bool(flags & abi.FSYNC_FDATASYNC)), _empty

    def _access(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        mask, _ = abi.ACCESS_IN.unpack_from(body)
        return self.ops.access(nodeid, mask, RequestContext(uid, gid, pid)), _access_out

    def _fallocate(self, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Started:
        fh, offset, length, mode, _ = abi.FALLOCATE_IN.unpack_from(body)
        return self.ops.fallocate(fh, mode, offset, length), _empty


def _op_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name.lower()
    except ValueError:
        return str(opcode)
