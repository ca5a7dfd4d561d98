"""The CLI against the real API served on 127.0.0.1 by a fake controller (a thread with its own loop)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import click
import msgspec
import pytest
import yaml
from click.testing import CliRunner, Result
from safekit_cloud.core import cli
from safekit_cloud.core.api import build_app, serve_api
from safekit_cloud.core.config import ApiConfig, load_config
from safekit_cloud.core.daemon import read_token as daemon_read_token
from safekit_cloud.core.engine import EngineError, read_key
from safekit_cloud.core.init import new_cluster_key
from safekit_cloud.core.status import (
    CheckerOut,
    CommandResult,
    DecisionOut,
    ModuleOut,
    NetworkOut,
    NodeOut,
    PeerOut,
)
from safekit_cloud.core.types import ModuleState

TOKEN = "cli-test-token-0123456789"
DECISION_TIME = round(time.time()) - 60.0  # fixed, so two status answers are byte-identical


class FakeController:
    """Implements status.Controller over attributes the tests set."""

    def __init__(self, log_dir: Path, modules: tuple[str, ...]):
        self.states = {m: "STOP" for m in modules}
        self.data = {m: "uptodate" for m in modules}
        self.log_dir = log_dir

    def module_names(self) -> list[str]:
        return list(self.states)

    def serving(self, module: str) -> bool:
        return ModuleState[self.states[module]].is_primary

    def log_path(self, module: str) -> str:
        return str(self.log_dir / f"{module}.log")

    async def command(self, module: str, verb: str) -> CommandResult:
        if verb == "second" and self.states[module] == "STOP":
            return CommandResult(False, "the module is stopped: start it first", "STOP")
        self.states[module] = {"start": "ALONE", "stop": "STOP", "swap": "SECOND"}.get(verb, self.states[module])
        return CommandResult(True, f"{verb} done", self.states[module])

    def status(self) -> NodeOut:
        peer = PeerOut("n2", True, 3, [NetworkOut("default", True, 0.1, 0.42), NetworkOut("backup", False, None, None)])
        return NodeOut(1, "0.1.0", "c1", "n1", 9, 75.0, peer, {"sent": 5}, [self._module(m) for m in self.states])

    def _module(self, name: str) -> ModuleOut:
        state = self.states[name]
        checker = CheckerOut("web", "http", False, "connection refused", 2, "restart", True)
        decision = DecisionOut(DECISION_TIME, "peer_lost", "SECOND", state, "peer n2 silent on every network",
                               ["take_vip"])
        return ModuleOut(name, state, ModuleState[state].value, self.data[name],
                         "peer unknown and data possibly stale" if state == "WAIT" else "", "",
                         self.serving(name), "198.18.0.100/24", "fake", "SECOND", "uptodate", "0a", 1, 3,
                         [checker], [decision], None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(folder: Path, port: int, modules: tuple[str, ...] = ("app",)) -> Path:
    token_file = folder / "api.token"
    token_file.write_text(TOKEN + "\n")
    config = {
        "cluster": {"name": "c1"},
        "nodes": [{"name": "n1", "addresses": "198.18.0.1"}, {"name": "n2", "addresses": "198.18.0.2"}],
        "api": {"listen": f"127.0.0.1:{port}", "token_file": str(token_file)},
        # each module its own virtual IP: the config loader refuses one shared by two modules
        "modules": [{"name": m, "vip": {"provider": "fake", "address": f"198.18.0.{100 + i}/24",
                                        "state_file": str(folder / "vip.json")}} for i, m in enumerate(modules)],
    }
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Daemon:
    """The API of a fake daemon, served from a thread so the (blocking) CLI can call it."""

    def __init__(self, folder: Path, modules: tuple[str, ...]):
        self.controller = FakeController(folder, modules)
        self.port = free_port()
        self.config = write_config(folder, self.port, modules)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        api = ApiConfig(listen=f"127.0.0.1:{self.port}")
        app = build_app(self.controller, TOKEN)
        self.runner = asyncio.run_coroutine_threadsafe(serve_api(app, api), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def cli(self, *args: str) -> Result:
        return invoke("-c", str(self.config), "--node", "n1", *args)


def invoke(*args: str, **kwargs: object) -> Result:
    return CliRunner().invoke(cli.main, list(args), **kwargs)  # type: ignore[arg-type]


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with Daemon(tmp_path, ("app",)) as running:
        yield running


@pytest.fixture
def two_modules(tmp_path: Path) -> Iterator[Daemon]:
    with Daemon(tmp_path, ("app", "db")) as running:
        yield running


# ---- state and waitstate -------------------------------------------------------------------------

@pytest.mark.parametrize("state", [s.name for s in ModuleState])
def test_state_exit_code_is_the_state_code(daemon: Daemon, state: str) -> None:
    daemon.controller.states["app"] = state
    result = daemon.cli("state")
    assert (result.exit_code, result.stdout) == (ModuleState[state].value, f"{state}\n")


def test_state_errors_exit_5_never_a_state_code(daemon: Daemon, tmp_path: Path) -> None:
    assert_one_line_error(daemon.cli("state", "-m", "nope"), 5, "unknown module 'nope'", "app")
    assert daemon.cli("state", "--bogus").exit_code == 5  # usage errors too (2 would read as ALONE)
    assert invoke("--bogus", "state").exit_code == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: {name: c1}\n")
    assert invoke("-c", str(bad), "state").exit_code == 5


def test_state_when_the_daemon_is_down(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    result = invoke("-c", str(config), "--node", "n1", "state")
    assert_one_line_error(result, 5, f"cannot reach the safekit-cloud daemon at 127.0.0.1:{port} (node n1): "
                                     "is `safekit-cloud run` running? (connection refused)")


def test_waitstate(daemon: Daemon) -> None:
    daemon.controller.states["app"] = "PRIM"
    assert daemon.cli("waitstate", "prim", "--timeout", "1").exit_code == 0
    daemon.controller.states["app"] = "WAIT"
    started = time.monotonic()
    result = daemon.cli("waitstate", "PRIM", "--timeout", "0.6")
    assert time.monotonic() - started >= 0.6
    assert_one_line_error(result, 1, "still not PRIM after 0.6 s", "state WAIT",
                          "waiting for: peer unknown and data possibly stale")
    threading.Timer(0.3, daemon.controller.states.__setitem__, ("app", "ALONE")).start()
    assert daemon.cli("waitstate", "ALONE", "--timeout", "5").exit_code == 0


def test_waitstate_second_needs_uptodate_data(daemon: Daemon) -> None:
    daemon.controller.states["app"] = "SECOND"
    daemon.controller.data["app"] = "resyncing"
    assert_one_line_error(daemon.cli("waitstate", "SECOND", "--timeout", "0.3"), 1, "data resyncing")
    daemon.controller.data["app"] = "uptodate"
    assert daemon.cli("waitstate", "SECOND", "--timeout", "0.3").exit_code == 0


def test_waitstate_when_the_daemon_is_down(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    result = invoke("-c", str(config), "--node", "n1", "waitstate", "PRIM", "--timeout", "0.3")
    assert_one_line_error(result, 1, "still not PRIM", "connection refused")



def test_waitstate_timeout_0_looks_once(daemon: Daemon) -> None:
    daemon.controller.states["app"] = "PRIM"
    assert daemon.cli("waitstate", "PRIM", "--timeout", "0").exit_code == 0
    assert_one_line_error(daemon.cli("waitstate", "STOP", "--timeout", "0"), 1, "still not STOP after 0 s")


@pytest.mark.timeout(30)  # nan used to make waitstate wait for ever
@pytest.mark.parametrize(("args", "value", "why"), [
    (["waitstate", "PRIM"], "nan", "is not a finite number"),
    (["waitstate", "PRIM"], "inf", "is not a finite number"),
    (["waitstate", "PRIM"], "-1", "is out of range"),
    (["waitstate", "PRIM"], "forever", "is not a number"),
    (["verify"], "nan", "is not a finite number"),
    (["verify"], "inf", "is not a finite number"),
    (["verify"], "1e400", "is not a finite number"),
    (["verify"], "-5", "is out of range"),
    (["verify"], "0", "is out of range"),  # a socket timeout of 0 does not wait at all
    (["verify"], "1e10", "is out of range"),  # overflows a socket timeout
])
def test_timeouts_must_be_finite_durations(daemon: Daemon, args: list[str], value: str, why: str) -> None:
    result = daemon.cli(*args, "--timeout", value)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert f"Error: Invalid value for '--timeout': '{value}' {why}: use a number of seconds" in result.stderr
    assert "up to 31536000 (a year)" in result.stderr
    assert "Traceback" not in result.output and "internal error" not in result.output


def test_every_timeout_option_is_a_checked_duration() -> None:
    """A new timeout or interval option must refuse nan and inf too: it has to use cli.Seconds."""
    commands: list[click.Command] = []
    pending: list[click.Command] = [cli.main]
    while pending:
        command = pending.pop()
        commands.append(command)
        if isinstance(command, click.Group):
            pending.extend(command.commands.values())
    timed = [(c.name, p.name) for c in commands for p in c.params
             if p.name and ("timeout" in p.name or "interval" in p.name)]
    assert ("verify", "timeout") in timed and ("waitstate", "timeout") in timed
    for command in commands:
        for param in command.params:
            if param.name and ("timeout" in param.name or "interval" in param.name):
                assert isinstance(param.type, cli.Seconds), (command.name, param.name)


# ---- status --------------------------------------------------------------------------------------

def test_status_json_is_what_the_api_returns(daemon: Daemon) -> None:
    daemon.controller.states["app"] = "PRIM"
    result = daemon.cli("status", "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout == msgspec.json.encode(daemon.controller.status()).decode() + "\n"
    assert json.loads(result.stdout)["schema_version"] == 1


def test_status_table(daemon: Daemon) -> None:
    daemon.controller.states["app"] = "WAIT"
    result = daemon.cli("status")
    assert result.exit_code == 0, result.output
    for text in ("c1", "n1", "peer n2", "backup", "silent", "0.42 ms", "module app", "WAIT", "(code 1)",
                 "waiting for: peer unknown", "198.18.0.100/24", "web", "connection refused",
                 "peer n2 silent on every network", "SECOND -> WAIT"):
        assert text in result.stdout, (text, result.stdout)


def test_status_module_filter_and_several_modules(two_modules: Daemon) -> None:
    result = two_modules.cli("status", "-m", "db")
    assert result.exit_code == 0 and "module db" in result.stdout and "module app" not in result.stdout
    assert two_modules.cli("status").exit_code == 0  # status shows every module without -m
    assert_one_line_error(two_modules.cli("state"), 5, "several modules (app, db): pass -m MODULE")
    assert_one_line_error(two_modules.cli("start"), 1, "several modules (app, db)")
    assert two_modules.cli("state", "-m", "db").exit_code == 0


# ---- commands ------------------------------------------------------------------------------------

def test_commands(daemon: Daemon) -> None:
    result = daemon.cli("start")
    assert (result.exit_code, result.stdout) == (0, "app: start done (state ALONE)\n")
    assert daemon.controller.states["app"] == "ALONE"
    assert daemon.cli("swap", "-m", "app").exit_code == 0
    daemon.controller.states["app"] = "STOP"
    assert_one_line_error(daemon.cli("second"), 1, "second refused: the module is stopped: start it first")
    assert_one_line_error(daemon.cli("stop", "-m", "nope"), 1, "unknown module 'nope' (modules of cluster c1: app)")


def test_command_when_the_daemon_is_down(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    assert_one_line_error(invoke("-c", str(config), "--node", "n1", "start"), 5, "connection refused")
    assert_one_line_error(invoke("-c", str(config), "--node", "n1", "status", "--json"), 5, "cannot reach")


def test_missing_token_file(daemon: Daemon) -> None:
    (daemon.config.parent / "api.token").unlink()
    assert_one_line_error(daemon.cli("status"), 1, "cannot read the API token", "no such file")


def test_wrong_token_shows_the_api_error_and_names_the_token_file(daemon: Daemon) -> None:
    """The API's words and "(HTTP 401)" did not say which file the CLI had read the token from."""
    token_file = daemon.config.parent / "api.token"
    token_file.write_text("not-the-token\n")
    named = (f"(HTTP 401): the daemon at 127.0.0.1:{daemon.port} (node n1) refused the token of {token_file} "
             "(api.token_file): it must hold the token that daemon read when it started; restart the daemon after "
             "writing a new token, or copy that token there")
    assert_one_line_error(daemon.cli("state"), 5, "missing or wrong API token", named)
    assert_one_line_error(daemon.cli("status"), 1, "missing or wrong API token", named)



