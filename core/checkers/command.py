"""Command checker: a command exits 0 within the timeout.

The command runs in its own process group so that, on timeout, everything it started is killed with
it; its last output line becomes the failure reason.
"""

from __future__ import annotations

import asyncio
import contextlib

from ..config import CommandChecker
from ..procgroup import OutputPipe, kill_and_reap
from ..text import shown
from .base import Checker, CheckResult

OUTPUT_KEEP = 4096  # bytes of output kept for the reason
OUTPUT_GRACE = 0.2  # seconds we wait for output after exit (a background child may hold the pipe)


async def _collect(pipe: OutputPipe, keep: bytearray) -> None:
    while chunk := await pipe.reader.read(65536):
        keep.extend(chunk)
        del keep[:-OUTPUT_KEEP]


def _last_line(output: bytes) -> str:
    lines = [line for line in output.decode(errors="replace").splitlines() if line.strip()]
    return shown(lines[-1].strip()[:200]) if lines else ""


class CommandCheck(Checker):
    config: CommandChecker

    async def probe(self) -> CheckResult:
        output = bytearray()
        with await OutputPipe.open() as pipe:
            proc = await asyncio.create_subprocess_exec(
                *self.config.command, stdin=asyncio.subprocess.DEVNULL, stdout=pipe.write_fd,
                stderr=pipe.write_fd, start_new_session=True,
            )
            pipe.child_started()
            reader = asyncio.create_task(_collect(pipe, output))
            try:
                rc = await proc.wait()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reader), OUTPUT_GRACE)
            finally:
                # Cancelled on timeout (or by the set stopping): kill the group, not only the leader.
                reader.cancel()
                await kill_and_reap(proc)
        if rc == 0:
            return CheckResult(True, "exit 0")
        last = _last_line(bytes(output))
        status = f"exit {rc}" if rc > 0 else f"killed by signal {-rc}"
        return CheckResult(False, f"{status}: {last}" if last else status)
