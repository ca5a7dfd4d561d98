"""The LAN VIP moving between two hosts, seen from a client on the same virtual switch.

n1, n2 and client share network "lan". n1 and n2 each run a small web server answering its own name
and a VIP agent (tests/integration/vip_agent.py: one LanProvider in a process inside the host). The
client's neighbour cache is never flushed: after the move only the gratuitous ARP / unsolicited NA
can point it at n2.
"""

from __future__ import annotations

import json
import logging
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from safekit_cloud.core.lab import Lab

pytestmark = pytest.mark.netns
log = logging.getLogger(__name__)

AGENT = Path(__file__).with_name("vip_agent.py")
PORT = 8080
PLANS = {
    "ipv4": {"n1": "198.18.0.1/24", "n2": "198.18.0.2/24", "client": "198.18.0.10/24", "vip": "198.18.0.100/24"},
    "ipv6": {"n1": "fd00:198:18::1/64", "n2": "fd00:198:18::2/64", "client": "fd00:198:18::10/64",
             "vip": "fd00:198:18::100/64"},
}


class Agent:
    """The VIP agent in one host, asked one command at a time."""

    def __init__(self, lab: Lab, host: str, vip: str, settings: dict[str, Any]):
        self.host = host
        self.proc = lab.spawn(host, [sys.executable, str(AGENT), host, vip, json.dumps(settings)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the VIP agent on {self.host} did not answer within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the VIP agent on {self.host} exited with {self.proc.wait()}")
        return json.loads(line)

    def wait_ready(self) -> None:
        assert self._read(20) == {"ready": self.host}

    def ask(self, verb: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(verb + "\n")
        self.proc.stdin.flush()
        reply = self._read(10)
        assert reply["ok"], f"{verb} on {self.host}: {reply}"
        return reply


@dataclass
class Lan:
    lab: Lab
    plan: dict[str, str]

    @property
    def vip(self) -> str:
        return self.plan["vip"].split("/")[0]

    def url(self, address: str) -> str:
        return f"http://[{address}]:{PORT}/" if ":" in address else f"http://{address}:{PORT}/"

    def get(self, address: str, timeout: float = 1.0) -> str | None:
        """The page the client gets from `address`, or None when it gets nothing within `timeout`."""
        done = self.lab.run("client", ["curl", "-gsS", "--max-time", f"{timeout:.2f}", self.url(address)],
                            timeout=timeout + 5, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    def neighbour(self) -> tuple[str | None, str]:
        """(MAC, state) of the VIP in the client's neighbour cache."""
        out = self.lab.run("client", ["ip", "-j", "neigh", "show", "to", self.vip]).stdout
        entries = json.loads(out or "[]")
        if not entries:
            return None, "absent"
        return entries[0].get("lladdr"), ",".join(entries[0].get("state", []))

    def agents(self, **settings: Any) -> tuple[Agent, Agent]:
        spec = {"interface": "eth0", **settings}
        pair = Agent(self.lab, "n1", self.plan["vip"], spec), Agent(self.lab, "n2", self.plan["vip"], spec)
        for agent in pair:
            agent.wait_ready()
        return pair


def _serve(lab: Lab, host: str, root: Path) -> None:
    root.mkdir()
    (root / "index.html").write_text(host)
    lab.spawn(host, [sys.executable, "-m", "http.server", "--bind", "::", "--directory", str(root), str(PORT)],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(params=["ipv4", "ipv6"])
def lan(request: pytest.FixtureRequest, lab: Lab, tmp_path: Path) -> Iterator[Lan]:
    plan = PLANS[request.param]
    lab.add_network("lan")
    for host in ("n1", "n2", "client"):
        lab.add_host(host, {"lan": plan[host]})
    setup = Lan(lab, plan)
    for host in ("n1", "n2"):
        _serve(lab, host, tmp_path / host)
    for host in ("n1", "n2"):
        own = plan[host].split("/")[0]
        deadline = time.monotonic() + 10
        while setup.get(own, 0.5) != host:
            assert time.monotonic() < deadline, f"the web server on {host} did not start"
            time.sleep(0.05)
    yield setup


def test_client_follows_the_vip_without_flushing_its_cache(lan: Lan) -> None:
    n1, n2 = lan.agents()
    assert n1.ask("take")["changed"]
    assert lan.get(lan.vip) == "n1"
    assert lan.neighbour()[0] == lan.lab.mac("n1", "lan")
    n2_mac = lan.lab.mac("n2", "lan")

    started = time.monotonic()
    assert n1.ask("release")["changed"]
    assert n2.ask("take")["changed"]
    deadline = started + 1.0
    while lan.neighbour()[0] != n2_mac:
        assert time.monotonic() < deadline, f"client still has {lan.neighbour()} for the VIP after 1 s"
        time.sleep(0.005)
    switched = time.monotonic() - started
    page = lan.get(lan.vip, timeout=max(0.1, deadline - time.monotonic()))
    reached = time.monotonic() - started
    log.info("VIP moved: client's neighbour entry on n2 after %.3fs, page from n2 after %.3fs",
             switched, reached)
    assert page == "n2"
    assert reached < 1.0
    assert n1.ask("holder")["holder"] is None and n2.ask("holder")["holder"] == "n2"


def test_without_announcements_the_client_keeps_the_old_mac(lan: Lan) -> None:
    """The control experiment: with garp_count=0 the same move goes unseen by the client."""
    n1, n2 = lan.agents(garp_count=0)
    n1.ask("take")
    assert lan.get(lan.vip) == "n1"
    n1_mac = lan.lab.mac("n1", "lan")
    n1.ask("release")
    n2.ask("take")
    time.sleep(1.0)
    assert lan.neighbour()[0] == n1_mac
    assert lan.get(lan.vip, timeout=0.3) is None
