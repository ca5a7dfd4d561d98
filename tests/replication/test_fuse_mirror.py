"""The real thing: a FUSE mount over a directory, replicated over loopback TCP to another directory.

A hypothesis-generated sequence of file operations is applied through the mount from the test thread
(the mount is served by another thread's loop); after it the replica must equal the primary.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from .harness import Mirror, describe_tree, fuse_available, running_mirror

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))]

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory):
    # "d/e" matches a whole path: renaming d changes whether e, below it, is replicated.
    with running_mirror(tmp_path_factory.mktemp("mirror"), Mirror, exclude=["tmp/", "*.tmp", "d/e"]) as mir:
        yield mir


def _clear(root: Path) -> None:
    for entry in list(root.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@pytest.fixture
def clean(mirror: Mirror) -> Mirror:
    _clear(mirror.primary)
    assert mirror.repl.sender is not None, f"link lost: {mirror.lost}"
    return mirror


def assert_same(mirror: Mirror) -> None:
    # close(2) returns before the kernel sends RELEASE (asynchronous in FUSE), and the Close that
    # carries the file's times is not waited for: under CPU load the replica's mtime of a file just
    # closed can lag by a moment. Give it that moment, then compare for real.
    for _ in range(20):
        if describe_tree(mirror.primary, mirror.excluder) == describe_tree(mirror.replica):
            return
        time.sleep(0.05)
    assert describe_tree(mirror.primary, mirror.excluder) == describe_tree(mirror.replica)
    assert mirror.repl.sender is not None and not mirror.marker.dirty, mirror.lost


PATHS = ["a", "b", "d", "d/a", "d/b", "d/e", "d/e/a", "x.tmp", "tmp", "tmp/a", "d/tmp"]
path_st = st.sampled_from(PATHS)
op_st = st.one_of(
    st.tuples(st.just("write"), path_st, st.sampled_from([0, 7, 4096, 70_000]),
              st.sampled_from([1, 100, 5000, 300_000]), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("append"), path_st, st.integers(1, 3000)),
    st.tuples(st.just("truncate"), path_st, st.sampled_from([0, 3, 100_000])),
    st.tuples(st.just("mkdir"), path_st),
    st.tuples(st.just("rmdir"), path_st),
    st.tuples(st.just("unlink"), path_st),
    st.tuples(st.just("rename"), path_st, path_st, st.sampled_from([0, 0, 1, 2])),
    st.tuples(st.just("symlink"), st.sampled_from(["a", "../x", "/nonexistent-safekit-test/abs", "d/e"]), path_st),
    st.tuples(st.just("link"), path_st, path_st),
    st.tuples(st.just("chmod"), path_st, st.sampled_from([0o600, 0o755, 0o2750, 0o4755])),
    st.tuples(st.just("chown"), path_st, st.sampled_from([0, 1000]), st.sampled_from([0, 1000])),
    st.tuples(st.just("utime"), path_st, st.integers(0, 2**33), st.integers(0, 2**33)),
    st.tuples(st.just("setxattr"), path_st, st.sampled_from(["user.a", "user.b"]), st.binary(max_size=50)),
    st.tuples(st.just("removexattr"), path_st, st.sampled_from(["user.a", "user.b"])),
    st.tuples(st.just("fsync"), path_st),
)


def apply_op(root: Path, op: tuple) -> None:
    kind, *args = op
    p = lambda rel: os.path.join(root, rel)
    if kind == "write":
        path, off, size, pattern = args
        fd = os.open(p(path), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, (pattern * (size // len(pattern) + 1))[:size], off)
        finally:
            os.close(fd)
    elif kind == "append":
        with open(p(args[0]), "ab") as f:
            f.write(b"+" * args[1])
    elif kind == "truncate":
        os.truncate(p(args[0]), args[1])
    elif kind == "mkdir":
        os.mkdir(p(args[0]))
    elif kind == "rmdir":
        os.rmdir(p(args[0]))
    elif kind == "unlink":
        os.unlink(p(args[0]))
    elif kind == "rename":
        src, dst, flags = args
        if _libc.renameat2(AT_FDCWD, p(src).encode(), AT_FDCWD, p(dst).encode(), flags) != 0:
            raise OSError(ctypes.get_errno(), "renameat2")
    elif kind == "symlink":
        os.symlink(args[0], p(args[1]))
    elif kind == "link":
        os.link(p(args[0]), p(args[1]), follow_symlinks=False)
    elif kind == "chmod":
        if not os.path.islink(p(args[0])):
            os.chmod(p(args[0]), args[1])
    elif kind == "chown":
        os.chown(p(args[0]), args[1], args[2], follow_symlinks=False)
    elif kind == "utime":
        os.utime(p(args[0]), ns=(args[1], args[2]), follow_symlinks=False)
    elif kind == "setxattr":
        os.setxattr(p(args[0]), args[1], args[2], follow_symlinks=False)
    elif kind == "removexattr":
        os.removexattr(p(args[0]), args[1], follow_symlinks=False)
    elif kind == "fsync":
        fd = os.open(p(args[0]), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@settings(max_examples=int(os.environ.get("REPL_EXAMPLES", "40")), deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(op_st, min_size=1, max_size=25))
def test_random_operations_replicate_exactly(clean: Mirror, ops: list[tuple]) -> None:
    for op in ops:
        try:
            apply_op(clean.primary, op)
        except OSError:
            pass  # refused on the primary: nothing to replicate, the trees must still match
    assert_same(clean)


def test_crossing_the_exclusion_boundary(clean: Mirror) -> None:
    p = clean.primary
    (p / "tmp").mkdir()
    (p / "tmp" / "sub").mkdir()
    (p / "tmp" / "sub" / "f").write_bytes(b"data" * 100_000)
    os.setxattr(p / "tmp" / "sub" / "f", "user.k", b"v")
    os.rename(p / "tmp" / "sub", p / "sub")  # excluded -> replicated: copied whole
    assert_same(clean)
    (p / "keep").write_bytes(b"k")
    os.rename(p / "keep", p / "keep.tmp")  # replicated -> excluded: removed on the replica
    assert not (clean.replica / "keep").exists()
    assert_same(clean)


def test_a_renamed_directory_moves_the_entries_below_it_across_a_whole_path_pattern(clean: Mirror) -> None:
    """With `d/e` excluded, renaming d makes e replicated (copied whole: the replica never had it),
    and renaming it back excludes e again (removed there). Before, a plain rename was sent: the
    replica never had keep/e, and a failover lost every write made there."""
    p, r = clean.primary, clean.replica
    (p / "d" / "e" / "sub").mkdir(parents=True)
    (p / "d" / "e" / "sub" / "f").write_bytes(b"written under an excluded path" * 1000)
    (p / "d" / "kept").write_bytes(b"replicated all along")
    assert not (r / "d" / "e").exists() and (r / "d" / "kept").exists()
    os.rename(p / "d", p / "keep")
    assert (r / "keep" / "e" / "sub" / "f").read_bytes() == b"written under an excluded path" * 1000
    assert_same(clean)
    with open(p / "keep" / "e" / "sub" / "f", "ab") as f:
        f.write(b"+appended under the replicated name")
    assert_same(clean)
    os.rename(p / "keep", p / "d")
    assert not (r / "d" / "e").exists() and (r / "d" / "kept").exists()
    assert_same(clean)
    (p / "x").mkdir()
    os.rename(p / "d", p / "x" / "y")  # deeper: x/y/e is replicated
    assert (r / "x" / "y" / "e" / "sub" / "f").exists()
    assert_same(clean)


def test_hard_links_across_the_exclusion_boundary_stay_links(clean: Mirror) -> None:
    p, r = clean.primary, clean.replica
    (p / "data").write_bytes(b"v1")
    os.link(p / "data", p / "x.tmp")  # an excluded second name of a replicated file
    with open(p / "x.tmp", "ab") as f:
        f.write(b"+through the excluded name")
    assert (r / "data").read_bytes() == b"v1+through the excluded name"
    os.rename(p / "x.tmp", p / "alias")  # excluded -> replicated: a link on the replica, not a copy
    (p / "tmp").mkdir()
    os.link(p / "data", p / "tmp" / "inner")
    os.rename(p / "tmp", p / "moved")  # a directory whose file is another name of "data"
    with open(p / "alias", "ab") as f:
        f.write(b"+alias")
    assert_same(clean)  # links compared too: data, alias and moved/inner are one file there
    assert os.stat(r / "data").st_ino == os.stat(r / "alias").st_ino == os.stat(r / "moved" / "inner").st_ino


def test_large_sparse_file_and_o_append_and_sync(clean: Mirror) -> None:
    p = clean.primary / "big"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_SYNC, 0o644)
    try:
        os.pwrite(fd, b"end", 5 * 2**30)  # beyond 4 GiB
    finally:
        os.close(fd)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"appended")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"still-appended")  # O_APPEND ignores the offset: the kernel passes the size
    finally:
        os.close(fd)
    r = clean.replica / "big"
    assert r.stat().st_size == 5 * 2**30 + 3 + 8 + 14
    with open(r, "rb") as f:
        f.seek(5 * 2**30)
        assert f.read() == b"endappendedstill-appended"
    assert r.stat().st_blocks * 512 < 2**20  # holes stayed holes
    os.unlink(p)


def test_open_unlinked_file_and_rename_while_open(clean: Mirror) -> None:
    p = clean.primary
    with open(p / "f", "wb") as f:
        f.write(b"1")
        f.flush()
        os.rename(p / "f", p / "g")
        f.write(b"2")
        f.flush()
    with open(p / "h", "wb") as f:
        f.write(b"x")
        f.flush()
        os.unlink(p / "h")
        f.write(b"y")  # the file has no name any more: nothing visible to replicate
        f.flush()
        os.fchmod(f.fileno(), 0o600)  # works as on a local file (no name to reach it by)
        os.utime(f.fileno(), ns=(10**18, 10**18))
        assert stat.S_IMODE(os.fstat(f.fileno()).st_mode) == 0o600
    assert (clean.replica / "g").read_bytes() == b"12"
    assert_same(clean)


def test_a_file_named_only_outside_the_tree_is_looked_for_once(clean: Mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opened by its name in the tree, which then goes, while a hard link outside the replicated
    directory keeps it: nothing of the tree names it, its writes are not replicated, and the walk
    that finds that out runs once, not once per write."""
    from safekit_cloud.core.replication import fusefs

    walks: list[int] = []
    walk = fusefs._names_of
    monkeypatch.setattr(fusefs, "_names_of", lambda root, ino, but: walks.append(ino) or walk(root, ino, but))
    p = clean.primary
    (p / "f").write_bytes(b"x")
    outside = p.parent / "outside-link"  # the same file system, beside the replicated directory
    os.link(f"/proc/self/fd/{clean.mount._root_fd}/f", outside)
    try:
        with open(p / "f", "r+b", buffering=0) as f:
            os.unlink(p / "f")
            f.writelines(b"y" for i in range(20))
            os.fsync(f.fileno())
        assert len(walks) == 1
        assert outside.read_bytes() == b"y" * 20
        assert not (clean.replica / "f").exists()
        assert_same(clean)
    finally:
        outside.unlink()


MMAP_SCRIPT = """
import mmap, os, sys
with open(sys.argv[1], "r+b") as f:
    mm = mmap.mmap(f.fileno(), 8192)
    mm[100:105] = b"hello"
    mm.flush()  # msync: the kernel writes the dirty page back through FUSE write
    os.fsync(f.fileno())
    mm.close()
"""


def test_mmap_shared_writes_are_replicated_on_msync(clean: Mirror) -> None:
    # In another process: touching mapped FUSE pages holds the GIL while the kernel waits for our
    # own server thread, which would deadlock this process.
    import subprocess
    import sys

    p = clean.primary / "mapped"
    p.write_bytes(b"\0" * 8192)
    subprocess.run([sys.executable, "-c", MMAP_SCRIPT, str(p)], check=True, timeout=30)
    assert (clean.replica / "mapped").read_bytes()[100:105] == b"hello"
    assert_same(clean)
