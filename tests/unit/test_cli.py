"""The CLI against the real API served on 127.0.0.1 by a fake controller (a thread with its own loop)."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import msgspec
import pytest
import yaml
from click.testing import CliRunner, Result
from safekit_cloud.core import cli
from safekit_cloud.core.api import build_app, serve_api
from safekit_cloud.core.config import ApiConfig, load_config
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
        "modules": [{"name": m, "vip": {"provider": "fake", "address": "198.18.0.100/24",
                                        "state_file": str(folder / "vip.json")}} for m in modules],
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


def test_wrong_token_shows_the_api_error(daemon: Daemon) -> None:
    (daemon.config.parent / "api.token").write_text("not-the-token\n")
    assert_one_line_error(daemon.cli("state"), 5, "missing or wrong API token", "HTTP 401")


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


def test_config_file_missing(tmp_path: Path) -> None:
    result = invoke("-c", str(tmp_path / "none.yaml"), "config", "check")
    assert result.exit_code == 1 and "file not found" in result.stderr and "safekit-cloud init" in result.stderr


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
])
def test_init_flag_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke(*args, "-o", str(tmp_path / "c.yaml"))
    assert_one_line_error(result, 1, message)
    assert list(tmp_path.iterdir()) == []


def test_init_invalid_values_are_reported_before_writing(tmp_path: Path) -> None:
    result = invoke("init", "--cluster", "c 1", "--module", "app", "--node", "n1=198.18.0.1",
                    "--node", "n2=not-an-ip", "-o", str(tmp_path / "c.yaml"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cluster.name" in result.stderr and "not-an-ip" in result.stderr
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
    secondary = {"role": "secondary", "agents": {"receiver": {"streams": {"/srv/data": {
        "connected": False, "last_error": "OSError: [Errno 28] No space left on device"}}}}}
    assert _replication_text(secondary) == ("replication secondary; last stream ended: OSError: [Errno 28] "
                                            "No space left on device")
    assert _replication_text(dict(primary, last_lost="x" * 500)).endswith("x…")
