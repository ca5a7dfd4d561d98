"""One replication process: the FUSE primary of one directory, or the receiver of a module.

Why a process: pyfuse3 allows one mount per process, and FUSE traffic must not steal the engine's
event loop (heartbeats have deadlines). The service starts agents and talks to them through pipes:
the key arrives on stdin (never on the command line), events leave on stdout as JSON lines:
  {"event": "ready"} once mounted / listening, {"event": "connected"}, {"event": "lost", "reason"},
  {"event": "status", ...} every second, {"event": "stopped"} at the end; the secondary's "ready" and
  "status" list the directories it made read-only for applications ("protected", see protect.py),
  and {"event": "warning", "reason"} says when it could not.
SIGTERM stops cleanly (unmount, close the stream).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .exclude import Excluder
from .fusefs import ReplicatedFS
from .mount import FuseMount
from .primary import DirtyMarker, LinkReplicator
from .protect import marker_path as protect_marker
from .protect import protect, unprotect
from .receiver import Receiver
from .sender import Sender

log = logging.getLogger(__name__)


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def marker_path(state_dir: Path, module: str, directory: Path) -> Path:
    safe = str(directory).strip("/").replace("/", "_") or "root"
    return state_dir / f"{module}.{safe}.dirty"


async def run_primary(args: argparse.Namespace, key: bytes, stop: asyncio.Event) -> None:
    directory = Path(args.directory)
    marker = DirtyMarker(marker_path(Path(args.state_dir), args.module, directory))
    repl = LinkReplicator(marker, on_lost=lambda reason: emit("lost", reason=reason))
    mount = FuseMount(directory, lambda fd: ReplicatedFS(fd, repl, Excluder(args.exclude)))
    await mount.start()
    emit("ready", dirty=marker.dirty)
    if marker.dirty:
        # Changes the peer never got: streaming now would build on a stale replica.
        emit("lost", reason="replica out of date: resync required before replicating")
    else:
        host, _, port = args.peer.rpartition(":")
        try:
            sender = await Sender.connect(host.strip("[]"), int(port), key, args.module,
                                          os.fsencode(directory), protocol=args.protocol,
                                          timeout=args.timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            emit("lost", reason=f"cannot connect to {args.peer}: {exc}")
        else:
            repl.attach(sender)
            emit("connected", peer=args.peer)
    try:
        while not stop.is_set():
            sender = repl.sender
            emit("status", connected=sender is not None, dirty=marker.dirty,
                 bytes_sent=sender.stats.bytes_sent if sender else 0,
                 inflight=sender.inflight_bytes if sender else 0,
                 lag=sender.lag_seconds() if sender else None, ops_alone=marker.ops)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    finally:
        await mount.stop()
        sender = repl.detach()
        if sender is not None:
            await sender.close()


async def run_secondary(args: argparse.Namespace, key: bytes, stop: asyncio.Event) -> None:
    pairs = {}
    for item in args.directory_list:  # "NAME" or "NAME=LOCAL": receive NAME's stream into LOCAL
        name, _, local = item.partition("=")
        pairs[os.fsencode(name)] = local or name
    receiver = Receiver(args.module, pairs, key, on_event=lambda e, d: emit(e, **d))
    host, _, port = args.listen.rpartition(":")
    locals_ = [Path(local) for local in pairs.values()]
    markers = {d: protect_marker(Path(args.state_dir), args.module, d) for d in locals_}
    for d in locals_:
        unprotect(d, markers[d])  # a killed agent's leftover: the receiver's descriptors must be writable
    await receiver.start(host.strip("[]"), int(port))  # opens the directory descriptors...
    protected = []
    try:
        if args.protect:
            for d in locals_:  # ...then hides the directories from applications behind a read-only bind
                try:
                    protect(d, markers[d])
                    protected.append(d)
                except OSError as exc:
                    log.error("cannot make %s read-only for applications: %s", d, exc)
                    emit("warning", reason=f"{d} stays writable for applications: {exc}")
        emit("ready", protected=[str(d) for d in protected])
        while not stop.is_set():
            emit("status", streams=receiver.status(), protected=[str(d) for d in protected])
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    finally:
        await receiver.stop()
        for d in locals_:
            try:
                unprotect(d, markers[d])
            except OSError as exc:
                log.error("cannot remove the read-only protection of %s: %s", d, exc)


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="safekit-cloud-replication-agent")
    ap.add_argument("--role", choices=["primary", "secondary"], required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--state-dir", default="/var/lib/safekit-cloud")
    ap.add_argument("--protocol", choices=["A", "B", "C"], default="C")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--exclude", action="append", default=[])
    ap.add_argument("--directory", help="primary: the directory to mount over")
    ap.add_argument("--peer", help="primary: host:port of the secondary's receiver")
    ap.add_argument("--listen", help="secondary: host:port to listen on")
    ap.add_argument("--directory-list", action="append", default=[], help="secondary: DIR or DIR=LOCAL_DIR, repeated")
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
    try:
        if args.role == "primary":
            await run_primary(args, key, stop)
        else:
            await run_secondary(args, key, stop)
    except Exception as exc:
        log.exception("replication agent failed")
        emit("failed", reason=f"{type(exc).__name__}: {exc}")
        return 1
    emit("stopped")
    return 0


def main() -> None:
    logging.basicConfig(level=os.environ.get("SAFEKIT_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(asyncio.run(amain(sys.argv[1:])))


if __name__ == "__main__":
    main()