@pytest.mark.parametrize(("content", "what"), [
    (b"\xff\xfecli-test-token\n", "is not text (byte 1 is not UTF-8)"),
    (b"cli-test\ntoken-0123456789\n", "holds a line break inside the token"),
    (b"cli-test\x01token-0123456789\n", "holds a control character ('\\x01') inside the token"),
    ("cli-test-t\u00f6ken-0123456789\n".encode(), "holds a non-ASCII character ('\u00f6') inside the token"),
])
def test_unusable_token_file(daemon: Daemon, content: bytes, what: str) -> None:
    token_file = daemon.config.parent / "api.token"
    token_file.write_bytes(content)
    for verb, code in (("status", 1), ("state", 5)):
        assert_one_line_error(daemon.cli(verb), code, f"the API token file {token_file} {what}",
                              "copy it again from the other node, or regenerate it with "
                              "`safekit-cloud init --force`")


@pytest.mark.timeout(30)  # reading a FIFO blocks until a writer comes
def test_token_file_that_is_a_fifo(daemon: Daemon) -> None:
    token_file = daemon.config.parent / "api.token"
    token_file.unlink()
    os.mkfifo(token_file)
    assert_one_line_error(daemon.cli("status"), 1, f"the API token file {token_file} is not a regular file")


def test_daemon_refuses_a_token_the_cli_could_not_send(tmp_path: Path) -> None:
    """`run` reads the token with the CLI's rules: a daemon started with a token that the CLI cannot
    put in a header would lock the operator out of it."""
    token_file = tmp_path / "api.token"
    token_file.write_bytes(b"cli-test\ntoken-0123456789\n")
    with pytest.raises(EngineError, match="holds a line break inside the token"):
        daemon_read_token(token_file)
    token_file.write_text("short\n")
    with pytest.raises(EngineError, match="shorter than 16 characters"):
        daemon_read_token(token_file)
    token_file.write_text(f"{TOKEN}\n")
    assert daemon_read_token(token_file) == TOKEN


