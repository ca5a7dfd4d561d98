"""ModuleRuntime in process: real scripts, the real fake VIP provider, a peer view the test controls.

Each test plays one node of a two-node cluster: `Harness.peer` is what the heartbeats would say about
the other node, `announce` records what this node tells its peer. Scripts are small shell scripts that
append one line per run to a journal; the VIP holder is read from the fake provider's shared file.
Traces are checked with an in-memory exporter on the process's tracer provider.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from safekit_cloud.core.config import parse_config
from safekit_cloud.core.module import ModuleRuntime
from safekit_cloud.core.store import ModuleStore
from safekit_cloud.core.types import DataStatus, Generation, ModuleState as S, PeerView
from safekit_cloud.providers.base import create_provider

VIP = "198.18.0.100/24"
SCRIPTS = ("prestart", "start_both", "start_prim", "stop_prim", "start_second", "stop_second", "stop_both",
           "transition")


def async_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run a coroutine test with asyncio.run (no pytest-asyncio here); fixtures still work."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 15))

    return wrapper


# ---- traces ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """An in-memory exporter on the global SDK provider. The global provider can be set only once per
    process: reuse it when another test installed one. The project's module-level tracers are proxies
    that follow the global provider once it is set."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # later spans are dropped by this exporter (a processor cannot be removed)


# ---- the harness -----------------------------------------------------------------------------------

def cluster_yaml(tmp_path: Path, preferred: str | None = "n1", witness_port: int | None = None) -> str:
    module = {
        "name": "app",
        "vip": {"provider": "fake", "address": VIP, "state_file": str(tmp_path / "vip.json")},
        "scripts": {"directory": str(tmp_path / "scripts"), "timeout": 10, "stop_timeout": 10},
    }
    if preferred:
        module["preferred_primary"] = preferred
    if witness_port is not None:
        module["witnesses"] = [{"type": "tcp", "address": "127.0.0.1", "port": witness_port, "timeout": 2}]
    return textwrap.dedent(f"""\
        cluster: {{name: c1}}
        nodes:
          - {{name: n1, addresses: 198.18.0.1}}
          - {{name: n2, addresses: 198.18.0.2}}
        heartbeat: {{interval: 0.1, timeout: 0.5}}
        modules:
          - {json.dumps(module)}
        """)


def write_scripts(tmp_path: Path, **bodies: str) -> None:
    """Every script appends `name current next action` to journal.log; `bodies` add to a script."""
    folder = tmp_path / "scripts"
    folder.mkdir(exist_ok=True)
    for name in SCRIPTS:
        path = folder / name
        journal = f'echo "{name} $1 $2 $3" >> "{tmp_path}/journal.log"\n'
        path.write_text("#!/bin/sh\n" + journal + bodies.get(name, ""))
        path.chmod(0o755)


