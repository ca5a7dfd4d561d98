"""The VIP provider contract (design §5), one suite run against every provider on a real backend.

- fake: the shared JSON state file.
- lan: a real interface in a lab namespace. The test's main thread enters host n1's namespace for the
  duration of the test, so the provider (its asyncio loop, its worker threads, its raw sockets) runs
  there; the permission case runs in a subprocess inside n1 with CAP_NET_ADMIN and CAP_NET_RAW dropped.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, Self

import pytest
from safekit_cloud.core.lab import Lab
from safekit_cloud.providers.base import (
    REGISTRY,
    ProviderPermissionError,
    ProviderSettings,
    VipProvider,
    create_provider,
    provider_class,
)

VIP = "198.18.0.100/24"
NODES = ["n1", "n2"]


class Backend(Protocol):
    name: str

    def make(self, node: str = "n1") -> VipProvider: ...
    def make_bad(self) -> VipProvider: ...
    def inject_retryable(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None: ...
    def denied_take(self) -> dict[str, Any]: ...


class FakeBackend:
    name = "fake"

    def __init__(self, tmp_path: Path):
        self.state = tmp_path / "vip.json"

    def make(self, node: str = "n1") -> VipProvider:
        return create_provider("fake", VIP, {"state_file": str(self.state)}, node, NODES)

    def make_bad(self) -> VipProvider:
        return create_provider("fake", VIP, {"state_file": "/dev/null/vip.json"}, "n1", NODES)

    def _patch_state(self, **values: Any) -> None:
        state = json.loads(self.state.read_text()) if self.state.exists() else {}
        state.update(values)
        self.state.write_text(json.dumps(state))

    def inject_retryable(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self._patch_state(fail_next=count)

    def denied_take(self) -> dict[str, Any]:
        self._patch_state(deny="vip:move")
        return asyncio.run(_take_reporting_error(self.make()))


class LanBackend:
    name = "lan"

    def __init__(self, lab: Lab):
        self.lab = lab
        lab.add_network("lan")
        lab.add_host("n1", {"lan": "198.18.0.1/24"})

    def make(self, node: str = "n1") -> VipProvider:
        return create_provider("lan", VIP, {"interface": "eth0", "garp_interval": 0.05}, node, NODES)

    def make_bad(self) -> VipProvider:
        return create_provider("lan", VIP, {"interface": "eth9"}, "n1", NODES)

    def inject_retryable(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        """The kernel answers EBUSY to the first `count` address additions (through pyroute2)."""
        import safekit_cloud.providers.lan.provider as lan
        from pyroute2 import NetlinkError

        real = lan.IPRoute
        remaining = [count]

        class FlakyIPRoute:
            def __init__(self) -> None:
                self._real = real()

            def __enter__(self) -> Self:
                return self

            def __exit__(self, *exc: object) -> None:
                self._real.close()

            def __getattr__(self, name: str) -> Any:
                return getattr(self._real, name)

            def addr(self, command: str, **spec: Any) -> Any:
                if command == "add" and remaining[0] > 0:
                    remaining[0] -= 1
                    raise NetlinkError(errno.EBUSY, "Device or resource busy")
                return self._real.addr(command, **spec)

        monkeypatch.setattr(lan, "IPRoute", FlakyIPRoute)

    def denied_take(self) -> dict[str, Any]:
        script = (
            "from __future__ import annotations\n"
            "import asyncio, json\n"
            "from safekit_cloud.providers.base import create_provider\n"
            f"p = create_provider('lan', {VIP!r}, {{'interface': 'eth0'}}, 'n1', {NODES!r})\n"
            f"{inspect.getsource(_take_reporting_error)}\n"
            "print(json.dumps(asyncio.run(_take_reporting_error(p, with_check=True))))\n"
        )
        drop = "-net_admin,-net_raw"
        done = self.lab.run("n1", ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", "--",
                                   sys.executable, "-c", script], timeout=30)
        return json.loads(done.stdout.strip().splitlines()[-1])


async def _take_reporting_error(provider: VipProvider, with_check: bool = False) -> dict[str, Any]:
    """Take the VIP and report how it failed, as data (so a subprocess can report it too)."""
    try:
        await provider.take()
        return {"error": None}
    except Exception as exc:  # noqa: BLE001 - the test asserts on the type
        report = {"error": type(exc).__name__, "message": str(exc)}
        if with_check:
            report["check"] = await provider.check()
        return report
    finally:
        await provider.close()


@pytest.fixture(params=["fake", pytest.param("lan", marks=pytest.mark.netns)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "fake":
        yield FakeBackend(tmp_path)
        return
    lab: Lab = request.getfixturevalue("lab")
    built = LanBackend(lab)
    with lab.inside("n1"):
        yield built


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _use(provider: VipProvider, *steps: str) -> list[Any]:
    """Call the provider's methods in order, then close it; returns their results."""
    try:
        return [await getattr(provider, step)() for step in steps]
    finally:
        await provider.close()


def test_take_makes_this_node_the_holder(backend: Backend) -> None:
    took, holder = run(_use(backend.make(), "take", "holder"))
    assert took.changed and took.attempts == 1
    assert holder == "n1"


def test_take_twice_is_idempotent(backend: Backend) -> None:
    first, second, holder = run(_use(backend.make(), "take", "take", "holder"))
    assert first.changed
    assert not second.changed and second.attempts == 0
    assert holder == "n1"


def test_holder_survives_a_new_provider_instance(backend: Backend) -> None:
    """A restarted daemon sees the VIP it holds (the state lives in the network, not the object)."""
    run(_use(backend.make(), "take"))
    again, holder = run(_use(backend.make(), "take", "holder"))
    assert not again.changed and holder == "n1"


def test_release_clears(backend: Backend) -> None:
    _, released, holder = run(_use(backend.make(), "take", "release", "holder"))
    assert released.changed
    assert holder is None


def test_release_when_not_holding_is_a_no_op(backend: Backend) -> None:
    released, holder = run(_use(backend.make(), "release", "holder"))
    assert not released.changed and released.attempts == 0
    assert holder is None


def test_check_passes_on_a_good_setup(backend: Backend) -> None:
    assert run(_use(backend.make(), "check")) == [[]]


def test_check_reports_a_bad_setup(backend: Backend) -> None:
    [problems] = run(_use(backend.make_bad(), "check"))
    assert problems and all(isinstance(p, str) and p for p in problems)


def test_retryable_failures_are_retried(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    backend.inject_retryable(monkeypatch, 2)
    provider = backend.make()
    provider.deadline = 2.0  # type: ignore[misc]  # a broken provider fails fast here
    took, holder = run(_use(provider, "take", "holder"))
    assert took.changed and took.attempts == 3
    assert holder == "n1"


def test_permission_error_surfaces_as_provider_permission_error(backend: Backend) -> None:
    report = backend.denied_take()
    assert report["error"] == ProviderPermissionError.__name__, report
    assert report["message"]


def test_close_is_safe_right_after_take_and_twice(backend: Backend) -> None:
    async def scenario() -> set[asyncio.Task[Any]]:
        provider = backend.make()
        await provider.take()
        await provider.close()
        await provider.close()
        return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]
    assert run(scenario()) == set()


def test_declares_its_quirks(backend: Backend) -> None:
    cls = provider_class(backend.name)
    assert cls.name == backend.name and backend.name in REGISTRY
    assert issubclass(cls.settings_model, ProviderSettings)
    assert isinstance(cls.make_before_break, bool)
    assert cls.propagation_delay >= 0 and cls.deadline > 0
    assert cls.first_backoff <= cls.max_backoff