def run_with_key(tmp_path: Path, content: bytes | None, state_dir: str | None = None) -> Result:
    """`run` with a cluster key file holding `content` (None: a FIFO)."""
    key_file = tmp_path / "cluster.key"
    if content is None:
        os.mkfifo(key_file)
    else:
        key_file.write_bytes(content)
    config = write_config(tmp_path, free_port())
    data = yaml.safe_load(config.read_text())
    data["heartbeat"] = {"key_file": str(key_file)}
    config.write_text(yaml.safe_dump(data))
    return invoke("-c", str(config), "--node", "n1", "--state-dir", state_dir or str(tmp_path / "state"), "run")


KEY_HOWTO = ("write 64 hex digits (32 random bytes) there, e.g. `openssl rand -hex 32 > FILE`, or let "
             "`safekit-cloud init` write one; the same file on both nodes")


@pytest.mark.timeout(30)  # a FIFO used to block `run` for ever; text that is not UTF-8 was "internal error"
@pytest.mark.parametrize(("content", "what"), [
    (None, "(heartbeat.key_file) is a FIFO, not a regular file"),
    (bytes(range(128, 192)), "is not hex text (byte 1 is not ASCII)"),
    (b"0123456789abcdef" * 2 + b"\n", "is too short (16 bytes, 32 at least)"),  # 16 to 31 bytes were taken
    (b"ab" * 31 + b"\n", "is too short (31 bytes, 32 at least)"),
    (b"not a key at all\n", "is not hexadecimal"),
], ids=["fifo", "not-text", "16-bytes", "31-bytes", "not-hex"])
def test_run_refuses_an_unusable_cluster_key(tmp_path: Path, content: bytes | None, what: str) -> None:
    result = run_with_key(tmp_path, content)
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert f"safekit-cloud: the cluster key {tmp_path / 'cluster.key'} {what}: {KEY_HOWTO}" in result.stderr
    assert "internal error" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "state").exists()  # refused before anything else happened


@pytest.mark.parametrize("verb", [["run"], ["config", "check"]])
def test_an_empty_state_dir_is_refused(tmp_path: Path, verb: list[str]) -> None:
    """It used to be the current directory, silently."""
    config = write_config(tmp_path, free_port())
    result = invoke("-c", str(config), "--node", "n1", "--state-dir", "", *verb)
    assert_one_line_error(result, 1, "Error: --state-dir is empty: name the daemon's state directory (default "
                                     "/var/lib/safekit-cloud), or leave --state-dir out")