@dataclass
class Harness:
    tmp_path: Path
    node: str = "n1"
    preferred: str | None = "n1"
    witness_port: int | None = None
    peer: PeerView = field(default_factory=lambda: PeerView(name="n2"))
    announced: list[dict[str, object]] = field(default_factory=list)
    runtime: ModuleRuntime | None = None

    @property
    def state_dir(self) -> Path:
        return self.tmp_path / f"state-{self.node}"

    def build(self) -> ModuleRuntime:
        runtime = self.build_unstarted()
        runtime.start()
        return runtime

    def build_unstarted(self) -> ModuleRuntime:
        cluster = parse_config(cluster_yaml(self.tmp_path, self.preferred, self.witness_port))
        module = cluster.module("app")
        assert module.vip is not None
        provider = create_provider("fake", module.vip.address, module.vip.settings, self.node, ["n1", "n2"])
        self.runtime = ModuleRuntime(cluster=cluster, config=module, node=self.node, state_dir=self.state_dir,
                                     peer_view=lambda _module: self.peer, announce=self._announce,
                                     provider=provider)
        return self.runtime

    def _announce(self) -> None:
        """What the peer would receive now, with the world as it is at that moment."""
        assert self.runtime is not None
        self.announced.append({**self.runtime.announce_fields(), "vip_holder": self.vip_holder(),
                               "journal": self.journal()})

    def set_peer(self, **changes: object) -> None:
        self.peer = replace(self.peer, **changes)
        assert self.runtime is not None
        self.runtime.peer_changed()

    def vip_holder(self) -> str | None:
        path = self.tmp_path / "vip.json"
        if not path.exists() or not path.read_text().strip():
            return None
        return json.loads(path.read_text()).get("holders", {}).get(VIP)

    def journal(self) -> list[str]:
        path = self.tmp_path / "journal.log"
        return path.read_text().splitlines() if path.exists() else []

    def ran(self, script: str) -> list[str]:
        return [line for line in self.journal() if line.split()[0] == script]

    async def reach(self, state: S, waiting_for: str | None = None, timeout: float = 5.0) -> None:
        assert self.runtime is not None
        deadline = time.monotonic() + timeout
        runtime = self.runtime
        while not (runtime.state == state and waiting_for in (None, runtime.waiting_for) and not runtime.busy):
            if time.monotonic() > deadline:
                raise AssertionError(f"still {self.runtime.state.name} ({self.runtime.waiting_for!r}), "
                                     f"expected {state.name}; decisions: {list(self.runtime.decisions)[:4]}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self.runtime is not None:
            await self.runtime.close()


def waiting_peer(**changes: object) -> PeerView:
    """n2 started too and waits, with up-to-date data it could serve."""
    return replace(PeerView(name="n2", reachable=True, state=S.WAIT, data=DataStatus.UPTODATE, eligible=True,
                            networks_alive=("default",)), **changes)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def start_alone(h: Harness) -> ModuleRuntime:
    """n1 (preferred) and n2 both start and wait: n1 serves, ALONE until n2 joins."""
    h.peer = waiting_peer()
    runtime = h.build()
    result = await runtime.command("start")
    assert result.ok and result.state == "WAIT"
    await h.reach(S.ALONE)
    return runtime


# ---- election, PRIM, failover, persistence ---------------------------------------------------------

@async_test
async def test_preferred_node_becomes_alone_and_takes_the_vip(tmp_path: Path) -> None:
    write_scripts(tmp_path, start_prim=f'echo "$@" > "{tmp_path}/args"\n'
                                       f'env | grep ^SAFEKIT_ | sort > "{tmp_path}/env"\n')
    h = Harness(tmp_path)
    try:
        runtime = await start_alone(h)
        assert h.vip_holder() == "n1"
        assert runtime.vip_held
        assert (tmp_path / "args").read_text().split() == ["WAIT", "ALONE", "peer_changed"]
        env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines())
        assert env["SAFEKIT_MODULE"] == "app"
        assert env["SAFEKIT_NODE"] == "n1"
        assert env["SAFEKIT_PEER"] == "n2"
        assert env["SAFEKIT_VIP"] == "198.18.0.100"
        # every script with its arguments, in order: `transition` precedes each change of state
        assert h.journal() == [
            "transition STOP WAIT start", "prestart STOP WAIT start", "start_both STOP WAIT start",
            "transition WAIT ALONE peer_changed", "start_prim WAIT ALONE peer_changed",
        ]
        assert runtime.serving
        stored = ModuleStore(h.state_dir, "app").load()
        assert stored.last_state == S.ALONE and stored.can_start_alone
        assert stored.generation.current != 0
        assert h.announced[-1]["state"] == int(S.ALONE)
    finally:
        await h.close()


