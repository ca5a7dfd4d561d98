from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from safekit_cloud.core.replication.syscalls import renameat2

from .harness import Mirror, describe_tree, fuse_available, running_mirror

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))]


@pytest.fixture
def mirror(tmp_path: Path):
    def preexisting(primary: Path, replica: Path) -> None:
        (primary / "preexisting").write_bytes(b"old")  # the mount goes over data already there
        shutil.copy2(primary / "preexisting", replica / "preexisting")

    with running_mirror(tmp_path, Mirror, preexisting, exclude=["tmp/", "*.tmp"]) as mir:
        yield mir


def test_smoke(mirror: Mirror) -> None:
    p = mirror.primary
    assert (p / "preexisting").read_bytes() == b"old"
    (p / "d").mkdir()
    with open(p / "d" / "f", "wb") as f:
        f.write(b"hello" * 1000)
    with open(p / "d" / "f", "ab") as f:
        f.write(b"!")
    os.symlink("f", p / "d" / "l")
    os.link(p / "d" / "f", p / "hard")
    os.rename(p / "d" / "f", p / "d" / "g")
    os.chmod(p / "d" / "g", 0o600)
    os.setxattr(p / "d" / "g", "user.a", b"1")
    (p / "x.tmp").write_bytes(b"excluded")
    (p / "tmp").mkdir()
    (p / "tmp" / "y").write_bytes(b"excluded")
    assert describe_tree(p, mirror.excluder) == describe_tree(mirror.replica)
    assert not (mirror.replica / "x.tmp").exists()