@pytest.mark.parametrize(("where", "what"), [
    ("file", "exists but is not a directory"),  # was "[Errno 17] File exists"
    ("file/state", "cannot be created: a part of its path is a file, not a directory"),
])
def test_run_says_the_state_dir_is_not_a_directory(tmp_path: Path, where: str, what: str) -> None:
    (tmp_path / "file").write_text("")
    result = run_with_key(tmp_path, new_cluster_key().encode(), state_dir=str(tmp_path / where))
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert (f"safekit-cloud: the state directory {tmp_path / where} {what}: give --state-dir (SAFEKIT_STATE_DIR) "
            "a directory, created if missing") in result.stderr
    assert "Errno" not in result.output


def test_the_key_init_writes_is_accepted_longer_ones_too(tmp_path: Path) -> None:
    key_file = tmp_path / "cluster.key"
    for key in (new_cluster_key(), "ab" * 48 + "\n"):
        key_file.write_text(key)
        assert read_key(key_file) == bytes.fromhex(key)


def test_token_with_surrounding_whitespace_is_fine(daemon: Daemon) -> None:
    (daemon.config.parent / "api.token").write_text(f"  {TOKEN} \n\n")
    assert daemon.cli("status", "--json").exit_code == 0


def test_real_entry_point_prints_one_line(tmp_path: Path) -> None:
    """The installed program, not CliRunner: nothing but one line on stderr."""
    config = write_config(tmp_path, free_port())
    proc = subprocess.run([sys.executable, "-m", "safekit_cloud.core.cli", "-c", str(config), "--node", "n1",
                           "status"], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5
    assert proc.stdout == ""
    assert proc.stderr.startswith("Error: cannot reach the safekit-cloud daemon") and proc.stderr.count("\n") == 1


# ---- log -----------------------------------------------------------------------------------------

def test_log_and_tail(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "app.log").write_text("".join(f"line {i}\n" for i in range(1, 101)))
    result = daemon.cli("log")
    assert result.exit_code == 0 and result.stdout.splitlines()[0] == "line 1" and result.stdout.count("\n") == 100
    result = daemon.cli("log", "-n", "2")
    assert (result.exit_code, result.stdout) == (0, "line 99\nline 100\n")


@pytest.mark.parametrize("lines", ["99999999999999999999999", "1000000000000000000", "-1"])
def test_log_lines_beyond_what_the_api_takes_is_a_usage_error(daemon: Daemon, lines: str) -> None:
    """It exited 1 with the API's 400; a value an option does not take exits 2 (docs/cli.md)."""
    result = daemon.cli("log", "-n", lines)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert f"Invalid value for '-n' / '--lines': {lines} is not in the range 0<=x<=999999999999999999" in result.stderr
    assert "HTTP 400" not in result.output


def test_log_lines_at_the_bound_reaches_the_api(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "app.log").write_text("a\nb\n")
    result = daemon.cli("log", "-n", "999999999999999999")
    assert result.exit_code == 0 and result.stdout == "a\nb\n", result.output


def test_log_follow_until_ctrl_c(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "app.log"
    log.write_text("first\n")
    naps = []

    def sleep(seconds: float) -> None:  # each poll appends a line; the third one is Ctrl-C
        naps.append(seconds)
        if len(naps) == 3:
            raise KeyboardInterrupt
        with log.open("a") as fh:
            fh.write(f"more {len(naps)}\n")

    monkeypatch.setattr(cli.time, "sleep", sleep)
    result = daemon.cli("log", "-f")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "first\nmore 1\nmore 2\n", "")
    assert naps == [0.5, 0.5, 0.5]


# ---- config check --------------------------------------------------------------------------------

def test_config_check_prints_the_effective_config(daemon: Daemon) -> None:
    result = invoke("-c", str(daemon.config), "config", "check")
    assert result.exit_code == 0, result.output
    effective = yaml.safe_load(result.stdout)
    assert effective["heartbeat"]["interval"] == 0.5  # a default, filled in
    assert effective["modules"][0]["vip"]["state_file"].endswith("vip.json")  # provider keys kept


def test_config_check_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: {name: c1}\nnodes:\n  - {name: n1, addresses: not-an-ip}\n"
                   "heartbeat: {interval: fast}\nmodules: []\n")
    result = invoke("-c", str(bad), "config", "check")
    assert result.exit_code == 1
    assert "Traceback" not in result.output and result.stdout == ""
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) >= 3, result.stderr
    for fragment in ("nodes", "heartbeat.interval", "modules"):
        assert fragment in result.stderr
    # the same problems stop every verb that needs the file, in the same form
    status = invoke("-c", str(bad), "status")
    assert status.exit_code == 1 and status.stderr == result.stderr


def test_config_check_warns_about_a_replicated_directory_missing_on_this_node(tmp_path: Path) -> None:
    """The file is valid, but the module could not replicate here: said at once, not at the first
    failover (the file stays valid: exit 0)."""
    out, data = tmp_path / "cluster.yaml", tmp_path / "data"
    assert invoke(*INIT_FLAGS, "--replicate", str(data), "-o", str(out)).exit_code == 0
    result = invoke("-c", str(out), "config", "check")
    assert result.exit_code == 0 and yaml.safe_load(result.stdout)["modules"][0]["name"] == "app"
    assert f"warning: this node: module app: replicated directory {data}: No such file or directory: create it " \
           "on this node" in result.stderr
    data.mkdir()
    assert "warning" not in invoke("-c", str(out), "config", "check").stderr


