"""Replication micro-benchmark: local directory vs FUSE mirror (protocol C over loopback TCP).

Runs the real layout: ReplicationService agent processes (a FUSE primary, a receiver writing into
another directory of this machine), the workload in this process. Both nodes and the workload share
the machine's cores. Prints ratios against the local directory measured in the same run.

    .venv/bin/python bench/replication_bench.py [--files 2000] [--iops 2000] [--mib 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncio
import socket

from safekit_cloud.core.config import ReplicationConfig
from safekit_cloud.core.replication.service import ReplicationService


def small_files(root: Path, n: int) -> float:
    d = root / "small"
    d.mkdir()
    t0 = time.perf_counter()
    for i in range(n):
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"x" * 4096)
        os.close(fd)
    return n / (time.perf_counter() - t0)


def fsync_iops(root: Path, n: int) -> float:
    fd = os.open(root / "rand", os.O_WRONLY | os.O_CREAT, 0o644)
    os.ftruncate(fd, 64 << 20)
    block = b"r" * 4096
    t0 = time.perf_counter()
    for i in range(n):
        os.pwrite(fd, block, (i * 7919 % 16384) * 4096)
        os.fsync(fd)
    rate = n / (time.perf_counter() - t0)
    os.close(fd)
    return rate


def sequential(root: Path, mib: int) -> float:
    buf = b"s" * (1 << 20)
    fd = os.open(root / "seq", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    for _ in range(mib):
        os.write(fd, buf)
    os.fsync(fd)
    rate = mib / (time.perf_counter() - t0)
    os.close(fd)
    os.unlink(root / "seq")
    return rate


def run_all(root: Path, args: argparse.Namespace) -> dict[str, float]:
    sequential(root, args.mib)  # warm-up (facts.md: the VM hands pages back to its host)
    return {"seq MB/s": sequential(root, args.mib), "4k fsync iops": fsync_iops(root, args.iops),
            "small files/s": small_files(root, args.files)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--iops", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--protocol", choices=["A", "B", "C"], default="C")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="replbench-", dir="/var/tmp"))
    local = base / "local"
    local.mkdir()
    dirs = [base / n for n in ("primary", "replica", "state")]
    for d in dirs:
        d.mkdir()
    loc = run_all(local, args)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = ReplicationConfig(directories=[dirs[0]], port=port, protocol=args.protocol)
    key = os.urandom(32)

    async def mirrored() -> dict[str, float]:
        second = ReplicationService("bench", cfg, "127.0.0.1", key, dirs[2] / "s", listen_address="127.0.0.1",
                                    receive_into={dirs[0]: dirs[1]})
        prim = ReplicationService("bench", cfg, "127.0.0.1", key, dirs[2] / "p")
        await second.become_secondary()
        try:
            await prim.become_primary()
            while not prim.status()["connected"]:
                await asyncio.sleep(0.1)
            return await asyncio.to_thread(run_all, dirs[0], args)
        finally:
            await prim.stop()
            await second.stop()

    try:
        rep = asyncio.run(mirrored())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{'workload':16} {'local':>10} {'mirror ' + args.protocol:>10} {'ratio':>7}")
    for k in loc:
        print(f"{k:16} {loc[k]:10.0f} {rep[k]:10.0f} {rep[k] / loc[k]:7.2f}")


if __name__ == "__main__":
    main()
