"""One replication process: the FUSE primary of one directory, or the receiver of a module.

Why a process: FUSE traffic must not steal the engine's event loop (heartbeats have deadlines).
The service starts agents and talks to them through pipes:
the key arrives on stdin (never on the command line), events leave on stdout as JSON lines:
  {"event": "ready"} once mounted / listening, {"event": "connected"}, {"event": "lost", "reason"},
  {"event": "resync_started", "mode"}, {"event": "resync_done", ...} (the primary: per directory; the
  secondary's receiver: with "directory"), {"event": "disconnected", "directory", "reason"},
  {"event": "status", ...} every second, {"event": "stopped"} at the end; the secondary's "ready" and
  "status" list the directories it made read-only for applications ("protected", see protect.py),
  and {"event": "warning", "reason"} says when it could not. The primary's {"event": "holding"} and
  {"event": "released", "seconds"} bracket a time its writes are held (resync.py, "Holding writes").
SIGTERM stops cleanly (unmount, close the stream); so does the death of the daemon (PR_SET_PDEATHSIG,
or our stdout breaking). The service's other signals: signals.py.

The primary keeps (re)connecting to the secondary's receiver whenever it is not connected (every
`--retry` seconds while it cannot connect, at once after the loss of a healthy link); each connection
starts with a resync (resync.py). A connection lost before its replication stayed live for
`HEALTHY_SECONDS` because the secondary refused a change (its disk full, say), or lost before its
resync ended, is retried after a doubling delay, up to `MAX_RETRY_DELAY`: each attempt costs a
resync on both nodes. A live link the network took away is retried at once, however short it lived.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import faulthandler
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from . import messages as m, unwatched
from .busypoll import DEFAULT_MAX_WINDOW, new_event_loop
from .exclude import Excluder
from .fusefs import ReplicatedFS
from .journal import DEFAULT_BLOCK, Journal, journal_path
from .memory import keep_freed_memory
from .mount import FuseMount, fuse_mount_listed
from .paths import open_replicated_dir
from .protect import is_protected, marker_path as protect_marker, protect
from .receiver import Receiver, raise_fd_limit
from .resync import MirrorReplicator
from .sender import Sender
from .signals import PEER_LOST_SIGNAL, REFUSE_HELD_WRITES_SIGNAL, RELEASE_WRITES_SIGNAL

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
HEALTHY_SECONDS = 10.0  # live this long, a lost connection is retried at once
MAX_RETRY_DELAY = 30.0


def reconnect_delay(failures: int, base: float, cap: float = MAX_RETRY_DELAY) -> float:
    """Seconds to wait before the next connection after `failures` connections in a row were lost
    before they were healthy: none after a healthy one, then `base`, doubling up to `cap`."""
    if failures <= 0:
        return 0.0
    return min(cap, base * 2 ** min(failures - 1, 32))


def emit(event: str, **fields: Any) -> None:
    try:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _daemon_gone()


def _daemon_gone() -> None:
    """Our stdout's reader, the daemon, is gone (a crash, kill -9): stop as on SIGTERM. Left on its
    own an agent would go on serving and replicating for a node nobody manages any more (its peer
    takes over meanwhile); the restarted daemon cleans up and starts afresh."""
    if sys.stdout is not _devnull():
        log.error("the daemon is gone (its end of our stdout is closed): stopping")
        sys.stdout = _devnull()
        os.kill(os.getpid(), signal.SIGTERM)


_DEVNULL: list[Any] = []


def _devnull() -> Any:
    if not _DEVNULL:
        _DEVNULL.append(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    return _DEVNULL[0]


def die_with_the_daemon() -> None:
    """SIGTERM as soon as the daemon that started us dies, not at our next status line."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the broken stdout says it a second later


