"""Node ids are the backing inode numbers, and ext4 hands a freed number to the very next entry
made. The kernel keeps sending requests for a node it knows (an OPEN after the LOOKUP of a path
that another thread unlinks meanwhile): they must never reach the entry that took the old
number. Driven without a mount (the handlers called in the order the kernel sends them), with a
recording replicator; the tree is on the test's own file system (ext4 here)."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from safekit_cloud.core.replication import fuseabi
from safekit_cloud.core.replication.fusefs import ReplicatedFS
from safekit_cloud.core.replication.inodes import ROOT
from safekit_cloud.core.replication.replicator import RecordingReplicator

CTX = fuseabi.RequestContext(0, 0, os.getpid())


def run(fs_call: Callable[[ReplicatedFS], Awaitable[Any]], fs: ReplicatedFS) -> Any:
    return asyncio.run(fs_call(fs))


@pytest.fixture
def fs(tmp_path: Path):
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    fs = ReplicatedFS(root, RecordingReplicator())
    try:
        yield fs
    finally:
        fs.release_pins()
        os.close(root)


def make_file(fs: ReplicatedFS, name: bytes) -> int:
    info, attrs = run(lambda f: f.create(ROOT, name, 0o644, os.O_WRONLY, CTX), fs)
    run(lambda f: f.release(info.fh), fs)
    return attrs.st_ino


@pytest.mark.parametrize("then", ["mkdir", "create", "rename over"])
def test_a_request_for_a_node_whose_entry_went_never_reaches_the_entry_made_next(fs: ReplicatedFS,
                                                                              then: str) -> None:
    """LOOKUP a (the kernel now knows its node), then another thread unlinks a and makes x, then
    the kernel's OPEN of that node arrives: it fails with ENOENT, as if the unlink had come
    first. Before, x took a's inode number, and the OPEN opened x (a directory opened as a file,
    refused by the replica; or another file, written in its place). The old node's inode is kept
    until the kernel forgets it, so x gets a number of its own."""
    ino = make_file(fs, b"a")
    assert run(lambda f: f.lookup(ROOT, b"a", CTX), fs).st_ino == ino  # the kernel's reference
    if then == "rename over":
        make_file(fs, b"b")
        run(lambda f: f.rename(ROOT, b"b", ROOT, b"a", 0, CTX), fs)  # a's file is replaced: freed
    else:
        run(lambda f: f.unlink(ROOT, b"a", CTX), fs)
    if then == "mkdir":
        made = run(lambda f: f.mkdir(ROOT, b"x", 0o755, CTX), fs).st_ino
    else:
        made = make_file(fs, b"x")
    assert made != ino
    with pytest.raises(fuseabi.FUSEError) as refused:
        run(lambda f: f.open(ino, os.O_RDONLY, CTX), fs)
    assert refused.value.errno == errno.ENOENT
    assert ino in fs._pins
    run(lambda f: f.forget([(ino, 2)]), fs)  # the kernel lets go: the inode is freed at last
    assert ino not in fs._pins


def test_a_directory_removed_while_the_kernel_knows_it_keeps_its_number(fs: ReplicatedFS) -> None:
    made = run(lambda f: f.mkdir(ROOT, b"d", 0o755, CTX), fs)
    run(lambda f: f.rmdir(ROOT, b"d", CTX), fs)
    new = make_file(fs, b"f")
    assert new != made.st_ino and stat.S_ISDIR(made.st_mode)
    with pytest.raises(fuseabi.FUSEError):
        run(lambda f: f.getattr(made.st_ino, CTX), fs)


def test_a_file_unlinked_while_open_keeps_its_number_until_the_kernel_forgets_it(fs: ReplicatedFS) -> None:
    """Its last handle released, the inode would be freed while the kernel may not have forgotten
    the node yet (the FORGET comes after the RELEASE): it is kept until then."""
    info, attrs = run(lambda f: f.create(ROOT, b"a", 0o644, os.O_WRONLY, CTX), fs)
    run(lambda f: f.unlink(ROOT, b"a", CTX), fs)
    assert attrs.st_ino not in fs._pins  # our open handle keeps it
    run(lambda f: f.release(info.fh), fs)
    assert attrs.st_ino in fs._pins
    assert make_file(fs, b"x") != attrs.st_ino
    run(lambda f: f.forget([(attrs.st_ino, 1)]), fs)
    assert attrs.st_ino not in fs._pins
