"""Replication benchmark: plain local directory vs FUSE mirror (protocol C over loopback TCP).

Runs the real layout: ReplicationService agent processes (a FUSE primary, a receiver writing into
another directory of this machine), the workload in this process. Both nodes and the workload share
the machine's 2 cores. Every workload runs on the local directory and on the mirror alternately,
`--runs` times each, after a warm-up pass (facts.md: this VM hands free pages back to its host, so a
first pass is slow); medians are printed with the ratio mirror/local and the issue's goal.

Workloads:
- seq: one file, `--mib` x 1 MiB writes from a page-aligned buffer (as `dd bs=1M`) then one fsync
  (MB/s); `seq unaligned`: the same from a Python bytes object (not page-aligned: two FUSE
  requests per write), printed without a goal;
- 4k fsync: `--iops` x (4 KiB pwrite at a scattered offset of a 64 MiB file + fsync) (iops);
- small files: `--files` x (create, write 4 KiB, fsync, close) in a fresh directory, then one fsync of
  the directory (files/s). fsync per file is what a database or mail server does and what facts.md
  measured (local 3,605 files/s); without it the local figure is page-cache speed (~70k files/s),
  which no user-space layer approaches; that variant is printed too, without a goal.
- pgbench (with --pgbench): PostgreSQL 15 TPS, initdb in the directory as user postgres,
  `pgbench -i -s 5`, then `-c 4 -j 2 -T 15` (once per side: it is long).

GlusterFS side by side (issue 3: every figure ahead of GlusterFS replica 2, measured in the same run):
with `--gluster`, on by default when GlusterFS is installed (scripts/bench-setup.sh), the same
workloads also run on a GlusterFS replica 2 volume of this machine (bench/gluster.py: a private
glusterd, both bricks on 127.0.0.2 under `--dir`, FUSE mount, GlusterFS's default options), in the same
alternation (local, mirror, gluster in every run). Printed: a gluster column, a line per workload
saying whether the mirror is ahead of GlusterFS, and the CPU seconds used per run by each side's
processes (/proc/PID/stat utime+stime: the mirror's two agents; glusterd, the two bricks, the
self-heal daemon and the FUSE client). `--no-gluster` leaves it out; without GlusterFS installed the
bench says so and runs without that column.

The ceiling (`--fuse-only`, on by default): the same workloads on our FUSE layer over a local
directory with nothing replicated (bench/fuse_only.py, its own process). local -> fuse-only is what
the FUSE layer costs, fuse-only -> mirror what the replication costs.

The whole machine's CPU (/proc/stat: every process and the kernel) is measured around each run
too: the report prints each side's CPU seconds per run and the share of the cores it kept busy.
Where the mirror kept them 80 % busy or more, its figure is bounded by its CPU cost: the report
prints what every core busy at that cost would give, against local (both nodes share these cores
here; on two machines the receiver's share moves away).

    .venv/bin/python bench/replication_bench.py [--mib 1024] [--iops 2000] [--files 10000] [--runs 3]
                                                [--pgbench] [--only NAME ...] [--gluster | --no-gluster]
                                                [--gluster-set KEY=VALUE] [--fuse-only | --no-fuse-only]

`--only seq` (repeatable: seq, sequnaligned, iops, files, nofsync, pgbench) runs only those workloads: an A/B of a
change that touches one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import mmap
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safekit_cloud.core.config import ReplicationConfig
from safekit_cloud.core.replication.mount import unmount
from safekit_cloud.core.replication.service import ReplicationService

from bench import gluster

# (issue 3's goal: a ratio to local in the same run, facts.md's target from its prototype: an absolute figure)
GOALS = {"seq MB/s": (0.5, 450), "4k fsync iops": (0.3, 1800), "small files/s": (0.25, 750),
         "small nofsync/s": (None, None), "pgbench tps": (None, None), "seq unaligned MB/s": (None, None)}
LEVEL = 0.05  # mirror vs GlusterFS within +-5 %: "level" (run-to-run noise here is larger still)
# GlusterFS options printed with the report: the ones that decide what a write or fsync waits for.
GLUSTER_SHOWN = ("performance.write-behind", "performance.flush-behind", "performance.strict-o-direct",
                 "cluster.eager-lock", "cluster.ensure-durability", "cluster.quorum-type")


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


def sequential(root: Path, mib: int, aligned: bool = True) -> float:
    """`mib` writes of 1 MiB then one fsync. `aligned`: from a page-aligned buffer, as `dd bs=1M`
    writes (and databases, whose buffers are page-aligned); else from a Python bytes object, whose
    data starts 32 bytes into a page: the kernel then sends each such write to a FUSE file system
    as two requests (one of 1 MiB less a few KiB, one of the rest), each a round trip to the
    secondary (docs/replication.md, "Sequential writes and buffer alignment")."""
    if aligned:
        buf: mmap.mmap | bytes = mmap.mmap(-1, 1 << 20)
        buf.write(b"s" * (1 << 20))
    else:
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
    port = str(_free_port())

    def as_pg(*cmd: str) -> str:
        p = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=False, capture_output=True,
                           text=True, cwd="/")
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} in {root}: {p.stderr.strip() or p.stdout.strip()}")
        return p.stdout

    sock = Path(tempfile.mkdtemp(prefix="pgsock-"))
    try:
        os.chown(sock, pw.pw_uid, pw.pw_gid)
        as_pg("initdb", "-D", str(data), "--no-instructions", "-A", "trust")
        as_pg("pg_ctl", "-D", str(data), "-w", "-l", str(sock / "log"), "-o",
              f"-k {sock} -p {port} -c listen_addresses=''", "start")
        try:
            as_pg("pgbench", "-h", str(sock), "-p", port, "-i", "-s", "5", "-q", "postgres")
            out = as_pg("pgbench", "-h", str(sock), "-p", port, "-c", "4", "-j", "2", "-T", "15", "postgres")
            tps = float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
        finally:
            as_pg("pg_ctl", "-D", str(data), "-w", "-m", "fast", "stop")
    finally:
        shutil.rmtree(sock, ignore_errors=True)
    shutil.rmtree(data)
    return tps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --only's names for the workloads.
SHORT = {"seq": "seq MB/s", "sequnaligned": "seq unaligned MB/s", "iops": "4k fsync iops", "files": "small files/s",
         "nofsync": "small nofsync/s", "pgbench": "pgbench tps"}


def workloads(args: argparse.Namespace) -> dict[str, tuple[Callable[[Path], float], int]]:
    w: dict[str, tuple[Callable[[Path], float], int]] = {
        "seq MB/s": (lambda r: sequential(r, args.mib), args.runs),
        "seq unaligned MB/s": (lambda r: sequential(r, args.mib, aligned=False), args.runs),
        "4k fsync iops": (lambda r: fsync_iops(r, args.iops), max(args.runs, 5)),
        "small files/s": (lambda r: small_files(r, args.files), args.runs),
        "small nofsync/s": (lambda r: small_files(r, args.files, sync=False), args.runs),
    }
    if args.pgbench:
        w["pgbench tps"] = (pgbench, 1)
    if args.only:
        wanted = {SHORT[name] for name in args.only}
        w = {name: run for name, run in w.items() if name in wanted}
    return w


@dataclass
class Side:
    name: str
    root: Path
    pids: Callable[[], list[int]] = list  # the processes that serve this side (CPU accounting)


@dataclass
class Figures:
    rates: dict[str, list[float]] = field(default_factory=dict)  # side -> one figure per run
    cpu: dict[str, list[float]] = field(default_factory=dict)  # side -> CPU seconds of its pids per run
    # side -> (CPU seconds of the whole machine, wall seconds) per run: how busy the cores were
    machine: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    faults: dict[str, list[int]] = field(default_factory=dict)  # side -> minor page faults of its pids per run


def minor_faults(pids: list[int]) -> int:
    """Page faults served without I/O (new pages touched) of `pids`, from /proc/PID/stat."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])  # field 10
        except OSError:
            continue
    return total


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of `pids` (their threads included; children not), from /proc/PID/stat."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / os.sysconf("SC_CLK_TCK")