def test_xattr_create_and_replace_flags_behave_as_on_a_local_file_system(mirror: Mirror) -> None:
    f = mirror.primary / "x"
    f.write_bytes(b"")
    os.setxattr(f, "user.k", b"first", os.XATTR_CREATE)
    with pytest.raises(FileExistsError):
        os.setxattr(f, "user.k", b"second", os.XATTR_CREATE)
    with pytest.raises(OSError) as missing:
        os.setxattr(f, "user.other", b"v", os.XATTR_REPLACE)
    assert missing.value.errno == errno.ENODATA
    os.setxattr(f, "user.k", b"third", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.k") == b"third"
    assert os.listxattr(mirror.replica / "x") == ["user.k"]
    assert os.getxattr(mirror.replica / "x", "user.k") == b"third"


@pytest.fixture
def fast_mirror(tmp_path: Path):
    with running_mirror(tmp_path, Mirror, timeout=1.0) as mir:
        yield mir


def test_hung_peer_mid_write_writer_returns_within_timeout(fast_mirror: Mirror) -> None:
    p = fast_mirror.primary
    with open(p / "f", "wb") as f:
        f.write(b"a" * 65536)
        f.flush()
        # The receiver's loop freezes (a hung peer): acks stop coming.
        fast_mirror.rx_thread.loop.call_soon_threadsafe(time.sleep, 4)
        t0 = time.monotonic()
        f.write(b"b" * 65536)
        f.flush()
        elapsed = time.monotonic() - t0
        f.write(b"c")  # later calls go on alone without waiting
        f.flush()
        assert time.monotonic() - t0 - elapsed < 0.5
    assert 0.5 < elapsed < 3.0
    assert fast_mirror.lost and "no acknowledgement" in fast_mirror.lost[0]
    assert fast_mirror.marker.dirty  # the replica is known to miss changes: resync before it may serve
    assert (p / "f").read_bytes() == b"a" * 65536 + b"b" * 65536 + b"c"


def test_peer_connection_reset_mid_write(fast_mirror: Mirror) -> None:
    p = fast_mirror.primary
    with open(p / "f", "wb") as f:
        f.write(b"a")
        f.flush()
        fast_mirror.rx_thread.call(fast_mirror.receiver.stop())
        t0 = time.monotonic()
        for _ in range(20):
            f.write(b"b" * 4096)
            f.flush()
        assert time.monotonic() - t0 < 2.0
    assert fast_mirror.lost and fast_mirror.marker.dirty
    fast_mirror.rx_thread.call(fast_mirror.receiver.start("127.0.0.1", fast_mirror.port))


def test_a_time_beyond_2116_does_not_stop_replication(mirror: Mirror) -> None:
    """ext4 keeps times up to 2446; the stream carries them clamped to its range (years
    1823..2116): such a file must not turn into a message the secondary refuses."""
    f = mirror.primary / "future"
    f.write_bytes(b"from the future")
    far = 10**19  # 2286-11-20, beyond the stream's range
    os.utime(f, ns=(far, far))
    with open(f, "r+b") as fh:  # a write, then a close carrying the file's times
        fh.write(b"F")
        fh.flush()
        os.fsync(fh.fileno())
    os.utime(f, ns=(far, far))
    (mirror.primary / "after").write_bytes(b"still replicating")
    assert (mirror.replica / "after").read_bytes() == b"still replicating"
    assert (mirror.replica / "future").read_bytes() == b"From the future"
    assert (mirror.replica / "future").stat().st_mtime_ns == 2**62  # clamped, not refused


def test_o_tmpfile_is_refused_as_unsupported_and_file_locks_work_on_the_node(mirror: Mirror) -> None:
    """O_TMPFILE gets EOPNOTSUPP, the answer applications fall back from (to a named temporary file),
    and nothing reaches the replica; flock and fcntl locks work through the mount, on this node."""
    p = mirror.primary
    with pytest.raises(OSError) as refused:
        os.open(p, os.O_TMPFILE | os.O_WRONLY, 0o600)
    assert refused.value.errno == errno.EOPNOTSUPP
    (p / "locked").write_bytes(b"0123456789")
    with open(p / "locked", "r+b") as f, open(p / "locked", "r+b") as other:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(f, fcntl.LOCK_EX, 10, 0)
    assert sorted(os.listdir(mirror.replica)) == ["locked", "preexisting"]


def test_rename_whiteout_is_refused_and_replication_goes_on(mirror: Mirror) -> None:
    """RENAME_WHITEOUT (overlayfs's flag) would leave a device node the replica cannot take: the
    mount refuses it (EINVAL, as a file system without whiteouts), nothing moves, the link stays."""
    p = mirror.primary
    (p / "a").write_bytes(b"aaaa")
    with pytest.raises(OSError) as refused:
        renameat2(-100, bytes(p / "a"), -100, bytes(p / "b"), 4)  # RENAME_WHITEOUT
    assert refused.value.errno == errno.EINVAL
    (p / "later").write_bytes(b"later")
    assert sorted(os.listdir(p)) == ["a", "later", "preexisting"]
    assert describe_tree(p, mirror.excluder) == describe_tree(mirror.replica)


def test_mknod_entries_keep_their_time_on_the_replica(mirror: Mirror) -> None:
    """A regular file made by mknod and never written (and a FIFO) has the primary's mtime on the
    replica, not the moment the replica made it."""
    p = mirror.primary
    os.mknod(p / "reg", stat.S_IFREG | 0o644)
    os.mkfifo(p / "fifo")
    time.sleep(0.01)
    (p / "after").write_bytes(b"")  # a later change: the replica is past both creations
    for name in ("reg", "fifo"):
        assert (mirror.replica / name).lstat().st_mtime_ns == (p / name).lstat().st_mtime_ns, name
    assert describe_tree(p, mirror.excluder) == describe_tree(mirror.replica)


def test_xattrs_through_a_descriptor_of_a_deleted_file_work_as_locally(mirror: Mirror) -> None:
    """fsetxattr, fgetxattr, flistxattr, fremovexattr on a file deleted while open: the calls come
    by inode and the file has no name left; they work through the open handle, as on a local file
    system, and the replica (where the file is gone too) is unaffected."""
    p = mirror.primary
    (p / "f").write_bytes(b"x")
    fd = os.open(p / "f", os.O_RDWR)
    try:
        os.unlink(p / "f")
        os.setxattr(fd, "user.k", b"v")
        assert os.getxattr(fd, "user.k") == b"v"
        assert os.listxattr(fd) == ["user.k"]
        os.removexattr(fd, "user.k")
        assert os.listxattr(fd) == []
        with pytest.raises(OSError) as missing:
            os.removexattr(fd, "user.k")
        assert missing.value.errno == errno.ENODATA
    finally:
        os.close(fd)
    (p / "after").write_bytes(b"")
    assert describe_tree(p, mirror.excluder) == describe_tree(mirror.replica)