async def run_primary(args: argparse.Namespace, key: bytes, stop: asyncio.Event) -> None:
    # `directory` names it (journal, stream); `local` is where it is here, symlinks resolved
    # before the mount (mounts are removed and protected by their real path).
    directory = Path(args.directory)
    local = Path(args.local or os.path.realpath(directory))
    name = os.fsencode(directory)
    excluder = Excluder(args.exclude)
    journal = Journal.load(journal_path(Path(args.state_dir), args.module, name), args.journal_block)
    fd = open_replicated_dir(local)  # before the mount: the real directory
    try:
        unwatched_paths = await asyncio.to_thread(  # its progress says to the service we are alive
            unwatched.look_around, journal, fd, excluder.excluded, directory,
            lambda n: emit("walking", directory=str(directory), entries=n))
    finally:
        os.close(fd)
    journal.become_source(args.generation, unwatched_paths)
    journal.watched_again()  # recorded as suspects (or a checksum resync): the marker can go
    log.info("journal of %s: %s", directory, journal.describe())
    bandwidth = args.resync_bandwidth * 1e6 if args.resync_bandwidth else None

    def on_event(event: str, **fields: Any) -> None:
        emit(event, **fields)
        emit("status", **repl.status())  # the service's view changes with these events: at once

    repl = MirrorReplicator(journal, excluder, block=args.journal_block, bandwidth=bandwidth,
                            generation=args.generation, on_event=on_event, hold_limit=args.hold_limit)
    if args.hold_writes:  # the module makes us the primary of an up-to-date secondary (a handover)
        repl.hold_writes("primary of an up-to-date secondary: until the first resync is done")

    def make_fs(fd: int) -> ReplicatedFS:
        repl.bind(fd)
        return ReplicatedFS(fd, repl, excluder)

    def peer_gone() -> None:  # PEER_LOST_SIGNAL from the service: heartbeats say the peer is gone
        if repl.sender is not None:
            repl.sender.abandon("peer lost on every heartbeat network")
        repl.release_writes("the peer is lost on every heartbeat network (the module recorded a new generation)")

    def peer_knows() -> None:  # RELEASE_WRITES_SIGNAL from the service
        repl.release_writes("the peer no longer counts itself an up-to-date secondary")

    asyncio.get_running_loop().add_signal_handler(PEER_LOST_SIGNAL, peer_gone)
    asyncio.get_running_loop().add_signal_handler(RELEASE_WRITES_SIGNAL, peer_knows)
    asyncio.get_running_loop().add_signal_handler(
        REFUSE_HELD_WRITES_SIGNAL, lambda: repl.refuse_held_writes("the module leaves the primary role"))
    # At the stop, a read-only bind goes beneath the mount before it is removed (protect.py).
    guard = protect_marker(Path(args.state_dir), args.module, local) if args.protect else None
    mount = FuseMount(local, make_fs, guard=guard)
    where = os.fsencode(local)
    await mount.start()
    emit("ready", dirty=True, journal=journal.describe())
    connector = asyncio.create_task(_connect_loop(args, key, name, repl, stop), name="repl-connect")
    stopped = asyncio.create_task(stop.wait(), name="repl-stop")
    ended = asyncio.create_task(mount.wait(), name="repl-mount-ended")
    try:
        while not stop.is_set():
            emit("status", **repl.status())
            await asyncio.wait([stopped, ended], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if not stop.is_set() and (ended.done() or not fuse_mount_listed(where)):
                # Unmounted from outside: what was written to the directory since went around us, into
                # no journal. The next resync compares everything, and the module restarts on a new mount.
                journal.invalidate(f"the mount over {directory} was removed from outside the agent")
                raise OSError(errno.ENOTCONN, f"the mount over {directory} was removed from outside the agent: "
                                              "changes made since may have bypassed replication (the next "
                                              "resync compares every file)")
    finally:
        for task in (stopped, ended):
            task.cancel()
        # Not cancelled while it connects (a cancel racing open_connection's result can leave the
        # task stuck on Python 3.11): it sees `stop` and returns; cancelled only if it lingers.
        stop.set()
        _, pending = await asyncio.wait([connector], timeout=2.0)
        for task in pending:
            task.cancel()
        await mount.stop()
        await repl.close(args.timeout)


async def _connect_loop(args: argparse.Namespace, key: bytes, name: bytes, repl: MirrorReplicator,
                        stop: asyncio.Event) -> None:
    """Connect whenever not connected: every `--retry` seconds while the peer cannot be reached; after
    the loss of a connection, at once if it was healthy, else after `reconnect_delay`. A failed
    first attempt is reported as "lost" once; a broken link is reported by the replicator."""
    host, _, port = args.peer.rpartition(":")
    announced = False
    failures = 0  # connections in a row lost before they were healthy
    attached = False
    while not stop.is_set():
        if attached and repl.sender is None:  # the connection we made is lost
            attached = False
            live = repl.last_live_seconds
            # A live link the network took away (a cut, a reset) is retried at once: the resync
            # completed, the secondary accepts the stream. One the secondary ended itself, or one
            # that never went live, is retried after a growing delay unless it had been healthy.
            healthy = live is not None and (live >= HEALTHY_SECONDS or not repl.last_refused)
            failures = 0 if healthy else failures + 1
            delay = reconnect_delay(failures, args.retry)
            if delay:
                log.warning("link to %s lost %d time(s) in a row before replication got going: next attempt "
                            "in %g s", args.peer, failures, delay)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
                continue
        if repl.sender is None:
            try:
                sender = await Sender.connect(host.strip("[]"), int(port), key, args.module, name,
                                              protocol=args.protocol, timeout=args.timeout)
            except (OSError, TimeoutError, ValueError, m.ProtocolError) as exc:
                if not announced:
                    emit("lost", reason=f"cannot connect to {args.peer}: {exc}")
                    announced = True
            else:
                if stop.is_set():
                    await sender.close()
                    return
                repl.attach(sender)
                attached = True
                emit("connected", peer=args.peer)
                announced = True
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(repl.lost_event.wait())]
        await asyncio.wait(waits, timeout=args.retry, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()


async def run_secondary(args: argparse.Namespace, key: bytes, stop: asyncio.Event) -> None:
    pairs = {}
    for item in args.directory_list:  # "NAME" or "NAME=LOCAL": receive NAME's stream into LOCAL
        name, _, local = item.partition("=")
        pairs[os.fsencode(name)] = local or name
    receiver = Receiver(args.module, pairs, key, on_event=lambda e, d: emit(e, **d), state_dir=Path(args.state_dir),
                        generation=args.generation, fullsync=args.fullsync, idle_timeout=2 * args.timeout)
    host, _, port = args.listen.rpartition(":")
    locals_ = [Path(local) for local in pairs.values()]
    markers = {d: protect_marker(Path(args.state_dir), args.module, d) for d in locals_}
    # Opens the directory descriptors: writable ones beneath a read-only bind of ours already there
    # (left by the primary's agent at its stop, or by a killed receiver), which stays in place...
    await receiver.start(host.strip("[]"), int(port))
    protected = []
    try:
        if args.protect:
            for d in locals_:  # ...else hides the directories from applications behind a read-only bind
                try:
                    if not (markers[d].exists() and is_protected(d)):
                        protect(d, markers[d])
                    protected.append(d)
                except OSError as exc:
                    log.error("cannot make %s read-only for applications: %s", d, exc)
                    emit("warning", reason=f"{d} stays writable for applications: {exc}")
        emit("ready", protected=[str(d) for d in protected])
        while not stop.is_set():
            for d in [d for d in protected if not is_protected(d)]:
                # Removed from outside: an application may have written there since. The next resync
                # compares every file, and it runs now.
                why = f"the read-only protection of {d} was removed from outside the agent"
                log.error("%s: made again; the next resync compares every file", why)
                emit("warning", reason=f"{why}: made again; the next resync compares every file")
                receiver.distrust(d, why)
                try:
                    protect(d, markers[d])
                except OSError as exc:
                    protected.remove(d)
                    emit("warning", reason=f"{d} stays writable for applications: {exc}")
            emit("status", streams=receiver.status(), protected=[str(d) for d in protected])
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    finally:
        # The read-only binds stay: the service removes them (a stopped module's directories are
        # writable, and from then on unwatched), the next primary's agent before its mount, and
        # the next receiver keeps them. Removed here, a receiver stopping with its daemon (killed)
        # left the directories writable, and watched by nobody, until the daemon came back.
        await receiver.stop()


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="safekit-cloud-replication-agent")
    ap.add_argument("--role", choices=["primary", "secondary"], required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--state-dir", default="/var/lib/safekit-cloud")
    ap.add_argument("--protocol", choices=["A", "B", "C"], default="C")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--exclude", action="append", default=[])
    ap.add_argument("--directory", help="primary: the directory to mount over")
    ap.add_argument("--local", help="primary: where --directory is on this node, symlinks resolved (default: "
                                    "resolved here)")
    ap.add_argument("--peer", help="primary: host:port of the secondary's receiver")
    ap.add_argument("--listen", help="secondary: host:port to listen on")
    ap.add_argument("--directory-list", action="append", default=[], help="secondary: DIR or DIR=LOCAL_DIR, repeated")
    ap.add_argument("--journal-block", type=int, default=DEFAULT_BLOCK, help="primary: journal granularity (bytes)")
    ap.add_argument("--resync-bandwidth", type=float, default=None, help="primary: resync cap in MB/s")
    ap.add_argument("--generation", type=lambda v: int(v, 0), default=None,
                    help="the engine's data generation (primary: the one shared when replication stopped)")
    ap.add_argument("--fullsync", action="store_true", help="secondary: forget the lineage (compare everything)")
    ap.add_argument("--busy-poll-us", type=float, default=DEFAULT_MAX_WINDOW * 1e6,
                    help="longest time the event loop polls before it sleeps, in microseconds (0: never)")
    ap.add_argument("--retry", type=float, default=0.5, help="primary: seconds between connection attempts")
    ap.add_argument("--hold-writes", action="store_true",
                    help="primary: start holding writes the peer does not have (see resync.py), until released")
    ap.add_argument("--hold-limit", type=float, default=None,
                    help="primary: release held writes after this many seconds (none: only the module does)")
    ap.add_argument("--no-protect", dest="protect", action="store_false",
                    help="secondary: leave the directories writable for applications (no read-only bind mount)")
    return ap.parse_args(argv)


async def amain(argv: list[str]) -> int:
    args = parse(argv)
    key = bytes.fromhex(sys.stdin.readline().strip())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    os.umask(0)  # modes are set explicitly; the daemon's umask must not mask them again
    # Primary: one backing descriptor per file the application has open through the mount (a
    # shell's 1,024 would refuse its 1,000th open with EMFILE); secondary: one per file written.
    raise_fd_limit()
    try:
        if args.role == "primary":
            await run_primary(args, key, stop)
        else:
            await run_secondary(args, key, stop)
    except OSError as exc:  # the node's side (a directory missing, a port taken): the message says it
        log.error("replication agent failed: %s", exc)
        emit("failed", reason=str(exc))
        return 1
    except Exception as exc:
        log.exception("replication agent failed")
        emit("failed", reason=f"{type(exc).__name__}: {exc}")
        return 1
    emit("stopped")
    return 0


def main() -> None:
    die_with_the_daemon()
    keep_freed_memory()  # memory.py: a page fault per page of every frame otherwise
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: every thread's stack to stderr
    logging.basicConfig(level=os.environ.get("SAFEKIT_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:]
    window = parse(argv).busy_poll_us / 1e6
    with asyncio.Runner(loop_factory=lambda: new_event_loop(window)) as runner:
        sys.exit(runner.run(amain(argv)))


if __name__ == "__main__":
    main()
