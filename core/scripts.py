"""The user-scripts runner: prestart, start_prim, stop_prim, ... run with a timeout, logged line by line.

A script runs in its own process group, so a timeout or a forcestop reaches everything it forked. Its
output (stdout and stderr merged) is appended to the module log as it arrives. A script that leaves a
background child holding its output (`app &`, `nohup app &`, `setsid app &`) must not hold up the
engine: `run` returns once the script itself has exited plus a short grace; whatever the leftover
children still print keeps being logged by a drain task the runner owns (closing their pipe instead
would kill a `nohup`-ed application with SIGPIPE on its next write).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ScriptsConfig
from .procgroup import OutputPipe, kill_and_reap, signal_group, terminate_group
from .text import shown

log = logging.getLogger(__name__)

SCRIPT_NAMES = (
    "prestart", "start_both", "start_prim", "stop_prim", "start_second", "stop_second", "stop_both", "transition",
)
STOP_SCRIPTS = frozenset({"stop_prim", "stop_second", "stop_both"})
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL of a timed-out script's group
OUTPUT_GRACE = 0.5  # seconds we keep collecting output after the script exited, before returning
TAIL_LINES = 20
MAX_LINE = 8192  # longer output without a newline is logged in pieces of this size
READ_CHUNK = 65536
# Output of one run (and of what it left in the background) written to the module log; beyond, it is
# read and dropped: a script in a loop, or an application started in the background that keeps
# printing, must not fill the disk the node needs.
MAX_LOGGED = 16 << 20


@dataclass(frozen=True)
class ScriptResult:
    name: str
    ran: bool  # False when the script file does not exist (that is not an error)
    ok: bool
    returncode: int | None
    timed_out: bool
    seconds: float
    output_tail: str  # the last TAIL_LINES lines of output, or why the script could not be started
    aborted: bool = False  # killed by abort() (forcestop)


class _LogSink:
    """Splits a byte stream into lines and appends them to the module log, keeping the last lines."""

    def __init__(self, log_file: Path, module: str, script: str):
        self._log_file = log_file
        self._prefix = f"{module} {script}"
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._partial = b""
        self.background = False  # set once run() returned: later lines come from leftover children
        self.logged = 0  # bytes of output written to the log (MAX_LOGGED)
        self.dropping = False  # the cap was reached: what comes next is read and dropped

    async def pump(self, pipe: OutputPipe) -> None:
        """Read until every writer closed the pipe (EOF), then close it."""
        try:
            while chunk := await pipe.reader.read(READ_CHUNK):
                await self._write(self._split(chunk))
            if self._partial:
                await self._write([self._partial])
                self._partial = b""
        finally:
            pipe.close()

    def _split(self, chunk: bytes) -> list[bytes]:
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        while len(self._partial) > MAX_LINE:
            lines.append(self._partial[:MAX_LINE])
            self._partial = self._partial[MAX_LINE:]
        return lines

    async def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        texts = [shown(raw.decode(errors="replace").rstrip("\r")) for raw in lines]
        logged: list[str] = []
        for text, raw in zip(texts, lines):
            if self.dropping:
                break
            if self.logged + len(raw) > MAX_LOGGED:  # said once, also when the cap fell between batches
                self.dropping = True
                logged.append(f"(output beyond {MAX_LOGGED / 2**20:g} MiB from this run is not logged)")
                break
            self.logged += len(raw)
            logged.append(text)
        if logged:
            await asyncio.to_thread(self.append, logged)
        # Only once written: a result whose tail shows a line (run() may return while a batch is
        # still being appended) then never comes before that line is in the module log.
        self.tail.extend(texts)

    def append(self, texts: list[str]) -> None:
        """Blocking file append: call through asyncio.to_thread."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")  # as the engine's own module-log lines
        prefix = f"{self._prefix}[background]" if self.background else self._prefix
        try:
            with open(self._log_file, "a", encoding="utf-8") as out:
                out.writelines(f"{stamp} {prefix}: {text}\n" for text in texts)
        except OSError as exc:
            # Losing log lines must not fail a failover; say it once per batch in the daemon log.
            log.warning("cannot append to %s: %s", self._log_file, exc)


@dataclass
class _Running:
    proc: asyncio.subprocess.Process
    aborted: bool = False