def agent_pids() -> list[int]:
    """This process's replication agents (the mirror's FUSE primary and its receiver)."""
    me, out = str(os.getpid()), []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1]
                cmd = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if ppid == me and b"safekit_cloud.core.replication.agent" in cmd:
                out.append(int(entry.name))
    return out


def machine_cpu_seconds() -> float:
    """CPU time every process and the kernel spent so far, all cores (/proc/stat: user, nice,
    system, irq, softirq; not idle, iowait or the time the hypervisor took)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def measure(fn: Callable[[Path], float], side: Side) -> tuple[float, float, tuple[float, float], int]:
    """The workload's figure, its side's CPU seconds, (machine CPU seconds, wall seconds) of the
    whole call (file removal included), and its side's minor page faults."""
    pids = side.pids()
    before, faults = cpu_seconds(pids), minor_faults(pids)
    machine, t0 = machine_cpu_seconds(), time.perf_counter()
    rate = fn(side.root)
    used = (machine_cpu_seconds() - machine, time.perf_counter() - t0)
    return rate, max(0.0, cpu_seconds(pids) - before), used, max(0, minor_faults(pids) - faults)


def run_all(sides: list[Side], args: argparse.Namespace) -> dict[str, Figures]:
    counted = ", ".join(f"{s.name} {len(s.pids())}" for s in sides if s.name != "local")
    print(f"  processes counted for CPU time: {counted}", flush=True)
    # Warm-up: write and delete the sequential data set once on each side, and a short pass of the rest.
    for side in sides:
        sequential(side.root, args.mib)
        fsync_iops(side.root, 200)
    out: dict[str, Figures] = {}
    for name, (fn, runs) in workloads(args).items():
        fig = Figures({s.name: [] for s in sides}, {s.name: [] for s in sides}, {s.name: [] for s in sides})
        for _ in range(runs):  # alternated, so drifting noise hits every side alike
            for side in sides:
                rate, cpu, used, faults = measure(fn, side)
                fig.rates[side.name].append(rate)
                fig.cpu[side.name].append(cpu)
                fig.machine[side.name].append(used)
                fig.faults.setdefault(side.name, []).append(faults)
        out[name] = fig
        print(f"  {name}: " + " ".join(f"{k} {[round(x) for x in v]}" for k, v in fig.rates.items()), flush=True)
    return out


