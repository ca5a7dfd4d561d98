"""The secondary's replicated directories are read-only for applications (a read-only bind mount over
each), while the receiver keeps writing through the descriptors it opened before."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest
from safekit_cloud.core.config import ReplicationConfig
from safekit_cloud.core.replication import protect as p
from safekit_cloud.core.replication.service import ReplicationService

from .harness import KEY, force_unmount, free_port, fuse_available

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) needs root")


def _detach_all(path: Path) -> None:
    for _ in range(8):
        if subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False).returncode != 0:
            break


def _erofs(fn, *args) -> bool:
    try:
        fn(*args)
    except OSError as exc:
        assert exc.errno == errno.EROFS, exc
        return True
    return False


def test_descriptor_opened_before_stays_writable(tmp_path: Path) -> None:
    d, marker = tmp_path / "d", tmp_path / "state" / "m.readonly"
    d.mkdir()
    (d / "old").write_bytes(b"old")
    fd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    try:
        p.protect(d, marker)
        assert p.is_protected(d) and marker.exists()
        # Applications, by path: every kind of change is refused.
        assert _erofs((d / "new").write_bytes, b"x")
        assert _erofs((d / "old").write_bytes, b"x")
        assert _erofs(os.mkdir, d / "sub")
        assert _erofs(os.chmod, d / "old", 0o600)
        assert _erofs(os.setxattr, d / "old", "user.k", b"v")
        assert _erofs(os.unlink, d / "old")
        # The receiver, through its descriptor: everything works, and reaches the same files.
        w = os.open("new", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(w, b"replicated")
        os.close(w)
        os.mkdir("sub", dir_fd=fd)
        os.rename("old", "sub/old", src_dir_fd=fd, dst_dir_fd=fd)
        pfd = os.open("new", os.O_PATH, dir_fd=fd)
        os.chmod(f"/proc/self/fd/{pfd}", 0o600)  # the magic links apply uses
        os.setxattr(f"/proc/self/fd/{pfd}", "user.k", b"v")
        os.close(pfd)
        assert (d / "new").read_bytes() == b"replicated" and (d / "sub" / "old").exists()
        assert os.getxattr(d / "new", "user.k") == b"v"
        # Protecting again (a restarted agent) does not stack a second mount.
        p.protect(d, marker)
        assert sum(line.split()[4] == os.fsencode(d) for line in Path("/proc/self/mountinfo").read_bytes().splitlines()) == 1
        assert p.unprotect(d, marker)
        assert not p.is_protected(d) and not marker.exists()
        (d / "after").write_bytes(b"writable again")
    finally:
        os.close(fd)
        _detach_all(d)


def test_unprotect_only_removes_our_own_mount(tmp_path: Path) -> None:
    d, marker = tmp_path / "d", tmp_path / "m.readonly"
    d.mkdir()
    try:
        subprocess.run(["mount", "--bind", str(d), str(d)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], check=True)
        assert p.is_protected(d)
        assert not p.unprotect(d, marker)  # no marker: somebody else's mount, left alone
        assert p.is_protected(d)
    finally:
        _detach_all(d)


def test_read_only_bind_goes_beneath_the_mount_before_it_is_removed(tmp_path: Path) -> None:
    """The primary's stop: the read-only bind is put beneath its mount (a tmpfs stands in for the
    FUSE mount here), so when that mount goes, applications find the directory read-only at once.
    The next receiver writes through a private writable copy of the bind, which stays in place."""
    d, marker = tmp_path / "d", tmp_path / "state" / "m.readonly"
    d.mkdir()
    (d / "real").write_bytes(b"real")
    root = os.open(d, os.O_PATH | os.O_DIRECTORY)  # as the primary's agent opens it before its mount
    try:
        subprocess.run(["mount", "-t", "tmpfs", "stand-in", str(d)], check=True)
        p.protect_beneath(root, d, marker)
        assert marker.exists()
        assert not (d / "real").exists()  # the mount on top still serves until it goes
        subprocess.run(["umount", "-l", str(d)], check=True)
        assert (d / "real").read_bytes() == b"real" and p.is_protected(d)
        assert _erofs((d / "new").write_bytes, b"x")
        assert _erofs(os.unlink, d / "real")
        receiver_root = p.open_writable(d, marker)
        try:
            w = os.open("new", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=receiver_root)
            os.write(w, b"replicated")
            os.close(w)
            os.mkdir("sub", dir_fd=receiver_root)
        finally:
            os.close(receiver_root)
        assert (d / "new").read_bytes() == b"replicated" and (d / "sub").is_dir()
        assert p.is_protected(d) and _erofs((d / "other").write_bytes, b"x")  # still read-only
        assert p.unprotect(d, marker)
        (d / "after").write_bytes(b"writable again")
        plain = p.open_writable(d, marker)  # nothing to go beneath: the directory itself
        try:
            assert os.stat("after", dir_fd=plain).st_size == len(b"writable again")
        finally:
            os.close(plain)
    finally:
        os.close(root)
        _detach_all(d)


def test_a_marker_says_in_which_boot_its_bind_was_made(tmp_path: Path) -> None:
    """A bind of ours found gone: removed by hand in this boot (what changed since is compared), or
    gone with a reboot (the journal's boot logic covers it)."""
    d, marker = tmp_path / "d", tmp_path / "state" / "m.readonly"
    d.mkdir()
    try:
        p.protect(d, marker)
        assert not p.made_in_another_boot(marker)
        directory, _this_boot = marker.read_text().splitlines()
        marker.write_text(f"{directory}\nan-earlier-boot\n")
        assert p.made_in_another_boot(marker)
        # Not text (damaged): it says nothing of a reboot, so the bind counts as removed by hand
        # and what changed is compared (it raised UnicodeDecodeError at every role change).
        marker.write_bytes(b"\xff\xfe/d\n\xff\n")
        assert not p.made_in_another_boot(marker)
    finally:
        _detach_all(d)


fuse = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))


