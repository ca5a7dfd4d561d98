"""A real two-node cluster on this machine: daemons in network namespaces built by `lab.Lab`.

Used by `safekit-cloud demo` and by the integration tests, so both exercise exactly what a user runs:
the `safekit-cloud` command, a cluster file, scripts, real heartbeats and a LAN virtual IP.
Synchronous on purpose: it drives processes and waits, it serves nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .lab import Lab

CLI = str(Path(sys.executable).with_name("safekit-cloud"))

# The demo application: a tiny HTTP service that says which node answered. start_prim starts it in the
# background (its own session, so it outlives the script) and stop_prim stops it by its pid file.
SERVICE = r'''
import http.server, os, socketserver, sys, threading
node, port = os.environ["SAFEKIT_NODE"], int(sys.argv[1])
data = sys.argv[2] if len(sys.argv) > 2 else ""
lock = threading.Lock()
def visit():
    """Count this request in the replicated data folder, durably, and return the count."""
    if not data:
        return ""
    with lock:
        path = os.path.join(data, "visits")
        try:
            with open(path) as f:
                count = int(f.read() or 0) + 1
        except FileNotFoundError:
            count = 1
        with open(path + ".tmp", "w") as f:
            f.write(str(count)); f.flush(); os.fsync(f.fileno())
        os.rename(path + ".tmp", path)
        return " visit %d" % count
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("served by " + node + visit() + "\n").encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
socketserver.TCPServer.allow_reuse_address = True
with socketserver.ThreadingTCPServer(("0.0.0.0", port), H) as s: s.serve_forever()
'''

START_PRIM = """#!/bin/sh
# start_prim <current> <next> <action>: start the service on the primary.
run="$SAFEKIT_WORKDIR/run-$SAFEKIT_NODE"; mkdir -p "$run"
setsid {python} "$SAFEKIT_WORKDIR/service.py" {port} {data} </dev/null >"$run/service.log" 2>&1 &
echo $! > "$run/service.pid"
for i in $(seq 1 50); do
  {python} -c "import socket; socket.create_connection(('127.0.0.1', {port}), 0.2)" 2>/dev/null && exit 0
  sleep 0.1
