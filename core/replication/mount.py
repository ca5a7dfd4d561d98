"""Mounting the pass-through file system over the replicated directory, as an owned asyncio task.

pyfuse3 holds one session per process: a process mounts one directory (the service runs one agent
process per replicated directory on the primary).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pyfuse3.asyncio

from .fusefs import ReplicatedFS

log = logging.getLogger(__name__)

FSNAME = "safekit"


def _notify_closing(fd: int) -> None:
    """pyfuse3.asyncio's notify_closing, minus its race: a read future whose descriptor already
    became readable (result set, task not yet resumed) must not get an exception set too
    (InvalidStateError out of pyfuse3.terminate())."""
    for fut in list(pyfuse3.asyncio._read_futures.get(fd, ())):
        if not fut.done():
            fut.set_exception(pyfuse3.asyncio.ClosedResourceError())


def mounted_fuse_at(directory: Path) -> bool:
    """True if a FUSE file system of ours is mounted exactly at `directory` (from mountinfo)."""
    target = os.fsencode(os.path.realpath(directory))
    try:
        lines = Path("/proc/self/mountinfo").read_bytes().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        sep = fields.index(b"-") if b"-" in fields else -1
        if sep > 4 and fields[4] == target and fields[sep + 1].startswith(b"fuse") \
                and fields[sep + 2] == FSNAME.encode():
            return True
    return False


def unmount(directory: Path) -> None:
    """Lazily unmount our FUSE file system at `directory` (a dead agent leaves ENOTCONN behind)."""
    while mounted_fuse_at(directory):
        result = subprocess.run(["fusermount3", "-u", "-z", str(directory)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise OSError(f"fusermount3 -u -z {directory}: {result.stderr.strip()}")


class FuseMount:
    def __init__(self, directory: Path, make_fs: Callable[[int], ReplicatedFS], max_tasks: int = 64) -> None:
        self.directory = Path(directory)
        self.make_fs = make_fs
        self.max_tasks = max_tasks
        self.fs: ReplicatedFS | None = None
        self._root_fd = -1
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        unmount(self.directory)
        # Opened before the mount: from now on this descriptor is the only way to the real files.
        self._root_fd = os.open(self.directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fs = self.make_fs(self._root_fd)
        pyfuse3.asyncio.enable()
        pyfuse3.asyncio.notify_closing = _notify_closing  # type: ignore[assignment]
        options = set(pyfuse3.default_options) | {"allow_other", f"fsname={FSNAME}", "subtype=safekit"}
        pyfuse3.init(self.fs, str(self.directory), options)
        self._task = asyncio.create_task(pyfuse3.main(min_tasks=1, max_tasks=self.max_tasks), name="fuse-main")
        log.info("replication mount over %s", self.directory)

    async def wait(self) -> None:
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        if self._task is None:
            return
        if not self._task.done():
            pyfuse3.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        except (TimeoutError, Exception) as exc:  # noqa: BLE001 - unmount regardless
            log.warning("FUSE main loop ended badly: %r", exc)
            self._task.cancel()
        self._task = None
        pyfuse3.close(unmount=True)
        unmount(self.directory)
        os.close(self._root_fd)
        self._root_fd = -1
        log.info("replication mount over %s removed", self.directory)