@pytest.mark.fuse
@fuse
def test_secondary_read_only_for_applications(tmp_path: Path) -> None:
    data, replica = tmp_path / "data", tmp_path / "replica"
    data.mkdir()
    replica.mkdir()
    (replica / "seed").write_bytes(b"seed")
    cfg = ReplicationConfig(directories=[data], port=free_port())

    async def scenario() -> dict[str, object]:
        out: dict[str, object] = {}
        secondary = ReplicationService("mod", cfg, "127.0.0.1", KEY, tmp_path / "state2",
                                       listen_address="127.0.0.1", receive_into={data: replica})
        primary = ReplicationService("mod", cfg, "127.0.0.1", KEY, tmp_path / "state1", timeout=2.0)
        await secondary.become_secondary()
        try:
            out["ready_protected"] = secondary._agents[0].status.get("protected")
            out["app_write"] = await asyncio.to_thread(_erofs, (replica / "app").write_bytes, b"x")
            out["app_seed"] = await asyncio.to_thread(_erofs, (replica / "seed").write_bytes, b"x")
            await primary.become_primary()
            for _ in range(50):
                if primary.status()["connected"]:
                    break
                await asyncio.sleep(0.1)
            await asyncio.to_thread((data / "f").write_bytes, b"replicated")
            await asyncio.to_thread(os.mkdir, data / "d")
            out["landed"] = (replica / "f").read_bytes() if (replica / "f").exists() else None
            # A primary agent killed with SIGKILL leaves a dead mount: the service removes it with
            # a read-only bind beneath first, so the directory is never writable for applications.
            primary._agents[0].proc.send_signal(signal.SIGKILL)
            await primary._agents[0].proc.wait()
            await primary._stop_agents()
            out["dead_mount_covered"] = p.is_protected(data) and await asyncio.to_thread(
                _erofs, (data / "app").write_bytes, b"x")
            await primary.stop()
            # A stopped module's directory is writable (the agent left it read-only as its mount
            # went, for a next role; the stop of the module removes that).
            out["primary_dir_after_stop"] = not p.is_protected(data) and not await asyncio.to_thread(
                _erofs, (data / "admin").write_bytes, b"x")
            # Orderly stop: the directory is writable again.
            await secondary.stop()
            out["after_stop"] = not await asyncio.to_thread(_erofs, (replica / "app").write_bytes, b"x")
            # A receiver killed with SIGKILL leaves its bind behind; the service removes it on stop.
            await secondary.become_secondary()
            out["protected_again"] = p.is_protected(replica)
            secondary._agents[0].proc.send_signal(signal.SIGKILL)
            await secondary._agents[0].proc.wait()
            out["left_behind"] = p.is_protected(replica)
            # One stopping on its own (SIGTERM, as when its daemon dies) leaves it too: the
            # directory is not left writable with nobody watching it.
            await secondary.become_secondary()
            secondary._agents[0].proc.send_signal(signal.SIGTERM)
            await secondary._agents[0].proc.wait()
            out["left_at_a_clean_stop"] = p.is_protected(replica)
            await secondary.stop()
            out["after_kill"] = not p.is_protected(replica) and not await asyncio.to_thread(
                _erofs, (replica / "app2").write_bytes, b"x")
            return out
        finally:
            await primary.stop()
            await secondary.stop()

    try:
        out = asyncio.run(scenario())
    finally:
        force_unmount(data)
        _detach_all(replica)
    assert out["ready_protected"] == [str(replica)]
    assert out["app_write"] and out["app_seed"]
    assert out["landed"] == b"replicated" and (replica / "d").is_dir()
    assert out["after_stop"] and out["primary_dir_after_stop"]
    assert out["protected_again"] and out["left_behind"] and out["left_at_a_clean_stop"]
    assert out["dead_mount_covered"]
    assert out["after_kill"]