def test_config_check_warns_about_what_this_node_lacks_to_run(tmp_path: Path) -> None:
    """The README's pre-flight check: a cluster key or API token missing here (`run` would refuse
    to start), a scripts directory missing (nothing would start the application), TLS files missing.
    Each a warning naming the file and what to do; the file itself stays valid (exit 0)."""
    out = tmp_path / "cluster.yaml"
    assert invoke(*INIT_FLAGS, "-o", str(out)).exit_code == 0
    data = yaml.safe_load(out.read_text())
    key, token = Path(data["heartbeat"]["key_file"]), Path(data["api"]["token_file"])
    key.unlink()
    token.unlink()
    scripts = tmp_path / "no-such-scripts"
    data["modules"][0]["scripts"] = {"directory": str(scripts)}
    data["api"]["tls"] = {"cert_file": str(tmp_path / "api.crt"), "key_file": str(tmp_path / "api.pem")}
    out.write_text(yaml.safe_dump(data))
    result = invoke("-c", str(out), "config", "check")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: this node: ")]
    assert any(f"cannot read the cluster key {key}" in w and "`safekit-cloud init`" in w and "refuses to start" in w
               for w in warnings), warnings
    assert any(str(token) in w and "refuses to start" in w for w in warnings), warnings
    assert any(f"scripts directory {scripts}" in w and "nothing would start the application" in w
               for w in warnings), warnings
    assert sum("api.tls" in w for w in warnings) == 2, warnings
    run = invoke("-c", str(out), "--node", "n1", "--state-dir", str(tmp_path / "state"), "run")
    assert run.exit_code == 1 and run.stderr.count(f"cannot read the cluster key {key}") == 1, run.output


@pytest.mark.parametrize("where", ["holds", "inside", "same"])
def test_a_replicated_directory_may_not_overlap_the_state_directory(tmp_path: Path, where: str) -> None:
    """A warning from `config check` (the state directory is this node's --state-dir), a refusal
    from `run`, before the daemon starts: its journal would be written through its own mount."""
    state = tmp_path / "state"
    data = {"holds": tmp_path, "inside": state / "app-data", "same": state}[where]
    data.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "cluster.yaml"
    assert invoke(*INIT_FLAGS, "--replicate", str(data), "-o", str(out)).exit_code == 0
    what = (f"module app: the replicated directory {data} and the state directory {state} overlap: replicate "
            "the application's own directories only, or give the daemon another --state-dir (SAFEKIT_STATE_DIR)")
    check = invoke("-c", str(out), "--state-dir", str(state), "config", "check")
    assert check.exit_code == 0 and f"warning: this node: {what}" in check.stderr
    assert_one_line_error(invoke("-c", str(out), "--state-dir", str(state), "--node", "n1", "run"), 1, what)
    assert "overlap" not in invoke("-c", str(out), "--state-dir", "/run/safekit-test-elsewhere", "config",
                                   "check").stderr


def test_config_file_missing(tmp_path: Path) -> None:
    result = invoke("-c", str(tmp_path / "none.yaml"), "config", "check")
    assert result.exit_code == 1 and "file not found" in result.stderr and "safekit-cloud init" in result.stderr



@pytest.mark.timeout(30)  # a FIFO used to block load_config for ever
@pytest.mark.parametrize("kind", ["FIFO", "directory"])
def test_config_path_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "cluster.yaml"
    if kind == "FIFO":
        os.mkfifo(path)
    else:
        path.mkdir()
    for verb, code in (("status", 1), ("state", 5), ("config", 1)):
        args = [verb, "check"] if verb == "config" else [verb]
        assert_one_line_error(invoke("-c", str(path), *args), code,
                              f"the cluster file {path} is a {kind}, not a regular file",
                              "name the cluster file with -c/--config")


def test_config_path_empty() -> None:
    for verb, code in (("status", 1), ("state", 5)):
        assert_one_line_error(invoke("-c", "", verb), code,
                              "-c/--config is empty: name the cluster file (default /etc/safekit-cloud/cluster.yaml)")


def test_help_is_not_an_error() -> None:
    for verb in ("init", "state", "status", "waitstate", "log", "start", "demo", "run"):
        result = invoke(verb, "--help")
        assert result.exit_code == 0 and "Usage:" in result.stdout, (verb, result.output)


def test_run_with_a_bad_config_is_one_clear_error(tmp_path: Path) -> None:
    result = invoke("-c", str(tmp_path / "none.yaml"), "run")
    assert result.exit_code == 1 and "file not found" in result.stderr and "Traceback" not in result.output


# ---- init ----------------------------------------------------------------------------------------

INIT_FLAGS = ["init", "--cluster", "c1", "--node", "n1=198.18.0.1", "--node", "n2=198.18.0.2",
              "--node", "n1:backup=198.18.1.1", "--node", "n2:backup=198.18.1.2", "--module", "app",
              "--vip", "198.18.0.100/24", "--interface", "eth0", "--preferred", "n2"]


def test_init_from_flags(tmp_path: Path) -> None:
    out = tmp_path / "etc" / "cluster.yaml"
    scripts, data = tmp_path / "scripts", tmp_path / "data"
    result = invoke(*INIT_FLAGS, "--scripts", str(scripts), "--replicate", str(data), "-o", str(out))
    assert result.exit_code == 0, result.output
    cfg = load_config(out)
    assert cfg.cluster.name == "c1"
    assert cfg.node("n1").addresses == {"default": "198.18.0.1", "backup": "198.18.1.1"}
    module = cfg.module("app")
    assert module.preferred_primary == "n2"
    assert module.vip is not None and module.vip.address == "198.18.0.100/24"
    assert module.vip.settings["interface"] == "eth0"
    assert module.scripts.directory == scripts and module.replication.directories == [data]
    key, token = out.parent / "cluster.key", out.parent / "api.token"
    assert cfg.heartbeat.key_file == key and cfg.api.token_file == token
    for secret in (key, token):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key.read_text().strip())) == 32
    assert len(token.read_text().strip()) >= 32
    text = out.read_text()
    assert text.count("\n# ") >= 5 and "# Heartbeats" in text  # every section explained
    assert "copy all three" in result.stdout and "n2" in result.stdout


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "cluster.yaml"
    assert invoke(*INIT_FLAGS, "-o", str(out)).exit_code == 0
    key = (tmp_path / "cluster.key").read_text()
    before = out.read_text()
    result = invoke(*INIT_FLAGS[:-2], "-o", str(out))
    assert_one_line_error(result, 1, "already exist", "--force", str(out))
    assert out.read_text() == before and (tmp_path / "cluster.key").read_text() == key
    forced = invoke(*INIT_FLAGS[:-2], "-o", str(out), "--force")
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "cluster.key").read_text() != key
    assert stat.S_IMODE((tmp_path / "cluster.key").stat().st_mode) == 0o600


