"""A throw-away GlusterFS replica-2 volume on this machine, for side-by-side benchmarks.

    with gluster_volume(Path("/var/tmp")) as vol:
        run_workload(vol.mount)        # a FUSE mount (mount -t glusterfs 127.0.0.2:/VOL)
        vol.pids()                     # glusterd, the 2 bricks, the self-heal daemon, the FUSE client

What it does, and undoes on exit (also after an error or Ctrl-C: every step registers its undo first):
- a private glusterd (`glusterd -N`, our own child, stopped by its PID at the end) whose working
  directory, run directory, logs and CLI socket all lie in a temporary directory, listening on
  127.0.0.2 only. Its hook scripts directory is empty, so no Samba/NFS-Ganesha hook runs. If a
  glusterd is already running, that one is used (default CLI socket) and left running;
- a replica 2 volume, both bricks on 127.0.0.2 (facts.md: not 127.0.0.1) in two directories of the
  temporary directory (`force`: bricks on the root file system). Options: GlusterFS's defaults, which
  are synchronous replication (AFR writes to both bricks; fsync is sent to both and returns when both
  did it), i.e. what our protocol C guarantees at fsync. `options` are `volume set` before the start;
- the FUSE mount, its client log in the temporary directory.
glusterd writes a few things outside its working directory whatever the options (brick and
self-heal daemon sockets in /run/gluster, /run/gluster/snaps, /var/lib/glusterd/{geo-replication,
ss_brick}): those that were not there before are removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

NOT_INSTALLED = "GlusterFS not installed: run scripts/bench-setup.sh"
HOST = "127.0.0.2"
# Created by glusterd at fixed places whatever its working directory (checked with glusterfs 10.3).
RESIDUE = [Path("/run/gluster/snaps"), Path("/var/lib/glusterd/geo-replication"),
           Path("/var/lib/glusterd/ss_brick")]
CLI_TIMEOUT = 120.0


class GlusterUnavailable(RuntimeError):
    """GlusterFS is not installed or could not be set up; the message says why."""


def installed() -> bool:
    return all(shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
               for b in ("glusterd", "gluster", "glusterfs", "mount.glusterfs"))


def version() -> str:
    out = subprocess.run(["glusterfs", "--version"], check=False, capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "glusterfs"


@dataclass
class GlusterVolume:
    name: str
    mount: Path
    work: Path  # the temporary directory: bricks, glusterd state, logs
    glusterd_pid: int
    started_glusterd: bool
    cli: Callable[..., str]
    options: dict[str, str] = field(default_factory=dict)

    def get(self, *keys: str) -> dict[str, str]:
        """The volume's effective value of each option in `keys` (`gluster volume get`)."""
        out = {}
        for line in self.cli("volume", "get", self.name, "all").splitlines():
            parts = line.split()
            if parts and parts[0] in keys:
                out[parts[0]] = " ".join(parts[1:]).replace(" (DEFAULT)", "")
        return {k: out.get(k, "?") for k in keys}

    def pids(self) -> list[int]:
        """The processes that serve this volume: glusterd, bricks, self-heal daemon, FUSE client."""
        ours = [pid for pid, argv in _processes().items() if any(str(self.work) in a for a in argv)]
        return [self.glusterd_pid, *(p for p in ours if p != self.glusterd_pid)]


# ---- processes ----

def _processes() -> dict[int, list[str]]:
    """PID -> argv of every process whose command line we can read."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                raw = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if raw:
                out[int(entry.name)] = raw.rstrip(b"\0").decode(errors="replace").split("\0")
    return out


def _running_glusterd() -> int | None:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                comm = Path(entry.path, "comm").read_text().strip()
                state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if comm == "glusterd" and state != "Z":
                return int(entry.name)
    return None


def _ours(pid: int, marker: str) -> bool:
    """`pid` still runs and its command line names `marker` (guards against a reused PID)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker.encode() in raw


