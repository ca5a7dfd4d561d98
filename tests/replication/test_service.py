"""ReplicationService end to end: agent processes, a FUSE primary and a receiver, over loopback."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import time
from pathlib import Path

import pytest
from safekit_cloud.core.config import ReplicationConfig
from safekit_cloud.core.replication.mount import mounted_fuse_at
from safekit_cloud.core.replication.service import ReplicationService

from .harness import KEY, describe_tree, force_unmount, free_port, fuse_available, running_pair, wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))]


def _blocking(fn, *args):
    return asyncio.to_thread(fn, *args)


def test_service_primary_and_secondary(tmp_path: Path) -> None:
    """Both roles on one machine: the secondary receives the stream of `data` into `replica`."""
    data, replica = tmp_path / "data", tmp_path / "replica"
    data.mkdir()
    replica.mkdir()
    port = free_port()
    cfg = ReplicationConfig(directories=[data], exclude=["*.tmp"], port=port)
    lost: list[str] = []

    from safekit_cloud.core.replication.exclude import Excluder

    primary_excluder = Excluder(cfg.exclude)

    async def scenario() -> tuple[dict, dict, float, bool]:
        secondary = ReplicationService("mod", cfg, "127.0.0.1", KEY, tmp_path / "state2",
                                       listen_address="127.0.0.1", receive_into={data: replica})
        primary = ReplicationService("mod", cfg, "127.0.0.1", KEY, tmp_path / "state1",
                                     on_link_lost=lost.append, timeout=1.0)
        await secondary.become_secondary()
        try:
            await primary.become_primary()
            assert mounted_fuse_at(data)
            for _ in range(50):
                if primary.status()["connected"]:
                    break
                await asyncio.sleep(0.1)
            st_connected = primary.status()
            await _blocking((data / "f").write_bytes, b"hello")
            await _blocking(os.mkdir, data / "d")
            await _blocking((data / "d" / "x.tmp").write_bytes, b"not replicated")
            await asyncio.sleep(1.2)  # one status period
            st_after = primary.status()
            same = describe_tree(data, primary_excluder) == describe_tree(replica)
            # Kill the receiver agent abruptly: the next write returns within the timeout, alone.
            secondary._agents[0].proc.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            await _blocking((data / "g").write_bytes, b"world")
            elapsed = time.monotonic() - t0
            for _ in range(30):
                if lost:
                    break
                await asyncio.sleep(0.1)
            await primary.stop()
            assert not mounted_fuse_at(data)
            return st_connected, st_after, elapsed, same
        finally:
            await primary.stop()
            await secondary.stop()

    try:
        st_connected, st_after, elapsed, same = asyncio.run(scenario())
    finally:
        force_unmount(data)
    assert st_connected["connected"] and st_connected["role"] == "primary"
    assert st_after["bytes_sent"] > 0 and same
    assert (replica / "f").read_bytes() == b"hello" and not (replica / "d" / "x.tmp").exists()
    assert elapsed < 3.0
    assert lost
    assert (data / "f").read_bytes() == b"hello" and (data / "g").read_bytes() == b"world"


def test_a_full_secondary_disk_is_retried_with_a_growing_delay_then_recovers(tmp_path: Path) -> None:
    """The secondary's disk fills up (a 1 MiB tmpfs): it refuses the stream with the reason, the
    primary goes on alone and retries after a doubling delay (every attempt costs a resync on both
    nodes; before, it reconnected at once: over a thousand resyncs in 8 s). Once space is back the
    link recovers by itself and the replica is identical."""
    import subprocess

    data, disk = tmp_path / "data", tmp_path / "disk"
    replica = disk / "replica"  # below the tmpfs' root: the read-only bind over it is not the disk's mount
    data.mkdir()
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    replica.mkdir()
    cfg = ReplicationConfig(directories=[data], port=free_port())
    lost: list[str] = []

    async def scenario() -> tuple[int, str, dict, bool]:
        async with running_pair(tmp_path, cfg, data, replica, on_link_lost=lost.append,
                                timeout=1.0) as (secondary, primary):
            assert await wait_for(lambda: primary.status()["connected"], 5)
            await _blocking((data / "big").write_bytes, os.urandom(2 << 20))  # returns: the primary goes alone
            await asyncio.sleep(6)
            refused, last = len(lost), primary.status()["last_lost"]
            receiver_status = secondary.status()["agents"]["receiver"]["streams"][str(data)]
            await _blocking(subprocess.run, ["mount", "-o", "remount,size=64m", str(disk)])
            await wait_for(lambda: primary.status()["synced"], 40)  # the delay had reached 4-8 s
            same = describe_tree(data) == describe_tree(replica)
            return refused, last, receiver_status, same

    try:
        refused, last, receiver_status, same = asyncio.run(scenario())
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    assert 2 <= refused <= 6, lost
    assert "No space left on device" in last, last
    assert "No space left on device" in receiver_status["last_error"], receiver_status
    assert same


def test_reconnect_delay_doubles_up_to_a_cap() -> None:
    from safekit_cloud.core.replication.agent import reconnect_delay

    assert [reconnect_delay(n, 0.5) for n in range(9)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert reconnect_delay(10**6, 0.5) == 30.0


def _start_error(cfg: ReplicationConfig, state_dir: Path, role: str) -> str:
    """What the service raises when its role cannot start ("no error" if it starts)."""
    async def attempt() -> str:
        svc = ReplicationService("mod", cfg, "127.0.0.1", KEY, state_dir, listen_address="127.0.0.1")
        try:
            await (svc.become_primary() if role == "primary" else svc.become_secondary())
        except RuntimeError as exc:
            return str(exc)
        finally:
            await svc.stop()
        return "no error"

    return asyncio.run(attempt())


def test_a_missing_replicated_directory_fails_with_what_to_do(tmp_path: Path) -> None:
    cfg = ReplicationConfig(directories=[tmp_path / "missing"], port=free_port())
    for role in ("primary", "secondary"):
        reason = _start_error(cfg, tmp_path / role, role)
        want = f"replicated directory {tmp_path / 'missing'}: No such file or directory: create it on this node"
        assert want in reason, reason
        assert "Traceback" not in reason


def test_another_file_system_mounted_inside_a_replicated_directory_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """A tmpfs mounted inside the directory: its files would be served and replicated as the
    directory's own (their inode numbers mixed with its files': on two file systems one number
    names two files), and the other node would hold them on its own disk. Both roles refuse it,
    the secondary also when its read-only bind (left by an earlier run) covers the directory."""
    import subprocess

    from safekit_cloud.core.replication.protect import marker_path, protect

    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    cfg = ReplicationConfig(directories=[data], port=free_port())
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(data / "logs")], check=True)
    try:
        want = (f"replicated directory {data}: {data / 'logs'} is a mount point inside it (another file system), "
                "which replication does not support: mount it outside the replicated directory")
        for role in ("primary", "secondary"):
            reason = _start_error(cfg, tmp_path / role, role)
            assert want in reason and "Traceback" not in reason, reason
            assert not mounted_fuse_at(data)
        protect(data, marker_path(tmp_path / "secondary", "mod", data))
        try:
            reason = _start_error(cfg, tmp_path / "secondary", "secondary")
            assert want in reason, reason
        finally:
            subprocess.run(["umount", "-l", str(data)], check=False)
    finally:
        subprocess.run(["umount", "-l", str(data / "logs")], check=False)


def test_a_replicated_directory_named_through_a_symlink_is_mounted_protected_and_released(tmp_path: Path) -> None:
    """replication.directories names /var/lib/app, a symlink to /data/app (a common layout). The
    mounts go on the real directory and are found and removed there: before, the primary's stop
    could neither put its read-only bind beneath its mount nor unmount it (umount and move_mount
    do not follow a final symlink), the agent failed and left a dead mount (ENOTCONN) over the
    application's data. Two rounds: the second one is a journal resync, and nothing is left."""
    real, replica_real = tmp_path / "real", tmp_path / "replica-real"
    real.mkdir()
    replica_real.mkdir()
    data, replica = tmp_path / "data", tmp_path / "replica"
    data.symlink_to(real)
    replica.symlink_to(replica_real)
    cfg = ReplicationConfig(directories=[data], port=free_port())

    def ours_mounted() -> list[str]:
        return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp_path) in line]

    async def round_(n: int) -> tuple[list[str], bool]:
        async with running_pair(tmp_path, cfg, data, replica, timeout=2.0) as (_, primary):
            assert await wait_for(lambda: primary.status()["synced"], 20)
            assert mounted_fuse_at(real)
            await _blocking((data / f"written-{n}").write_bytes, b"through the symlink")
            await asyncio.sleep(0.3)
            with pytest.raises(OSError) as refused:
                (replica / "stray").write_bytes(b"x")
            assert refused.value.errno == errno.EROFS
            modes = (primary.status()["last_resync"] or {}).get("modes")
        return modes, bool(ours_mounted())

    try:
        assert asyncio.run(round_(0))[1] is False  # nothing left mounted after the stop
        modes, left = asyncio.run(round_(1))
        assert modes == ["journal"] and not left
        assert describe_tree(real) == describe_tree(replica_real)
        assert (replica_real / "written-1").read_bytes() == b"through the symlink"
        (data / "after-the-stop").write_bytes(b"writable again")  # no read-only bind, no dead mount
    finally:
        force_unmount(real)