def test_init_custom_secret_paths_and_default_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths are written absolute in the file
    result = invoke("-c", "c.yaml", *INIT_FLAGS[:7], "--module", "web", "--key-file", "keys/k",
                    "--token-file", "t")
    assert result.exit_code == 0, result.output
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.heartbeat.key_file == tmp_path / "keys" / "k" and cfg.api.token_file == tmp_path / "t"
    assert cfg.module("web").vip is None and cfg.module("web").preferred_primary == "n1"


def test_init_names_the_files_it_wrote_where_run_finds_them(tmp_path: Path) -> None:
    """`DIR/sub/../k` with sub missing: init wrote DIR/k but the cluster file said DIR/sub/../k, which
    `run` could not open."""
    base = tmp_path / "etc"
    result = invoke(*INIT_FLAGS, "-o", f"{base}/x/../cluster.yaml", "--key-file", f"{base}/sub/../k",
                    "--token-file", f"{base}/a/b/../../t")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in base.iterdir()) == ["cluster.yaml", "k", "t"]
    cfg = load_config(base / "cluster.yaml")
    assert (cfg.heartbeat.key_file, cfg.api.token_file) == (base / "k", base / "t")
    assert len(read_key(cfg.heartbeat.key_file)) == 32 and len(daemon_read_token(cfg.api.token_file)) >= 32
    assert result.stdout.startswith(f"wrote {base}/cluster.yaml, {base}/k (mode 0600) and {base}/t (mode 0600)")
    # the default key and token go next to the cluster file that was written
    result = invoke(*INIT_FLAGS, "-o", f"{tmp_path}/other/y/../c.yaml")
    assert result.exit_code == 0, result.output
    cfg = load_config(tmp_path / "other" / "c.yaml")
    assert cfg.heartbeat.key_file == tmp_path / "other" / "cluster.key" and cfg.heartbeat.key_file.exists()


def test_init_keeps_a_symbolic_link_name_after_the_last_dots(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link.key").symlink_to(tmp_path / "real" / "k")
    result = invoke(*INIT_FLAGS, "-o", str(tmp_path / "c.yaml"), "--key-file", f"{tmp_path}/no/../link.key")
    assert result.exit_code == 0, result.output
    assert load_config(tmp_path / "c.yaml").heartbeat.key_file == tmp_path / "link.key"
    assert (tmp_path / "link.key").is_symlink() and len(read_key(tmp_path / "real" / "k")) == 32


@pytest.mark.parametrize(("args", "message"), [
    (["init", "--module", "app"], "init needs --cluster, --node"),
    (["init", "--cluster", "c1", "--module", "app", "--node", "n1=198.18.0.1", "--node", "n2=198.18.0.2",
      "--node", "n3=198.18.0.3"], "exactly two nodes"),
    (["init", "--cluster", "c1", "--module", "app", "--node", "n1=198.18.0.1", "--node", "n2=198.18.0.2",
      "--vip", "198.18.0.100/24"], "--vip needs --interface"),
    (["init", "--cluster", "c1", "--module", "app", "--node", "n1=198.18.0.1", "--node", "n2"],
     "expected NAME=ADDRESS"),
    (["init", "--cluster", "c1", "--module", "app", "--node", "n1=198.18.0.1", "--node", "n2=198.18.0.2",
      "--node", "n1:backup=198.18.1.1"], "same heartbeat networks"),
    (["init", "--cluster", "c1", "--module", "app", "--node", "n1=198.18.0.1", "--node", "n2=198.18.0.2",
      "--interface", "eth0"], "--interface is only used with --vip: add --vip ADDRESS/PREFIX"),
    (["init", "--cluster", "c1", "--module", "app", "--node", "n1=198.18.0.1", "--node", "n2=198.18.0.1"],
     "--node: n1 and n2 both have the address 198.18.0.1 on network default: give each node its own address"),
    (["init", "--cluster", "c1", "--module", "app", "--node", "n1=198.18.0.1", "--node", "n2=198.18.0.2",
      "--node", "n1:b=2001:db8::1", "--node", "n2:b=2001:db8:0::1"], "both have the address 2001:db8::1 on network b"),
    (INIT_FLAGS + ["--replicate", ""], "--replicate is empty: give a directory to replicate, or leave --replicate out"),
    (INIT_FLAGS + ["--scripts", ""], "--scripts is empty"),
    (INIT_FLAGS + ["--key-file", ""], "--key-file is empty"),
    (INIT_FLAGS + ["--token-file", " "], "--token-file is empty"),
])
def test_init_flag_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke(*args, "-o", str(tmp_path / "c.yaml"))
    assert_one_line_error(result, 1, message)
    assert list(tmp_path.iterdir()) == []


def test_init_output_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # "" used to become this directory
    assert_one_line_error(invoke(*INIT_FLAGS, "-o", ""), 1, "-o/--output is empty: give the cluster file to write, "
                                                           "or leave -o/--output out")
    assert list(tmp_path.iterdir()) == []


def test_init_invalid_values_are_reported_before_writing(tmp_path: Path) -> None:
    """Each problem names the flag, as typed: they named YAML lines of a file that was never written."""
    result = invoke("init", "--cluster", "c 1", "--module", "app", "--node", "n1=198.18.0.1",
                    "--node", "n2=not-an-ip", "--vip", "198.18.0.1/24", "--interface", "bad/if",
                    "--replicate", "/etc", "--preferred", "n9", "-o", str(tmp_path / "c.yaml"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines() == [
        "Error: init (nothing was written): 6 problem(s):",
        "  - --cluster 'c 1': String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'",
        "  - --node n2=not-an-ip: network 'default': 'not-an-ip' is not an IPv4 or IPv6 address",
        ("  - --replicate /etc: /etc is a system directory: replicated, it would be read-only on the secondary and "
         "replaced by the other node's at a failover; name the application's own directories inside it (e.g. "
         "/etc/app)"),
        "  - --preferred n9: 'n9' is not a node (['n1', 'n2'])",
        ("  - --vip 198.18.0.1/24: 198.18.0.1 is the address of nodes[0]: a virtual IP moves between the nodes, it "
         "needs an address of its own"),
        "  - --interface bad/if: interface: String should match pattern '^[^/\\s:]{1,15}$'",
    ]
    assert "line" not in result.stderr and "c.yaml" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("state_dir", "replicate"), [(None, "/var/lib/safekit-cloud"), ("/srv/app/state", "/srv/app")])
def test_init_refuses_to_replicate_the_state_directory(tmp_path: Path, state_dir: str | None, replicate: str) -> None:
    """init wrote a file that `run` then refused."""
    state = ["--state-dir", state_dir] if state_dir else []
    result = invoke(*state, *INIT_FLAGS, "--replicate", replicate, "-o", str(tmp_path / "c.yaml"))
    assert_one_line_error(result, 1, f"Error: --replicate: module app: the replicated directory {replicate} and the "
                                     f"state directory {state_dir or '/var/lib/safekit-cloud'} overlap: replicate "
                                     "the application's own directories only, or give the daemon another "
                                     "--state-dir (SAFEKIT_STATE_DIR) (nothing was written)")
    assert list(tmp_path.iterdir()) == []


def test_init_interactive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "interactive", lambda: True)
    answers = "c9\nalpha\n198.18.0.1\nbeta\n198.18.0.2\napp\n198.18.0.100/24\neth1\n\n/srv/data\n"
    result = invoke("init", "-o", str(tmp_path / "c.yaml"), input=answers)
    assert result.exit_code == 0, result.output
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.cluster.name, [n.name for n in cfg.nodes]) == ("c9", ["alpha", "beta"])
    module = cfg.module("app")
    assert module.vip is not None and module.vip.settings["interface"] == "eth1"
    assert module.scripts.directory is None and module.replication.directories == [Path("/srv/data")]



