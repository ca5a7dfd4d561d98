from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .harness import Mirror, describe_tree, force_unmount, fuse_available

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))]


@pytest.fixture
def mirror(tmp_path: Path):
    dirs = [tmp_path / n for n in ("primary", "replica", "state")]
    for d in dirs:
        d.mkdir()
    (dirs[0] / "preexisting").write_bytes(b"old")  # the mount goes over data already there
    shutil.copy2(dirs[0] / "preexisting", dirs[1] / "preexisting")
    mir = Mirror(dirs[0], dirs[1], dirs[2], exclude=["tmp/", "*.tmp"])
    try:
        yield mir
    finally:
        try:
            mir.close()
        finally:
            force_unmount(dirs[0])


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