@async_test
async def test_alone_then_prim_then_peer_lost_starts_a_new_generation(tmp_path: Path) -> None:
    write_scripts(tmp_path)
    h = Harness(tmp_path)
    try:
        runtime = await start_alone(h)
        first = runtime.persisted.generation
        h.set_peer(state=S.SECOND, data=DataStatus.UPTODATE, generation=first)
        await h.reach(S.PRIM)
        stored = ModuleStore(h.state_dir, "app").load()
        assert stored.last_state == S.PRIM and not stored.can_start_alone
        assert stored.generation == first
        assert h.vip_holder() == "n1"

        h.set_peer(reachable=False, networks_alive=())
        await h.reach(S.ALONE)
        stored = ModuleStore(h.state_dir, "app").load()
        assert stored.last_state == S.ALONE and stored.can_start_alone
        assert stored.generation.current not in (0, first.current)
        assert stored.generation.history[0] == first.current
        assert h.vip_holder() == "n1"
        assert len(h.ran("start_prim")) == 1  # the application kept running through PRIM -> ALONE
    finally:
        await h.close()


@async_test
async def test_failing_start_prim_waits_releases_the_vip_and_stops(tmp_path: Path) -> None:
    write_scripts(tmp_path, start_prim="echo cannot start >&2\nexit 3\n")
    h = Harness(tmp_path)
    try:
        h.peer = waiting_peer()
        runtime = h.build()
        await runtime.command("start")
        await h.reach(S.WAIT, "failed:start_prim")
        assert h.vip_holder() is None
        assert not runtime.vip_held
        assert len(h.ran("stop_prim")) == 1
        assert not runtime.serving
        log = runtime.log_path.read_text()
        assert "cannot start" in log and "start_prim failed" in log
        # it stays put: the failure blocks serving until an admin acts
        await asyncio.sleep(0.3)
        assert runtime.state == S.WAIT and len(h.ran("start_prim")) == 1
        assert runtime.announce_fields()["eligible"] is False
    finally:
        await h.close()


@async_test
async def test_state_announced_only_after_the_actions(tmp_path: Path) -> None:
    write_scripts(tmp_path, stop_prim="sleep 0.4\n")
    h = Harness(tmp_path)
    try:
        runtime = await start_alone(h)
        assert h.announced[-1]["state"] == int(S.ALONE) and h.announced[-1]["vip_holder"] == "n1"
        stopping = asyncio.create_task(runtime.command("stop"))
        await until(lambda: bool(h.ran("stop_prim")))
        # stop_prim is running: the peer is still told ALONE and the VIP is still here
        assert runtime.announce_fields()["state"] == int(S.ALONE)
        assert h.vip_holder() == "n1"
        result = await stopping
        assert result.ok and result.state == "STOP"
        last = h.announced[-1]
        assert last["state"] == int(S.STOP)
        assert last["vip_holder"] is None  # released before STOP was announced
        assert any(line.startswith("stop_both") for line in last["journal"])  # type: ignore[union-attr]
        assert all(a["vip_holder"] is None for a in h.announced if a["state"] == int(S.STOP))
    finally:
        await h.close()


@async_test
async def test_a_starting_module_says_so_until_its_start_scripts_are_done(tmp_path: Path) -> None:
    """While `start` runs prestart and start_both the state is still STOP: the peer is told the module
    is starting, so it does not take this node for one an admin stopped."""
    write_scripts(tmp_path, start_both="sleep 0.4\n")
    h = Harness(tmp_path)
    try:
        runtime = h.build()
        assert runtime.announce_fields()["intent"] == "none"  # stopped, nothing under way
        starting = asyncio.create_task(runtime.command("start"))
        await until(lambda: bool(h.ran("start_both")))
        fields = runtime.announce_fields()
        assert (fields["state"], fields["intent"]) == (int(S.STOP), "starting")
        result = await starting
        assert result.ok and result.state == "WAIT"
        assert h.announced[-1]["state"] == int(S.WAIT) and h.announced[-1]["intent"] == "none"
        assert all(a["intent"] != "starting" for a in h.announced if a["state"] != int(S.STOP))
    finally:
        await h.close()


