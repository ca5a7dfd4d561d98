"""Process checker: a process is alive, found by exact name, pid file or command-line regex.

/proc is read in a worker thread (asyncio.to_thread): walking it is file I/O and, on a busy host,
thousands of small reads.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from ..config import ProcessChecker
from .base import Checker, CheckResult

PROC = Path("/proc")
COMM_LEN = 15  # the kernel truncates comm to 15 characters (TASK_COMM_LEN - 1)


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir(PROC) if entry.isdigit()]


def _read(pid: int, name: str) -> bytes | None:
    """A /proc/<pid> file, or None when the process vanished or is not ours to read."""
    try:
        return (PROC / str(pid) / name).read_bytes()
    except OSError:
        return None


def _is_live(pid: int) -> bool:
    """Running and not a zombie (a dead application waiting to be reaped is not running)."""
    stat = _read(pid, "stat")
    if stat is None:
        return False
    # The state follows the parenthesised comm, which may itself contain ") ".
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def _argv(pid: int) -> list[bytes]:
    raw = _read(pid, "cmdline") or b""
    return raw.rstrip(b"\0").split(b"\0") if raw else []


def find_by_name(name: str) -> list[int]:
    wanted = name.encode()
    found = []
    for pid in _pids():
        comm = (_read(pid, "comm") or b"").rstrip(b"\n")
        named = comm == wanted or (len(wanted) > COMM_LEN and comm == wanted[:COMM_LEN] and _argv0_is(pid, wanted))
        if named and _is_live(pid):
            found.append(pid)
    return found


def _argv0_is(pid: int, wanted: bytes) -> bool:
    argv = _argv(pid)
    return bool(argv) and os.path.basename(argv[0]) == wanted


def find_by_regex(pattern: re.Pattern[str]) -> list[int]:
    me = os.getpid()  # our own command line may quote the pattern (config path, argv): never match it
    found = []
    for pid in _pids():
        argv = _argv(pid)
        if pid != me and argv and pattern.search(b" ".join(argv).decode(errors="replace")):
            found.append(pid)
    return found


def check_pid_file(path: Path) -> tuple[bool, str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return False, f"pid file {path} unreadable: {exc.strerror}"
    # The pid is the first line (PostgreSQL's postmaster.pid has more after it). ASCII digits only:
    # str.isdigit takes other scripts' digits too, and int() would then check another process.
    text = raw.decode(errors="replace").strip()
    first = text.splitlines()[0].strip() if text else ""
    if not (first.isascii() and first.isdigit()) or len(first) > 10 or not 0 < int(first) < 2**31:
        return False, f"pid file {path} holds no pid on its first line ({text[:40]!r})"
    pid = int(first)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, f"pid {pid} from {path} is not running"
    except PermissionError:
        pass  # it exists, it is merely not ours
    if not _is_live(pid):
        return False, f"pid {pid} from {path} is not running (zombie)"
    return True, f"pid {pid} from {path} is running"


class ProcessCheck(Checker):
    config: ProcessChecker

    def __init__(self, config: ProcessChecker):
        super().__init__(config)
        self._regex = re.compile(config.cmdline_regex) if config.cmdline_regex is not None else None

    async def probe(self) -> CheckResult:
        return CheckResult(*await asyncio.to_thread(self._look))

    def _look(self) -> tuple[bool, str]:
        cfg = self.config
        if cfg.pid_file is not None:
            return check_pid_file(cfg.pid_file)
        if self._regex is not None:
            pids = find_by_regex(self._regex)
            what = f"process matching /{cfg.cmdline_regex}/"
        else:
            assert cfg.process_name is not None
            pids = find_by_name(cfg.process_name)
            what = f"process named {cfg.process_name}"
        if not pids:
            return False, f"no {what}"
        return True, f"{what} running (pid {', '.join(map(str, pids[:5]))}{', ...' if len(pids) > 5 else ''})"