def test_a_mount_removed_from_outside_is_reported_and_the_next_resync_compares_everything(tmp_path: Path) -> None:
    """`umount -l` of the primary's mount by someone else: what the application writes there next goes
    around replication into no journal. The agent reports it as failed (the engine restarts the
    module on a new mount) and its journal is no longer trusted, so the next resync compares every
    file and the replica gets those writes too. (A space in the path: mountinfo escapes it.)"""
    import subprocess

    data, replica = tmp_path / "data dir", tmp_path / "replica"
    data.mkdir()
    replica.mkdir()
    cfg = ReplicationConfig(directories=[data], port=free_port())
    failed: list[str] = []

    async def scenario() -> tuple[dict, bool]:
        async with running_pair(tmp_path, cfg, data, replica, on_agent_failed=failed.append,
                                timeout=1.0) as (_, primary):
            await wait_for(lambda: primary.status()["synced"], 10)
            await _blocking((data / "through-the-mount").write_bytes, b"replicated")
            await _blocking(subprocess.check_call, ["umount", "-l", str(data)])
            await _blocking((data / "around-it").write_bytes, b"written to the bare directory")
            await wait_for(lambda: failed, 5)
            assert failed and "removed from outside" in failed[0], failed
            await primary.become_primary()  # what the engine does on replication_failed
            await wait_for(lambda: primary.status()["synced"], 10)
            return primary.status()["last_resync"], describe_tree(data) == describe_tree(replica)

    last, same = asyncio.run(scenario())
    assert last["modes"] == ["checksum"], last
    assert same and (replica / "around-it").read_bytes() == b"written to the bare directory"


