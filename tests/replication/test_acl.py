"""POSIX ACLs through the mount: enforced as on the backing file system, inherited from default
ACLs as there, and replicated (the secondary's tree keeps the same ACLs and modes)."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from .harness import Mirror, describe_tree, fuse_available, running_mirror

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))]

NOBODY, NOGROUP = 65534, 65534
UNDEFINED = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
ACCESS, DEFAULT = "system.posix_acl_access", "system.posix_acl_default"
# The system's python: the test's virtualenv may not be readable by nobody.
PYTHON = "/usr/bin/python3"


def acl(*entries: tuple[int, int, int]) -> bytes:
    """The xattr form of an ACL (acl(5), posix_acl_xattr): version 2, then (tag, perm, id) sorted."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in sorted(entries))


def can(path: Path, uid: int, gid: int) -> tuple[bool, bool]:
    """(read, write): whether `uid`:`gid` (no supplementary group) may open `path` for reading and
    for writing, asked by a process of that user (the kernel decides; opened relative to the
    directory, so the test's own parent directories need not be open to that user)."""
    dfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    code = ("import os, sys\n"
            "for flag in (os.O_RDONLY, os.O_WRONLY):\n"
            "    try:\n"
            "        os.close(os.open(sys.argv[2], flag, dir_fd=int(sys.argv[1])))\n"
            "        print(1)\n"
            "    except PermissionError:\n"
            "        print(0)\n")
    try:
        out = subprocess.run([PYTHON, "-c", code, str(dfd), path.name], user=uid, group=gid, extra_groups=[],
                             pass_fds=[dfd], capture_output=True, text=True, check=True, timeout=30).stdout.split()
    finally:
        os.close(dfd)
    return out[0] == "1", out[1] == "1"


def assert_same(mir: Mirror) -> None:
    a, b = describe_tree(mir.primary), describe_tree(mir.replica)
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


@pytest.fixture
def mirror(tmp_path: Path):
    with running_mirror(tmp_path, Mirror) as mir:
        yield mir


def test_acls_grant_and_restrict_through_the_mount_as_on_the_disk(mirror: Mirror, tmp_path: Path) -> None:
    """A named user the ACL grants may write; a member of the owning group whose entry is read-only
    may not, although the mask (the mode's group bits) allows writing. Without the kernel's ACL
    support the mount checked the mode bits alone: the first was refused, the second allowed."""
    local = tmp_path / "local"
    local.mkdir()
    os.chmod(local, 0o755)
    named = acl((USER_OBJ, 6, UNDEFINED), (USER, 6, NOBODY), (GROUP_OBJ, 0, UNDEFINED), (MASK, 6, UNDEFINED),
                (OTHER, 0, UNDEFINED))
    group_read_only = acl((USER_OBJ, 6, UNDEFINED), (USER, 6, 1), (GROUP_OBJ, 4, UNDEFINED), (MASK, 6, UNDEFINED),
                          (OTHER, 0, UNDEFINED))
    for root in (mirror.primary, local):
        (root / "named").write_bytes(b"n")
        os.chmod(root / "named", 0o600)
        os.setxattr(root / "named", ACCESS, named)
        (root / "group").write_bytes(b"g")
        os.chown(root / "group", 0, NOGROUP)
        os.setxattr(root / "group", ACCESS, group_read_only)
    for name in ("named", "group"):
        assert stat.S_IMODE((mirror.primary / name).stat().st_mode) == 0o660  # the mask shows as group bits
        assert can(mirror.primary / name, NOBODY, NOGROUP) == can(local / name, NOBODY, NOGROUP)
    assert can(mirror.primary / "named", NOBODY, NOGROUP) == (True, True)
    assert can(mirror.primary / "group", NOBODY, NOGROUP) == (True, False)
    assert os.getxattr(mirror.replica / "named", ACCESS) == os.getxattr(local / "named", ACCESS)
    assert_same(mirror)
    os.chmod(mirror.primary / "group", 0o640)  # a chmod changes the mask: the replica's follows
    assert can(mirror.primary / "group", NOBODY, NOGROUP) == (True, False)
    assert_same(mirror)


def test_a_default_acl_is_inherited_as_on_the_disk(mirror: Mirror, tmp_path: Path) -> None:
    """A directory whose default ACL keeps new entries private (`other::---`) and grants a named
    user: files and directories made in it through the mount get the ACL the backing file system
    gives them (same modes, same entries), on the replica too. Made private and chmod-ed to the
    mode instead, they were readable by all."""
    local = tmp_path / "local"
    local.mkdir()
    default = acl((USER_OBJ, 7, UNDEFINED), (USER, 7, NOBODY), (GROUP_OBJ, 5, UNDEFINED), (MASK, 7, UNDEFINED),
                  (OTHER, 0, UNDEFINED))
    old = os.umask(0)  # the kernel applies the caller's umask to what it sends the mount, not locally (see docs)
    try:
        for root in (mirror.primary, local):
            (root / "shared").mkdir(0o755)
            os.setxattr(root / "shared", DEFAULT, default)
            fd = os.open(root / "shared" / "f", os.O_WRONLY | os.O_CREAT, 0o666)
            os.close(fd)
            os.mkdir(root / "shared" / "sub", 0o777)
            os.mkfifo(root / "shared" / "fifo", 0o644)
    finally:
        os.umask(old)
    for name in ("f", "sub", "fifo"):
        ours, disk = mirror.primary / "shared" / name, local / "shared" / name
        assert stat.S_IMODE(ours.stat().st_mode) == stat.S_IMODE(disk.stat().st_mode), name
        assert os.getxattr(ours, ACCESS) == os.getxattr(disk, ACCESS), name
    assert os.getxattr(mirror.primary / "shared" / "sub", DEFAULT) == default
    assert stat.S_IMODE((mirror.primary / "shared" / "f").stat().st_mode) & 0o007 == 0  # private
    assert can(mirror.primary / "shared" / "f", NOBODY, NOGROUP) == (True, True)  # the named user
    assert_same(mirror)