@async_test
async def test_start_twice_is_a_success_that_does_nothing(tmp_path: Path) -> None:
    write_scripts(tmp_path)
    h = Harness(tmp_path)
    try:
        runtime = h.build()  # the peer is silent: n1 waits for it
        first = await runtime.command("start")
        assert first.ok and first.state == "WAIT"
        second = await runtime.command("start")
        assert second.ok
        assert "already started" in second.message
        assert len(h.ran("prestart")) == 1
    finally:
        await h.close()


@async_test
async def test_forcestop_aborts_a_long_start_script(tmp_path: Path) -> None:
    pid_file = tmp_path / "start_prim.pid"
    write_scripts(tmp_path, start_prim=f'echo $$ > "{pid_file}"\nsleep 30\n')
    h = Harness(tmp_path)
    try:
        h.peer = waiting_peer()
        runtime = h.build()
        await runtime.command("start")
        await until(pid_file.exists)
        await until(lambda: pid_file.read_text().strip() != "")
        pid = int(pid_file.read_text())
        began = time.monotonic()
        result = await runtime.command("forcestop")
        assert time.monotonic() - began < 5
        await h.reach(S.STOP)
        assert result.ok
        assert not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert h.vip_holder() is None
        assert "aborted" in runtime.log_path.read_text()
    finally:
        await h.close()


@async_test
async def test_persisted_state_survives_a_daemon_restart(tmp_path: Path) -> None:
    write_scripts(tmp_path)
    h = Harness(tmp_path)
    try:
        runtime = await start_alone(h)
        before = runtime.persisted
        await h.close()  # the daemon dies: no clean stop

        h.peer = PeerView(name="n2")  # the peer is gone too
        restarted = h.build()
        assert restarted.persisted == before
        assert restarted.state == S.STOP
        await restarted.command("start")
        # it was the last primary: after the startup wait (the heartbeat timeout) it serves alone
        await h.reach(S.ALONE, timeout=5)
        assert restarted.persisted.generation.history[0] == before.generation.current
        assert h.vip_holder() == "n1"
    finally:
        await h.close()


@async_test
async def test_a_fresh_node_alone_does_not_serve(tmp_path: Path) -> None:
    write_scripts(tmp_path)
    h = Harness(tmp_path)
    try:
        runtime = h.build()
        await runtime.command("start")
        await asyncio.sleep(0.8)  # past the startup wait
        await h.reach(S.WAIT, "stale")
        assert h.vip_holder() is None and not h.ran("start_prim")
    finally:
        await h.close()


# ---- failover trace --------------------------------------------------------------------------------

def by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