def test_a_secondary_whose_protection_is_removed_makes_it_again_and_is_compared_in_full(tmp_path: Path) -> None:
    """Someone unmounts the secondary's read-only bind and writes into the replica: the receiver
    makes the bind again, forgets its lineage and ends the stream, so the primary's next resync
    compares every file and the stray change is undone."""
    import subprocess

    from safekit_cloud.core.replication.protect import is_protected

    data, replica = tmp_path / "data", tmp_path / "replica"
    data.mkdir()
    replica.mkdir()
    cfg = ReplicationConfig(directories=[data], port=free_port())

    async def scenario() -> tuple[bool, dict, bool, str, str]:
        async with running_pair(tmp_path, cfg, data, replica, timeout=1.0) as (secondary, primary):
            await _blocking((data / "f").write_bytes, b"from the primary")
            assert await wait_for(lambda: primary.status()["synced"], 10)
            first = primary.status()["last_resync"]["finished_at"]
            await _blocking(subprocess.check_call, ["umount", str(replica)])
            await _blocking((replica / "f").write_bytes, b"written on the secondary")
            reprotected = await wait_for(lambda: is_protected(replica), 5)

            def resynced_again() -> bool:
                st = primary.status()
                return st["synced"] and (st["last_resync"] or {}).get("finished_at") not in (None, first)

            assert await wait_for(resynced_again, 10)

            def stream_ended() -> str:  # the receiver's status comes once a second
                return str(secondary.status()["agents"]["receiver"].get("streams", {}).get(str(data), {})
                           .get("last_error") or "")

            await wait_for(lambda: stream_ended(), 5)
            return (reprotected, primary.status()["last_resync"], describe_tree(data) == describe_tree(replica),
                    primary.status()["last_lost"], stream_ended())

    reprotected, last, same, lost, ended = asyncio.run(scenario())
    assert reprotected
    assert last["modes"] == ["checksum"], last
    assert same and (replica / "f").read_bytes() == b"from the primary"
    # Why the stream ended, on both sides (before: "receiver closed the connection", "peer closed
    # the stream").
    assert "read-only protection" in lost and "compares every file" in lost, lost
    assert "read-only protection" in ended, ended


