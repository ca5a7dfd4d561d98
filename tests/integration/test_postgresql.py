"""The PostgreSQL example (docs/examples/postgresql) on a real two-node cluster with replicated data.

Its scripts run unchanged; only environment variables place PGDATA inside the lab's replicated
folder (each node has its own copy, in its own mount namespace) and the socket and log per node.
pgbench runs from the client against the virtual IP; the primary is powered off in the middle (every
process killed, cables pulled); PostgreSQL must start on the other node with every transaction
pgbench saw committed, then the old primary comes back as an up-to-date secondary.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safekit_cloud.core.lab import LabError, lab_supported
from safekit_cloud.core.labcluster import LabCluster

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "postgresql" / "scripts"
PGBIN = next((d for d in ("/usr/lib/postgresql/15/bin",) if os.path.isfile(f"{d}/pg_ctl")),
             os.path.dirname(shutil.which("pg_ctl") or "/nonexistent/pg_ctl"))
PORT = 5432
CLIENTS = 4


def postgresql_missing() -> str | None:
    for tool in ("initdb", "pg_ctl", "postgres", "pgbench", "psql", "pg_isready"):
        if not os.access(f"{PGBIN}/{tool}", os.X_OK) and shutil.which(tool) is None:
            return f"PostgreSQL's {tool} is not installed (scripts/setup.sh installs postgresql)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres system user (scripts/setup.sh creates it)"
    for tool in ("runuser",):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux)"
    return None


def fuse_missing() -> str | None:
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not available"
    return None


pytestmark = [
    pytest.mark.netns, pytest.mark.fuse,
    pytest.mark.skipif(not lab_supported()[0], reason=f"network namespaces: {lab_supported()[1]}"),
    pytest.mark.skipif(fuse_missing() is not None, reason=f"FUSE: {fuse_missing()}"),
    pytest.mark.skipif(postgresql_missing() is not None, reason=str(postgresql_missing())),
    pytest.mark.timeout(240),
]


def tool(name: str) -> str:
    return f"{PGBIN}/{name}" if os.access(f"{PGBIN}/{name}", os.X_OK) else name


@pytest.fixture
def cluster() -> Iterator[LabCluster]:
    made = LabCluster(
        interval=0.1, timeout=0.5, module="pg", replicate=True, scripts_dir=EXAMPLE, service_port=PORT,
        script_env={
            "PGBIN": PGBIN,
            "PGPORT": str(PORT),
            "PGDATA": "{workdir}/data/main",  # inside the replicated folder (LabCluster.data_dir)
            "PG_SOCKET_DIR": "{workdir}/run-{node}",
            "PG_LOG": "{workdir}/run-{node}/postgresql.log",
            "PG_CLIENT_NET": "198.18.0.0/24",
            "PG_CLIENT_AUTH": "trust",
            "PG_OPTIONS": "-c shared_buffers=32MB -c max_connections=30",
            "PG_STOP_TIMEOUT": "15",
        },
        # tolerant of a loaded machine: a slow pg_isready must not fail the primary over mid-test
        checkers=[{"name": "pg", "type": "command", "interval": 1, "timeout": 10, "failures": 5,
                   "command": [tool("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(PORT), "-t", "8"]}],
        extra_module={"scripts": {"directory": str(EXAMPLE), "timeout": 90, "stop_timeout": 40}},
    )
    try:
        made.build()
        assert made.workdir is not None
        os.chmod(made.workdir, 0o711)  # the postgres user must reach PGDATA, socket and log inside it
        yield made
    finally:
        made.close()


def sql(cluster: LabCluster, query: str, timeout: float = 20) -> str:
    """Run `query` from the client through the virtual IP; its output, unaligned."""
    assert cluster.lab is not None
    vip = cluster.vip.split("/")[0]
    done = cluster.lab.run("client", [tool("psql"), "-X", "-h", vip, "-p", str(PORT), "-U", "postgres", "-d",
                                      "postgres", "-v", "ON_ERROR_STOP=1", "-At", "-c", query],
                           timeout=timeout)
    return done.stdout.strip()


def sql_when_up(cluster: LabCluster, query: str, within: float = 30) -> str:
    """`sql`, retried while the server is still starting (crash recovery) or the VIP moving."""
    deadline = time.monotonic() + within
    while True:
        try:
            return sql(cluster, query, timeout=10)
        except LabError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def completed_transactions(prefix: Path) -> int:
    """Transactions pgbench logged as completed (-l): one line each, its 3rd field the latency in us.
    Failed or skipped ones have a word there instead; aborted clients log nothing for their last one."""
    count = 0
    for log in prefix.parent.glob(prefix.name + ".*"):
        for line in log.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2].isdigit():
                count += 1
    return count


def node_log(cluster: LabCluster, node: str) -> str:
    assert cluster.workdir is not None
    path = cluster.workdir / f"run-{node}" / "postgresql.log"
    return path.read_text(errors="replace") if path.exists() else ""


def test_pgbench_through_vip_survives_power_off_of_the_primary(cluster: LabCluster) -> None:
    assert cluster.lab is not None and cluster.workdir is not None
    vip = cluster.vip.split("/")[0]
    pg = ["-h", vip, "-p", str(PORT), "-U", "postgres"]

    cluster.start_daemon("n1")
    cluster.start_daemon("n2")
    # n1 runs initdb on its first start (through the replication mount), n2 receives it all
    cluster.wait_states({"n1": "PRIM", "n2": "SECOND"}, timeout=60)

    init = cluster.lab.run("client", [tool("pgbench"), "-i", "-s", "1", "-q", *pg, "postgres"], timeout=60,
                           check=False)
    assert init.returncode == 0, init.stderr
    assert sql(cluster, "select count(*) from pgbench_history") == "0"

    prefix = cluster.workdir / "pgbench"
    # Keepalives: a client waiting for the answer of a server that died notices it (the probe reaches
    # the VIP's new owner, which resets the connection) instead of waiting for ever.
    conninfo = "dbname=postgres keepalives=1 keepalives_idle=1 keepalives_interval=1 keepalives_count=3 " \
               "tcp_user_timeout=5000"
    bench = cluster.lab.spawn("client", [tool("pgbench"), "-c", str(CLIENTS), "-T", "15", "-l",
                                         f"--log-prefix={prefix}", *pg, conninfo],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(5)
    running = sql(cluster, "select count(*) from pgbench_history")
    assert int(running) > 0, "pgbench committed nothing in 5 s"

    cluster.power_off("n1")  # cables pulled, daemon, agents and PostgreSQL killed at once
    try:
        output, _ = bench.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        bench.kill()
        output, _ = bench.communicate()
        pytest.fail(f"pgbench did not end after the power-off: {output[-2000:]}")
    logged = completed_transactions(prefix)
    processed = re.search(r"number of transactions actually processed: (\d+)", output)
    assert logged > 0, output[-2000:]
    if processed:  # pgbench's own total agrees with its per-transaction log
        assert int(processed.group(1)) == logged, output[-2000:]

    cluster.wait_states({"n2": "ALONE"}, timeout=30)
    kept = int(sql_when_up(cluster, "select count(*) from pgbench_history"))
    # every transaction pgbench saw committed is there; at most one more per client: committed on n1
    # and replicated, but the acknowledgement never reached pgbench
    assert logged <= kept <= logged + CLIENTS, f"pgbench logged {logged} commits, n2 has {kept} rows"
    print(f"pgbench: {logged} commits logged before the power-off, {kept} rows on n2 after failover")
    # PostgreSQL recovered from a crash (not from a clean shutdown), and serves reads and writes
    assert "database system was interrupted" in node_log(cluster, "n2") or \
        "was not properly shut down" in node_log(cluster, "n2"), node_log(cluster, "n2")[-3000:]
    assert sql(cluster, "select pg_is_in_recovery()") == "f"
    # the TPC-B invariant: each transaction changed a branch, a teller and an account by the same delta
    sums = sql(cluster, "select (select sum(abalance) from pgbench_accounts), (select sum(bbalance) from "
                        "pgbench_branches), (select sum(tbalance) from pgbench_tellers), "
                        "(select coalesce(sum(delta), 0) from pgbench_history)")
    assert len(set(sums.split("|"))) == 1, f"balances disagree after failover: {sums}"
    # the primary-key index agrees with the table (bt_index_check raises, hence psql fails, otherwise)
    sql(cluster, "create extension if not exists amcheck")
    sql(cluster, "select bt_index_check('pgbench_accounts_pkey', true)")
    sql(cluster, "create table after_failover as select 1 as x")

    # the old primary reboots: it must come back as a resynchronised secondary, not as a primary
    cluster.power_on("n1")
    cluster.wait_states({"n1": "SECOND", "n2": "PRIM"}, timeout=60)
    assert int(sql(cluster, "select count(*) from pgbench_history")) == kept
    sql(cluster, "checkpoint")
    verify = cluster.cli("n2", "verify", timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # failback by hand: the resynchronised copy on n1 serves everything
    swap = cluster.cli("n2", "swap")
    assert swap.returncode == 0, swap.stdout + swap.stderr
    cluster.wait_states({"n1": "PRIM", "n2": "SECOND"}, timeout=60)
    assert int(sql_when_up(cluster, "select count(*) from pgbench_history")) == kept
    assert sql(cluster, "select count(*) from after_failover") == "1"



def run_by_hand(cluster: LabCluster, node: str, argv: list[str], env: dict[str, str], timeout: float = 120) -> str:
    """What an administrator runs on `node` itself: in its namespaces, on its own copy of the data."""
    proc = cluster.app_spawn(node, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(argv)} did not finish in {timeout:g}s: {output[-2000:]}")
    assert proc.returncode == 0, f"{' '.join(argv)}: {output[-2000:]}"
    return output


def wait_stopped(cluster: LabCluster, node: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while (cluster.status(node) or {}).get("modules", [{}])[0].get("state") != "STOP":
        assert time.monotonic() < deadline, f"{node} did not stop: {cluster.status(node)}"
        time.sleep(0.2)


def test_postgresql_run_by_hand_while_the_module_is_stopped_is_resynchronised(cluster: LabCluster) -> None:
    """An administrator stops the module on both nodes (the secondary first), starts PostgreSQL by
    hand on the primary for maintenance, runs transactions, stops it, then starts the module again.
    None of that went through replication. The restart finds it: a journal resync (the tree was
    watched until the stop, so only what changed is compared, not the data set), replicas that
    verify identical, and every row there, on both nodes."""
    assert cluster.lab is not None and cluster.workdir is not None
    cluster.start_daemon("n1")
    cluster.start_daemon("n2")
    cluster.wait_states({"n1": "PRIM", "n2": "SECOND"}, timeout=60)
    vip = cluster.vip.split("/")[0]
    init = cluster.lab.run("client", [tool("pgbench"), "-i", "-s", "2", "-q", "-h", vip, "-p", str(PORT), "-U",
                                      "postgres", "postgres"], timeout=60, check=False)
    assert init.returncode == 0, init.stderr
    sql(cluster, "checkpoint")

    for node in ("n2", "n1"):  # the secondary first: the primary then has no one to hand over to
        stop = cluster.cli(node, "stop", timeout=90)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        wait_stopped(cluster, node)

    env = dict(cluster.env("n1"), PG_REQUIRE_REPLICATED="0")  # the plain directory: no mount now
    run_by_hand(cluster, "n1", [str(EXAMPLE / "start_prim"), "STOP", "PRIM", "start"], env)
    run_by_hand(cluster, "n1", ["runuser", "-u", "postgres", "--", tool("pgbench"), "-n", "-c", "2", "-t", "150",
                                "-h", str(cluster.workdir / "run-n1"), "-p", str(PORT), "postgres"], env)
    run_by_hand(cluster, "n1", [str(EXAMPLE / "stop_prim"), "PRIM", "STOP", "stop"], env)
    data_set = sum(f.stat().st_size for f in cluster.disk("n1").rglob("*") if f.is_file() and not f.is_symlink())

    for node in ("n1", "n2"):
        start = cluster.cli(node, "start", timeout=90)
        assert start.returncode == 0, start.stdout + start.stderr
    cluster.wait_states({"n1": "PRIM", "n2": "SECOND"}, timeout=90)
    replication = (cluster.status("n1") or {}).get("modules", [{}])[0].get("replication") or {}
    last = replication.get("last_resync") or {}
    print(f"resync after PostgreSQL ran by hand ({data_set} bytes in the data directory): {last}")
    assert last.get("modes") == ["journal"], last
    assert sql_when_up(cluster, "select count(*) from pgbench_history") == "300"
    sql(cluster, "checkpoint")
    verify = cluster.cli("n1", "verify", timeout=90)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    swap = cluster.cli("n1", "swap", timeout=90)
    assert swap.returncode == 0, swap.stdout + swap.stderr
    cluster.wait_states({"n1": "SECOND", "n2": "PRIM"}, timeout=90)
    assert sql_when_up(cluster, "select count(*) from pgbench_history") == "300"