def goal_text(name: str, ratio: float, mirror: float) -> str:
    rg, ag = GOALS[name]
    if rg is None:
        return "-"
    return (f"issue >= {rg}x: {'met' if ratio >= rg else 'NOT met'}; "
            f"facts.md >= {ag}: {'met' if mirror >= ag else 'not reached'}")


def versus(mirror: float, other: float) -> str:
    r = mirror / other
    word = "ahead of" if r > 1 + LEVEL else "behind" if r < 1 - LEVEL else "level with"
    return f"mirror {word} GlusterFS: {r:.2f}x ({mirror:.0f} vs {other:.0f})"


def report(results: dict[str, Figures], args: argparse.Namespace, gluster_info: str = "") -> str:
    med = statistics.median
    has_g = any("gluster" in f.rates for f in results.values())
    sizes = {"seq MB/s": f"seq {args.mib} MiB", "4k fsync iops": f"{args.iops} x 4k fsync",
             "small files/s": f"{args.files} files"}
    what = ", ".join(text for name, text in sizes.items() if name in results)
    lines = [(f"replication_bench {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, protocol {args.protocol}, "
              f"{what}, medians of {args.runs}+ runs "
              f"(4k fsync: {max(args.runs, 5)}; pgbench: 1), after a warm-up pass; {os.cpu_count()} cores, "
              "both nodes and the workload on this machine")]
    if gluster_info:
        lines.append(gluster_info)
    has_f = any("fuse-only" in f.rates for f in results.values())
    head = f"{'workload':16} {'local':>10}" + (f" {'fuse-only':>10} {'ratio':>6}" if has_f else "")
    head += f" {'mirror':>10} {'ratio':>6}"
    lines.append(head + (f" {'gluster':>10} {'ratio':>6}" if has_g else "") + "   goal")
    for name, f in results.items():
        lm, rm = med(f.rates["local"]), med(f.rates["mirror"])
        row = f"{name:16} {lm:10.0f}"
        if has_f:
            fm = med(f.rates["fuse-only"])
            row += f" {fm:10.0f} {fm / lm:6.2f}"
        row += f" {rm:10.0f} {rm / lm:6.2f}"
        if has_g:
            gm = med(f.rates["gluster"])
            row += f" {gm:10.0f} {gm / lm:6.2f}"
        lines.append(row + "   " + goal_text(name, rm / lm, rm))
    if has_f:
        lines.append("fuse-only: our FUSE layer over a local directory, nothing replicated (bench/fuse_only.py): "
                     "the ceiling of the mirror here; mirror/fuse-only is what replication keeps of it:")
        lines.append("  " + ", ".join(f"{name} {med(f.rates['mirror']) / med(f.rates['fuse-only']):.2f}"
                                      for name, f in results.items()))
    lines.append("the mirror's 2 agent processes, CPU seconds per run, medians: "
                 + ", ".join(f"{name} {med(f.cpu['mirror']):.2f}" for name, f in results.items()))
    lines.append("minor page faults per run of the mirror's agents (new memory touched; core/replication/memory.py), "
                 "medians: " + ", ".join(f"{name} {med(f.faults.get('mirror') or [0]):.0f}" for name, f in results.items()))
    if has_g:
        lines.append(f"mirror vs GlusterFS replica 2, same run, medians (level: within {LEVEL:.0%}):")
        for name, f in results.items():
            lines.append(f"  {name:16} {versus(med(f.rates['mirror']), med(f.rates['gluster']))}")
        lines.append("CPU seconds per run, medians (mirror: its 2 agent processes; gluster: glusterd, 2 bricks, "
                     "self-heal daemon, FUSE client):")
        for name, f in results.items():
            mc, gc = med(f.cpu["mirror"]), med(f.cpu["gluster"])
            ratio = f"{gc / mc:.2f}" if mc > 0 else "-"
            lines.append(f"  {name:16} mirror {mc:6.2f}  gluster {gc:6.2f}  gluster/mirror {ratio}")
    lines += machine_lines(results)
    sides = list(next(iter(results.values())).rates) if results else []
    lines.append(f"runs ({' / '.join(sides)}):")
    for name, f in results.items():
        lines.append(f"  {name:16} " + " / ".join(str([round(x) for x in f.rates[s]]) for s in sides))
    return "\n".join(lines)


