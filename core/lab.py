"""Test hosts in network namespaces, for the integration tests and `safekit-cloud demo`.

A `Lab` is a few hosts, each one a network namespace, cabled to virtual switches. Each switch is a
Linux bridge; all the bridges of a lab live in one switch namespace of their own, so nothing is ever
created in the root namespace and no lab address can leak onto a real network. Host addresses must
come from the benchmarking ranges 198.18.0.0/15 and fd00:198:18::/48.

This is a synchronous utility: it runs `ip`, `nsenter` and `unshare` with `subprocess` and blocks
while they work (a few milliseconds each). That is fine for tests and for setting up the demo; never
call it from the daemon's event loop.

Naming: a lab has a prefix such as ``sk-3f9ka-``; host ``n1`` lives in namespace ``sk-3f9ka-n1`` and
sees its cables as ``eth0``, ``eth1``, ... in the order of its links; the switch namespace is
``sk-3f9ka-_sw``. The owner's pid is written to ``/run/safekit-cloud-lab/<prefix>.pid`` before any
namespace exists, so `cleanup_stale_labs` can remove what a crashed run left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Self

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
PID_DIR = Path("/run/safekit-cloud-lab")
FAMILY = "sk-"
LAB_RANGES = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fd00:198:18::/48"))
TERM_GRACE = 3.0  # seconds between SIGTERM and SIGKILL in close()

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,18}[a-z0-9])?$")
_PREFIX = re.compile(r"^[a-z0-9][a-z0-9-]{0,10}-$")
_SWITCH = "_sw"  # cannot clash with a host: host names never start with "_"
_CLONE_NEWNET = 0x40000000


class LabError(Exception):
    """A lab could not be built or used. The message says what failed and why."""


@dataclass
class _Link:
    network: str
    ifname: str  # inside the host: eth0, eth1, ...
    switch_ifname: str  # its peer in the switch namespace, enslaved to the network's bridge
    addresses: list[str]


@dataclass
class _Host:
    name: str
    netns: str
    links: dict[str, _Link] = field(default_factory=dict)


def _run_cmd(argv: Sequence[str], *, input: str | None = None, timeout: float = 30) -> str:
    try:
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise LabError(f"{argv[0]} is not installed (apt install iproute2 util-linux)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout:g}s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise LabError(f"{' '.join(argv)} failed: {detail}")
    return done.stdout


def _ip(*args: str, netns: str | None = None, batch: Sequence[str] = ()) -> str:
    """Run one `ip` command, or a batch of them (one process) when `batch` is given."""
    head = ["ip", "-n", netns] if netns else ["ip"]
    if batch:
        return _run_cmd([*head, "-batch", "-"], input="\n".join(batch) + "\n")
    return _run_cmd([*head, *args])


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return None


def _pids_in(inodes: set[int]) -> list[int]:
    """Pids of live processes whose network namespace is one of `inodes` (zombies have none)."""
    if not inodes:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            link = os.readlink(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if link.startswith("net:[") and int(link[5:-1]) in inodes:
            pids.append(int(entry))
    return pids


def _signal(pid: int, sig: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: with the pid it names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _check_address(host: str, network: str, address: str) -> str:
    try:
        iface = ipaddress.ip_interface(address)
    except ValueError:
        raise LabError(f"host {host}, network {network}: {address!r} is not an address with prefix "
                       "(e.g. 198.18.0.1/24)") from None
    if "/" not in address:
        raise LabError(f"host {host}, network {network}: give {address} a prefix length (e.g. /24)")
    if not any(iface.ip in net for net in LAB_RANGES):
        raise LabError(f"host {host}, network {network}: {address} is outside the lab ranges "
                       "198.18.0.0/15 and fd00:198:18::/48 (chosen so a lab never clashes with a real network)")
    return str(iface)


class Lab:
    """Hosts in network namespaces on virtual switches; `close()` (or the `with` block) removes it all.

    Everything the lab creates carries its prefix, so parallel labs never collide. Processes started
    with `spawn`/`run` run in their own process group; `close()` stops them, and any other process
    still inside one of the lab's namespaces, then deletes the namespaces, which removes the veth
    cables, the bridges and every address with them.
    """

    def __init__(self, prefix: str | None = None):
        ok, why = lab_supported()
        if not ok:
            raise LabError(f"network-namespace labs are not supported here: {why}")
        self.prefix = self._claim_prefix(prefix)
        self._networks: dict[str, str] = {}  # network -> bridge name
        self._hosts: dict[str, _Host] = {}
        self._namespaces: list[str] = []  # in creation order
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False

    # ---- building --------------------------------------------------------------------------------

    @property
    def switch_netns(self) -> str:
        return self.prefix + _SWITCH

    def add_network(self, name: str) -> None:
        """A virtual switch: a Linux bridge (no STP, no multicast snooping) in the switch namespace."""
        self._check_open()
        _check_name("network", name)
        if name in self._networks:
            raise LabError(f"network {name!r} already exists in lab {self.prefix}")
        if not self._networks:
            self._add_netns(self.switch_netns)
        bridge = f"br-{name}" if len(name) <= 12 else f"br{len(self._networks)}"
        # Without STP a port forwards at once; without snooping the bridge floods multicast like a
        # dumb switch, which is what neighbour discovery on a small LAN expects.
        _ip(netns=self.switch_netns, batch=[
            f"link add {bridge} type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
            f"link set {bridge} up",
        ])
        self._networks[name] = bridge

    def add_host(self, host: str, links: Mapping[str, str | Sequence[str]]) -> None:
        """A host cabled to each network of `links` (network -> "198.18.0.1/24", or a list of
        addresses). Cables are eth0, eth1, ... in the order given; loopback and cables are up.
        IPv6 addresses are added without duplicate address detection so they work at once."""
        self._check_open()
        _check_name("host", host)
        if host in self._hosts:
            raise LabError(f"host {host!r} already exists in lab {self.prefix}")
        plan = self._plan_links(host, links)
        record = _Host(host, self.prefix + host)
        self._add_netns(record.netns)
        self._hosts[host] = record
        commands = ["link set lo up"]
        for link in plan:
            self._cable(record, link)
            record.links[link.network] = link
            for address in link.addresses:
                nodad = " nodad" if ":" in address else ""
                commands.append(f"address add {address} dev {link.ifname}{nodad}")
            commands.append(f"link set {link.ifname} up")
        _ip(netns=record.netns, batch=commands)

    def _plan_links(self, host: str, links: Mapping[str, str | Sequence[str]]) -> list[_Link]:
        hidx = len(self._hosts)
        plan = []
        for i, (network, spec) in enumerate(links.items()):
            if network not in self._networks:
                raise LabError(f"host {host}: no network {network!r} in lab {self.prefix} (add_network first)")
            addresses = [spec] if isinstance(spec, str) else list(spec)
            checked = [_check_address(host, network, a) for a in addresses]
            ifname = f"eth{i}"
            peer = f"{host}-{ifname}" if len(host) + len(ifname) < 15 else f"h{hidx}-{ifname}"
            plan.append(_Link(network, ifname, peer, checked))
        return plan

    def _cable(self, record: _Host, link: _Link) -> None:
        bridge = self._networks[link.network]
        _ip(netns=self.switch_netns, batch=[
            f"link add {link.switch_ifname} type veth peer name {link.ifname} netns {record.netns}",
            f"link set {link.switch_ifname} master {bridge}",
            f"link set {link.switch_ifname} up",
        ])

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)

    # ---- looking -------------------------------------------------------------------------------

    def netns(self, host: str) -> str:
        return self._host(host).netns

    def interface(self, host: str, network: str) -> str:
        return self._link(host, network).ifname

    def hosts(self) -> list[str]:
        return list(self._hosts)

    def mac(self, host: str, network: str) -> str:
        """The MAC address of the host's cable on `network` (lower case, colon separated)."""
        link = self._link(host, network)
        info = json.loads(_ip("-j", "link", "show", "dev", link.ifname, netns=self.netns(host)))
        return str(info[0]["address"]).lower()

    def _host(self, host: str) -> _Host:
        try:
            return self._hosts[host]
        except KeyError:
            raise LabError(f"no host {host!r} in lab {self.prefix} (hosts: {', '.join(self._hosts)})") from None

    def _link(self, host: str, network: str) -> _Link:
        record = self._host(host)
        try:
            return record.links[network]
        except KeyError:
            raise LabError(f"host {host} has no cable on network {network!r}") from None

    # ---- running things inside a host ----------------------------------------------------------

    def spawn(self, host: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              stdin: Any = None, stdout: Any = None, stderr: Any = None, cwd: str | os.PathLike[str] | None = None,
              mount_namespace: bool = False, text: bool = False) -> subprocess.Popen[Any]:
        """Start `argv` inside the host's network namespace, in a process group of its own.

        `env` adds variables to this process's environment. `mount_namespace=True` also gives the
        process a private mount namespace (its mounts stay invisible outside). The process is
        tracked: `close()` stops it if it still runs. The returned Popen's pid is the process itself
        (nsenter and unshare exec, they do not fork).
        """
        self._check_open()
        full = self._wrap(host, argv, mount_namespace)
        environ = {**os.environ, **(env or {})}
        try:
            proc = subprocess.Popen(full, env=environ, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd,
                                    start_new_session=True, text=text)
        except OSError as exc:
            raise LabError(f"cannot start {argv[0]} on host {host}: {exc.strerror}") from None
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str], timeout: float = 30, check: bool = True, *,
            env: Mapping[str, str] | None = None, input: str | None = None,
            mount_namespace: bool = False) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the host and wait; output is captured as text. On timeout the whole
        process group is killed and LabError raised; with `check`, so is a non-zero exit."""
        proc = self.spawn(host, argv, env=env, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, mount_namespace=mount_namespace, text=True)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal(proc.pid, signal.SIGKILL, group=True)
            proc.communicate()
            raise LabError(f"on host {host}: {' '.join(argv)} did not finish within {timeout:g}s") from None
        finally:
            with contextlib.suppress(ValueError):
                self._procs.remove(proc)
        done = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise LabError(f"on host {host}: {' '.join(argv)} exited with {proc.returncode}: "
                           f"{(err or out).strip()[-2000:]}")
        return done

    def _wrap(self, host: str, argv: Sequence[str], mount_namespace: bool) -> list[str]:
        if not argv:
            raise LabError("empty command")
        full = ["nsenter", f"--net={NETNS_DIR / self.netns(host)}", "--"]
        if mount_namespace:
            full += ["unshare", "--mount", "--propagation", "private", "--"]
        return full + [str(a) for a in argv]

    @contextlib.contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """Move the calling thread into the host's network namespace for the block, then back.

        Only this thread moves; threads it starts in the block inherit the namespace (so an
        `asyncio.run` in the block, with its thread pool, runs entirely inside the host). Sockets keep
        the namespace they were created in.
        """
        target = os.open(NETNS_DIR / self.netns(host), os.O_RDONLY | os.O_CLOEXEC)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, f"host {host}")
            try:
                yield
            finally:
                _setns(home, "the original namespace")
        finally:
            os.close(target)
            os.close(home)

    # ---- faults ----------------------------------------------------------------------------------

    def cut(self, host: str, network: str) -> None:
        """Pull the host's cable on `network`: its switch port goes down, the host sees no carrier."""
        self._check_open()
        _ip("link", "set", "dev", self._link(host, network).switch_ifname, "down", netns=self.switch_netns)

    def restore(self, host: str, network: str) -> None:
        self._check_open()
        _ip("link", "set", "dev", self._link(host, network).switch_ifname, "up", netns=self.switch_netns)

    def kill_host(self, host: str) -> int:
        """SIGKILL every process inside the host's network namespace at once, as a power cut would.
        Returns how many were killed."""
        inode = _netns_inode(self.netns(host))
        pids = _pids_in({inode}) if inode is not None else []
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and inode is not None and _pids_in({inode}):
            time.sleep(0.01)
        return len(pids)

    # ---- teardown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process of the lab, delete its namespaces and its pid file. Idempotent; never
        raises (problems are logged)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_processes()
        except Exception:  # close() must go on to delete the namespaces whatever happened
            log.exception("lab %s: stopping processes failed", self.prefix)
        left = _delete_namespaces(reversed(self._namespaces))
        if left:
            log.error("lab %s: could not delete namespaces %s; the pid file stays so that "
                      "cleanup_stale_labs() can retry", self.prefix, ", ".join(left))
            return
        with contextlib.suppress(OSError):
            (PID_DIR / f"{self.prefix}.pid").unlink()

    def _stop_processes(self) -> None:
        inodes = {i for i in map(_netns_inode, self._namespaces) if i is not None}
        tracked = [p for p in self._procs if p.poll() is None]
        _terminate(tracked, inodes)
        for proc in self._procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        self._procs.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise LabError(f"lab {self.prefix} is closed")

    def _claim_prefix(self, prefix: str | None) -> str:
        """Write the pid file that reserves the prefix (two live labs never share one)."""
        PID_DIR.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            candidate = prefix or FAMILY + "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                                   for _ in range(5)) + "-"
            if not _PREFIX.match(candidate):
                raise LabError(f"lab prefix {candidate!r}: use 2-12 of a-z, 0-9 and '-', ending with '-'")
            if prefix and _owner_dead(candidate):
                cleanup_lab(candidate)
            # Written aside and linked into place: the pid file appears complete or not at all.
            scratch = PID_DIR / f".{candidate}.{os.getpid()}.tmp"
            scratch.write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
            try:
                os.link(scratch, PID_DIR / f"{candidate}.pid")
            except FileExistsError:
                if prefix:
                    raise LabError(f"lab prefix {prefix!r} is in use by a running process") from None
                continue
            finally:
                scratch.unlink()
            return candidate
        raise LabError(f"no free lab prefix found in {PID_DIR}")


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise LabError(f"{kind} name {name!r}: use 1-20 of a-z, 0-9 and '-' (not at either end)")


