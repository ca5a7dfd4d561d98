"""`safekit-cloud verify` and `POST /api/v1/modules/{module}/verify` against a fake controller."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from safekit_cloud.core import cli
from safekit_cloud.core.api import build_app, serve_api
from safekit_cloud.core.config import ApiConfig
from safekit_cloud.core.replication.verify import VerifyError

TOKEN = "verify-test-token-0123456789"
SAME = {"identical": True, "differences": [], "total_differences": 0, "counts": {}, "notes": [],
        "directories": [{"directory": "/srv/app", "primary_entries": 12, "primary_bytes_hashed": 3_000_000}],
        "duration_s": 0.5}
DIFF = {"identical": False, "total_differences": 102, "truncated": True,
        "differences": [{"directory": "/srv/app", "path": "d/f", "problem": "differs", "fields": ["content"]},
                        {"directory": "/srv/app", "path": "g", "problem": "differs", "fields": ["mode", "xattrs"]},
                        {"directory": "/srv/app", "path": "extra", "problem": "missing_on_primary"}],
        "counts": {"missing_on_secondary": 0, "missing_on_primary": 1, "differs": 101},
        "notes": ["1 difference(s) seen during the walk were gone when re-checked at the end"],
        "directories": [{"directory": "/srv/app", "primary_entries": 12, "primary_bytes_hashed": 3_000_000}],
        "duration_s": 0.5}


class Controller:
    def __init__(self) -> None:
        self.report: dict[str, Any] | Exception = SAME
        self.takes = 0.0  # seconds a verify runs

    def module_names(self) -> list[str]:
        return ["app"]

    async def verify(self, module: str) -> dict[str, Any]:
        await asyncio.sleep(self.takes)
        if isinstance(self.report, Exception):
            raise self.report
        return self.report


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Controller, Path]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "api.token").write_text(TOKEN)
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "cluster": {"name": "c1"},
        "nodes": [{"name": "n1", "addresses": "198.18.0.1"}, {"name": "n2", "addresses": "198.18.0.2"}],
        "api": {"listen": f"127.0.0.1:{port}", "token_file": str(tmp_path / "api.token")},
        "modules": [{"name": "app"}],
    }))
    controller = Controller()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = asyncio.run_coroutine_threadsafe(
        serve_api(build_app(controller, TOKEN), ApiConfig(listen=f"127.0.0.1:{port}")), loop).result(10)
    try:
        yield controller, config
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _cli(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli.main, ["-c", str(config), "--node", "n1", "verify", *args])


def test_identical_exits_0(daemon: tuple[Controller, Path]) -> None:
    _, config = daemon
    result = _cli(config)
    assert result.exit_code == 0, result.output
    assert "app: replicas identical (1 directory, 12 entries, 3.0 MB hashed on each node" in result.stdout


def test_differences_exit_1_with_a_readable_list(daemon: tuple[Controller, Path]) -> None:
    controller, config = daemon
    controller.report = DIFF
    result = _cli(config)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("app: 102 differences between the replicas")
    assert lines[1].split() == ["d/f", "content", "differ"]
    assert lines[2].split() == ["g", "mode,", "xattrs", "differ"]
    assert lines[3].split() == ["extra", "missing", "on", "the", "primary"]
    assert "... and 99 more (1 missing on the primary, 101 differing)" in lines[4]
    assert lines[5].startswith("note: 1 difference(s)")
    as_json = _cli(config, "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout) == DIFF


def test_cannot_run_is_a_one_line_error(daemon: tuple[Controller, Path]) -> None:
    controller, config = daemon
    controller.report = VerifyError("verify runs on the primary; this node's replication role is secondary")
    result = _cli(config)
    assert result.exit_code == 1
    assert result.stderr.strip() == ("Error: verify app: verify runs on the primary; this node's replication "
                                     "role is secondary (HTTP 409)")


def test_a_verify_longer_than_the_timeout_is_not_called_an_unreachable_daemon(daemon: tuple[Controller, Path]) -> None:
    controller, config = daemon
    controller.takes = 2.0
    result = _cli(config, "--timeout", "0.3")
    assert result.exit_code == 1, result.output
    assert "no verify report" in result.stderr and "within 0.3 s" in result.stderr
    assert "larger --timeout" in result.stderr and "last_verify" in result.stderr
    assert "not reachable" not in result.stderr and "did not answer" not in result.stderr


def test_daemon_unreachable_exits_5(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "api.token").write_text(TOKEN)
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "cluster": {"name": "c1"},
        "nodes": [{"name": "n1", "addresses": "198.18.0.1"}, {"name": "n2", "addresses": "198.18.0.2"}],
        "api": {"listen": f"127.0.0.1:{port}", "token_file": str(tmp_path / "api.token")},
        "modules": [{"name": "app"}],
    }))
    result = _cli(config)
    assert result.exit_code == 5 and "cannot reach the safekit-cloud daemon" in result.stderr
