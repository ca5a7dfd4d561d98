"""The small interface the engine uses: become primary, become secondary, stop, status.

It owns agent processes (agent.py): on the primary one per replicated directory (a FUSE mount each),
on the secondary one receiver for the module. Their events arrive as JSON lines; a link loss is
reported once per loss through `on_link_lost(reason)`, which the engine turns into
REPLICATION_LOST (PRIM -> ALONE; the secondary is no longer up to date).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the engine passes it in; replication does not depend on the config layer
    from safekit_cloud.core.config import ReplicationConfig

from . import unwatched
from .busypoll import DEFAULT_MAX_WINDOW
from .exclude import Excluder
from .journal import directories_marker, journal_path, mark_writable, writable_marker
from .mount import abort_connection, mounted_fuse_at, unmount
from .protect import (
    is_protected,
    made_in_another_boot,
    marker_path as protect_marker,
    protect_beneath,
    unprotect,
)
from .signals import PEER_LOST_SIGNAL, REFUSE_HELD_WRITES_SIGNAL, RELEASE_WRITES_SIGNAL
from .verify import VerifyError, verify_module

log = logging.getLogger(__name__)

STOP_TIMEOUT = 20.0  # an agent drains (2 s), closes its session (5 s), waits for the last acks (10 s)
READY_TIMEOUT = 30.0  # of silence: an agent walking a large tree first reports its progress


@dataclass
class _Agent:
    name: str
    proc: asyncio.subprocess.Process
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    failed: str = ""
    synced: bool = False  # primary agent: its resync completed and the link held since
    heard: float = field(default_factory=time.monotonic)  # when its last line came (watchdog)
    mount_point: bytes | None = None  # primary agent: where its mount is, resolved before it


class ReplicationService:
    # Seconds after which a primary agent releases held writes by itself (resync.py, "Holding
    # writes"). None: only the engine does (release_writes), as it must; for a caller without an
    # engine, such as the tests that drive this service alone.
    hold_limit: float | None = None

    def __init__(self, module_name: str, config: ReplicationConfig, peer_address: str, key: bytes,
                 state_dir: Path | str, on_link_lost: Callable[[str], None] | None = None,
                 listen_address: str = "0.0.0.0", timeout: float = 10.0,
                 receive_into: dict[Path, Path] | None = None,
                 on_resync_done: Callable[[], None] | None = None,
                 on_agent_failed: Callable[[str], None] | None = None) -> None:
        """`receive_into` redirects, on the secondary, a replicated directory to another local path
        (two nodes on one machine without mount namespaces, tests); normally the path is the same.
        `on_agent_failed(reason)`: an agent of this node died (its mount or its receiver is gone:
        the engine restarts the module's replication); without it, reported as a lost link."""
        self.module = module_name
        self.config = config
        self.peer_address = peer_address
        self.key = key
        self.state_dir = Path(state_dir)
        self.on_link_lost = on_link_lost
        self.on_resync_done = on_resync_done  # the agent reported "resync_done": the replica is current
        self.on_agent_failed = on_agent_failed
        self.listen_address = listen_address
        self.timeout = timeout
        self.receive_into = {Path(k): Path(v) for k, v in (receive_into or {}).items()}
        self.role = "stopped"
        self._agents: list[_Agent] = []
        self._last_lost = ""  # why the link (or an agent) was last lost: status "last_lost"
        self._start_error = ""  # why this node's agents did not start last time ("" once they do)
        self._synced_dirs: set[str] = set()  # secondary: directories resynchronised, link held since
        # Primary: descriptors of the replicated directories opened before the mounts, so verify
        # reads the real files beneath the FUSE layer (never through it).
        self._local_fds: dict[Path, int] = {}
        self._verify_lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None
        self._last_verify: dict[str, Any] | None = None

    # ---- roles ----

    async def become_primary(self, base_generation: int | None = None, hold_writes: bool = False) -> None:
        """Mount over every replicated directory and stream to the peer (journal if it is away).
        Returns once every mount is in place: the application may start.
        `base_generation` (optional): the data generation both nodes shared when replication last
        held; recorded with a new journal and compared (as a diagnostic) with the secondary's.
        `hold_writes`: the peer is an up-to-date secondary (a handover): writes it does not have
        are acknowledged only after the first resync (or `release_writes`, see resync.py)."""
        await self._stop_agents()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._check_protection()
        self._unprotect_all()  # a crashed secondary's read-only bind must not be under our mount
        self._open_local_fds()
        for directory in self.config.directories:
            argv = ["--role", "primary", "--directory", str(directory), "--local", str(self._local_dir(directory)),
                    "--peer", f"{self._bracket(self.peer_address)}:{self.config.port}"]
            argv += [f"--exclude={p}" for p in self.config.exclude]
            argv += self._resync_argv(base_generation) + (["--hold-writes"] if hold_writes else [])
            if self.hold_limit is not None:
                argv.append(f"--hold-limit={self.hold_limit}")
            # Resolved now, before the mount: the watchdog must not ask a mount that may be hung.
            await self._spawn(str(directory), argv, mount_point=os.fsencode(self._local_dir(directory)))
        self.role = "primary"
        self._start_watchdog()

    async def become_secondary(self, generation: int | None = None, fullsync: bool = False) -> None:
        """Receive for every replicated directory (the application must not run here).
        `generation` (optional): this node's data generation, reported to the primary.
        `fullsync`: forget what this node's trees are known to hold, so the next resync compares
        every block (`second --fullsync`)."""
        await self._stop_agents()
        self._check_protection()
        argv = ["--role", "secondary", "--listen", f"{self._bracket(self.listen_address)}:{self.config.port}"]
        argv += [f"--directory-list={d}={self._local_dir(d)}" for d in self.config.directories]
        argv += self._resync_argv(generation) + (["--fullsync"] if fullsync else [])
        await self._spawn("receiver", argv)
        self.role = "secondary"
        self._start_watchdog()

    async def stop(self) -> None:
        # A stopped module leaves its directories writable, as before it started (the agents leave
        # them read-only, for a next role). What is changed there from now on goes around us: the
        # next agent looks for it (unwatched.py). Marked first: the marker must not be later than
        # the moment the directory became writable (a change the agents made just before counts
        # twice, harmless); a bind already gone counts from when it was made.
        self._check_protection()
        watched = [d for d in self.config.directories if not writable_marker(self._journal(d)).exists()]
        self._mark_unwatched(self.config.directories)
        await self._stop_agents()
        await self._record_directories(watched)
        self._unprotect_all()
        self.role = "stopped"

    def _journal(self, directory: Path | str) -> Path:
        return journal_path(self.state_dir, self.module, os.fsencode(str(directory)))

    async def _record_directories(self, directories: list[Path] | list[str]) -> None:
        """While our read-only binds still cover the trees (watched until now): the identity of
        each of their directories, so that a directory whose entries change while the module is
        stopped is compared by its entries, not as a whole subtree (unwatched.py)."""
        excluder = Excluder(list(self.config.exclude))
        for directory in directories:
            local, marker = self._local_dir(directory), directories_marker(self._journal(directory))
            try:
                if not is_protected(local):
                    marker.unlink(missing_ok=True)
                    continue
                fd = os.open(local, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    count = await asyncio.to_thread(unwatched.record_directories, fd, marker, excluder.excluded)
                finally:
                    os.close(fd)
                log.info("%s: the identity of its %d directories recorded", local, count)
            except OSError as exc:  # changed directories are then compared whole: slower, not wrong
                log.warning("cannot record the directories of %s: %s", local, exc)
                marker.unlink(missing_ok=True)

    def peer_lost(self) -> None:
        """Heartbeats declared the peer lost: the primary gives the link up at once, so the
        application's pending writes complete now rather than after the acknowledgement timeout."""
        if self.role != "primary":
            return
        for agent in self._agents:
            if agent.proc.returncode is None:
                agent.proc.send_signal(PEER_LOST_SIGNAL)

    def _primary_agents(self) -> list[_Agent]:
        return [a for a in self._agents if a.name != "receiver"]

    def _holders(self) -> list[_Agent]:
        """The running primary agents that hold the application's writes (resync.py, "Holding writes")."""
        return [a for a in self._primary_agents() if a.proc.returncode is None and a.status.get("writes_held") is not None]

    @property
    def live(self) -> bool:
        """The primary replicates synchronously: every directory's resync is done and its link held since."""
        mine = self._primary_agents()
        return (self.role == "primary" and len(mine) == len(self.config.directories)
                and all(a.synced and a.status.get("connected") for a in mine))

    def writes_held(self) -> float | None:
        """Seconds the primary has held the application's writes; None: it holds none."""
        return max((a.status["writes_held"] for a in self._holders()), default=None)

    def release_writes(self) -> None:
        """The peer can no longer take over without what the primary holds: acknowledge it."""
        self._signal_holders(RELEASE_WRITES_SIGNAL)

    def refuse_held_writes(self) -> None:
        """This node leaves the primary role: what it holds fails instead (resync.py)."""
        self._signal_holders(REFUSE_HELD_WRITES_SIGNAL)

    def _signal_holders(self, sig: int) -> None:
        for agent in self._holders():
            agent.proc.send_signal(sig)

    def _resync_argv(self, generation: int | None) -> list[str]:
        argv = [f"--journal-block={getattr(self.config, 'journal_block', 4096)}"]
        bandwidth = getattr(self.config, "resync_bandwidth", None)
        if bandwidth:
            argv.append(f"--resync-bandwidth={bandwidth}")
        if generation is not None:
            argv.append(f"--generation={generation}")
        return argv

    @staticmethod
    def _resync_progress(statuses: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The resyncs running now, summed over the directories (None: none)."""
        runs = [s["resync"] for s in statuses if s.get("resync")]
        if not runs:
            return None
        out: dict[str, Any] = {k: sum(r.get(k) or 0 for r in runs) for k in (
            "bytes_total", "bytes_done", "bytes_sent", "files_total", "files_done", "namespace_ops",
            "entries_listed")}
        etas = [r.get("eta_seconds") for r in runs]
        out.update(
            directories=len(runs), modes=sorted({r.get("mode") for r in runs}),
            phases=sorted({r.get("phase") for r in runs}),
            started_at=min(r.get("started_at") or 0 for r in runs),
            rate_bytes_per_s=sum(r.get("rate_bytes_per_s") or 0 for r in runs),
            eta_seconds=None if any(e is None for e in etas) else max(etas),
            bandwidth_cap_bytes_per_s=runs[0].get("bandwidth_cap_bytes_per_s"),
        )
        return out

    @staticmethod
    def _last_resync(statuses: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The latest resync of each directory (finished or interrupted), summed."""
        runs = [s["last_resync"] for s in statuses if s.get("last_resync")]
        if not runs:
            return None
        out: dict[str, Any] = {k: sum(r.get(k) or 0 for r in runs) for k in (
            "bytes_total", "bytes_done", "bytes_sent", "files_total", "files_done", "namespace_ops",
            "entries_listed")}
        out.update(directories=len(runs), modes=sorted({r.get("mode") for r in runs}),
                   results=sorted({r.get("result") for r in runs}),
                   seconds=max(r.get("elapsed") or 0 for r in runs),
                   finished_at=max((r.get("finished_at") or 0 for r in runs), default=0) or None)
        return out

    def status(self) -> dict[str, Any]:
        agents = {a.name: dict(a.status, alive=a.proc.returncode is None, failed=a.failed, pid=a.proc.pid)
                  for a in self._agents}
        primary = [a.status for a in self._agents if self.role == "primary"]
        return {
            "role": self.role,
            "connected": bool(primary) and all(s.get("connected") for s in primary),
            "dirty": any(s.get("dirty") for s in primary),
            "bytes_sent": sum(s.get("bytes_sent", 0) for s in primary),
            "inflight_bytes": sum(s.get("inflight", 0) for s in primary),
            "lag_seconds": max((s.get("lag") or 0.0 for s in primary), default=0.0),
            # Seconds the application's writes have been held (resync.py, "Holding writes"); None: none.
            "writes_held": self.writes_held(),
            # Progress of the resyncs running now (bytes to send or compare, done, sent, files, ETA).
            "resync": self._resync_progress(primary),
            # The latest resync of each directory once over ("results": done / interrupted).
            "last_resync": self._last_resync(primary),
            "synced": (all(a.synced for a in self._agents) if self.role == "primary" and self._agents
                       else self.role == "secondary" and self._all_synced_dirs()),
            "agents": agents,
            "last_lost": self._last_lost,
            "start_error": self._start_error or None,
            "last_verify": self._last_verify,
        }

    # ---- verify ----

    async def verify(self) -> dict[str, Any]:
        """Compare this primary's replicated directories with the secondary's copies, online (see
        verify.py); the report: {"identical": bool, "differences": [...], "counts": ...}.
        VerifyError if this node is not the primary or the secondary's receiver cannot be reached."""
        if self.role != "primary":
            raise VerifyError(f"verify runs on the primary; this node's replication role is {self.role}")
        async with self._verify_lock:
            missing = [str(d) for d in self.config.directories if Path(d) not in self._local_fds]
            if missing:
                raise VerifyError(f"no local descriptor of {', '.join(missing)} (not opened at become_primary)")
            st = self.status()
            notes = []
            if not st["connected"]:
                notes.append("the replication link is down: the secondary is out of date until resynchronised")
            if st["dirty"]:
                notes.append("the secondary misses changes made while alone (dirty): differences are expected")
            report = await verify_module(
                self.module, [(os.fsencode(str(d)), self._local_fds[Path(d)]) for d in self.config.directories],
                self.peer_address, self.config.port, self.key, list(self.config.exclude),
                timeout=self.timeout, notes=notes)
        self._last_verify = {k: report[k] for k in ("identical", "total_differences", "finished_at")}
        return report

    def _local_dir(self, directory: Path | str) -> Path:
        """Where `directory` is on this node, symlinks resolved: mounts are made, found and
        removed by their real path (umount and move_mount do not follow a final symlink)."""
        return Path(os.path.realpath(self.receive_into.get(Path(directory), Path(directory))))

    def _unprotect_all(self) -> None:
        """Remove our read-only binds."""
        for directory in self.config.directories:
            for local in {Path(directory), self._local_dir(directory)}:
                try:
                    unprotect(local, protect_marker(self.state_dir, self.module, local))
                except OSError as exc:
                    log.error("cannot remove the read-only protection of %s: %s", local, exc)

    def _check_protection(self) -> None:
        """A read-only bind of ours that is gone (removed by hand while the daemon was down, say):
        whatever changed since it was made went around us."""
        for directory in self.config.directories:
            for local in {Path(directory), self._local_dir(directory)}:
                marker = protect_marker(self.state_dir, self.module, local)
                try:
                    if not marker.exists() or is_protected(local):
                        continue
                    # Gone with a reboot: the journal knows since when (its boot). Else removed by hand.
                    if not made_in_another_boot(marker):
                        log.warning("the read-only bind over %s was removed behind our back: what changed there "
                                    "since is compared at the next resync", local)
                        self._mark_unwatched([directory], marker.stat().st_mtime_ns)
                    marker.unlink()
                except OSError as exc:
                    log.error("cannot check the read-only protection of %s: %s", local, exc)

    def _cover(self, directory: Path) -> None:
        """A killed agent's dead mount is about to go: our read-only bind beneath it first, as the
        agent itself does at a stop (protect.py), else the directory is marked unwatched."""
        fd = self._local_fds.get(directory)
        local = self._local_dir(directory)
        if fd is not None:
            try:
                protect_beneath(fd, local, protect_marker(self.state_dir, self.module, local))
                return
            except OSError as exc:
                log.warning("cannot put a read-only bind beneath the dead mount over %s: %s", directory, exc)
        self._mark_unwatched([directory])

    def _mark_unwatched(self, directories: list[Path] | list[str], since_ns: int | None = None) -> None:
        for directory in directories:
            try:
                mark_writable(self._journal(directory), since_ns)
            except OSError as exc:  # then changes made from now on may go unnoticed: say so
                log.error("cannot record that %s is writable with no agent watching it: %s", directory, exc)

    def _open_local_fds(self) -> None:
        self._close_local_fds()
        for directory in self.config.directories:
            local = self._local_dir(directory)
            try:
                unmount(local)  # a dead mount of a crashed agent would hide the directory
            except OSError as exc:
                log.error("cannot unmount %s: %s", directory, exc)
            try:
                self._local_fds[Path(directory)] = os.open(local, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:  # the agent will report it too; verify says so
                log.error("cannot open %s: %s", directory, exc)

    def _close_local_fds(self) -> None:
        for fd in self._local_fds.values():
            os.close(fd)
        self._local_fds.clear()

    # ---- agents ----

    @staticmethod
    def _bracket(host: str) -> str:
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    async def _spawn(self, name: str, argv: list[str], mount_point: bytes | None = None) -> None:
        cmd = [sys.executable, "-m", "safekit_cloud.core.replication.agent", "--module", self.module,
               "--state-dir", str(self.state_dir), "--protocol", self.config.protocol,
               "--timeout", str(self.timeout),
               f"--busy-poll-us={getattr(self.config, 'busy_poll_us', DEFAULT_MAX_WINDOW * 1e6):g}", *argv]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C to the daemon must not reach the agent before its unmount
        )
        assert proc.stdin is not None
        proc.stdin.write(self.key.hex().encode() + b"\n")
        await proc.stdin.drain()
        proc.stdin.close()
        agent = _Agent(name, proc, mount_point=mount_point)
        agent.reader = asyncio.create_task(self._read_events(agent), name=f"repl-agent-{name}")
        self._agents.append(agent)
        while not agent.ready.is_set() and not agent.failed:
            try:
                await asyncio.wait_for(agent.ready.wait(), 1.0)
            except TimeoutError:
                if time.monotonic() - agent.heard > READY_TIMEOUT:
                    agent.failed = f"not ready, and silent for {READY_TIMEOUT:g} s"
        if agent.failed:
            # Reported by this exception, so its exit is not reported again as a lost link (the
            # engine took a receiver that could not bind its port for a link lost).
            self._agents.remove(agent)
            await self._end(agent)
            self._start_error = f"replication agent {name} failed: {agent.failed}"
            raise RuntimeError(self._start_error)
        self._start_error = ""

    async def _read_events(self, agent: _Agent) -> None:
        assert agent.proc.stdout is not None
        while line := await agent.proc.stdout.readline():
            agent.heard = time.monotonic()
            try:
                event = json.loads(line)
            except ValueError:
                log.warning("agent %s: %r", agent.name, line[:200])
                continue
            self._on_event(agent, event)
        await agent.proc.wait()
        if self.role != "stopping" and agent in self._agents:
            agent.failed = agent.failed or f"exited with {agent.proc.returncode}"
            agent.ready.set()
            reason = f"agent {agent.name} {agent.failed}"
            if self.on_agent_failed is None or self.role not in ("primary", "secondary"):
                self._link_lost(reason)
                return
            self._last_lost = reason  # shown as last_lost, like a lost link
            try:
                self.on_agent_failed(reason)
            except Exception:
                log.exception("on_agent_failed callback failed")

    def _on_event(self, agent: _Agent, event: dict[str, Any]) -> None:
        kind = event.pop("event", "")
        if kind == "status":
            agent.status = event | {"at": time.time()}
            return
        agent.events.append(dict(event, event=kind))
        del agent.events[:-50]
        log.info("replication %s: %s %s", agent.name, kind, event)
        if kind == "ready":
            agent.status.update(event)
            agent.ready.set()
        elif kind == "failed":
            agent.failed = event.get("reason", "failed")
            agent.ready.set()
        elif kind in ("resync_started", "disconnected"):
            self._set_synced(agent, event, False)  # (a secondary's stream ended: see receiver.py)
        elif kind == "resync_done":
            # Reported once every directory of the module is resynchronised (on either side).
            if self._set_synced(agent, event, True) and self.on_resync_done is not None:
                try:
                    self.on_resync_done()
                except Exception:
                    log.exception("on_resync_done callback failed")
        elif kind == "lost":
            agent.status["connected"] = False
            self._set_synced(agent, event, False)
            self._link_lost(f"{agent.name}: {event.get('reason', '')}")

    def _set_synced(self, agent: _Agent, event: dict[str, Any], synced: bool) -> bool:
        """Record a directory's resync state; True if every directory is now synced."""
        if agent.name == "receiver":
            directory = str(event.get("directory", ""))
            if synced:
                self._synced_dirs.add(directory)
            else:
                self._synced_dirs.discard(directory)
            return self._all_synced_dirs()
        agent.synced = synced
        mine = self._primary_agents()
        return synced and len(mine) == len(self.config.directories) and all(a.synced for a in mine)

    def _all_synced_dirs(self) -> bool:
        return all(str(d) in self._synced_dirs for d in self.config.directories)

    def _link_lost(self, reason: str) -> None:
        self._last_lost = reason
        if self.on_link_lost is not None:
            try:
                self.on_link_lost(reason)
            except Exception:
                log.exception("on_link_lost callback failed")

    def _start_watchdog(self) -> None:
        limit = getattr(self.config, "agent_timeout", 0)
        if limit and self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch_agents(limit), name="repl-agent-watchdog")

    async def _watch_agents(self, limit: float) -> None:
        """An agent writes a status line every second; one silent for `limit` seconds is hung (a
        deadlock, a stop signal): the application must not wait on its mount for ever. Its mount is
        aborted, it is killed, and its exit is reported as a failed agent (the module restarts it)."""
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            for agent in list(self._agents):
                if agent.proc.returncode is None and not agent.failed and now - agent.heard > limit:
                    agent.failed = f"not responding for {now - agent.heard:.0f} s: its mount aborted and it was killed"
                    log.error("replication agent %s %s", agent.name, agent.failed)
                    if agent.mount_point is not None:
                        abort_connection(agent.mount_point)
                    agent.proc.kill()

    @staticmethod
    async def _end(agent: _Agent) -> None:
        """Stop `agent` (SIGTERM: it unmounts what it mounted; killed if it ignores that) and wait
        for its event reader to end."""
        if agent.proc.returncode is None:
            agent.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await agent.proc.wait()
        except TimeoutError:
            log.error("replication agent %s ignored SIGTERM: killing it", agent.name)
            agent.proc.kill()
            await agent.proc.wait()
        if agent.reader is not None:
            await asyncio.gather(agent.reader, return_exceptions=True)

    async def _stop_agents(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        self._synced_dirs.clear()
        agents, previous = self._agents, self.role
        self.role = "stopping"
        for agent in agents:
            if agent.proc.returncode is None:
                agent.proc.send_signal(signal.SIGTERM)
        for agent in agents:
            await self._end(agent)
        self._agents = []
        if previous == "primary":
            for directory in self.config.directories:
                try:
                    if mounted_fuse_at(self._local_dir(directory)):  # a killed agent leaves a dead mount behind
                        self._cover(Path(directory))
                        unmount(self._local_dir(directory))
                except OSError as exc:
                    log.error("cannot unmount %s: %s", directory, exc)
            self._close_local_fds()
        # A receiver leaves its read-only binds (so does a killed one): the next receiver keeps
        # them, become_primary and stop remove them.
        self.role = previous