def machine_lines(results: dict[str, Figures]) -> list[str]:
    """How busy the machine's cores were during each side's runs, and, where the mirror kept them
    nearly all busy, the most its CPU cost allows here: its figure if every core did only its work."""
    cores = os.cpu_count() or 1
    lines = [(f"whole machine during each run (all processes and the kernel, /proc/stat), medians: CPU seconds "
              f"per run, and the share of the {cores} cores busy:")]
    for name, f in results.items():
        parts = []
        for side, used in f.machine.items():
            cpu = statistics.median(u[0] for u in used)
            busy = statistics.median(u[0] / (u[1] * cores) for u in used if u[1] > 0)
            parts.append(f"{side} {cpu:.2f} s {busy:.0%}")
        lines.append(f"  {name:16} " + ", ".join(parts))
        mirror = [(rate, u[0] / (u[1] * cores)) for rate, u in zip(f.rates["mirror"], f.machine["mirror"]) if u[1] > 0]
        if mirror and statistics.median(b for _, b in mirror) >= 0.8:
            most = statistics.median(rate / b for rate, b in mirror)
            lines.append(f"  {'':16} the mirror kept the cores {statistics.median(b for _, b in mirror):.0%} busy: "
                         f"at that CPU cost (busy polling included), every core busy would give ~{most:.0f} "
                         f"({most / statistics.median(f.rates['local']):.2f}x local)")
    return lines