done
echo "service did not open port {port}" >&2; exit 1
"""

STOP_PRIM = """#!/bin/sh
# stop_prim <current> <next> <action>: stop the service.
pidfile="$SAFEKIT_WORKDIR/run-$SAFEKIT_NODE/service.pid"
[ -f "$pidfile" ] || exit 0
pid=$(cat "$pidfile"); kill "$pid" 2>/dev/null
# gone, or a zombie waiting to be reaped by init, counts as stopped
running() {{ [ -r /proc/$pid/status ] && ! grep -q '^State:.*Z' /proc/$pid/status; }}
for i in $(seq 1 60); do running || break; sleep 0.05; done
kill -9 "$pid" 2>/dev/null; rm -f "$pidfile"; exit 0
"""

PROBE = r'''
import json, socket, sys, time
vip, port, period, until = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
end = time.time() + until
while time.time() < end:
    t = time.time()
    try:
        with socket.create_connection((vip, port), timeout=0.3) as s:
            s.settimeout(0.3)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        words = data.decode(errors="replace").rsplit("served by ", 1)[-1].split()
        who = words[0] if b"served by" in data and words else "?"
        visit = int(words[2]) if len(words) > 2 and words[1] == "visit" else None
        print(json.dumps({"t": t, "ok": True, "node": who, "visit": visit}), flush=True)
    except Exception as exc:
        print(json.dumps({"t": t, "ok": False, "error": type(exc).__name__}), flush=True)
    time.sleep(max(0.0, period - (time.time() - t)))
'''


@dataclass
class NodeSpec:
    name: str
    addresses: dict[str, str]  # network -> address with prefix


@dataclass
class LabCluster:
    """Two nodes (n1, n2) and a client on network `lan`, plus a second heartbeat network `hb2`."""

    interval: float = 0.1
    timeout: float = 0.5
    preferred: str | None = "n1"
    service_port: int = 8080
    vip: str = "198.18.0.100/24"
    networks: tuple[str, ...] = ("lan", "hb2")
    module: str = "web"
    checkers: list[dict[str, Any]] = field(default_factory=list)
    witnesses: list[dict[str, Any]] = field(default_factory=list)
    restart: dict[str, Any] | None = None
    extra_module: dict[str, Any] = field(default_factory=dict)
    # More settings of the module's replication section (with replicate=True): resync_bandwidth...
    replication_settings: dict[str, Any] = field(default_factory=dict)
    # Replicate the service's data folder: each node then runs in its own mount namespace, with its
    # own copy (disk-<node>) bind-mounted on the same path (data), as two machines would have.
    replicate: bool = False
    # Run this folder's scripts instead of the demo service's (e.g. docs/examples/postgresql/scripts).
    scripts_dir: Path | None = None
    # Extra environment of the daemons, hence of their scripts and checkers; "{node}" and "{workdir}"
    # in a value become the node's name and the lab's folder (per-node sockets, logs, ...).
    script_env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    lab: Lab | None = None
    daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._own_workdir = self.workdir is None
        # Absolute: the cluster file refuses relative paths (the daemons' working directory is arbitrary).
        self.workdir = Path(tempfile.mkdtemp(prefix="safekit-lab-")) if self.workdir is None else self.workdir.absolute()
        self.nodes = [
            NodeSpec("n1", {net: f"198.18.{i}.1/24" for i, net in enumerate(self.networks)}),
            NodeSpec("n2", {net: f"198.18.{i}.2/24" for i, net in enumerate(self.networks)}),
        ]

    # ---- building ------------------------------------------------------------------------------

    def build(self) -> LabCluster:
        self.lab = Lab()
        for net in self.networks:
            self.lab.add_network(net)
        for node in self.nodes:
            self.lab.add_host(node.name, node.addresses)
        self.lab.add_host("client", {"lan": "198.18.0.10/24"})
        self._write_files()
        return self

    @property
    def config_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "cluster.yaml"

    def _write_files(self) -> None:
        assert self.workdir is not None and self.lab is not None
        work = self.workdir
        (work / "cluster.key").write_text(secrets.token_hex(32))
        (work / "api.token").write_text(secrets.token_hex(16))
        os.chmod(work / "cluster.key", 0o600)
        os.chmod(work / "api.token", 0o600)
        (work / "service.py").write_text(SERVICE)
        scripts = work / "scripts"
        scripts.mkdir(exist_ok=True)
        # prestart cleans what a crashed daemon may have left running: the same as stop_prim here.
        for name, text in (("start_prim", START_PRIM), ("stop_prim", STOP_PRIM), ("prestart", STOP_PRIM)):
            path = scripts / name
            data = str(self.data_dir) if self.replicate else ""
            path.write_text(text.format(python=sys.executable, port=self.service_port, data=data))
            path.chmod(0o755)
        self.config_path.write_text(yaml.safe_dump(self.config_dict(), sort_keys=False))

    def config_dict(self) -> dict[str, Any]:
        assert self.workdir is not None and self.lab is not None
        module: dict[str, Any] = {
            "name": self.module,
            "preferred_primary": self.preferred,
            "vip": {"provider": "lan", "address": self.vip, "interface": self.lab.interface("n1", "lan")},
            "scripts": {"directory": str((self.scripts_dir or self.workdir / "scripts").absolute()), "timeout": 20},
            "checkers": self.checkers,
            "witnesses": self.witnesses,
        }
        if self.restart:
            module["restart"] = self.restart
        if self.replicate:
            module["replication"] = {"directories": [str(self.data_dir)], "timeout": max(2.0, 4 * self.timeout),
                                     **self.replication_settings}
        module.update(self.extra_module)
        return {
            "cluster": {"name": "demo"},
            "nodes": [{"name": n.name, "addresses": {k: v.split("/")[0] for k, v in n.addresses.items()}}
                      for n in self.nodes],
            "heartbeat": {"interval": self.interval, "timeout": self.timeout,
                          "key_file": str(self.workdir / "cluster.key")},
            "api": {"listen": "127.0.0.1:9010", "token_file": str(self.workdir / "api.token")},
            "modules": [module],
        }

    # ---- daemons -------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """The replicated folder, the same path on both nodes."""
        assert self.workdir is not None
        return self.workdir / "data"

    def disk(self, node: str) -> Path:
        """The node's own copy of the replicated folder, as seen from outside its mount namespace."""
        assert self.workdir is not None
        return self.workdir / f"disk-{node}"

    def state_dir(self, node: str) -> Path:
        assert self.workdir is not None
        return self.workdir / f"state-{node}"

    def daemon_log(self, node: str) -> Path:
        assert self.workdir is not None
        return self.workdir / f"daemon-{node}.log"

    def env(self, node: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"SAFEKIT_WORKDIR": str(self.workdir), "SAFEKIT_NODE": node})
        env.update({k: v.format(node=node, workdir=self.workdir) for k, v in self.script_env.items()})
        for var in [v for v in env if v.startswith("OTEL_")]:
            del env[var]
        return env

    def start_daemon(self, node: str) -> None:
        assert self.lab is not None
        argv = [CLI, "-c", str(self.config_path), "--node", node, "--state-dir", str(self.state_dir(node)), "run"]
        if self.replicate:
            self.disk(node).mkdir(exist_ok=True)
            self.data_dir.mkdir(exist_ok=True)
            argv = ["sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh",
                    str(self.disk(node)), str(self.data_dir), *argv]
        with open(self.daemon_log(node), "ab") as out:
            self.daemons[node] = self.lab.spawn(node, argv, env=self.env(node), stdout=out,
                                                stderr=subprocess.STDOUT, mount_namespace=self.replicate)

    def kill_daemon(self, node: str) -> None:
        """SIGKILL the daemon (not its application): a crash of safekit-cloud itself."""
        proc = self.daemons.pop(node, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def stop_daemon(self, node: str, timeout: float = 30) -> int | None:
        """SIGTERM: the daemon stops its modules cleanly, then exits."""
        proc = self.daemons.pop(node, None)
        if proc is None:
            return None
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def power_off(self, node: str) -> None:
        """The node dies: every cable pulled and every process of the node killed at once (daemon,
        replication agents, application)."""
        assert self.lab is not None
        for net in self.networks:
            self.lab.cut(node, net)
        self.lab.kill_host(node)
        self.kill_daemon(node)

    def power_on(self, node: str) -> None:
        """The node reboots: no application, no virtual IP, cables back, daemon started."""
        assert self.lab is not None
        self.lab.run(node, ["ip", "addr", "del", self.vip, "dev", self.lab.interface(node, "lan")], check=False)
        for net in self.networks:
            self.lab.restore(node, net)
        self.start_daemon(node)

    def service_pid(self, node: str) -> int | None:
        assert self.workdir is not None
        try:
            return int((self.workdir / f"run-{node}" / "service.pid").read_text())
        except (OSError, ValueError):
            return None

    def kill_service(self, node: str) -> None:
        pid = self.service_pid(node)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def app_spawn(self, node: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process where the node's application runs: its network namespace and, with
        replication, its daemon's mount namespace (so it writes through the replicated mount)."""
        assert self.lab is not None
        if self.replicate:
            daemon = self.daemons[node]
            argv = ["nsenter", f"--mount=/proc/{daemon.pid}/ns/mnt", "--", *argv]
        return self.lab.spawn(node, argv, **kwargs)

    # ---- asking the daemons (through the real CLI) ----------------------------------------------

    def cli(self, node: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        assert self.lab is not None
        argv = [CLI, "-c", str(self.config_path), "--node", node, "--state-dir", str(self.state_dir(node)), *args]
        return self.lab.run(node, argv, timeout=timeout, check=False, env=self.env(node))

    def status(self, node: str) -> dict[str, Any] | None:
        result = self.cli(node, "status", "--json", timeout=10)
        if result.returncode != 0:
            return None
        return json.loads(result.stdout)

    def module_state(self, node: str) -> str | None:
        status = self.status(node)
        if status is None:
            return None
        module = status["modules"][0]
        return module["state"] + ("" if module["data"] == "uptodate" else f"({module['data']})")

    def wait_states(self, want: dict[str, str], timeout: float = 30) -> dict[str, str | None]:
        """Wait until each node's module is in the wanted state (SECOND means up to date)."""
        deadline = time.monotonic() + timeout
        seen: dict[str, str | None] = {}
        while time.monotonic() < deadline:
            seen = {node: self.module_state(node) for node in want}
            if seen == want:
                return seen
            time.sleep(0.1)
        raise TimeoutError(f"wanted {want}, still {seen} after {timeout:g}s; logs in {self.workdir}")

    def start_probe(self, seconds: float, period: float = 0.05) -> subprocess.Popen[str]:
        """A client requesting the VIP every `period` s, one JSON line per attempt on stdout."""
        assert self.lab is not None
        vip = self.vip.split("/")[0]
        return self.lab.spawn("client", [sys.executable, "-c", PROBE, vip, str(self.service_port), str(period),
                                         str(seconds)], stdout=subprocess.PIPE, text=True)  # type: ignore[return-value]

    def close(self) -> None:
        for node in list(self.daemons):
            self.kill_daemon(node)
        for node in ("n1", "n2"):
            self.kill_service(node)
        if self.lab is not None:
            self.lab.close()
            self.lab = None
        if self._own_workdir and self.workdir is not None and not os.environ.get("SAFEKIT_KEEP_LAB"):
            subprocess.run(["rm", "-rf", str(self.workdir)], check=False)

    def __enter__(self) -> LabCluster:  # noqa: PYI034 - build() returns self
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_probe(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def outage(samples: list[dict[str, Any]], after: float, to_node: str) -> float | None:
    """Seconds from `after` to the first request served by `to_node`."""
    for s in samples:
        if s["t"] >= after and s["ok"] and s["node"] == to_node:
            return s["t"] - after
    return None