def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder`: a file's bytes, what a link points to, "dir" for a directory."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            out[name] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[name] = "dir"
        else:
            out[name] = path.read_bytes()
    return out


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize(("paths", "first", "second"), [
    (["-o", "o/c.yaml", "--key-file", "o/c.yaml"], "the cluster file", "the cluster key (--key-file)"),
    (["-o", "o/c.yaml", "--key-file", "o/k", "--token-file", "o/k"], "the cluster key (--key-file)",
     "the API token (--token-file)"),
    (["-o", "o/c.yaml", "--token-file", "o/x/../c.yaml"], "the cluster file", "the API token (--token-file)"),
    (["-o", "o/c.yaml", "--key-file", "link.key", "--token-file", "real/x.key"], "the cluster key (--key-file)",
     "the API token (--token-file)"),
    (["-o", "o/c.yaml", "--key-file", "real/hard.key", "--token-file", "real/x.key"],
     "the cluster key (--key-file)", "the API token (--token-file)"),
])
def test_init_refuses_two_files_at_one_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, paths: list[str],
                                            first: str, second: str, force: list[str]) -> None:
    """Even with --force: one file would be written over another (the key replaced by the token)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "c.yaml").write_text("old cluster file\n")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x.key").write_text("old key\n")
    (tmp_path / "link.key").symlink_to("real/x.key")
    os.link(tmp_path / "real" / "x.key", tmp_path / "real" / "hard.key")
    before = snapshot(tmp_path)
    result = invoke(*INIT_FLAGS, *paths, *force)
    assert_one_line_error(result, 1, first, second, "are the same file: give each its own path",
                          "(nothing was written)")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_init_refuses_a_directory_as_a_file(tmp_path: Path, force: list[str]) -> None:
    folder = tmp_path / "secrets"
    folder.mkdir()
    result = invoke(*INIT_FLAGS, "-o", str(tmp_path / "c.yaml"), "--token-file", str(folder), *force)
    assert_one_line_error(result, 1, f"the API token (--token-file) {folder} is a directory: name a file, "
                                     f"e.g. {folder}/api.token (nothing was written)")
    assert "--force" not in result.stderr  # it could not help
    assert snapshot(tmp_path) == {"secrets": "dir"}


def test_init_refuses_a_fifo_as_the_cluster_file(tmp_path: Path) -> None:
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    result = invoke(*INIT_FLAGS, "-o", str(fifo), "--force")
    assert_one_line_error(result, 1, f"the cluster file {fifo} is a FIFO, not a regular file: choose another path")
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


def test_init_refuses_a_place_it_cannot_write_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file\n")
    out = tmp_path / "etc" / "c.yaml"  # init creates missing directories, and removes them on failure
    result = invoke(*INIT_FLAGS, "-o", str(out), "--key-file", str(tmp_path / "plain" / "k"))
    assert_one_line_error(result, 1, f"cannot write the cluster key (--key-file) {tmp_path}/plain/k: "
                                     f"{tmp_path}/plain is not a directory: choose another path")
    assert snapshot(tmp_path) == {"plain": b"a file\n"}
    result = invoke(*INIT_FLAGS, "-o", str(out), "--key-file", "/proc/nope/k", "--force")
    assert_one_line_error(result, 1, "cannot write the cluster key (--key-file) /proc/nope/k: No such file or "
                                     "directory (/proc/nope); nothing was written")
    assert snapshot(tmp_path) == {"plain": b"a file\n"}


def test_init_refuses_a_directory_it_may_not_write_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root may write anywhere, so the permission is faked: the message and that nothing is written."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    result = invoke(*INIT_FLAGS, "-o", str(tmp_path / "c.yaml"), "--token-file", str(locked / "new" / "t"))
    assert_one_line_error(result, 1, f"cannot write the API token (--token-file) {locked}/new/t: the directory "
                                     f"{locked} is not writable by this user: run init as root, or choose another "
                                     "path (nothing was written)")
    assert snapshot(tmp_path) == {"locked": "dir"}


def test_init_failure_part_way_leaves_no_new_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The third file cannot be written (disk full): the first two, their directory and every temporary
    file are gone, and files a --force run was replacing are untouched."""
    real_fsync = os.fsync
    calls: list[int] = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(cli.os, "fsync", fsync)
    out = tmp_path / "etc" / "c.yaml"
    result = invoke(*INIT_FLAGS, "-o", str(out))
    assert_one_line_error(result, 1, f"cannot write the API token (--token-file) {tmp_path}/etc/api.token: No "
                                     "space left on device", "; nothing was written")
    assert snapshot(tmp_path) == {}

    monkeypatch.setattr(cli.os, "fsync", real_fsync)
    assert invoke(*INIT_FLAGS, "-o", str(out)).exit_code == 0
    before = snapshot(tmp_path)
    calls.clear()
    monkeypatch.setattr(cli.os, "fsync", fsync)
    assert_one_line_error(invoke(*INIT_FLAGS, "-o", str(out), "--force"), 1, "No space left on device",
                          "nothing was written")
    assert snapshot(tmp_path) == before


def test_init_keeps_a_file_that_appears_while_it_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --force nothing is replaced, even a file created after the check: the new files
    already in place are taken back."""
    out = tmp_path / "c.yaml"
    token = tmp_path / "api.token"
    real_check = cli.check_init_targets

    def check_then_race(targets: list[cli.InitTarget]) -> list[cli.InitTarget]:
        existing = real_check(targets)
        token.write_text("someone else's\n")
        return existing

    monkeypatch.setattr(cli, "check_init_targets", check_then_race)
    result = invoke(*INIT_FLAGS, "-o", str(out))
    assert_one_line_error(result, 1, f"the API token (--token-file) {token} appeared while init was writing; "
                                     "nothing was written: pass --force to replace it")
    assert snapshot(tmp_path) == {"api.token": b"someone else's\n"}


def test_init_existing_file_message(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    key.write_text("old key\n")
    result = invoke(*INIT_FLAGS, "-o", str(tmp_path / "c.yaml"))
    assert_one_line_error(result, 1, f"{key} already exists: pass --force to replace it (a new cluster key must "
                                     "then be copied to both nodes), or choose other paths with -o, --key-file, "
                                     "--token-file")
    assert snapshot(tmp_path) == {"cluster.key": b"old key\n"}


def test_init_force_through_a_symlink_replaces_its_target(tmp_path: Path) -> None:
    """A cluster file linked from elsewhere stays a link: the file it points to gets the new text."""
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "c.yaml").write_text("old\n")
    (tmp_path / "c.yaml").symlink_to("store/c.yaml")
    result = invoke(*INIT_FLAGS, "-o", str(tmp_path / "c.yaml"), "--force")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.yaml").is_symlink()
    assert load_config(tmp_path / "store" / "c.yaml").cluster.name == "c1"
    assert stat.S_IMODE((tmp_path / "store" / "c.yaml").stat().st_mode) == 0o644
    assert not [p for p in tmp_path.rglob(".*.tmp")]


@pytest.mark.parametrize("body", [b'{"node": "\xff\xfe"}', b"not json", b'{"node": 1}'])
def test_a_status_the_cli_cannot_read_is_a_clear_error_not_a_traceback(body: bytes) -> None:
    from safekit_cloud.core.client import ClientError, decode_status

    with pytest.raises(ClientError, match="does not match this CLI's schema"):
        decode_status(body)


def test_status_line_says_why_replication_is_down() -> None:
    from safekit_cloud.core.cli import _replication_text

    primary = {"role": "primary", "connected": False, "bytes_sent": 0,
               "last_lost": "/srv/data: receiver error: OSError: [Errno 28] No space left on device"}
    assert _replication_text(primary).endswith(
        "not connected (journaling), 0.0 MB sent; last lost: /srv/data: receiver error: OSError: [Errno 28] "
        "No space left on device")
    assert "last lost" not in _replication_text(dict(primary, connected=True))
    held = _replication_text(dict(primary, writes_held=1.24))
    assert "writes held 1.2 s (until the peer knows its copy is out of date)" in held
    assert "writes held" not in _replication_text(dict(primary, writes_held=None))
    secondary = {"role": "secondary", "agents": {"receiver": {"streams": {"/srv/data": {
        "connected": False, "last_error": "OSError: [Errno 28] No space left on device"}}}}}
    assert _replication_text(secondary) == ("replication secondary; last stream ended: OSError: [Errno 28] "
                                            "No space left on device")
    assert _replication_text(dict(primary, last_lost="x" * 500)).endswith("x…")