def start_gluster(args: argparse.Namespace, base: Path, stack: contextlib.ExitStack) -> gluster.GlusterVolume | None:
    """The GlusterFS volume for the side-by-side column, or None (with a message saying why)."""
    if args.gluster is False:
        return None
    try:
        vol = stack.enter_context(gluster.gluster_volume(base, dict(args.gluster_set)))
    except gluster.GlusterUnavailable as exc:
        print(f"{exc}; running without the GlusterFS column", flush=True)
        return None
    print(f"gluster: volume {vol.name} mounted on {vol.mount}", flush=True)
    return vol


def gluster_info(vol: gluster.GlusterVolume) -> str:
    settings = ", ".join(f"{k} {v}" for k, v in vol.get(*GLUSTER_SHOWN).items())
    set_ = f"; set: {', '.join(f'{k}={v}' for k, v in vol.options.items())}" if vol.options else " (defaults)"
    return (f"gluster: {gluster.version()} replica 2, both bricks on {gluster.HOST} under {vol.work.parent}, "
            f"FUSE mount; {settings}{set_}")


@contextlib.contextmanager
def fuse_only_mount(directory: Path) -> Iterator[Side]:
    """bench/fuse_only.py serving `directory` in its own process, as the "fuse-only" side."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.fuse_only", str(directory)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"bench/fuse_only.py did not mount {directory} (exit status {proc.poll()})")
        yield Side("fuse-only", directory, lambda: [proc.pid])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        unmount(directory)  # in case it died before it could


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: mounts, volume, processes, directories


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--iops", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--protocol", choices=["A", "B", "C"], default="C")
    ap.add_argument("--pgbench", action="store_true", help="also PostgreSQL pgbench TPS (needs user postgres)")
    ap.add_argument("--only", action="append", choices=sorted(SHORT), default=[],
                    help="run only this workload (repeatable; pgbench also needs --pgbench)")
    ap.add_argument("--gluster", action=argparse.BooleanOptionalAction, default=None,
                    help="also a GlusterFS replica 2 volume of this machine, side by side "
                         "(default: on when GlusterFS is installed, see scripts/bench-setup.sh)")
    ap.add_argument("--gluster-set", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                    help="gluster volume set KEY VALUE before the start (default: none, GlusterFS's defaults)")
    ap.add_argument("--fuse-only", action=argparse.BooleanOptionalAction, default=True,
                    help="also our FUSE layer with nothing replicated (bench/fuse_only.py), the mirror's ceiling")
    ap.add_argument("--dir", default="/var/tmp", help="where the test directories are made")
    ap.add_argument("--out", help="also write the report to this file")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.ExitStack() as stack:  # unwound in reverse: GlusterFS first, then `base`
        base = Path(tempfile.mkdtemp(prefix="replbench-", dir=args.dir))
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        os.chmod(base, 0o755)
        local = base / "local"
        local.mkdir()
        fuse_side = None
        if args.fuse_only:
            (base / "fuse-only").mkdir()
            fuse_side = stack.enter_context(fuse_only_mount(base / "fuse-only"))
        dirs = [base / n for n in ("primary", "replica", "state")]
        for d in dirs:
            d.mkdir()
        vol = start_gluster(args, base, stack)
        info = gluster_info(vol) if vol else ""
        cfg = ReplicationConfig(directories=[dirs[0]], port=_free_port(), protocol=args.protocol)
        key = os.urandom(32)

        async def mirrored() -> dict[str, Figures]:
            second = ReplicationService("bench", cfg, "127.0.0.1", key, dirs[2] / "s", listen_address="127.0.0.1",
                                        receive_into={dirs[0]: dirs[1]})
            prim = ReplicationService("bench", cfg, "127.0.0.1", key, dirs[2] / "p")
            await second.become_secondary()
            try:
                await prim.become_primary()
                while not prim.status()["connected"]:
                    await asyncio.sleep(0.1)
                sides = [Side("local", local)] + ([fuse_side] if fuse_side else [])
                sides.append(Side("mirror", dirs[0], agent_pids))
                if vol:
                    sides.append(Side("gluster", vol.mount, vol.pids))
                return await asyncio.to_thread(run_all, sides, args)
            finally:
                await prim.stop()
                await second.stop()

        results = asyncio.run(mirrored())
    text = report(results, args, info)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
