"""Replication benchmark: plain local directory vs FUSE mirror (protocol C over loopback TCP).

Runs the real layout: ReplicationService agent processes (a FUSE primary, a receiver writing into
another directory of this machine), the workload in this process. Both nodes and the workload share
the machine's 2 cores. Every workload runs on the local directory and on the mirror alternately,
`--runs` times each, after a warm-up pass (facts.md: this VM hands free pages back to its host, so a
first pass is slow); medians are printed with the ratio mirror/local and the issue's goal.

Workloads:
- seq: one file, `--mib` x 1 MiB writes then one fsync (MB/s);
- 4k fsync: `--iops` x (4 KiB pwrite at a scattered offset of a 64 MiB file + fsync) (iops);
- small files: `--files` x (create, write 4 KiB, fsync, close) in a fresh directory, then one fsync of
  the directory (files/s). fsync per file is what a database or mail server does and what facts.md
  measured (local 3,605 files/s); without it the local figure is page-cache speed (~70k files/s),
  which no user-space layer approaches; that variant is printed too, without a goal.
- pgbench (with --pgbench): PostgreSQL 15 TPS, initdb in the directory as user postgres,
  `pgbench -i -s 5`, then `-c 4 -j 2 -T 15` (once per side: it is long).

    .venv/bin/python bench/replication_bench.py [--mib 1024] [--iops 2000] [--files 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safekit_cloud.core.config import ReplicationConfig
from safekit_cloud.core.replication.service import ReplicationService

# (ratio goal vs local, absolute goal): docs/replication.md, issue 3, facts.md
GOALS = {"seq MB/s": (0.5, 450), "4k fsync iops": (0.3, 1800), "small files/s": (0.25, 750),
         "small nofsync/s": (None, None), "pgbench tps": (None, None)}


def small_files(root: Path, n: int, sync: bool = True) -> float:
    d = root / f"small{time.monotonic_ns()}"
    d.mkdir()
    data = b"x" * 4096
    t0 = time.perf_counter()
    for i in range(n):
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data)
        if sync:
            os.fsync(fd)
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    rate = n / (time.perf_counter() - t0)
    shutil.rmtree(d)
    return rate


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
    os.unlink(root / "rand")
    return rate


def sequential(root: Path, mib: int) -> float:
    buf = b"s" * (1 << 20)
    fd = os.open(root / "seq", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    for _ in range(mib):
        os.write(fd, buf)
    os.fsync(fd)
    rate = mib * 1.048576 / (time.perf_counter() - t0)  # MB/s (10^6), as facts.md
    os.close(fd)
    os.unlink(root / "seq")
    return rate


def pgbench(root: Path) -> float:
    """TPS of pgbench -c 4 -T 15 against a cluster initialised in `root` (as user postgres)."""
    pw = pwd.getpwnam("postgres")
    data = root / "pgdata"
    data.mkdir()
    os.chown(root, pw.pw_uid, pw.pw_gid)
    os.chown(data, pw.pw_uid, pw.pw_gid)
    sock = Path(tempfile.mkdtemp(prefix="pgsock-"))
    os.chown(sock, pw.pw_uid, pw.pw_gid)
    port = str(_free_port())

    def as_pg(*cmd: str) -> str:
        return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True,
                              text=True, cwd="/").stdout

    as_pg("initdb", "-D", str(data), "--no-instructions", "-A", "trust")
    as_pg("pg_ctl", "-D", str(data), "-w", "-l", str(sock / "log"), "-o",
          f"-k {sock} -p {port} -c listen_addresses=''", "start")
    try:
        as_pg("pgbench", "-h", str(sock), "-p", port, "-i", "-s", "5", "-q", "postgres")
        out = as_pg("pgbench", "-h", str(sock), "-p", port, "-c", "4", "-j", "2", "-T", "15", "postgres")
        tps = float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    finally:
        as_pg("pg_ctl", "-D", str(data), "-w", "-m", "fast", "stop")
        shutil.rmtree(sock, ignore_errors=True)
    shutil.rmtree(data)
    return tps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workloads(args: argparse.Namespace) -> dict[str, tuple[Callable[[Path], float], int]]:
    w: dict[str, tuple[Callable[[Path], float], int]] = {
        "seq MB/s": (lambda r: sequential(r, args.mib), args.runs),
        "4k fsync iops": (lambda r: fsync_iops(r, args.iops), max(args.runs, 5)),
        "small files/s": (lambda r: small_files(r, args.files), args.runs),
        "small nofsync/s": (lambda r: small_files(r, args.files, sync=False), args.runs),
    }
    if args.pgbench:
        w["pgbench tps"] = (pgbench, 1)
    return w


def run_all(local: Path, mirror: Path, args: argparse.Namespace) -> dict[str, tuple[list[float], list[float]]]:
    # Warm-up: write and delete the sequential data set once on each side, and a short pass of the rest.
    sequential(local, args.mib)
    sequential(mirror, args.mib)
    fsync_iops(local, 200)
    fsync_iops(mirror, 200)
    out: dict[str, tuple[list[float], list[float]]] = {}
    for name, (fn, runs) in workloads(args).items():
        loc, rep = [], []
        for _ in range(runs):  # alternated, so drifting noise hits both sides alike
            loc.append(fn(local))
            rep.append(fn(mirror))
        out[name] = (loc, rep)
        print(f"  {name}: local {[round(x) for x in loc]} mirror {[round(x) for x in rep]}", flush=True)
    return out


def report(results: dict[str, tuple[list[float], list[float]]], args: argparse.Namespace) -> str:
    lines = [f"replication_bench {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, protocol {args.protocol}, "
             f"seq {args.mib} MiB, {args.iops} x 4k fsync, {args.files} files, medians of {args.runs}+ runs "
             f"(4k fsync: {max(args.runs, 5)}; pgbench: 1), after a warm-up pass; {os.cpu_count()} cores, "
             "both nodes and the workload on this machine",
             f"{'workload':16} {'local':>10} {'mirror':>10} {'ratio':>6}   goal"]
    for name, (loc, rep) in results.items():
        lm, rm = statistics.median(loc), statistics.median(rep)
        ratio = rm / lm
        rg, ag = GOALS[name]
        if rg is None:
            goal = "-"
        else:
            ok = ratio >= rg and rm >= ag
            goal = f">= {rg}x and >= {ag}: {'met' if ok else 'NOT met'}"
        lines.append(f"{name:16} {lm:10.0f} {rm:10.0f} {ratio:6.2f}   {goal}")
    lines.append("runs (local / mirror):")
    for name, (loc, rep) in results.items():
        lines.append(f"  {name:16} {[round(x) for x in loc]} / {[round(x) for x in rep]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--iops", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--protocol", choices=["A", "B", "C"], default="C")
    ap.add_argument("--pgbench", action="store_true", help="also PostgreSQL pgbench TPS (needs user postgres)")
    ap.add_argument("--dir", default="/var/tmp", help="where the test directories are made")
    ap.add_argument("--out", help="also write the report to this file")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="replbench-", dir=args.dir))
    os.chmod(base, 0o755)
    local = base / "local"
    local.mkdir()
    dirs = [base / n for n in ("primary", "replica", "state")]
    for d in dirs:
        d.mkdir()
    cfg = ReplicationConfig(directories=[dirs[0]], port=_free_port(), protocol=args.protocol)
    key = os.urandom(32)

    async def mirrored() -> dict[str, tuple[list[float], list[float]]]:
        second = ReplicationService("bench", cfg, "127.0.0.1", key, dirs[2] / "s", listen_address="127.0.0.1",
                                    receive_into={dirs[0]: dirs[1]})
        prim = ReplicationService("bench", cfg, "127.0.0.1", key, dirs[2] / "p")
        await second.become_secondary()
        try:
            await prim.become_primary()
            while not prim.status()["connected"]:
                await asyncio.sleep(0.1)
            return await asyncio.to_thread(run_all, local, dirs[0], args)
        finally:
            await prim.stop()
            await second.stop()

    try:
        results = asyncio.run(mirrored())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    text = report(results, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
