"""The FUSE layer sends a write to the peer before writing locally (the two overlap): a local write
that fails or comes up short must be undone on the peer. Driven without a mount (handlers called
directly), with a recording replicator."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from safekit_cloud.core.replication import fuseabi, messages as m
from safekit_cloud.core.replication.fusefs import ReplicatedFS
from safekit_cloud.core.replication.replicator import RecordingReplicator, Started


def _fs(tmp_path: Path, content: bytes, flags: int) -> tuple[ReplicatedFS, RecordingReplicator, int]:
    (tmp_path / "f").write_bytes(content)
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    repl = RecordingReplicator()
    fs = ReplicatedFS(root, repl)
    ino = os.stat(tmp_path / "f").st_ino
    fs.inodes.lookup(ino, b"f")
    fd = os.open(tmp_path / "f", flags)
    return fs, repl, fs._register(fd, ino, flags, os.getuid())


def test_failed_local_write_is_undone_on_the_peer(tmp_path: Path) -> None:
    fs, repl, fh = _fs(tmp_path, b"a" * 100, os.O_RDONLY)  # pwrite fails: EBADF
    with pytest.raises(fuseabi.FUSEError):
        asyncio.run(fs.write(fh, 50, b"b" * 100))
    assert isinstance(repl.ops[0], m.Open)
    assert repl.ops[1] == m.Write(0, fh, 50, b"b" * 100, False)
    # then our content of what the file had in the range, and our size (the write would have grown it)
    assert repl.ops[2:] == [m.Write(0, fh, 50, b"a" * 50, False), m.SetAttr(0, b"f", hid=fh, size=100)]


def test_successful_write_is_sent_once(tmp_path: Path) -> None:
    fs, repl, fh = _fs(tmp_path, b"a" * 100, os.O_WRONLY)
    assert asyncio.run(fs.write(fh, 10, b"c" * 10)) == 10
    assert [type(op) for op in repl.ops] == [m.Open, m.Write]
    assert (tmp_path / "f").read_bytes() == b"a" * 10 + b"c" * 10 + b"a" * 80


def test_started_runs_to_the_first_suspension_at_once() -> None:
    seen: list[str] = []

    async def coro() -> int:
        seen.append("enqueued")
        await asyncio.sleep(0)
        seen.append("after")
        return 7

    async def main() -> int:
        s = Started(coro())
        assert seen == ["enqueued"]
        return await s

    assert asyncio.run(main()) == 7 and seen == ["enqueued", "after"]


class _Ctx:
    uid, gid = 0, 0


def test_failed_local_create_is_undone_on_the_peer(tmp_path: Path) -> None:
    """The peer's Create (sent before ours) truncated its copy: if ours fails, the peer gets our
    file back in full."""
    fs, repl, _ = _fs(tmp_path, b"keep" * 10, os.O_RDONLY)
    repl.ops.clear()
    with pytest.raises(fuseabi.FUSEError):
        asyncio.run(fs.create(fuseabi.ROOT_INODE, b"f", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _Ctx()))
    create, close, remove, *resend = repl.ops
    assert isinstance(create, m.Create) and create.path == b"f" and create.hid is not None
    assert close == m.Close(0, create.hid) and remove == m.Remove(0, b"f")
    assert isinstance(resend[0], m.Create) and resend[0].path == b"f"
    assert b"".join(op.data for op in resend if isinstance(op, m.Write)) == b"keep" * 10


def test_create_is_sent_once_with_its_final_owner_and_mode(tmp_path: Path) -> None:
    fs, repl, _ = _fs(tmp_path, b"", os.O_RDONLY)
    repl.ops.clear()
    info, _ = asyncio.run(fs.create(fuseabi.ROOT_INODE, b"g", 0o640, os.O_WRONLY | os.O_CREAT, _Ctx()))
    # Once, with its final owner and mode; then the directory's new time (not a fix of the file).
    assert repl.ops == [m.Create(0, b"g", 0o100640, 0, 0, hid=info.fh),
                        m.SetAttr(0, b"", mtime_ns=os.stat(tmp_path).st_mtime_ns)]
    assert os.stat(tmp_path / "g").st_mode == 0o100640
