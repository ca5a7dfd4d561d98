"""ScriptRunner against real shell scripts: arguments, environment, log, failures, timeouts, abort."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from pathlib import Path

import pytest
from safekit_cloud.core.config import ScriptsConfig
from safekit_cloud.core.scripts import SCRIPT_NAMES, ScriptRunner, _LogSink


def async_test(fn):
    """Run a coroutine test with asyncio.run (no pytest-asyncio here); fixtures still work."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 15))

    return wrapper


def write_script(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    return write_file(directory / name, ("#!/bin/sh\n" + body).encode(), mode)


def write_file(path: Path, content: bytes, mode: int = 0o755) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def make_runner(tmp_path: Path, **config) -> ScriptRunner:
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    return ScriptRunner(
        module="mod1",
        node="node1",
        config=ScriptsConfig(directory=scripts, **config),
        env={"SAFEKIT_VIP": "198.18.0.100", "SAFEKIT_PEER": "node2", "SAFEKIT_CLUSTER": "c1"},
        log_file=tmp_path / "module.log",
    )


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for a reaper that is not ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


async def wait_gone(pid: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        await asyncio.sleep(0.02)
    return gone(pid)


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@async_test
async def test_args_env_and_output_logged(tmp_path):
    runner = make_runner(tmp_path)
    write_script(
        runner.config.directory, "start_prim",
        'echo "args=$1,$2,$3"\n'
        'echo "env=$SAFEKIT_MODULE,$SAFEKIT_NODE,$SAFEKIT_VIP,$SAFEKIT_PEER,$SAFEKIT_CLUSTER"\n'
        'echo "more=$SAFEKIT_SCRIPT,$SAFEKIT_CURRENT_STATE,$SAFEKIT_NEXT_STATE,$SAFEKIT_ACTION"\n'
        'echo "path=${PATH:+set}"\n'
        'echo "to stderr" >&2\n',
    )
    result = await runner.run("start_prim", "SECOND", "ALONE", "failover")
    assert result.ran and result.ok and result.returncode == 0 and not result.timed_out
    assert "args=SECOND,ALONE,failover" in result.output_tail
    assert "env=mod1,node1,198.18.0.100,node2,c1" in result.output_tail
    assert "more=start_prim,SECOND,ALONE,failover" in result.output_tail
    assert "path=set" in result.output_tail  # os.environ is inherited
    log_lines = (tmp_path / "module.log").read_text().splitlines()
    assert any(line.endswith("mod1 start_prim: args=SECOND,ALONE,failover") for line in log_lines)
    assert any(line.endswith("mod1 start_prim: to stderr") for line in log_lines)


@async_test
async def test_control_characters_of_the_output_are_logged_as_escapes(tmp_path):
    """An escape sequence would clear or recolour the terminal of an operator following the log, a
    NUL or a carriage return hide what precedes them."""
    runner = make_runner(tmp_path)
    write_script(runner.config.directory, "start_prim", "printf 'red \\033[31mtext\\033[0m\\000 end\\tok\\n'\n")
    result = await runner.run("start_prim", "WAIT", "ALONE", "start")
    assert result.output_tail == "red \\x1b[31mtext\\x1b[0m\\x00 end\tok"
    assert (tmp_path / "module.log").read_text().endswith("mod1 start_prim: red \\x1b[31mtext\\x1b[0m\\x00 end\tok\n")


@async_test
async def test_missing_script_and_missing_directory_are_skipped(tmp_path):
    runner = make_runner(tmp_path)
    result = await runner.run("prestart", "STOP", "WAIT", "start")
    assert (result.ran, result.ok, result.returncode) == (False, True, None)
    nowhere = ScriptRunner(module="m", node="n", config=ScriptsConfig(directory=tmp_path / "none"), env={},
                           log_file=tmp_path / "log")
    assert (await nowhere.run("stop_prim", "ALONE", "STOP", "stop")).ok
    unset = ScriptRunner(module="m", node="n", config=ScriptsConfig(), env={}, log_file=tmp_path / "log")
    assert not (await unset.run("stop_prim", "ALONE", "STOP", "stop")).ran


@async_test
async def test_not_executable_fails_clearly(tmp_path):
    runner = make_runner(tmp_path)
    write_script(runner.config.directory, "stop_prim", "exit 0\n", mode=0o644)
    result = await runner.run("stop_prim", "ALONE", "STOP", "stop")
    assert result.ran and not result.ok and result.returncode is None
    assert "not executable" in result.output_tail
    assert "not executable" in (tmp_path / "module.log").read_text()


@async_test
async def test_no_interpreter_line_fails_clearly(tmp_path):
    runner = make_runner(tmp_path)
    write_file(runner.config.directory / "prestart", b"\x7fELF-garbage")
    result = await runner.run("prestart", "STOP", "WAIT", "start")
    assert result.ran and not result.ok and "cannot execute" in result.output_tail


@async_test
async def test_a_dangling_symlink_or_a_file_as_the_folder_is_a_failure_not_a_skip(tmp_path):
    """Both were skipped as "no script": the step counted as done, and nothing started."""
    runner = make_runner(tmp_path)
    (runner.config.directory / "start_prim").symlink_to("/nonexistent/app-start")
    result = await runner.run("start_prim", "WAIT", "ALONE", "start")
    assert result.ran and not result.ok
    assert result.output_tail == (f"script {runner.config.directory / 'start_prim'} is a symbolic link to "
                                  "/nonexistent/app-start, which does not exist")
    (tmp_path / "a-file").write_text("")
    wrong = ScriptRunner(module="m", node="n", config=ScriptsConfig(directory=tmp_path / "a-file"), env={},
                         log_file=tmp_path / "log")
    result = await wrong.run("start_prim", "WAIT", "ALONE", "start")
    assert result.ran and not result.ok
    assert result.output_tail == (f"the scripts directory {tmp_path / 'a-file'} is not a directory: set "
                                  "scripts.directory to the folder of the scripts")


@async_test
async def test_a_missing_interpreter_is_named_and_windows_line_endings_are_said(tmp_path):
    runner = make_runner(tmp_path)
    write_file(runner.config.directory / "start_prim", b"#!/bin/sh\r\necho hi\r\n")
    result = await runner.run("start_prim", "WAIT", "ALONE", "start")
    assert not result.ok and "the file has Windows line endings; convert it with `dos2unix" in result.output_tail
    write_file(runner.config.directory / "stop_prim", b"#!/opt/nothing/bash\nexit 0\n")
    result = await runner.run("stop_prim", "ALONE", "STOP", "stop")
    assert not result.ok and "its interpreter '/opt/nothing/bash', named on its first line, does not exist" \
        in result.output_tail


@async_test
async def test_output_of_one_run_is_logged_up_to_a_cap(tmp_path, monkeypatch):
    """A script in a loop, or an application left in the background that keeps printing, must not
    fill the disk with the module log."""
    monkeypatch.setattr("safekit_cloud.core.scripts.MAX_LOGGED", 64 * 1024)
    runner = make_runner(tmp_path)
    write_script(runner.config.directory, "start_prim", "yes 'a line of output' | head -c 1000000\necho last\n")
    result = await runner.run("start_prim", "WAIT", "ALONE", "start")
    assert result.ok and result.output_tail.endswith("last")  # the tail is still what the script said last
    text = (tmp_path / "module.log").read_text()
    output = [line.split(": ", 1)[1] for line in text.splitlines()]
    assert output[-1] == "(output beyond 0.0625 MiB from this run is not logged)"
    assert 64 * 1024 - 16 < sum(len(line) for line in output[:-1]) <= 64 * 1024  # of 1,000,000 bytes


@async_test
async def test_output_dropped_after_a_cap_reached_exactly_between_two_reads_is_still_said(tmp_path, monkeypatch):
    """The pipe delivers output in pieces of any size: the cap may be reached by the last line of one
    piece; the next line dropped must still leave the notice (it was missing in 1 run of 3 above)."""
    monkeypatch.setattr("safekit_cloud.core.scripts.MAX_LOGGED", 32)
    sink = _LogSink(tmp_path / "module.log", "mod1", "start_prim")
    await sink._write([b"a" * 16, b"b" * 16])  # exactly the cap
    await sink._write([b"c" * 16])
    await sink._write([b"d" * 16])
    output = [line.split(": ", 1)[1] for line in (tmp_path / "module.log").read_text().splitlines()]
    assert output == ["a" * 16, "b" * 16, "(output beyond 3.05176e-05 MiB from this run is not logged)"]
    assert list(sink.tail)[-1] == "d" * 16  # the result's tail still has what the script said last


@async_test
async def test_non_zero_exit_is_a_failure_with_its_code(tmp_path):
    runner = make_runner(tmp_path)
    write_script(runner.config.directory, "start_second", "echo broken\nexit 3\n")
    result = await runner.run("start_second", "WAIT", "SECOND", "start")
    assert result.ran and not result.ok and result.returncode == 3 and not result.timed_out
    assert result.output_tail == "broken"
    assert "mod1 safekit-cloud: start_second failed with status 3" in (tmp_path / "module.log").read_text()


@async_test
async def test_output_tail_keeps_the_last_lines(tmp_path):
    runner = make_runner(tmp_path)
    write_script(runner.config.directory, "transition", "for i in $(seq 1 100); do echo line$i; done\n")
    result = await runner.run("transition", "SECOND", "ALONE", "failover")
    lines = result.output_tail.splitlines()
    assert len(lines) == 20 and lines[-1] == "line100" and lines[0] == "line81"
    assert (tmp_path / "module.log").read_text().count("mod1 transition: line") == 100


@async_test
async def test_timeout_kills_the_whole_group(tmp_path):
    runner = make_runner(tmp_path, timeout=0.5)
    pid_file = tmp_path / "child.pid"
    write_script(runner.config.directory, "start_prim", f"sleep 100 &\necho $! > {pid_file}\nwait\n")
    began = time.monotonic()
    result = await runner.run("start_prim", "WAIT", "ALONE", "start")
    child = int(pid_file.read_text())
    try:
        assert result.timed_out and not result.ok
        assert "start_prim killed after its 0.5s timeout" in (tmp_path / "module.log").read_text()
        assert time.monotonic() - began < 3.5  # timeout + at most the 2 s grace + slack
        assert await wait_gone(child), f"child {child} of the timed-out script survived"
    finally:
        kill_quietly(child)


@async_test
async def test_sigterm_ignoring_group_gets_sigkill(tmp_path):
    runner = make_runner(tmp_path)
    pid_file = tmp_path / "child.pid"
    write_script(runner.config.directory, "stop_prim",
                 f"trap '' TERM\nsh -c 'trap \"\" TERM; sleep 100' &\necho $! > {pid_file}\nwait\n")
    result = await runner.run("stop_prim", "ALONE", "STOP", "stop", timeout=0.3)
    child = int(pid_file.read_text())
    try:
        assert result.timed_out and result.returncode == -signal.SIGKILL
        assert await wait_gone(child)
    finally:
        kill_quietly(child)


@async_test
async def test_stop_scripts_use_stop_timeout(tmp_path):
    runner = make_runner(tmp_path, timeout=30, stop_timeout=0.3)
    write_script(runner.config.directory, "stop_both", "exec sleep 100\n")
    result = await runner.run("stop_both", "ALONE", "STOP", "stop")
    assert result.timed_out and result.seconds < 3


@pytest.mark.parametrize("launch", ["sleep 100 &", "nohup sleep 100 &", "setsid sleep 100 &"])
def test_background_daemon_does_not_hang_run(tmp_path, launch):
    @async_test
    async def scenario(tmp_path):
        runner = make_runner(tmp_path)
        pid_file = tmp_path / "daemon.pid"
        write_script(runner.config.directory, "start_prim",
                     f"echo starting\n{launch}\necho $! > {pid_file}\necho started\n")
        began = time.monotonic()
        result = await runner.run("start_prim", "WAIT", "ALONE", "start")
        elapsed = time.monotonic() - began
        daemon = int(pid_file.read_text())
        try:
            assert result.ok and elapsed < 2, elapsed
            assert "started" in result.output_tail
            assert not gone(daemon)  # we do not kill what the script meant to leave running
        finally:
            kill_quietly(daemon)
            await runner.close()

    scenario(tmp_path)


@async_test
async def test_background_output_keeps_being_logged(tmp_path):
    runner = make_runner(tmp_path)
    write_script(runner.config.directory, "start_prim", "(sleep 0.8; echo late line) &\necho early\n")
    result = await runner.run("start_prim", "WAIT", "ALONE", "start")
    assert result.ok and "late line" not in result.output_tail
    await asyncio.sleep(1.0)
    text = (tmp_path / "module.log").read_text()
    assert "mod1 start_prim[background]: late line" in text
    await runner.close()


@async_test
async def test_abort_kills_the_running_script(tmp_path):
    runner = make_runner(tmp_path)
    pid_file = tmp_path / "child.pid"
    write_script(runner.config.directory, "start_prim", f"sleep 100 &\necho $! > {pid_file}\nwait\n")
    task = asyncio.create_task(runner.run("start_prim", "WAIT", "ALONE", "start"))
    while not pid_file.exists() or not pid_file.read_text().strip():
        await asyncio.sleep(0.02)
    child = int(pid_file.read_text())
    try:
        await runner.abort()
        result = await task
        assert result.aborted and not result.ok and not result.timed_out
        assert result.returncode == -signal.SIGKILL
        assert await wait_gone(child)
        await runner.abort()  # nothing running: a no-op
    finally:
        kill_quietly(child)


@async_test
async def test_one_script_at_a_time(tmp_path):
    runner = make_runner(tmp_path)
    marks = tmp_path / "marks"
    for name in ("stop_prim", "start_prim"):
        write_script(runner.config.directory, name, f"echo {name}-in >> {marks}\nsleep 0.2\necho {name}-out >> {marks}\n")
    await asyncio.gather(runner.run("stop_prim", "ALONE", "ALONE", "restart"),
                         runner.run("start_prim", "ALONE", "ALONE", "restart"))
    assert marks.read_text().split() == ["stop_prim-in", "stop_prim-out", "start_prim-in", "start_prim-out"]


@async_test
async def test_cancelled_run_kills_the_group(tmp_path):
    runner = make_runner(tmp_path)
    pid_file = tmp_path / "child.pid"
    write_script(runner.config.directory, "prestart", f"sleep 100 &\necho $! > {pid_file}\nwait\n")
    task = asyncio.create_task(runner.run("prestart", "STOP", "WAIT", "start"))
    while not pid_file.exists() or not pid_file.read_text().strip():
        await asyncio.sleep(0.02)
    child = int(pid_file.read_text())
    try:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_gone(child)
    finally:
        kill_quietly(child)


def test_unknown_script_name_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError):
        asyncio.run(make_runner(tmp_path).run("start_primary", "a", "b", "c"))
    assert "start_prim" in SCRIPT_NAMES


@async_test
async def test_abort_before_the_script_is_spawned_still_applies(tmp_path):
    runner = make_runner(tmp_path)
    write_script(runner.config.directory, "stop_prim", "sleep 100\n")
    write_script(runner.config.directory, "stop_both", "exit 0\n")
    first = asyncio.create_task(runner.run("stop_prim", "ALONE", "STOP", "forcestop"))
    await asyncio.sleep(0)  # the run holds the lock and is checking the file: not spawned yet
    assert runner._lock.locked() and runner._running is None
    await runner.abort()
    result = await first
    assert result.aborted and not result.ok and result.seconds < 2
    assert (await runner.run("stop_both", "ALONE", "STOP", "forcestop")).ok  # the next run is not aborted