@async_test
async def test_failover_span_has_detection_witness_vip_and_script_children(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    write_scripts(tmp_path)
    witness = socket.socket()
    witness.bind(("127.0.0.1", 0))
    witness.listen(8)
    h = Harness(tmp_path, node="n2", witness_port=witness.getsockname()[1])
    try:
        h.peer = PeerView(name="n1", reachable=True, state=S.PRIM, data=DataStatus.UPTODATE,
                          generation=Generation(12345), preferred=True, networks_alive=("default",))
        runtime = h.build()
        await runtime.command("start")
        await h.reach(S.SECOND)
        assert runtime.persisted.generation.current == 12345  # no replicated data: adopts the primary's
        spans.clear()

        h.set_peer(reachable=False, networks_alive=())
        await h.reach(S.ALONE)
        assert h.vip_holder() == "n2"
        finished = spans.get_finished_spans()
        failovers = by_name(finished, "failover")
        assert len(failovers) == 1, [s.name for s in finished]
        failover = failovers[0]
        assert failover.attributes is not None
        assert failover.attributes["from_state"] == "SECOND" and failover.attributes["to_state"] == "ALONE"
        children = {s.name: s for s in finished
                    if s.parent is not None and s.parent.span_id == failover.context.span_id}
        for name in ("detection", "witness_check", "vip.take", "script start_prim"):
            assert name in children, f"{name} not a child of failover: {sorted(children)}"
        assert children["witness_check"].attributes["witness.ok"] is True  # type: ignore[index]
        assert children["vip.take"].attributes["vip.changed"] is True  # type: ignore[index]
        assert children["script start_prim"].attributes["script.ok"] is True  # type: ignore[index]
        # every span of the takeover is in the failover's trace
        trace_id = failover.context.trace_id
        assert all(s.context.trace_id == trace_id for s in children.values())
        assert not by_name(finished, "takeover_check")  # the provisional name was replaced
    finally:
        await h.close()
        witness.close()


@async_test
async def test_no_witness_answers_no_takeover(tmp_path: Path, spans: InMemorySpanExporter) -> None:
    write_scripts(tmp_path)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    h = Harness(tmp_path, node="n2", witness_port=closed.getsockname()[1])
    try:
        h.peer = PeerView(name="n1", reachable=True, state=S.PRIM, data=DataStatus.UPTODATE,
                          generation=Generation(7), preferred=True, networks_alive=("default",))
        runtime = h.build()
        await runtime.command("start")
        await h.reach(S.SECOND)
        spans.clear()
        h.set_peer(reachable=False, networks_alive=())
        await h.reach(S.WAIT, "witness")
        assert h.vip_holder() is None and not h.ran("start_prim")
        finished = spans.get_finished_spans()
        assert not by_name(finished, "failover")
        transition = by_name(finished, "transition")[0]
        witness_checks = [s for s in by_name(finished, "witness_check")
                          if s.parent is not None and s.parent.span_id == transition.context.span_id]
        assert witness_checks and witness_checks[0].attributes["witness.ok"] is False  # type: ignore[index]
    finally:
        await h.close()
        closed.close()


# ---- telemetry set-up (in a subprocess: the global provider of this process must stay as it is) -----

SETUP = """
import sys
from safekit_cloud.core.telemetry import setup_tracing, shutdown_tracing
on = setup_tracing("safekit-cloud", "n1", "c1")
shutdown_tracing()
sys.exit(0 if on else 3)
"""


def run_setup(**env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", SETUP], env={**clean, **env}, capture_output=True,
                          timeout=60, check=False)
    return done.returncode


def test_tracing_is_off_without_otel_variables() -> None:
    assert run_setup() == 3


def test_tracing_is_on_with_the_console_exporter() -> None:
    assert run_setup(OTEL_TRACES_EXPORTER="console") == 0


def test_sdk_disabled_wins() -> None:
    assert run_setup(OTEL_TRACES_EXPORTER="console", OTEL_SDK_DISABLED="true") == 3


def test_the_same_decision_in_a_row_is_counted_not_repeated(tmp_path: Path) -> None:
    """A retry that fails alike every 30 s must not push the decisions that explain it out of the
    five status shows: it is counted on the latest entry (`repeated`, with the latest time)."""
    from safekit_cloud.core.status import DecisionOut

    runtime = Harness(tmp_path).build_unstarted()
    first = DecisionOut(1.0, "peer_lost", "SECOND", "ALONE", "n2 lost: taking over", ["take_vip"])
    retry = DecisionOut(2.0, "receiver_retry", "SECOND", "SECOND", "receiver did not start (in use)",
                        ["replicate_as_secondary"])
    runtime._record_decision(first)
    for at in (2.0, 3.0, 4.0):
        runtime._record_decision(msgspec.structs.replace(retry, time=at))
    assert [(d.event, d.repeated, d.time) for d in runtime.decisions] == [("receiver_retry", 3, 4.0),
                                                                           ("peer_lost", 1, 1.0)]
    runtime._record_decision(msgspec.structs.replace(retry, reason="receiver did not start (other)", time=5.0))
    assert [d.repeated for d in runtime.decisions] == [1, 3, 1]
