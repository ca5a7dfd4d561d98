"""Checkers against real processes, loopback sockets and an aiohttp server; CheckerSet; witnesses."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web
from pydantic import TypeAdapter
from safekit_cloud.core.checkers import CheckerSet, any_witness_reachable, build_checker
from safekit_cloud.core.checkers.base import Checker, CheckResult
from safekit_cloud.core.checkers.tcp import os_error_text
from safekit_cloud.core.checkers.witness import ping_argv
from safekit_cloud.core.config import CheckerConfig, TcpChecker, WitnessConfig
from safekit_cloud.core.types import CheckerAction

CHECKER = TypeAdapter(CheckerConfig)


def async_test(fn):
    """Run a coroutine test with asyncio.run (no pytest-asyncio here); fixtures still work."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 15))

    return wrapper


def checker(**fields) -> Checker:
    return build_checker(CHECKER.validate_python({"name": "c1", **fields}))


def free_port() -> int:
    """A loopback port nobody listens on (bound then closed; nothing else on this host races us)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_state(pid: int) -> str:
    """The process's state letter ("" when it no longer exists)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def sleeper(*argv: str):
    """A real process to look for, killed and reaped afterwards."""
    proc = subprocess.Popen(list(argv) or ["sleep", "100"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def listening():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def http_server():
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="status: green\n")

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


# --- process -----------------------------------------------------------------------------------------


@async_test
async def test_process_by_name():
    with sleeper("sleep", "100"):
        result = await checker(type="process", process_name="sleep").check()
        assert result.ok and "process named sleep running" in result.reason
    missing = await checker(type="process", process_name="no-such-proc-xyz").check()
    assert not missing.ok and "no process named no-such-proc-xyz" in missing.reason


@async_test
async def test_process_by_regex():
    marker = f"{time.time_ns()}"
    # one process, no children: a shell's forked child could carry the marker for a moment
    with sleeper(sys.executable, "-c", "import time; time.sleep(100)", f"marker-{marker}") as proc:
        result = await checker(type="process", cmdline_regex=f"marker-{marker}$").check()
        assert result.ok and str(proc.pid) in result.reason
    gone = await checker(type="process", cmdline_regex=f"marker-{marker}$").check()
    assert not gone.ok


@async_test
async def test_process_by_pid_file(tmp_path):
    pid_file = tmp_path / "app.pid"
    c = checker(type="process", pid_file=str(pid_file))
    assert "unreadable" in (await c.check()).reason
    pid_file.write_text("garbage\n")
    assert "holds no pid" in (await c.check()).reason
    # not text, a number no pid can be, another script's digits (١٢٣ is 123 to int()): no pid, said
    for content in (b"\xff\xfe", b"99999999999999999999\n", "\u0661\u0662\u0663\n".encode()):
        pid_file.write_bytes(content)
        reason = (await c.check()).reason
        assert reason.startswith(f"pid file {pid_file} holds no pid on its first line"), reason
    with sleeper("sleep", "100") as proc:
        pid_file.write_text(f"{proc.pid}\n")
        assert (await c.check()).ok
        pid_file.write_text(f"{proc.pid}\n/var/lib/postgresql/15/main\n1700000000\n")  # postmaster.pid
        assert (await c.check()).ok
    result = await c.check()  # killed and reaped
    assert not result.ok and "is not running" in result.reason


@async_test
async def test_process_zombie_is_not_running(tmp_path):
    proc = subprocess.Popen(["sleep", "100"])  # noqa: ASYNC220 - Popen: we want an unreaped zombie
    try:
        proc.kill()
        deadline = time.monotonic() + 3
        while proc_state(proc.pid) != "Z":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        (tmp_path / "p").write_text(str(proc.pid))
        assert not (await checker(type="process", pid_file=str(tmp_path / "p")).check()).ok
    finally:
        proc.wait()


# --- tcp ---------------------------------------------------------------------------------------------


@async_test
async def test_tcp_listening_and_closed():
    async with listening() as port:
        ok = await checker(type="tcp", port=port).check()
        assert ok.ok and f"127.0.0.1:{port}" in ok.reason
    refused_port = free_port()
    refused = await checker(type="tcp", port=refused_port).check()
    assert not refused.ok and refused.reason == f"127.0.0.1:{refused_port}: Connection refused"


def test_a_host_name_that_does_not_resolve_says_so() -> None:
    """getaddrinfo's error codes are not errno values: the reason read "Unknown error -2". (The error
    is built here: a test must not send a DNS query anywhere.)"""
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert os_error_text(error) == ("cannot resolve the host name (Name or service not known): check the "
                                    "name, or use its IP address")


# --- http --------------------------------------------------------------------------------------------


@async_test
async def test_http_ok_status_mismatch_body_mismatch():
    async with http_server() as base:
        assert (await checker(type="http", url=f"{base}/health").check()).ok
        assert (await checker(type="http", url=f"{base}/health", body_regex=r"status: \w+").check()).ok
        status = await checker(type="http", url=f"{base}/broken").check()
        assert not status.ok and "status 503, expected 200" in status.reason
        assert (await checker(type="http", url=f"{base}/broken", expect_status=503).check()).ok
        body = await checker(type="http", url=f"{base}/health", body_regex="red").check()
        assert not body.ok and "body does not match" in body.reason
    port = free_port()
    down = await checker(type="http", url=f"http://127.0.0.1:{port}/").check()
    assert not down.ok and down.reason == f"GET http://127.0.0.1:{port}/: cannot connect: Connection refused"


@async_test
async def test_http_an_answer_that_is_not_http_is_said_so_and_a_timeout_names_the_url():
    """aiohttp reports a malformed answer as a "400" of its own: it read as if the server answered 400."""
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HELLO THERE\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await checker(type="http", url=f"http://127.0.0.1:{port}/").check()
        assert not result.ok and result.reason.startswith(f"GET http://127.0.0.1:{port}/: the answer is not valid HTTP (")
    finally:
        server.close()
        await server.wait_closed()
    async with silent_port() as port:
        slow = await checker(type="http", url=f"http://127.0.0.1:{port}/", timeout=0.3).check()
        assert slow.reason == f"GET http://127.0.0.1:{port}/: no answer within 0.3s"


# --- command -----------------------------------------------------------------------------------------


@async_test
async def test_command_true_false_missing():
    assert (await checker(type="command", command=["true"]).check()).ok
    failed = await checker(type="command", command=["sh", "-c", "echo db unreachable >&2; exit 2"]).check()
    assert not failed.ok and failed.reason == "exit 2: db unreachable"
    # what reaches `status`: no terminal control sequence, no NUL
    noisy = await checker(type="command", command=["sh", "-c", "printf 'down\\033[2J\\000!\\n'; exit 1"]).check()
    assert noisy.reason == "exit 1: down\\x1b[2J\\x00!"
    missing = await checker(type="command", command=["/nonexistent/check"]).check()
    assert not missing.ok and "FileNotFoundError" in missing.reason


@async_test
async def test_command_timeout_kills_its_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    c = checker(type="command", timeout=0.3, command=["sh", "-c", f"sleep 100 & echo $! > {pid_file}; wait"])
    began = time.monotonic()
    result = await c.check()
    assert not result.ok and "0.3s" in result.reason and time.monotonic() - began < 1.5
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 3
    while proc_state(child) not in ("", "Z"):
        assert time.monotonic() < deadline, "the command's child survived the timeout"
        await asyncio.sleep(0.02)


@async_test
async def test_command_leaving_background_child_is_not_a_hang():
    result = await checker(type="command", timeout=2, command=["sh", "-c", "sleep 100 & exit 0"]).check()
    assert result.ok


# --- base contract -----------------------------------------------------------------------------------


class Exploding(Checker):
    async def probe(self) -> CheckResult:
        raise RuntimeError("boom")


@async_test
async def test_exception_in_probe_is_a_failure():
    result = await Exploding(TcpChecker(name="x", type="tcp", port=1)).check()
    assert result == CheckResult(False, "RuntimeError: boom")


# --- CheckerSet --------------------------------------------------------------------------------------


@async_test
async def test_checker_set_fires_once_then_recovers(tmp_path):
    flag = tmp_path / "healthy"
    cfg = CHECKER.validate_python({
        "name": "app", "type": "command", "command": ["test", "-e", str(flag)],
        "interval": 0.05, "failures": 3, "action": "stopstart",
    })
    fired: list[tuple[str, CheckerAction, str]] = []
    recovered: list[str] = []
    checkers = CheckerSet([cfg], lambda *a: fired.append(a), recovered.append)
    assert checkers.status()[0].ok is None and checkers.status()[0].last_check_ago is None
    checkers.start()
    try:
        await wait_for(lambda: checkers.status()[0].consecutive_failures >= 6)
        assert fired == [("app", CheckerAction.STOPSTART, "exit 1")]  # exactly once past the threshold
        status = checkers.status()[0]
        assert (status.name, status.type, status.ok, status.action) == ("app", "command", False, CheckerAction.STOPSTART)
        assert status.last_check_ago is not None and status.last_check_ago < 1
        flag.touch()
        await wait_for(lambda: recovered == ["app"])
        assert checkers.status()[0].consecutive_failures == 0 and checkers.status()[0].ok
        flag.unlink()
        await wait_for(lambda: len(fired) == 2)  # fails again after recovering: fires again
    finally:
        await checkers.stop()
    assert not checkers.running


@async_test
async def test_checker_set_below_threshold_never_fires_and_no_recovery_without_fire(tmp_path):
    flag = tmp_path / "healthy"
    cfg = CHECKER.validate_python({
        "name": "app", "type": "command", "command": ["test", "-e", str(flag)],
        "interval": 0.05, "failures": 50,
    })
    fired, recovered = [], []
    checkers = CheckerSet([cfg], lambda *a: fired.append(a), recovered.append)
    checkers.start()
    try:
        await wait_for(lambda: checkers.status()[0].consecutive_failures >= 3)
        flag.touch()
        await wait_for(lambda: checkers.status()[0].ok is True)
    finally:
        await checkers.stop()
    assert fired == [] and recovered == []


@async_test
async def test_checker_set_start_delay_and_broken_callback():
    cfg = CHECKER.validate_python({"name": "t", "type": "tcp", "port": free_port(), "interval": 0.05,
                                   "failures": 1, "start_delay": 0.3})
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("callback bug")

    checkers = CheckerSet([cfg], broken, broken)
    checkers.start()
    try:
        await asyncio.sleep(0.15)
        assert checkers.status()[0].ok is None  # still in its start delay
        await wait_for(lambda: checkers.status()[0].consecutive_failures >= 3)  # task survived the bug
        assert len(calls) == 1
    finally:
        await checkers.stop()


@async_test
async def test_checker_set_restart_rearms():
    cfg = CHECKER.validate_python({"name": "t", "type": "tcp", "port": free_port(), "interval": 0.05,
                                   "failures": 2, "action": "restart"})
    fired = []
    checkers = CheckerSet([cfg], lambda *a: fired.append(a), lambda name: None)
    checkers.start()
    await wait_for(lambda: len(fired) == 1)
    checkers.rearm("t")
    await wait_for(lambda: len(fired) == 2)
    await checkers.stop()
    checkers.start()  # a stop/start (around a restart) starts counting afresh
    await wait_for(lambda: len(fired) == 3)
    await checkers.stop()
    assert all(action is CheckerAction.RESTART for _, action, _ in fired)


async def wait_for(predicate, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# --- witnesses ---------------------------------------------------------------------------------------


@async_test
async def test_no_witness_is_ok():
    assert await any_witness_reachable([]) == (True, "no witness configured")


@contextlib.asynccontextmanager
async def silent_port():
    """A loopback port whose SYNs go unanswered: a listener with a full accept queue (deterministic,
    unlike a routed "unreachable" address, which some networks answer)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port = sock.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))  # fills the queue of one
    try:
        yield port
    finally:
        filler.close()
        sock.close()


@pytest.fixture
def fake_ping(tmp_path, monkeypatch):
    """Put a `ping` of the test's making first on PATH; returns a function writing its body."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def install(body: str) -> None:
        (bin_dir / "ping").write_text("#!/bin/sh\n" + body)
        (bin_dir / "ping").chmod(0o755)

    return install


@async_test
async def test_tcp_witness_up_and_down():
    async with listening() as port:
        ok, reason = await any_witness_reachable([WitnessConfig(type="tcp", address="127.0.0.1", port=port)])
        assert ok and reason == f"tcp witness 127.0.0.1:{port} answered"
    ok, reason = await any_witness_reachable([WitnessConfig(type="tcp", address="127.0.0.1", port=port)])
    assert not ok and reason == f"no witness answered: tcp witness 127.0.0.1:{port}: Connection refused"


@async_test
async def test_silent_witness_times_out():
    async with silent_port() as port:
        began = time.monotonic()
        ok, reason = await any_witness_reachable(
            [WitnessConfig(type="tcp", address="127.0.0.1", port=port, timeout=0.3)]
        )
        assert not ok and "no answer within 0.3s" in reason and time.monotonic() - began < 1.5


@async_test
async def test_ping_witness_and_first_answer_wins():
    ok, reason = await any_witness_reachable([WitnessConfig(address="127.0.0.1")])
    assert ok and reason == "ping witness 127.0.0.1 answered"
    async with silent_port() as port:
        began = time.monotonic()
        ok, reason = await any_witness_reachable(
            [WitnessConfig(type="tcp", address="127.0.0.1", port=port, timeout=5), WitnessConfig(address="127.0.0.1")]
        )
        assert ok and reason == "ping witness 127.0.0.1 answered" and time.monotonic() - began < 2


def test_ping_without_reply_or_hanging_or_missing(fake_ping, monkeypatch, tmp_path):
    fake_ping("exit 1\n")
    ok, reason = asyncio.run(any_witness_reachable([WitnessConfig(address="10.9.9.9")]))
    assert not ok and reason == "no witness answered: ping witness 10.9.9.9: no reply (ping exit 1)"
    fake_ping("exec sleep 100\n")
    began = time.monotonic()
    ok, reason = asyncio.run(any_witness_reachable([WitnessConfig(address="10.9.9.9", timeout=0.3)]))
    assert not ok and "no answer within 0.3s" in reason and time.monotonic() - began < 1.5
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    ok, reason = asyncio.run(any_witness_reachable([WitnessConfig(address="10.9.9.9")]))
    assert not ok and "not installed" in reason


def test_ping_argv():
    assert ping_argv(WitnessConfig(address="::1", timeout=0.5))[-2:] == ["-6", "::1"]
    assert ping_argv(WitnessConfig(address="10.0.0.1", timeout=2.5))[-3:] == ["-W", "3", "10.0.0.1"]
    assert "-6" not in ping_argv(WitnessConfig(address="gw.example"))


@async_test
async def test_ping_ipv6_loopback():
    ok, reason = await any_witness_reachable([WitnessConfig(address="::1")])
    assert ok, reason
