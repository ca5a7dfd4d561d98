"""Write-only opens bypass the FUSE page cache (direct I/O, fusefs._direct): what other opens of the
same file see must stay exactly what a local file system shows them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .harness import Mirror, describe_tree, fuse_available, running_mirror

pytestmark = [pytest.mark.fuse, pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory):
    with running_mirror(tmp_path_factory.mktemp("coherence"), Mirror) as mir:
        yield mir


def _assert_replicated(mirror: Mirror, name: str) -> None:
    assert (mirror.replica / name).read_bytes() == (mirror.primary / name).read_bytes()
    assert describe_tree(mirror.primary) == describe_tree(mirror.replica)


_MAPPED_SCENARIO = """
import mmap, os, sys
path = sys.argv[1]
rw = os.open(path, os.O_RDWR)
wo = os.open(path, os.O_WRONLY)
assert os.pread(rw, 8192, 0) == b"A" * 8192  # now in the FUSE page cache
with mmap.mmap(rw, 8192) as mapped:
    os.pwrite(wo, b"B" * 100, 10)
    assert os.pread(rw, 110, 0) == b"A" * 10 + b"B" * 100, "cached reader"
    assert mapped[10:110] == b"B" * 100, "mapping"
    mapped[0:5] = b"CCCCC"
    mapped.flush()
    os.pwrite(wo, b"D" * 3, 5000)
    assert os.pread(rw, 10, 0) == b"CCCCC" + b"A" * 5, "mapped write, then direct write"
    assert mapped[4999:5004] == b"ADDDA", "mapping after direct write"
"""


def test_cached_reader_and_mapping_see_writes_of_a_write_only_open(mirror: Mirror) -> None:
    # In its own process, as an application is: msync holds this interpreter's GIL while the
    # kernel waits for the FUSE server, which runs in a thread of this test process.
    path = mirror.primary / "shared"
    path.write_bytes(b"A" * 8192)
    result = subprocess.run([sys.executable, "-c", _MAPPED_SCENARIO, str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    _assert_replicated(mirror, "shared")


def test_append_through_a_write_only_open_lands_at_the_end(mirror: Mirror) -> None:
    path = mirror.primary / "log"
    path.write_bytes(b"first\n")
    rd = os.open(path, os.O_RDONLY)
    try:
        assert os.read(rd, 100) == b"first\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"second\n")
            os.write(fd, b"third\n")
        finally:
            os.close(fd)
        assert os.pread(rd, 100, 0) == b"first\nsecond\nthird\n"
        assert os.fstat(rd).st_size == len(b"first\nsecond\nthird\n")
    finally:
        os.close(rd)
    _assert_replicated(mirror, "log")


def test_large_unaligned_writes_through_a_write_only_open(mirror: Mirror) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    fd = os.open(mirror.primary / "big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.write(fd, data[:777]) == 777
        assert os.write(fd, data[777:]) == len(data) - 777  # spans several 1 MiB requests
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (mirror.primary / "big").read_bytes() == data
    _assert_replicated(mirror, "big")
