"""The namespace lab itself (safekit_cloud.core.lab): cabling, faults, processes, cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safekit_cloud.core import lab as labmod
from safekit_cloud.core.lab import Lab, LabError, cleanup_stale_labs, lab_namespaces, stale_labs

pytestmark = pytest.mark.netns


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _pings(lab: Lab, host: str, address: str) -> bool:
    return lab.run(host, ["ping", "-c1", "-W1", "-q", address], check=False).returncode == 0


def test_hosts_talk_and_a_cut_cable_stops_them(lab: Lab) -> None:
    lab.add_network("lan")
    lab.add_network("heartbeat")
    lab.add_host("a", {"lan": "198.18.0.1/24", "heartbeat": ["198.18.1.1/24", "fd00:198:18:1::1/64"]})
    lab.add_host("b", {"lan": "198.18.0.2/24", "heartbeat": ["198.18.1.2/24", "fd00:198:18:1::2/64"]})
    assert (lab.interface("a", "lan"), lab.interface("a", "heartbeat")) == ("eth0", "eth1")
    assert lab.netns("a") == lab.prefix + "a"
    assert _pings(lab, "a", "198.18.0.2") and _pings(lab, "a", "fd00:198:18:1::2")

    lab.cut("b", "lan")
    assert not _pings(lab, "a", "198.18.0.2")
    assert _pings(lab, "a", "198.18.1.2")  # the other network still works
    link = json.loads(lab.run("b", ["ip", "-j", "link", "show", "eth0"]).stdout)[0]
    assert "NO-CARRIER" in link["flags"]

    lab.restore("b", "lan")
    deadline = time.monotonic() + 5
    while not _pings(lab, "a", "198.18.0.2"):
        assert time.monotonic() < deadline


def test_nothing_is_created_in_the_root_namespace(lab: Lab) -> None:
    before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    lab.add_network("lan")
    lab.add_host("a", {"lan": "198.18.0.1/24"})
    after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert lab.prefix not in after and "br-lan" not in after.replace(before, "")


@pytest.mark.usefixtures("_lab_host")  # skips where labs cannot be built
def test_close_stops_processes_even_stubborn_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labmod, "TERM_GRACE", 0.3)
    lab = Lab()
    try:
        lab.add_network("lan")
        lab.add_host("a", {"lan": "198.18.0.1/24"})
        polite = lab.spawn("a", ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        assert polite.stdout is not None
        child = int(polite.stdout.readline())
        stubborn = lab.spawn("a", ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"],
                             stdout=subprocess.PIPE, text=True)
        assert stubborn.stdout is not None and stubborn.stdout.readline() == "ready\n"
        namespaces = lab_namespaces(lab.prefix)
        assert len(namespaces) == 2
    finally:
        lab.close()
    assert polite.poll() is not None and stubborn.returncode == -signal.SIGKILL
    assert _gone(child)
    assert lab_namespaces(lab.prefix) == []
    assert not (labmod.PID_DIR / f"{lab.prefix}.pid").exists()
    lab.close()  # idempotent
    with pytest.raises(LabError, match="closed"):
        lab.add_network("again")


def test_spawn_runs_in_the_host_with_an_optional_mount_namespace(lab: Lab) -> None:
    lab.add_network("lan")
    lab.add_host("a", {"lan": "198.18.0.1/24"})
    script = "import os; print(os.readlink('/proc/self/ns/net'), os.readlink('/proc/self/ns/mnt'))"
    net, mnt = lab.run("a", [sys.executable, "-c", script]).stdout.split()
    assert net != os.readlink("/proc/self/ns/net") and mnt == os.readlink("/proc/self/ns/mnt")
    net2, mnt2 = lab.run("a", [sys.executable, "-c", script], mount_namespace=True).stdout.split()
    assert net2 == net and mnt2 != mnt
    assert lab.run("a", ["sh", "-c", "echo $X"], env={"X": "from env"}).stdout.strip() == "from env"
    with pytest.raises(LabError, match="exited with 3"):
        lab.run("a", ["sh", "-c", "exit 3"])
    with pytest.raises(LabError, match="did not finish"):
        lab.run("a", ["sleep", "5"], timeout=0.2)


def test_inside_moves_only_the_calling_thread_and_comes_back(lab: Lab) -> None:
    lab.add_network("lan")
    lab.add_host("a", {"lan": "198.18.0.1/24"})
    home = os.readlink("/proc/thread-self/ns/net")
    with lab.inside("a"):
        inside = os.readlink("/proc/thread-self/ns/net")
        assert inside != home
    assert os.readlink("/proc/thread-self/ns/net") == home
    assert inside == f"net:[{os.stat(labmod.NETNS_DIR / lab.netns('a')).st_ino}]"


@pytest.mark.parametrize(("host", "links", "message"), [
    ("a", {"lan": "10.0.0.1/24"}, "outside the lab ranges"),
    ("a", {"lan": "198.18.0.1"}, "prefix length"),
    ("a", {"lan": "nonsense/24"}, "not an address"),
    ("a", {"wan": "198.18.0.1/24"}, "no network 'wan'"),
    ("Bad_Name", {"lan": "198.18.0.1/24"}, "host name"),
])
def test_bad_hosts_are_refused_before_anything_is_built(lab: Lab, host: str, links: dict[str, str],
                                                         message: str) -> None:
    lab.add_network("lan")
    with pytest.raises(LabError, match=message):
        lab.add_host(host, links)
    assert lab.hosts() == []


def test_stale_labs_of_dead_owners_are_cleaned_and_live_ones_kept(lab: Lab) -> None:
    lab.add_network("lan")
    owner_script = (
        "import sys, time\n"
        "from safekit_cloud.core.lab import Lab\n"
        "lab = Lab()\n"
        "lab.add_network('lan')\n"
        "lab.add_host('x', {'lan': '198.18.0.1/24'})\n"
        "p = lab.spawn('x', ['sleep', '60'])\n"
        "print(lab.prefix, p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", owner_script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        prefix, sleeper = owner.stdout.readline().split()
        assert prefix not in stale_labs()
        owner.kill()  # a crash: close() never runs
        owner.wait()
        assert prefix in stale_labs() and lab.prefix not in stale_labs()
        removed = cleanup_stale_labs()
        assert set(removed) >= {prefix + "x", prefix + "_sw"}
        assert lab_namespaces(prefix) == [] and lab_namespaces(lab.prefix) != []
        deadline = time.monotonic() + 3
        while not _gone(int(sleeper)):
            assert time.monotonic() < deadline, "the stale lab's process survived"
            time.sleep(0.02)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        cleanup_stale_labs()  # even when an assertion failed half-way
