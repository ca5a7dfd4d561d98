"""Child processes in their own process group: spawning with an output pipe, and killing the group.

Shared by the script runner and the command checker. Both start children with
`start_new_session=True`, so the child's pid is also its process group id and one signal reaches every
process it forked (unless one escaped with setsid, which is how a daemon says it wants to outlive us).

Output goes through a pipe we create ourselves rather than asyncio's `PIPE`: the asyncio `Process`
then owns no pipe, so `Process.wait()` resolves when the child exits even if a background grandchild
still holds the write end (Python 3.12+ makes `wait()` wait for the pipes too, which would hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Self

log = logging.getLogger(__name__)

GROUP_POLL = 0.05  # seconds between "is anyone left in the group" probes while waiting for a grace


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the whole group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Only when a member changed credentials (setuid program): we cannot do better than the leader.
        log.warning("cannot signal process group %d (permission denied)", pgid)
        return True
    return True


def group_alive(pgid: int) -> bool:
    return signal_group(pgid, 0)


async def terminate_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the group, give it `grace` seconds to leave, then SIGKILL whatever remains.

    We wait for the whole group, not only the leader: a shell script dies at once on SIGTERM while the
    child it was waiting for may still be cleaning up (or ignoring SIGTERM).
    """
    pgid = proc.pid
    if not signal_group(pgid, signal.SIGTERM):
        await proc.wait()
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while loop.time() < deadline:
        if proc.returncode is not None and not group_alive(pgid):
            return
        await asyncio.sleep(GROUP_POLL)
    signal_group(pgid, signal.SIGKILL)
    await proc.wait()


def kill_group_now(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the group without waiting (for cancellation paths, where we must not linger)."""
    if proc.returncode is None or group_alive(proc.pid):
        signal_group(proc.pid, signal.SIGKILL)


async def kill_and_reap(proc: asyncio.subprocess.Process, within: float = 2.0) -> None:
    """SIGKILL the group and wait (bounded) for the leader, so the child watcher does not report to a
    loop that has since closed. Safe to await from a task that is being cancelled."""
    kill_group_now(proc)
    if proc.returncode is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), within)


class OutputPipe:
    """A pipe whose write end is given to a child (stdout and stderr) and whose read end we stream.

    Usage: `pipe = await OutputPipe.open()`, spawn with `stdout=pipe.write_fd, stderr=pipe.write_fd`,
    then `pipe.child_started()` (drops our copy of the write end so EOF means "every writer is gone"),
    read from `pipe.reader`, and `pipe.close()` when done.
    """

    def __init__(self, write_fd: int, reader: asyncio.StreamReader, transport: asyncio.ReadTransport):
        self.write_fd: int | None = write_fd
        self.reader = reader
        self._transport = transport

    @classmethod
    async def open(cls, limit: int = 2**16) -> OutputPipe:
        read_fd, write_fd = os.pipe()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader, loop=loop), os.fdopen(read_fd, "rb", buffering=0)
            )
        except BaseException:
            os.close(write_fd)
            raise
        return cls(write_fd, reader, transport)

    def child_started(self) -> None:
        if self.write_fd is not None:
            os.close(self.write_fd)
            self.write_fd = None

    def close(self) -> None:
        self.child_started()
        self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