def test_a_hung_agent_is_killed_and_the_application_gets_an_error_not_a_wait(tmp_path: Path) -> None:
    """The primary's agent stops answering (SIGSTOP here; a deadlock would do the same): after
    `agent_timeout` its mount is aborted, so the application's call fails instead of waiting for
    ever, the agent is killed, and its failure is reported for the module to restart it."""
    data, replica = tmp_path / "data", tmp_path / "replica"
    data.mkdir()
    replica.mkdir()
    cfg = ReplicationConfig(directories=[data], port=free_port(), agent_timeout=2)
    failed: list[str] = []

    def write() -> str:
        try:
            (data / "during").write_bytes(b"x")
        except OSError as exc:
            return exc.strerror or str(exc)
        return "written"

    async def scenario() -> str:
        async with running_pair(tmp_path, cfg, data, replica, on_agent_failed=failed.append,
                                timeout=1.0) as (_, primary):
            assert await wait_for(lambda: primary.status()["synced"], 10)
            pid = primary.status()["agents"][str(data)]["pid"]
            os.kill(pid, signal.SIGSTOP)  # the agent this test's service started
            async with asyncio.timeout(20):  # without the watchdog: for ever
                outcome = await asyncio.to_thread(write)
            await wait_for(lambda: failed, 5)
            return outcome

    outcome = asyncio.run(scenario())
    # ECONNABORTED for the call that was waiting, ENOTCONN for a later one: an error, not a wait
    assert outcome in (os.strerror(errno.ECONNABORTED), os.strerror(errno.ENOTCONN)), outcome
    assert failed and "not responding" in failed[0], failed


def test_an_application_with_many_files_open_through_the_mount_is_not_refused(tmp_path: Path) -> None:
    """The primary agent holds one backing descriptor per file open through the mount: started
    from a shell whose limit is 256 descriptors, it raises its own to the hard limit, and an
    application with 1,000 files open keeps opening them (before: EMFILE at about the 250th)."""
    import resource

    data, replica = tmp_path / "data", tmp_path / "replica"
    data.mkdir()
    replica.mkdir()
    cfg = ReplicationConfig(directories=[data], port=free_port())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= 2048, "this test needs a hard limit of at least 2,048 descriptors"

    def open_many() -> int:
        fds = []
        try:
            for i in range(1000):
                fds.append(os.open(data / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644))
        finally:
            for fd in fds:
                os.close(fd)
        return len(fds)

    async def scenario() -> int:
        # The agents inherit it (above what this test process has open: a long run's leftovers).
        low = max(256, len(os.listdir("/proc/self/fd")) + 64)
        assert low < 1000
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        try:
            async with running_pair(tmp_path, cfg, data, replica) as (_, primary):
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                assert await wait_for(lambda: primary.status()["connected"], 5)
                return await _blocking(open_many)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    assert asyncio.run(scenario()) == 1000
    assert len(os.listdir(replica)) == 1000
