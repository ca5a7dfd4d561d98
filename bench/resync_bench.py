"""Resync benchmark: bring a secondary back up to date after 1 % of a 1 GiB data set changed.

The same change three ways, both nodes on this machine (loopback), page cache warm:
- our journal resync: the primary journaled the change while the secondary was away;
- our checksum resync: the secondary comes back with `fullsync` (no trusted lineage): both sides
  hash the whole data set, only differing blocks are sent;
- rsync -a --no-whole-file of the same change, in daemon mode over loopback TCP and between two
  local paths.

The change: 1 % of the file's 4 KiB blocks, at scattered random places, overwritten with random
data through the FUSE mount while the primary is alone. Ours run through ReplicationService agent
processes, as in production. Prints times (the resync itself, and end to end from "the secondary
starts" to "it is up to date") and bytes sent, with ratios against rsync daemon mode.

    .venv/bin/python bench/resync_bench.py [--gib 1] [--percent 1] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import xxhash
from safekit_cloud.core.config import ReplicationConfig
from safekit_cloud.core.replication.service import ReplicationService

KEY = b"b" * 32
CHUNK = 64 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def make_data(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.writelines(os.urandom(CHUNK) for _ in range(size // CHUNK))
        f.flush()
        os.fsync(f.fileno())


def change(path: Path, size: int, percent: float, seed: int = 1) -> tuple[int, float]:
    """Overwrite `percent` % of the 4 KiB blocks at scattered places; (bytes changed, seconds)."""
    rng = random.Random(seed)
    blocks = rng.sample(range(size // 4096), int(size // 4096 * percent / 100))
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        for b in blocks:
            os.pwrite(fd, rng.randbytes(4096), b * 4096)
    finally:
        os.close(fd)
    return len(blocks) * 4096, time.perf_counter() - t0


class Pair:
    """A primary and a secondary ReplicationService of one directory on this machine."""

    def __init__(self, base: Path, data: Path, replica: Path) -> None:
        self.base, self.data, self.replica = base, data, replica
        self.cfg = ReplicationConfig(directories=[data], port=free_port(), timeout=5.0)
        self.done = {"primary": asyncio.Event(), "secondary": asyncio.Event()}
        self.primary = ReplicationService("bench", self.cfg, "127.0.0.1", KEY, base / "state1", timeout=5.0,
                                          on_resync_done=self.done["primary"].set)
        self.secondary = ReplicationService("bench", self.cfg, "127.0.0.1", KEY, base / "state2",
                                            listen_address="127.0.0.1", receive_into={data: replica},
                                            on_resync_done=self.done["secondary"].set)

    async def secondary_up(self, fullsync: bool = False) -> dict:
        """Start the secondary; wait until both sides report the resync done. The primary's agent
        reconnects by itself (every 0.5 s while not connected)."""
        for ev in self.done.values():
            ev.clear()
        t0 = time.perf_counter()
        await self.secondary.become_secondary(fullsync=fullsync)
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in self.done.values())), 600)
        end_to_end = time.perf_counter() - t0
        await asyncio.sleep(0.2)  # the agent's status follows its event
        agent = next(iter(self.primary.status()["agents"].values()))
        last = agent["last_resync"]
        return {"mode": last["mode"], "seconds": last["elapsed"], "end_to_end": end_to_end,
                "bytes_sent": agent["bytes_sent"], "data_sent": last["bytes_sent"],
                "bytes_received": last.get("digests_received", 0)}


def rsync_daemon(base: Path, src: Path, dst: Path) -> dict:
    port = free_port()
    conf = base / "rsyncd.conf"
    conf.write_text(f"port = {port}\nuse chroot = false\npid file = {base / 'rsyncd.pid'}\n"
                    f"[dst]\npath = {dst}\nread only = false\nuid = root\ngid = root\n")
    daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        return _rsync(["rsync", "-a", "--no-whole-file", "--stats", f"{src}/", f"rsync://127.0.0.1:{port}/dst/"])
    finally:
        daemon.terminate()
        daemon.wait(10)


def rsync_local(src: Path, dst: Path) -> dict:
    return _rsync(["rsync", "-a", "--no-whole-file", "--stats", f"{src}/", f"{dst}/"])


def _rsync(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    seconds = time.perf_counter() - t0

    def stat(name: str) -> int:
        found = re.search(rf"{name}: ([\d,.]+)", out)
        return int(found.group(1).replace(",", "").replace(".", "")) if found else -1

    return {"seconds": seconds, "bytes_sent": stat("Total bytes sent"), "bytes_received": stat("Total bytes received")}


async def run(args: argparse.Namespace) -> None:
    size = int(args.gib * (1 << 30)) // CHUNK * CHUNK
    base = Path(tempfile.mkdtemp(prefix="resync-bench-", dir=args.dir))
    data, replica, old = base / "data", base / "replica", base / "old"
    for d in (data, replica, old):
        d.mkdir()
    pair = Pair(base, data, replica)
    try:
        print(f"data set: one file of {size >> 20} MiB; change: {args.percent} % of its 4 KiB blocks, scattered")
        make_data(data / "data.bin", size)
        shutil.copy2(data / "data.bin", replica / "data.bin")  # both sides start identical...
        file_hash(data / "data.bin")  # ...and warm (facts.md: the first pass on this VM is slow)
        await pair.secondary.become_secondary()
        await pair.primary.become_primary()
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in pair.done.values())), 600)
        print("initial checksum resync done (identical copies: nothing to send)")
        await pair.secondary.stop()  # the secondary goes away; the primary journals
        shutil.copy2(replica / "data.bin", old / "data.bin")  # the old state, for the other runs
        await asyncio.sleep(0.5)
        changed, secs = await asyncio.to_thread(change, data / "data.bin", size, args.percent)
        print(f"changed {changed / 1e6:.1f} MB through the mount while alone in {secs:.2f} s "
              f"({changed // 4096} journaled writes)")
        results: dict[str, dict] = {}

        os.sync()  # every run starts with a clean page cache: only its own writes get flushed
        results["journal resync (ours)"] = await pair.secondary_up()
        expected = file_hash(data / "data.bin")
        assert file_hash(replica / "data.bin") == expected, "journal resync: replica differs"

        await pair.secondary.stop()
        shutil.copy2(old / "data.bin", replica / "data.bin")
        file_hash(replica / "data.bin")
        os.sync()
        results["checksum resync (ours)"] = await pair.secondary_up(fullsync=True)
        assert file_hash(replica / "data.bin") == expected, "checksum resync: replica differs"

        await pair.secondary.stop()
        await pair.primary.stop()  # rsync reads the plain directory
        target = base / "rsync-dst"
        target.mkdir()
        shutil.copy2(old / "data.bin", target / "data.bin")
        file_hash(target / "data.bin")
        os.sync()
        results["rsync daemon (loopback)"] = rsync_daemon(base, data, target)
        assert file_hash(target / "data.bin") == expected, "rsync: copy differs"
        shutil.copy2(old / "data.bin", target / "data.bin")
        file_hash(target / "data.bin")
        os.sync()
        results["rsync local paths"] = rsync_local(data, target)
        assert file_hash(target / "data.bin") == expected

        ref = results["rsync daemon (loopback)"]
        print()
        print(f"{'method':26} {'time s':>8} {'end-to-end s':>13} {'sent MB':>9} {'received MB':>12} "
              f"{'x faster':>9} {'x fewer bytes':>14}")
        for name, r in results.items():
            e2e = f"{r['end_to_end']:.2f}" if "end_to_end" in r else "-"
            print(f"{name:26} {r['seconds']:8.2f} {e2e:>13} {r['bytes_sent'] / 1e6:9.2f} "
                  f"{r['bytes_received'] / 1e6:12.2f} {ref['seconds'] / r['seconds']:9.1f} "
                  f"{ref['bytes_sent'] / max(r['bytes_sent'], 1):14.1f}")
        print(f"\n(changed data: {changed / 1e6:.2f} MB; ours: 'time' is the resync from the secondary's "
              f"answer to 'up to date', including its syncfs (rsync does not sync); end-to-end adds "
              f"starting the secondary's agent and the primary's reconnection, up to 0.5 s)")
    finally:
        for svc in (pair.secondary, pair.primary):
            try:
                await svc.stop()
            except Exception as exc:  # noqa: BLE001
                print("stop:", exc)
        await asyncio.to_thread(subprocess.run, ["fusermount3", "-u", "-z", str(data)], capture_output=True,
                                check=False)
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--percent", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
