"""A real mirror in one test process: the FUSE primary and the receiver each run their own asyncio
loop in a thread, and the test drives the mount from its own thread (never from the loop serving it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from safekit_cloud.core.replication.exclude import Excluder
from safekit_cloud.core.replication.fusefs import ReplicatedFS
from safekit_cloud.core.replication.mount import FuseMount, unmount
from safekit_cloud.core.replication.primary import DirtyMarker, LinkReplicator
from safekit_cloud.core.replication.receiver import Receiver
from safekit_cloud.core.replication.sender import Sender

T = TypeVar("T")
KEY = b"k" * 32
NAME = b"/srv/app"


def fuse_available() -> str | None:
    """None if FUSE tests can run here, else the reason to skip."""
    if not os.path.exists("/dev/fuse") or not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not available"
    if os.geteuid() != 0:
        return "FUSE mirror tests need root (mount(2), allow_other, chown)"
    return None


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class Mirror:
    def __init__(self, primary: Path, replica: Path, state: Path, exclude: list[str] = (),
                 protocol: str = "C", timeout: float = 5.0) -> None:
        self.primary, self.replica = primary, replica
        self.lost: list[str] = []
        self.rx_thread = LoopThread("receiver")
        self.fs_thread = LoopThread("fuse")
        self.receiver = Receiver("mod", {NAME: replica}, KEY)
        self.port = self.rx_thread.call(self.receiver.start("127.0.0.1", 0))
        self.marker = DirtyMarker(state / "dirty")
        self.repl = LinkReplicator(self.marker, on_lost=self.lost.append)
        self.excluder = Excluder(list(exclude))
        self.mount = FuseMount(primary, lambda fd: ReplicatedFS(fd, self.repl, self.excluder))
        self.protocol, self.timeout = protocol, timeout

        async def up() -> None:
            await self.connect()
            await self.mount.start()

        self.fs_thread.call(up())

    async def connect(self) -> None:
        sender = await Sender.connect("127.0.0.1", self.port, KEY, "mod", NAME, protocol=self.protocol,
                                      timeout=self.timeout)
        self.repl.attach(sender)

    def close(self) -> None:
        try:
            async def down() -> None:
                await self.mount.stop()
                sender = self.repl.detach()
                if sender is not None:
                    await sender.close()

            self.fs_thread.call(down())
        finally:
            try:
                unmount(self.primary)
            finally:
                try:
                    self.rx_thread.call(self.receiver.stop())
                finally:
                    self.fs_thread.close()
                    self.rx_thread.close()


@contextlib.contextmanager
def running_mirror(base: Path, make: Callable[..., Any], prepare: Callable[[Path, Path], None] | None = None,
                   **kwargs: Any) -> Iterator[Any]:
    """primary/, replica/ and state/ under `base`, a mirror made by `make(primary, replica, state,
    **kwargs)`, closed and its mount forced away afterwards even when the test failed."""
    dirs = [base / n for n in ("primary", "replica", "state")]
    for d in dirs:
        d.mkdir()
    if prepare is not None:
        prepare(dirs[0], dirs[1])
    mir = make(dirs[0], dirs[1], dirs[2], **kwargs)
    try:
        yield mir
    finally:
        try:
            mir.close()
        finally:
            force_unmount(dirs[0])


def run_in_threads(target: Callable[[int], None], count: int, timeout: float) -> list[threading.Thread]:
    """`target(0)` .. `target(count - 1)` at once, each in its own thread; the threads still running
    after `timeout` seconds (a call hung on the mount)."""
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return [t for t in threads if t.is_alive()]


def free_port() -> int:
    """A TCP port free on loopback right now (for a receiver the test starts next)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def force_unmount(path: Path) -> None:
    try:
        unmount(path)
    except OSError:
        pass  # best effort, after a failed test


COMPARED_XATTRS = ("user.", "system.posix_acl_access", "system.posix_acl_default")


def describe_tree(root: Path, excluder: Excluder | None = None) -> dict[str, tuple]:
    """What must be equal on both sides: type, mode, owner, size, content or target, user xattrs
    and POSIX ACLs,
    file, directory and symlink mtimes, and which names are hard links of one another."""
    out: dict[str, tuple] = {".": ("root mtime", os.lstat(root).st_mtime_ns)}
    inode_names: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if excluder is not None and excluder.excluded(os.fsencode(rel), stat.S_ISDIR(st.st_mode)):
                if name in dirnames:
                    dirnames.remove(name)
                continue
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(kind):
                with open(full, "rb") as f:
                    body: Any = f.read()
                inode_names.setdefault(st.st_ino, []).append(rel)
                mtime = st.st_mtime_ns
            elif stat.S_ISLNK(kind):
                body, mtime = os.readlink(full), st.st_mtime_ns
            elif stat.S_ISDIR(kind):
                body, mtime = None, st.st_mtime_ns
            else:
                body, mtime = None, None
            xattrs = () if stat.S_ISLNK(kind) else tuple(sorted(
                (n, os.getxattr(full, n)) for n in os.listxattr(full) if n.startswith(COMPARED_XATTRS)))
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_size if not stat.S_ISDIR(kind) else None, body, xattrs, mtime)
    for names in inode_names.values():
        for n in names:
            out[n] = out[n] + (tuple(sorted(names)),)
    return out


@contextlib.asynccontextmanager
async def running_pair(tmp_path: Path, cfg: Any, data: Path, replica: Path,
                       **primary_kw: Any) -> AsyncIterator[tuple[Any, Any]]:
    """(secondary, primary) ReplicationServices of one module on loopback, both started: the
    secondary receives `data`'s stream into `replica`; `primary_kw` are the primary's extra keyword
    arguments. Both stopped afterwards, and the mount over `data` forced away, even on failure."""
    from safekit_cloud.core.replication.service import ReplicationService

    secondary = ReplicationService("mod", cfg, "127.0.0.1", KEY, tmp_path / "state2", listen_address="127.0.0.1",
                                   receive_into={data: replica})
    primary = ReplicationService("mod", cfg, "127.0.0.1", KEY, tmp_path / "state1", **primary_kw)
    try:
        await secondary.become_secondary()
        await primary.become_primary()
        yield secondary, primary
    finally:
        await primary.stop()
        await secondary.stop()
        force_unmount(data)


async def wait_for(ready: Callable[[], Any], timeout: float) -> bool:
    """Poll `ready()` every 0.1 s until it is true or `timeout` seconds passed; its last answer."""
    for _ in range(max(1, int(timeout * 10))):
        if ready():
            return True
        await asyncio.sleep(0.1)
    return bool(ready())