def _stop_pid(pid: int, marker: str, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`, a process we started (checked by its command line)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _ours(pid, marker):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _ours(pid, marker) and not _zombie(pid):
            time.sleep(0.05)
        if _zombie(pid) or not _ours(pid, marker):
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# ---- glusterd and its CLI ----

def _cli(sock: Path | None, log: Path) -> Callable[..., str]:
    base = ["gluster", "--mode=script", f"--log-file={log}"]
    if sock is not None:
        base.append(f"--glusterd-sock={sock}")

    def run(*args: str, check: bool = True) -> str:
        p = subprocess.run([*base, *args], check=False, capture_output=True, text=True, timeout=CLI_TIMEOUT)
        if check and p.returncode != 0:
            raise GlusterUnavailable(f"gluster {' '.join(args)}: {(p.stdout + p.stderr).strip()}")
        return p.stdout

    return run


def _start_glusterd(work: Path, stack: contextlib.ExitStack,
                    log: Callable[[str], None]) -> tuple[subprocess.Popen[bytes], Path]:
    for d in ("glusterd", "run", "log"):
        (work / d).mkdir()
    sock = work / "gd.sock"
    opts = {"working-directory": work / "glusterd", "run-directory": work / "run",
            "glusterd-sockfile": sock, "transport.socket.bind-address": HOST,
            "cluster-test-mode": work / "log"}  # the log directory of bricks and daemons
    argv = ["glusterd", "-N", f"--log-file={work / 'log' / 'glusterd.log'}"]
    for k, v in opts.items():
        argv += ["--xlator-option", f"management.{k}={v}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # Ctrl-C is ours to handle
    stack.callback(_quiet(f"stopping glusterd (PID {proc.pid})", _stop_glusterd, proc, log=log))
    cli = _cli(sock, work / "log" / "cli.log")
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise GlusterUnavailable(f"glusterd exited ({proc.returncode}): {_tail(work / 'log' / 'glusterd.log')}")
        try:
            cli("volume", "list")
            return proc, sock
        except GlusterUnavailable:
            if time.monotonic() > deadline:
                raise GlusterUnavailable(f"glusterd not answering: {_tail(work / 'log' / 'glusterd.log')}")
            time.sleep(0.2)


def _stop_glusterd(proc: subprocess.Popen[bytes]) -> None:
    """Stop our glusterd and its helpers still running in its process group (the gsyncd.py calls
    of its start-up, which write /var/lib/glusterd/geo-replication). Bricks and the self-heal daemon
    have left the group (they daemonize): the volume stop and _reap handle them."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None and not _group_alive(proc.pid):
            return  # (checked first: a group id is never reused while a member lives)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)  # the group we created (start_new_session): glusterd's PID
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
        deadline = time.monotonic() + wait
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    """A live (not zombie) process is left in process group `pgid`."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


# ---- volume and mount ----

def _unmount(mount: Path) -> None:
    if not os.path.ismount(mount):
        return
    if subprocess.run(["umount", str(mount)], check=False, capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)  # busy: detach now


def _stop_volume(cli: Callable[..., str], name: str) -> None:
    if name not in cli("volume", "list", check=False).split():
        return
    try:
        cli("volume", "stop", name)
    except GlusterUnavailable:
        cli("volume", "stop", name, "force")
    cli("volume", "delete", name)


def _remove_new(paths: list[Path], existed: set[Path]) -> None:
    for p in paths:
        if p not in existed:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def _snapshot(work: Path, pids: list[int], sockets: list[Path]) -> None:
    """Before the teardown: the processes serving `work` (bricks, self-heal daemon, FUSE client) and
    the -S sockets they made in /run/gluster, which glusterd does not remove."""
    for pid, argv in _processes().items():
        if any(str(work) in a for a in argv):
            pids.append(pid)
            if "-S" in argv[:-1]:
                sockets.append(Path(argv[argv.index("-S") + 1]))


def _reap(work: Path, pids: list[int]) -> None:
    """Last: whatever still runs for `work` is stopped by its PID: those of the snapshot, and any
    process whose command line names `work` (a glusterd whose start was interrupted, its helpers)."""
    for pid in dict.fromkeys([*pids, *(p for p, argv in _processes().items() if any(str(work) in a for a in argv))]):
        if pid != os.getpid():
            _stop_pid(pid, str(work))


def _quiet(what: str, fn: Callable[..., object], *args: object, log: Callable[[str], None]) -> Callable[[], None]:
    """A cleanup step that reports its failure and lets the next steps run."""
    def step() -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - cleanup goes on; the message says what may be left
            log(f"gluster cleanup: {what} failed: {exc}")
    return step


@contextlib.contextmanager
def gluster_volume(base: Path | str, options: Mapping[str, str] | None = None,
                   log: Callable[[str], None] = print) -> Iterator[GlusterVolume]:
    """A mounted GlusterFS replica 2 volume (bricks on 127.0.0.2) in a temporary directory under
    `base`, removed with everything it started on exit. Raises GlusterUnavailable (NOT_INSTALLED when
    it is not installed) before yielding if it cannot be set up, after undoing what was done."""
    if not installed():
        raise GlusterUnavailable(NOT_INSTALLED)
    if os.geteuid() != 0:
        raise GlusterUnavailable("GlusterFS side by side needs root (glusterd, mount)")
    existed = {p for p in RESIDUE if p.exists()}
    # Undo steps run in reverse order of registration, each one even if an earlier one failed:
    # snapshot, unmount, volume stop + delete, our glusterd stop, leftover processes, sockets,
    # glusterd's files outside `work`, `work`.
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="gluster-", dir=base))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        os.chmod(work, 0o755)  # other users reach the mount below it (pgbench runs as postgres)
        stack.callback(_quiet("removing glusterd's files", _remove_new, RESIDUE, existed, log=log))
        sockets: list[Path] = []
        stack.callback(_quiet("removing sockets", _remove_new, sockets, set(), log=log))
        pids: list[int] = []
        stack.callback(_quiet("stopping leftover processes", _reap, work, pids, log=log))
        name = f"skbench{os.getpid()}"
        running = _running_glusterd()
        if running is None:
            proc, sock = _start_glusterd(work, stack, log)
            gd_pid, cli = proc.pid, _cli(sock, work / "log" / "cli.log")
        else:
            log(f"gluster: using the glusterd already running (PID {running}); it stays running")
            (work / "log").mkdir()
            gd_pid, cli = running, _cli(None, work / "log" / "cli.log")
        stack.callback(_quiet(f"stopping and deleting volume {name}", _stop_volume, cli, name, log=log))
        mount = work / "mnt"
        mount.mkdir()
        stack.callback(_quiet(f"unmounting {mount}", _unmount, mount, log=log))
        stack.callback(_snapshot, work, pids, sockets)
        bricks = [work / "brick1", work / "brick2"]
        for b in bricks:
            b.mkdir()
        cli("volume", "create", name, "replica", "2", *(f"{HOST}:{b}" for b in bricks), "force")
        for k, v in (options or {}).items():
            cli("volume", "set", name, k, v)
        cli("volume", "start", name)
        p = subprocess.run(["mount", "-t", "glusterfs", "-o", f"log-file={work / 'log' / 'mount.log'}",
                            f"{HOST}:/{name}", str(mount)], check=False, capture_output=True, text=True,
                           timeout=CLI_TIMEOUT)
        if p.returncode != 0 or not os.path.ismount(mount):
            raise GlusterUnavailable(f"mount failed: {p.stderr.strip()} {_tail(work / 'log' / 'mount.log')}")
        yield GlusterVolume(name, mount, work, gd_pid, running is None, cli, dict(options or {}))
