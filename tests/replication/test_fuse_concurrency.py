"""Concurrent applications on the mirror: several threads change the same small tree at once
(writes, appends, truncates, renames, links, unlinks, mkdir/rmdir, attributes). Whatever order the
kernel and the FUSE layer interleave them in, the replica must end up exactly like the primary:
the secondary applies operations in the order they were applied locally."""

from __future__ import annotations

import os
import random

import pytest
from safekit_cloud.core.replication.inodes import fuse_ino

from .harness import Mirror, fuse_available, run_in_threads, running_mirror
from .resync_harness import ResyncMirror
from .test_fuse_mirror import _clear, apply_op, assert_same

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))]

PATHS = ["a", "b", "c", "d", "d/a", "d/b", "d/e", "d/e/a", "x.tmp", "tmp", "tmp/a"]


def random_op(rng: random.Random) -> tuple:
    p = rng.choice(PATHS)
    kind = rng.choice(["write", "write", "write", "append", "append", "truncate", "mkdir", "rmdir", "unlink",
                       "rename", "link", "chmod", "utime", "setxattr", "fsync"])
    if kind == "write":
        return ("write", p, rng.choice([0, 7, 4096, 70_000]), rng.choice([1, 100, 5000, 300_000]),
                rng.randbytes(rng.randint(1, 8)))
    if kind == "append":
        return ("append", p, rng.randint(1, 3000))
    if kind == "truncate":
        return ("truncate", p, rng.choice([0, 3, 100_000]))
    if kind in ("rename", "link"):
        return (kind, p, rng.choice(PATHS), *([rng.choice([0, 0, 1, 2])] if kind == "rename" else []))
    if kind == "chmod":
        return ("chmod", p, rng.choice([0o600, 0o644, 0o755]))
    if kind == "utime":
        return ("utime", p, rng.randint(0, 2**40), rng.randint(0, 2**40))
    if kind == "setxattr":
        return ("setxattr", p, rng.choice(["user.a", "user.b"]), rng.randbytes(rng.randint(0, 20)))
    return (kind, p)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory):
    with running_mirror(tmp_path_factory.mktemp("concurrency"), Mirror, exclude=["tmp/", "*.tmp"]) as mir:
        yield mir


@pytest.mark.parametrize("seed", range(int(os.environ.get("REPL_CONCURRENCY_ROUNDS", "4"))))
def test_concurrent_operations_replicate_exactly(mirror: Mirror, seed: int) -> None:
    _clear(mirror.primary)
    assert mirror.repl.sender is not None, f"link lost: {mirror.lost}"
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        try:
            for _ in range(150):
                try:
                    apply_op(mirror.primary, random_op(rng))
                except OSError:
                    pass  # refused on the primary (ENOENT, EISDIR...): the trees must still match
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    assert not run_in_threads(worker, 4, timeout=120), "a worker hung on the mount"
    assert not errors, errors
    assert_same(mirror)
    assert not stale_names(mirror)


def stale_names(mirror: Mirror | ResyncMirror) -> list[bytes]:
    """Names the FUSE layer's inode table holds that do not name that file (any more): a change
    through a handle of that file would reach another entry of the replica by such a name.
    Looked at on the FUSE loop, where the table and the tree change together."""
    fs = mirror.mount.fs

    async def check() -> list[bytes]:
        stale = []
        for path, ino in fs.inodes.names():
            try:
                st = os.lstat(path or b".", dir_fd=fs.root)
            except OSError:
                stale.append(path)
                continue
            if fuse_ino(st.st_ino, fs._root_ino) != ino:
                stale.append(path)
        return stale

    return mirror.fs_thread.call(check())
