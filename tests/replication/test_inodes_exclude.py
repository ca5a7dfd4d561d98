from __future__ import annotations

import pytest
from safekit_cloud.core.replication.exclude import Excluder
from safekit_cloud.core.replication.inodes import ROOT, Inodes, fuse_ino


def test_fuse_ino_is_a_bijection_around_the_root() -> None:
    assert fuse_ino(500, 500) == ROOT
    assert fuse_ino(1, 500) == 500
    assert fuse_ino(7, 500) == 7


def test_rename_moves_descendants_and_hard_links_keep_other_names() -> None:
    ino = Inodes()
    ino.lookup(10, b"d")
    ino.lookup(11, b"d/f")
    ino.lookup(11, b"hard")
    ino.lookup(12, b"d/e/g")
    ino.rename(b"d", b"x", is_dir=True)
    assert ino.paths(11) == [b"hard", b"x/f"] and ino.path(12) == b"x/e/g"
    ino.remove_path(b"hard")
    assert ino.path(11) == b"x/f"
    ino.rename(b"x/f", b"x/e/g")  # replaces g
    assert ino.path(12) is None and ino.path(11) == b"x/e/g"


def test_a_hard_link_is_named_by_its_preferred_name() -> None:
    # The FUSE layer prefers replicated names: a write through the excluded name x.tmp of a file
    # also named "data" must reach the replica as a write to "data".
    excluder = Excluder(["*.tmp"])
    ino = Inodes(prefer=lambda p: not excluder.excluded(p))
    ino.lookup(5, b"x.tmp")
    ino.lookup(5, b"data")
    assert ino.path(5) == b"data" and ino.paths(5) == [b"x.tmp", b"data"]
    ino.remove_path(b"data")
    assert ino.path(5) == b"x.tmp"  # only the excluded name is left: the FUSE layer skips it
    assert Inodes().path(ROOT) == b""


def test_exchange_and_forget() -> None:
    ino = Inodes()
    ino.lookup(2, b"a")
    ino.lookup(3, b"b")
    ino.lookup(4, b"b/c")
    ino.exchange(b"a", b"b")
    assert ino.path(2) == b"b" and ino.path(3) == b"a" and ino.path(4) == b"a/c"
    ino.lookup(2, b"b")
    ino.forget(2, 1)
    assert ino.path(2) == b"b"
    ino.forget(2, 1)
    assert ino.path(2) is None and ino.ino_of(b"b") is None
    ino.forget(ROOT, 100)
    assert ino.path(ROOT) == b""


@pytest.mark.parametrize("path, is_dir, expected", [
    (b"tmp", True, True), (b"tmp", False, False), (b"a/tmp/x", False, True), (b"a/tmpx", True, False),
    (b"x.tmp", False, True), (b"d/x.tmp/inner", False, True), (b"x.tmpl", False, False),
    (b"cache/a.bin", False, True), (b"sub/cache/a.bin", False, False), (b"cache/a.txt", False, False),
    (b"", True, False),
])
def test_exclude_patterns(path: bytes, is_dir: bool, expected: bool) -> None:
    assert Excluder(["tmp/", "*.tmp", "/cache/*.bin"]).excluded(path, is_dir) is expected


def test_no_patterns_is_falsy_and_fast() -> None:
    ex = Excluder()
    assert not ex and not ex.excluded(b"anything")
