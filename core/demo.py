"""`safekit-cloud demo`: a two-node cluster on this machine, a failover and a swap, watched from a client.

Everything runs in network namespaces on 198.18.0.0/15 and is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from .labcluster import LabCluster, outage, read_probe

console = Console()


class Probe:
    """Collects the client's probe lines in a thread so the demo can watch while it acts."""

    def __init__(self, cluster: LabCluster, seconds: float):
        self.proc = cluster.start_probe(seconds)
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def samples(self) -> list[dict[str, Any]]:
        return read_probe(list(self.lines))

    def served_by(self) -> str:
        recent = [s for s in self.samples()[-5:] if s["ok"]]
        if not recent:
            return "nobody"
        last = recent[-1]
        return last["node"] + (f" (visit #{last['visit']})" if last.get("visit") else "")

    def last_visit_before(self, t: float) -> int | None:
        counts = [s["visit"] for s in self.samples() if s["ok"] and s["t"] < t and s.get("visit")]
        return max(counts) if counts else None

    def first_visit_after(self, t: float) -> int | None:
        return next((s["visit"] for s in self.samples() if s["ok"] and s["t"] >= t and s.get("visit")), None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self._thread.join(2)


def step(text: str) -> None:
    console.print(f"\n[bold cyan]==>[/] {text}")


def show_states(cluster: LabCluster) -> None:
    states = {n: cluster.module_state(n) or "(down)" for n in ("n1", "n2")}
    console.print("    " + "   ".join(f"{n}: [bold]{s}[/]" for n, s in states.items()))


def run_demo(fast: bool = True, keep: bool = False) -> int:
    from .lab import lab_supported

    supported, why = lab_supported()
    if not supported:
        console.print(f"[red]The demo needs root and network namespaces: {why}[/]")
        return 2
    interval, timeout = (0.1, 0.5) if fast else (0.5, 3.0)
    cluster = LabCluster(interval=interval, timeout=timeout, replicate=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return _scenario(cluster, interval, timeout)
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted: cleaning up[/]")
        return 130
    except (TimeoutError, OSError) as exc:
        console.print(f"[red]demo failed: {exc}[/]")
        return 1
    finally:
        cluster.close()
        signal.signal(signal.SIGTERM, previous)
        console.print("[dim]namespaces, processes and files removed[/]")


def _scenario(cluster: LabCluster, interval: float, timeout: float) -> int:
    step(f"Building two nodes and a client in network namespaces (heartbeat {interval * 1000:.0f} ms, "
         f"peer lost after {timeout * 1000:.0f} ms of silence on both networks)")
    cluster.build()
    console.print(f"    n1 198.18.0.1  n2 198.18.0.2  client 198.18.0.10  virtual IP {cluster.vip}")
    console.print(f"    the service counts visits in {cluster.data_dir}, replicated synchronously n1 <-> n2")
    step("Starting safekit-cloud on both nodes: n1 is the preferred primary")
    cluster.start_daemon("n1")
    cluster.start_daemon("n2")
    cluster.wait_states({"n1": "PRIM", "n2": "SECOND"}, timeout=30)
    show_states(cluster)
    probe = Probe(cluster, seconds=600)
    try:
        time.sleep(1.5)
        console.print(f"    client -> http://{cluster.vip.split('/')[0]}:{cluster.service_port}/ : "
                      f"[green]{probe.served_by()}[/]")
        step("Powering off n1 (daemon killed, cables pulled)")
        killed = time.time()
        cluster.power_off("n1")
        cluster.wait_states({"n2": "ALONE"}, timeout=timeout + 15)
        time.sleep(1.0)
        failover = outage(probe.samples(), killed, "n2")
        show_states(cluster)
        console.print(f"    client -> [green]{probe.served_by()}[/]; service was unavailable for "
                      f"[bold]{_fmt(failover)}[/]")
        before, after = probe.last_visit_before(killed), probe.first_visit_after(killed)
        data_kept = before is not None and after is not None and after > before  # a lost answer may skip one
        console.print(f"    last visit counted on n1: #{before}, first on n2: #{after}: "
                      + ("[green]no acknowledged write lost[/]" if data_kept else "[red]data lost[/]"))
        step("Powering n1 back on: it is resynchronised with only what changed, then rejoins as secondary")
        cluster.power_on("n1")
        cluster.wait_states({"n1": "SECOND", "n2": "PRIM"}, timeout=60)
        show_states(cluster)
        replication = (cluster.status("n2") or {}).get("modules", [{}])[0].get("replication") or {}
        resync = replication.get("resync") or replication.get("last_resync")
        if resync:
            console.print(f"    resync: {resync}")
        step("swap: handing the primary role back to n1")
        swapped = time.time()
        result = cluster.cli("n2", "swap")
        console.print(f"    {result.stdout.strip() or result.stderr.strip()}")
        cluster.wait_states({"n1": "PRIM", "n2": "SECOND"}, timeout=30)
        time.sleep(1.0)
        swap = outage(probe.samples(), swapped, "n1")
        show_states(cluster)
        console.print(f"    client -> [green]{probe.served_by()}[/]; swap interrupted service for "
                      f"[bold]{_fmt(swap)}[/]")
        before2, after2 = probe.last_visit_before(swapped), probe.first_visit_after(swapped)
        data_kept = data_kept and before2 is not None and after2 is not None and after2 > before2
        console.print(f"    last visit on n2: #{before2}, first on n1: #{after2}")
        step("safekit-cloud verify: comparing the two replicas online (content and metadata)")
        checked = cluster.cli("n1", "verify", timeout=120)
        identical = checked.returncode == 0
        console.print("    " + (checked.stdout.strip() or checked.stderr.strip()).replace("\n", "\n    "))
    finally:
        probe.stop()
    samples = probe.samples()
    table = Table(title="safekit-cloud demo summary")
    table.add_column("what")
    table.add_column("result")
    table.add_row("client requests", f"{len(samples)} ({sum(s['ok'] for s in samples)} answered)")
    table.add_row("failover (n1 powered off -> served by n2)", _fmt(failover))
    table.add_row("swap (n2 -> n1)", _fmt(swap))
    table.add_row("replicated data", "every acknowledged visit kept" if data_kept else "[red]visits lost[/]")
    table.add_row("replicas compared (verify)", "identical" if identical else "[red]different[/]")
    table.add_row("final state", "n1 PRIM, n2 SECOND")
    console.print()
    console.print(table)
    return 0 if failover is not None and swap is not None and data_kept and identical else 1


def _fmt(seconds: float | None) -> str:
    return "not measured" if seconds is None else f"{seconds:.2f} s"
