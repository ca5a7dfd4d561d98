"""Mounting the pass-through file system over the replicated directory, served on the running loop
(fusesession.py speaks the FUSE protocol over /dev/fuse itself).

One process may hold several mounts; the service still runs one agent process per replicated
directory of the primary so that FUSE traffic never delays the engine's heartbeats (agent.py).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from . import mountinfo
from .fusefs import ReplicatedFS
from .fusesession import FuseSession, umount_detach
from .paths import open_replicated_dir
from .protect import protect, protect_beneath, unprotect

log = logging.getLogger(__name__)

FSNAME = "safekit"
# At a stop, how long the requests in progress may take to finish (a live peer answers in
# milliseconds; a lost one is given up by the replicator's own timeout or by heartbeats).
DRAIN_TIMEOUT = 2.0


def mounted_fuse_at(directory: Path) -> bool:
    """True if a FUSE file system of ours is mounted exactly at `directory` (from mountinfo)."""
    return fuse_mount_listed(os.fsencode(os.path.realpath(directory)))


def _our_mounts(target: bytes) -> list[list[bytes]]:
    """The mountinfo entries of FUSE file systems of ours at `target`, an absolute path with no
    symlink in it (reads /proc only: see mountinfo.py)."""
    out = []
    for fields in mountinfo.entries():
        sep = fields.index(b"-") if b"-" in fields else -1
        if sep > 4 and fields[4] == target and fields[sep + 1].startswith(b"fuse") \
                and fields[sep + 2] == FSNAME.encode():
            out.append(fields)
    return out


def fuse_mount_listed(target: bytes) -> bool:
    """True if mountinfo lists a FUSE file system of ours at `target` (see _our_mounts)."""
    return bool(_our_mounts(target))


def abort_connection(target: bytes) -> bool:
    """Abort the FUSE connection of our mount at `target` (an absolute path with no symlink, as
    mountinfo shows it) through fusectl: requests waiting on it, and later ones, fail with ENOTCONN
    instead of waiting for a server that does not answer. False if it cannot be found or aborted."""
    for fields in _our_mounts(target):
        minor = fields[2].partition(b":")[2].decode()
        try:
            Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
            return True
        except OSError as exc:
            log.error("cannot abort the FUSE connection of %s: %s", target.decode(errors="replace"), exc)
    return False


def unmount(directory: Path) -> None:
    """Lazily unmount every FUSE file system of ours at `directory` (a dead agent leaves one behind
    that answers ENOTCONN). umount2(MNT_DETACH) as root; fusermount3 when that is refused."""
    while mounted_fuse_at(directory):
        try:
            umount_detach(directory)
            continue
        except OSError as exc:
            log.debug("%s; trying fusermount3", exc)
        result = subprocess.run(["fusermount3", "-u", "-z", str(directory)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise OSError(f"fusermount3 -u -z {directory}: {result.stderr.strip()}")


class FuseMount:
    def __init__(self, directory: Path, make_fs: Callable[[int], ReplicatedFS], max_tasks: int = 64,
                 guard: Path | None = None) -> None:
        self.directory = Path(directory)
        # The marker of the read-only bind left over the directory when the mount goes (protect.py):
        # None leaves the directory writable (tests, fuse-only bench).
        self.guard = guard
        self.make_fs = make_fs
        self.max_tasks = max_tasks  # requests waiting at once (beyond, the kernel's queue waits)
        self.fs: ReplicatedFS | None = None
        self.session: FuseSession | None = None
        self._root_fd = -1

    async def start(self) -> None:
        unmount(self.directory)
        if self.guard is not None:
            unprotect(self.directory, self.guard)  # our read-only bind must not be under the mount
        # Opened before the mount: from now on this descriptor is the only way to the real files.
        self._root_fd = open_replicated_dir(self.directory)
        try:
            self.fs = self.make_fs(self._root_fd)
            self.session = FuseSession(self.fs, self.directory, fsname=FSNAME, subtype="safekit",
                                       max_tasks=self.max_tasks)
            await self.session.start()
        except BaseException:
            self.session = None
            os.close(self._root_fd)
            self._root_fd = -1
            raise
        log.info("replication mount over %s", self.directory)

    async def wait(self) -> None:
        """Until the mount goes away (stop(), or unmounted from outside)."""
        if self.session is not None:
            await self.session.wait()

    async def stop(self) -> None:
        if self.session is None:
            return
        session, self.session = self.session, None
        guarded = False
        try:
            drained = await session.drain(DRAIN_TIMEOUT)
            guarded = self._guard_beneath()
            await session.close()
            if drained and self.fs is not None:
                # Files the application still had open: released as the kernel would have, so
                # their last times reach the peer (they travel with the Close). Only with no request
                # left in progress: a handler resumed later would use a descriptor closed here.
                await self.fs.release_all()
        finally:
            unmount(self.directory)
            if self.guard is not None and not guarded:
                self._guard_after()
            if self.fs is not None:
                self.fs.release_pins()
            os.close(self._root_fd)
            self._root_fd = -1
        log.info("replication mount over %s removed", self.directory)

    def _guard_beneath(self) -> bool:
        if self.guard is None:
            return False
        try:
            protect_beneath(self._root_fd, self.directory, self.guard)
            return True
        except OSError as exc:  # before Linux 6.5, or the mount already gone from outside
            log.warning("cannot put the read-only bind beneath the mount over %s (%s): made after it",
                        self.directory, exc)
            return False

    def _guard_after(self) -> None:
        assert self.guard is not None
        try:
            protect(self.directory, self.guard)
        except OSError as exc:
            log.error("cannot make %s read-only for applications after its mount: %s", self.directory, exc)