def _setns(fd: int, what: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise LabError(f"cannot enter the network namespace of {what}: {os.strerror(code)}")


def _terminate(tracked: list[subprocess.Popen[Any]], inodes: set[int]) -> None:
    """SIGTERM the tracked process groups and every process still inside the lab's namespaces;
    SIGKILL what is left after TERM_GRACE seconds."""
    for proc in tracked:
        _signal(proc.pid, signal.SIGTERM, group=True)
    for pid in _pids_in(inodes):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE
    while time.monotonic() < deadline:
        running = [p for p in tracked if p.poll() is None]
        if not running and not _pids_in(inodes):
            return
        time.sleep(0.02)
    for proc in tracked:
        if proc.poll() is None:
            _signal(proc.pid, signal.SIGKILL, group=True)
    for pid in _pids_in(inodes):
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and _pids_in(inodes):
        time.sleep(0.02)


def _delete_namespaces(names: Iterator[str] | Sequence[str]) -> list[str]:
    """Delete the namespaces (hosts before the switch); returns the ones that could not be deleted."""
    left = []
    for name in names:
        if not (NETNS_DIR / name).exists():
            continue
        try:
            _ip("netns", "delete", name)
        except LabError as exc:
            log.warning("%s", exc)
            left.append(name)
    return left


# ---- support check and stale labs ------------------------------------------------------------------

@cache
def lab_supported() -> tuple[bool, str]:
    """(True, "") when labs can be built here: root, `ip` and `nsenter`, and the kernel's network
    namespaces, veth and bridge. Otherwise (False, the reason). Probes once per process."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces, veth and bridges)"
    for tool, package in (("ip", "iproute2"), ("nsenter", "util-linux"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return False, f"{tool} is not installed (apt install {package})"
    probe = f"skprobe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip(netns=probe, batch=["link add skp0 type veth peer name skp1",
                                "link add skpbr type bridge", "link set skp0 master skpbr"])
    except LabError as exc:
        return False, str(exc)
    finally:
        _delete_namespaces([probe])
    return True, ""


def _read_owner(prefix: str) -> tuple[int, str] | None:
    try:
        pid, start = (PID_DIR / f"{prefix}.pid").read_text().split()
        return int(pid), start
    except (OSError, ValueError):
        return None


def _owner_dead(prefix: str) -> bool:
    """True when the prefix's pid file names a process that no longer runs (same pid, other start
    time counts as dead: the pid was reused)."""
    owner = _read_owner(prefix)
    if owner is None:
        return (PID_DIR / f"{prefix}.pid").exists()  # unreadable: damaged, nobody can own it
    pid, start = owner
    return _start_time(pid) != start


def stale_labs(family: str = FAMILY) -> list[str]:
    """Prefixes of labs of `family` whose owner process is dead."""
    try:
        files = sorted(PID_DIR.glob(f"{family}*.pid"))
    except OSError:
        return []
    return [f.name[:-4] for f in files if _owner_dead(f.name[:-4])]


def lab_namespaces(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def cleanup_lab(prefix: str) -> list[str]:
    """Remove what the lab `prefix` left: stop the processes still inside its namespaces, delete the
    namespaces (hosts first), then its pid file. Returns the namespaces deleted."""
    names = lab_namespaces(prefix)
    inodes = {i for i in map(_netns_inode, names) if i is not None}
    _terminate([], inodes)
    names.sort(key=lambda n: n.endswith(_SWITCH))
    left = _delete_namespaces(names)
    if not left:
        with contextlib.suppress(OSError):
            (PID_DIR / f"{prefix}.pid").unlink()
    return [n for n in names if n not in left]


def cleanup_stale_labs(family: str = FAMILY) -> list[str]:
    """Remove the namespaces (and the processes inside them) of every lab of `family` whose owner
    process is dead: what a crashed or killed earlier run left behind. Labs of live owners are never
    touched. Returns the namespaces deleted."""
    removed: list[str] = []
    for prefix in stale_labs(family):
        try:
            removed += cleanup_lab(prefix)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cleaning stale lab %s: %s", prefix, exc)
    return removed
