"""Failover time: from powering off the primary to the client's first answered request through the VIP.

Runs a real two-node cluster in network namespaces (as `safekit-cloud demo` does) with fast
(100 ms / 500 ms) and default (500 ms / 3 s) heartbeat settings, N runs each, and prints the median,
min and max, next to the heartbeat timeout of the same run as the baseline: the ratio says how much
of the failover is detection and how much is takeover (VIP, gratuitous ARP, start script).

    sudo .venv/bin/python bench/failover.py [--runs 10] [--only fast|default]

Goals (issue 2): median <= 1.0 s with fast settings, <= 3.5 s with defaults (keepalived ~3.6 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from safekit_cloud.core.labcluster import LabCluster, outage, read_probe

SETTINGS = {"fast": (0.1, 0.5), "default": (0.5, 3.0)}
GOALS = {"fast": 1.0, "default": 3.5}


def one_failover(cluster: LabCluster, primary: str, secondary: str) -> float | None:
    probe = cluster.start_probe(seconds=60, period=0.01)
    try:
        time.sleep(0.5)
        killed = time.time()
        cluster.power_off(primary)
        cluster.wait_states({secondary: "ALONE"}, timeout=30)
        time.sleep(1.5)  # let the client's first answered requests arrive
        probe.terminate()
        return outage(read_probe(probe.communicate()[0].splitlines()), killed, secondary)
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()


def measure(name: str, runs: int) -> list[float]:
    interval, timeout = SETTINGS[name]
    figures: list[float] = []
    with LabCluster(interval=interval, timeout=timeout, preferred=None) as cluster:
        cluster.start_daemon("n1")
        cluster.start_daemon("n2")
        cluster.wait_states({"n1": "PRIM", "n2": "SECOND"}, timeout=60)
        primary, secondary = "n1", "n2"
        for i in range(runs):
            seconds = one_failover(cluster, primary, secondary)
            if seconds is not None:
                figures.append(seconds)
            print(f"  {name} run {i + 1}/{runs}: {seconds if seconds is None else round(seconds, 3)} s", flush=True)
            cluster.power_on(primary)
            cluster.wait_states({primary: "SECOND", secondary: "PRIM"}, timeout=60)
            primary, secondary = secondary, primary
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--only", choices=sorted(SETTINGS))
    args = parser.parse_args()
    rows = []
    for name in [args.only] if args.only else ["fast", "default"]:
        figures = measure(name, args.runs)
        timeout = SETTINGS[name][1]
        if not figures:
            rows.append((name, timeout, None, None, None))
            continue
        rows.append((name, timeout, statistics.median(figures), min(figures), max(figures)))
    print("\nsettings  hb-timeout  median   min     max     median/timeout  goal")
    ok = True
    for name, timeout, median, low, high in rows:
        if median is None:
            print(f"{name:9} {timeout:6.2f} s   no successful run")
            ok = False
            continue
        goal = GOALS[name]
        ok &= median <= goal
        print(f"{name:9} {timeout:6.2f} s   {median:5.2f} s  {low:5.2f} s {high:5.2f} s  {median / timeout:6.2f}x"
              f"          <= {goal} s {'met' if median <= goal else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