class ScriptRunner:
    """Runs one module's scripts, one at a time (the lock: scripts of a module never overlap)."""

    def __init__(self, *, module: str, node: str, config: ScriptsConfig, env: dict[str, str], log_file: Path):
        self.module = module
        self.node = node
        self.config = config
        self.env = dict(env)
        self.log_file = log_file
        self._lock = asyncio.Lock()
        self._running: _Running | None = None
        self._abort_pending = False  # abort() came while the current run was not yet spawned
        self._drains: set[asyncio.Task[None]] = set()

    async def run(
        self, name: str, current: str, next: str, action: str, timeout: float | None = None
    ) -> ScriptResult:
        """Run script `name` with arguments (current state, next state, action); never raises for a
        script problem (missing, not executable, failing, timing out): the result says what happened."""
        if name not in SCRIPT_NAMES:
            raise ValueError(f"unknown script {name!r} (one of {', '.join(SCRIPT_NAMES)})")
        if timeout is None:
            timeout = self.config.stop_timeout if name in STOP_SCRIPTS else self.config.timeout
        async with self._lock:
            try:
                result = await self._run_locked(name, [current, next, action], timeout)
            finally:
                self._abort_pending = False  # an abort applies to the run in progress, not the next
            await self._conclude(result, timeout)
        return result

    async def abort(self) -> None:
        """Kill the running script's whole group at once (forcestop) and wait until it is gone.

        Scripts queued behind it on the lock still run: the engine stops asking for them."""
        running = self._running
        if running is None:
            # A run may hold the lock and be about to spawn its script: it will kill it on sight.
            self._abort_pending = self._lock.locked()
            return
        if running.proc.returncode is None:
            self._kill(running)
            await running.proc.wait()

    def _kill(self, running: _Running) -> None:
        running.aborted = True
        log.warning("%s: aborting the running script (pid %d)", self.module, running.proc.pid)
        signal_group(running.proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Stop logging the output of background children that outlived their script."""
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)

    async def _run_locked(self, name: str, args: list[str], timeout: float) -> ScriptResult:
        path = self.config.directory / name if self.config.directory is not None else None
        problem = await asyncio.to_thread(_check_script, path)
        if problem is None:
            return ScriptResult(name, False, True, None, False, 0.0, "")
        if problem:
            await asyncio.to_thread(_LogSink(self.log_file, self.module, name).append, [problem])
            return ScriptResult(name, True, False, None, False, 0.0, problem)
        assert path is not None
        return await self._execute(name, path, args, timeout)

    def _environment(self, name: str, args: list[str]) -> dict[str, str]:
        return {
            **os.environ,
            "SAFEKIT_MODULE": self.module,
            "SAFEKIT_NODE": self.node,
            **self.env,
            "SAFEKIT_SCRIPT": name,
            "SAFEKIT_CURRENT_STATE": args[0],
            "SAFEKIT_NEXT_STATE": args[1],
            "SAFEKIT_ACTION": args[2],
        }

    async def _execute(self, name: str, path: Path, args: list[str], timeout: float) -> ScriptResult:
        loop = asyncio.get_running_loop()
        started = loop.time()
        sink = _LogSink(self.log_file, self.module, name)
        log.info("%s: running %s %s", self.module, name, " ".join(args))
        pipe = await OutputPipe.open()
        try:
            proc = await asyncio.create_subprocess_exec(
                str(path), *args, stdin=asyncio.subprocess.DEVNULL, stdout=pipe.write_fd,
                stderr=pipe.write_fd, env=self._environment(name, args), cwd=path.parent,
                start_new_session=True,
            )
        except OSError as exc:
            pipe.close()
            hint = await asyncio.to_thread(_interpreter_hint, path, exc)  # reads the #! line: off the loop
            note = f"cannot execute {path}: {exc.strerror or exc}{hint}"
            await asyncio.to_thread(sink.append, [note])
            return ScriptResult(name, True, False, None, False, loop.time() - started, note)
        pipe.child_started()
        pump = asyncio.create_task(sink.pump(pipe), name=f"{self.module}:{name}:output")
        self._running = running = _Running(proc)
        if self._abort_pending:
            self._kill(running)
        try:
            timed_out = await self._wait(proc, timeout)
            await self._finish_output(pump, sink)
        except asyncio.CancelledError:
            # The engine gave up on this script (it is shutting down): leave nothing behind.
            pump.cancel()
            await kill_and_reap(proc)
            raise
        finally:
            self._running = None
        return self._result(name, proc, running, timed_out, loop.time() - started, sink)

    async def _wait(self, proc: asyncio.subprocess.Process, timeout: float) -> bool:
        """Wait for the script; on timeout kill its group. True when it timed out."""
        try:
            await asyncio.wait_for(proc.wait(), timeout)
            return False
        except TimeoutError:
            log.warning("%s: script pid %d still running after %gs: killing its group",
                        self.module, proc.pid, timeout)
            await terminate_group(proc, KILL_GRACE)
            return True

    async def _finish_output(self, pump: asyncio.Task[None], sink: _LogSink) -> None:
        """Give the output a short grace to reach EOF; if children still hold the pipe, keep
        draining it in the background instead of waiting for them."""
        done, _ = await asyncio.wait({pump}, timeout=OUTPUT_GRACE)
        if done:
            return
        sink.background = True
        self._drains.add(pump)
        pump.add_done_callback(self._drains.discard)

    @staticmethod
    def _result(
        name: str, proc: asyncio.subprocess.Process, running: _Running, timed_out: bool, seconds: float,
        sink: _LogSink,
    ) -> ScriptResult:
        rc = proc.returncode
        ok = rc == 0 and not timed_out and not running.aborted
        return ScriptResult(name, True, ok, rc, timed_out, seconds, "\n".join(sink.tail), running.aborted)

    async def _conclude(self, result: ScriptResult, timeout: float) -> None:
        """One line in the daemon log, and on failure one in the module log, saying how it ended
        (output_tail stays the script's own words: the result's fields already tell the rest)."""
        if not result.ran:
            log.debug("%s: no %s script, skipped", self.module, result.name)
            return
        if result.ok:
            log.info("%s: %s ok in %.2fs", self.module, result.name, result.seconds)
            return
        if result.aborted:
            note = f"{result.name} aborted (forcestop)"
        elif result.timed_out:
            note = f"{result.name} killed after its {timeout:g}s timeout"
        elif result.returncode is not None:
            note = f"{result.name} failed with {_describe_rc(result.returncode)}"
        else:
            note = f"{result.name} could not run"
        last = result.output_tail.rsplit("\n", 1)[-1]
        log.warning("%s: %s after %.2fs: %s", self.module, note, result.seconds, last)
        if result.returncode is not None or result.timed_out:
            await asyncio.to_thread(_LogSink(self.log_file, self.module, "safekit-cloud").append, [note])


def _interpreter_hint(path: Path, exc: OSError) -> str:
    """ENOENT for a file that exists is about its `#!` line: say which interpreter is missing (a
    script saved with Windows line endings asks for "/bin/sh\\r")."""
    if not isinstance(exc, FileNotFoundError) or not path.is_file():
        return ""
    try:
        with open(path, "rb") as fh:
            first = fh.readline(256)
    except OSError:
        return ""
    if not first.startswith(b"#!"):
        return ""
    interpreter = first[2:].strip(b" \t\n").split(b" ")[0]
    if interpreter.endswith(b"\r"):
        return (f" (its first line ends with a carriage return: the file has Windows line endings; "
                f"convert it with `dos2unix {path}` or `sed -i 's/\\r$//' {path}`)")
    return f" (its interpreter {interpreter.decode(errors='replace')!r}, named on its first line, does not exist)"


def _describe_rc(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"status {rc}"


def _check_script(path: Path | None) -> str | None:
    """None: no script to run; "": runnable; otherwise why it cannot run. Blocking (stat)."""
    if path is None:
        return None
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():  # the name is there: a link whose target went is not "no script"
            return f"script {path} is a symbolic link to {os.readlink(path)}, which does not exist"
        return None  # missing file or missing directory: the user provides only the scripts they need
    except NotADirectoryError:
        return f"the scripts directory {path.parent} is not a directory: set scripts.directory to the folder of the scripts"
    except OSError as exc:
        return f"cannot access script {path}: {exc.strerror}"
    if not path.is_file():
        return f"script {path} is not a regular file"
    if not os.access(path, os.X_OK) or not mode & 0o111:
        return f"script {path} is not executable (chmod +x {path})"
    return ""
