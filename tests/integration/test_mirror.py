"""A real two-node mirror cluster in network namespaces, driven through the `safekit-cloud` command.

Each test builds its own lab (two nodes on two heartbeat networks and a client), and removes it,
daemons, services and namespaces included, even when it fails.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from safekit_cloud.core.lab import lab_supported
from safekit_cloud.core.labcluster import LabCluster, outage, read_probe

pytestmark = [pytest.mark.netns, pytest.mark.skipif(not lab_supported()[0], reason=lab_supported()[1])]

TIMEOUT = 0.5  # heartbeat timeout used by these tests (interval 0.1 s)


@pytest.fixture
def make_cluster() -> Iterator[Any]:
    made: list[LabCluster] = []

    def make(**kwargs: Any) -> LabCluster:
        cluster = LabCluster(interval=0.1, timeout=TIMEOUT, **kwargs)
        made.append(cluster)
        return cluster.build()

    yield make
    for cluster in made:
        cluster.close()


def start_pair(cluster: LabCluster) -> None:
    cluster.start_daemon("n1")
    cluster.start_daemon("n2")
    cluster.wait_states({"n1": "PRIM", "n2": "SECOND"}, timeout=30)


def decisions(cluster: LabCluster, node: str) -> list[dict[str, Any]]:
    status = cluster.status(node)
    assert status is not None, f"{node} does not answer"
    return status["modules"][0]["decisions"]


def test_failover_when_primary_daemon_is_killed_and_client_follows_within_1s(make_cluster: Any) -> None:
    cluster = make_cluster()
    start_pair(cluster)
    probe = cluster.start_probe(seconds=30, period=0.02)
    time.sleep(0.5)
    killed = time.time()
    cluster.kill_daemon("n1")
    cluster.wait_states({"n2": "ALONE"}, timeout=10)
    takeover = next(d for d in decisions(cluster, "n2") if d["to_state"] == "ALONE")
    assert "lost on every heartbeat network" in takeover["reason"]
    time.sleep(1.5)
    probe.terminate()
    samples = read_probe(probe.communicate()[0].splitlines())
    assert any(s["ok"] and s["node"] == "n1" for s in samples if s["t"] < killed), "n1 never served"
    # gratuitous ARP: the client reaches the VIP on n2 within 1 s of the takeover decision
    after_takeover = outage(samples, takeover["time"], "n2")
    assert after_takeover is not None and after_takeover <= 1.0, after_takeover
    # the restarted daemon releases the stale VIP, cleans up (prestart) and rejoins as secondary
    cluster.start_daemon("n1")
    cluster.wait_states({"n1": "SECOND", "n2": "PRIM"}, timeout=20)


def test_failover_when_all_links_of_the_primary_are_cut(make_cluster: Any) -> None:
    cluster = make_cluster()
    start_pair(cluster)
    cluster.lab.cut("n1", "lan")
    cluster.lab.cut("n1", "hb2")
    cluster.wait_states({"n2": "ALONE"}, timeout=10)
    # n1 is isolated but alive: it keeps its application and goes ALONE too
    cluster.wait_states({"n1": "ALONE"}, timeout=10)
    # the partition heals: exactly one primary remains (the preferred n1), n2 becomes secondary
    cluster.lab.restore("n1", "lan")
    cluster.lab.restore("n1", "hb2")
    cluster.wait_states({"n1": "PRIM", "n2": "SECOND"}, timeout=20)


def test_no_failover_when_only_one_heartbeat_network_is_cut(make_cluster: Any) -> None:
    cluster = make_cluster()
    start_pair(cluster)
    cluster.lab.cut("n1", "hb2")
    time.sleep(TIMEOUT * 4)
    assert cluster.module_state("n1") == "PRIM"
    assert cluster.module_state("n2") == "SECOND"
    status = cluster.status("n2")
    networks = {n["network"]: n["alive"] for n in status["peer"]["networks"]}
    assert networks == {"lan": True, "hb2": False}
    assert status["peer"]["reachable"] is True


def test_secondary_that_reaches_no_witness_does_not_take_over(make_cluster: Any) -> None:
    cluster = make_cluster(witnesses=[{"type": "ping", "address": "198.18.0.10", "timeout": 0.3}])
    start_pair(cluster)
    # n2 is cut from everything: it loses n1 and the witness (the client), so it must not serve
    cluster.lab.cut("n2", "lan")
    cluster.lab.cut("n2", "hb2")
    time.sleep(TIMEOUT * 6)
    status = cluster.status("n2")["modules"][0]
    assert status["state"] == "WAIT" and status["waiting_for"] == "witness", status
    assert cluster.module_state("n1") == "ALONE"
    # back on the network: the peer is there again, n2 rejoins as secondary
    cluster.lab.restore("n2", "lan")
    cluster.lab.restore("n2", "hb2")
    cluster.wait_states({"n1": "PRIM", "n2": "SECOND"}, timeout=20)


def test_swap_moves_the_primary_role_and_back(make_cluster: Any) -> None:
    cluster = make_cluster()
    start_pair(cluster)
    result = cluster.cli("n1", "swap")
    assert result.returncode == 0, result.stderr
    cluster.wait_states({"n1": "SECOND", "n2": "PRIM"}, timeout=20)
    # swap asked on the secondary works too
    result = cluster.cli("n1", "swap")
    assert result.returncode == 0, result.stderr
    cluster.wait_states({"n1": "PRIM", "n2": "SECOND"}, timeout=20)
    # swap on a lone primary is refused with a reason and a non-zero exit
    cluster.stop_daemon("n2")
    cluster.wait_states({"n1": "ALONE"}, timeout=20)
    refused = cluster.cli("n1", "swap")
    assert refused.returncode != 0 and "secondary" in (refused.stdout + refused.stderr)


def test_checker_restarts_then_fails_over_after_the_restart_limit(make_cluster: Any) -> None:
    checker = {"name": "web", "type": "tcp", "port": 8080, "interval": 0.2, "timeout": 0.5, "failures": 2,
               "action": "restart"}
    cluster = make_cluster(checkers=[checker], restart={"limit": 2, "window": 3600})
    start_pair(cluster)
    for expected_restarts in (1, 2):
        pid = cluster.service_pid("n1")
        cluster.kill_service("n1")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            module = cluster.status("n1")["modules"][0]
            if module["restarts"] == expected_restarts and cluster.service_pid("n1") not in (None, pid):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"no restart #{expected_restarts}: {module}")
        assert cluster.module_state("n1") == "PRIM"
    cluster.kill_service("n1")
    cluster.wait_states({"n1": "SECOND", "n2": "PRIM"}, timeout=20)
    reasons = [d["reason"] for d in decisions(cluster, "n1")]
    assert any("restart limit reached" in r for r in reasons), reasons


def test_clean_stop_of_both_and_restart_in_the_right_order(make_cluster: Any) -> None:
    cluster = make_cluster()
    start_pair(cluster)
    assert cluster.stop_daemon("n1") == 0
    cluster.wait_states({"n2": "ALONE"}, timeout=10)  # clean stop: taken over without a timeout
    assert cluster.stop_daemon("n2") == 0
    # n1 stopped first: alone it cannot prove its data is current and waits, saying why
    cluster.start_daemon("n1")
    time.sleep(TIMEOUT * 4)
    module = cluster.status("n1")["modules"][0]
    assert module["state"] == "WAIT" and "cannot prove" in module["decisions"][0]["reason"], module
    state = cluster.cli("n1", "state")
    assert state.returncode == 1 and state.stdout.strip() == "WAIT"
    # n2 stopped last: it serves, and n1 joins it as secondary
    cluster.start_daemon("n2")
    cluster.wait_states({"n1": "SECOND", "n2": "PRIM"}, timeout=20)


def test_admin_stop_start_and_forced_prim(make_cluster: Any) -> None:
    cluster = make_cluster()
    start_pair(cluster)
    assert cluster.cli("n1", "stop").returncode == 0
    cluster.wait_states({"n1": "STOP", "n2": "ALONE"}, timeout=10)
    assert cluster.cli("n1", "start").returncode == 0
    cluster.wait_states({"n1": "SECOND", "n2": "PRIM"}, timeout=10)
    again = cluster.cli("n1", "start")
    assert again.returncode == 0, "start on a started module succeeds without doing anything"
    # both daemons down, only the stale one comes back: `prim` forces it
    cluster.stop_daemon("n2")
    cluster.wait_states({"n1": "ALONE"}, timeout=10)
    cluster.stop_daemon("n1")
    cluster.start_daemon("n2")
    time.sleep(TIMEOUT * 4)
    assert cluster.module_state("n2") == "WAIT"
    assert cluster.cli("n2", "prim").returncode == 0
    cluster.wait_states({"n2": "ALONE"}, timeout=10)
