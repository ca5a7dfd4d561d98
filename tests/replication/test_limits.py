"""The application's own space limits through the mount: ext4's blocks reserved for root (and disk
quotas, which CAP_SYS_RESOURCE lifts the same way) hold against a non-root application's writes
as they do on the disk, although the agent that makes those writes runs as root."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Mirror, describe_tree, fuse_available, running_mirror
from .test_acl import NOBODY, NOGROUP, PYTHON

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available())),
              pytest.mark.skipif(not os.path.exists("/dev/loop-control"), reason="no loop devices (/dev/loop-control)")]

MiB = 1 << 20
RESERVED_PERCENT = 50  # of a 16 MiB file system: a reserve far larger than the test's margins


def mount_small_ext4(image: Path, where: Path) -> None:
    """A 16 MiB ext4 file system (half of it reserved for root) in `image`, mounted on `where`
    through a loop device that the kernel releases at the unmount."""
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", str(RESERVED_PERCENT), str(image)], check=True, timeout=60)
    subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True, timeout=60)


def unmount_small_ext4(where: Path) -> None:
    if os.path.ismount(where):
        subprocess.run(["umount", str(where)], check=False, timeout=60)
        if os.path.ismount(where):
            subprocess.run(["umount", "-l", str(where)], check=False, timeout=60)


def fill_as_nobody(directory: Path) -> tuple[int, str, str]:
    """Bytes a process of nobody writes into a new file of `directory` until a write fails, the
    error that stopped it, and what a posix_fallocate of 1 MiB more then gets."""
    code = ("import os, sys\n"
            "fd = os.open('fill', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=int(sys.argv[1]))\n"
            "done, chunk = 0, b'x' * 65536\n"
            "try:\n"
            "    while done < 64 << 20:\n"
            "        done += os.write(fd, chunk)\n"
            "    error = 'no error'\n"
            "except OSError as exc:\n"
            "    error = os.strerror(exc.errno)\n"
            "try:\n"
            "    os.posix_fallocate(fd, done, 1 << 20)\n"
            "    more = 'no error'\n"
            "except OSError as exc:\n"
            "    more = os.strerror(exc.errno)\n"
            "print(done, error, '|', more)\n"
            "os.close(fd)\n")
    dfd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        out = subprocess.run([PYTHON, "-c", code, str(dfd)], user=NOBODY, group=NOGROUP, extra_groups=[],
                             pass_fds=[dfd], capture_output=True, text=True, check=True, timeout=60).stdout
    finally:
        os.close(dfd)
    done, errors = out.strip().split(" ", 1)
    error, more = errors.split(" | ")
    return int(done), error, more


def root_free(path: Path) -> int:
    s = os.statvfs(path)
    return s.f_bfree * s.f_frsize


@pytest.fixture
def small_disks(tmp_path: Path) -> Iterator[tuple[Mirror, Path]]:
    """A mirror whose primary directory is a small ext4 with a large root reserve, and a plain
    directory on another such file system to compare with; both hold app/, owned by nobody."""
    local = tmp_path / "local"
    local.mkdir()

    def prepare(primary: Path, replica: Path) -> None:
        mount_small_ext4(tmp_path / "primary.img", primary)
        for top in (primary, local):
            (top / "app").mkdir()
            os.chown(top / "app", NOBODY, NOGROUP)
        subprocess.run(["cp", "-a", f"{primary}/.", str(replica)], check=True, timeout=60)

    with contextlib.ExitStack() as stack:
        stack.callback(unmount_small_ext4, tmp_path / "primary")
        stack.callback(unmount_small_ext4, local)
        mount_small_ext4(tmp_path / "local.img", local)
        mir = stack.enter_context(running_mirror(tmp_path, Mirror, prepare))
        yield mir, local


def test_root_reserve_holds_against_an_application_user_as_on_the_disk(small_disks: tuple[Mirror, Path]) -> None:
    """nobody fills the disk through the mount: its writes (and then a fallocate) stop with ENOSPC
    where they stop on the same file system without the mount, leaving root's reserve free (for root's services and the
    agent's own journal); root can still write there; the replica equals the primary, failed
    writes included."""
    mirror, local = small_disks
    reserve = root_free(local)
    assert reserve > 7 * MiB
    done_local, error_local, more_local = fill_as_nobody(local / "app")
    done_mirror, error_mirror, more_mirror = fill_as_nobody(mirror.primary / "app")
    assert error_local == error_mirror == os.strerror(28), (error_local, error_mirror)  # ENOSPC
    assert more_local == more_mirror == os.strerror(28), (more_local, more_mirror)  # fallocate too
    assert abs(done_mirror - done_local) <= 512 * 1024, (done_mirror, done_local)
    assert root_free(mirror.primary) >= RESERVED_PERCENT * 16 * MiB // 100 - MiB
    (mirror.primary / "app" / "root-can").write_bytes(b"r" * MiB)  # root's reserve is there for root
    a, b = describe_tree(mirror.primary), describe_tree(mirror.replica)
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
