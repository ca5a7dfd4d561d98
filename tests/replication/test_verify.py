"""verify: manifests of both replicas compared online (content hashes and metadata)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safekit_cloud.core.config import ReplicationConfig
from safekit_cloud.core.replication import messages as m, verify as v
from safekit_cloud.core.replication.auth import client_handshake
from safekit_cloud.core.replication.framing import read_message
from safekit_cloud.core.replication.receiver import Receiver
from safekit_cloud.core.replication.sender import Sender

from .conftest import KEY, run
from .harness import force_unmount, free_port, fuse_available, running_pair, wait_for

NAME = b"/srv/app"


def _tree(root: Path) -> None:
    """A bit of everything: nested dirs, empty and multi-chunk files, a sparse file, a symlink,
    a hard link, a FIFO, xattrs, a non-UTF-8 name, names whose order is tricky (a, a-b, a/b)."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "a-b").mkdir()
    (root / "a" / "b" / "f").write_bytes(b"abc" * 1_000_000)  # 3 MB: several hash chunks
    (root / "a" / "empty").write_bytes(b"")
    with open(root / "sparse", "wb") as f:
        f.truncate(50 << 20)
        f.seek(10 << 20)
        f.write(b"middle")
    (root / "a-b" / "g").write_bytes(b"g")
    os.link(root / "a-b" / "g", root / "a" / "g-link")
    os.symlink("a/b/f", root / "sym")
    os.mkfifo(root / "fifo")
    (root / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    os.setxattr(root / "a" / "b" / "f", "user.color", b"blue")
    os.setxattr(root / "a", "user.dir", b"x")
    os.chmod(root / "a" / "empty", 0o640)
    (root / "cache").mkdir()
    (root / "cache" / "big.bin").write_bytes(b"not compared")
    (root / "x.tmp").write_bytes(b"not compared either")


def _copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)


def _same_dir_times(primary: Path, replica: Path) -> None:
    """Give the replica's directories the primary's mtimes again (as live replication does after
    every change in a directory) once a test changed entries in them behind its back."""
    for dirpath, _, _ in os.walk(primary):
        rel = os.path.relpath(dirpath, primary)
        there = replica / rel
        if there.is_dir() and not there.is_symlink():
            st_ = os.stat(dirpath)
            os.utime(there, ns=(st_.st_atime_ns, st_.st_mtime_ns))


async def _verify(primary: Path, replica: Path, exclude: list[str] = (),
                  mutate_before_recheck: Callable[[], None] | None = None,
                  monkeypatch: pytest.MonkeyPatch | None = None) -> dict[str, Any]:
    receiver = Receiver("mod", {NAME: replica}, KEY)
    port = await receiver.start("127.0.0.1", 0)
    fd = os.open(primary, os.O_PATH | os.O_DIRECTORY)
    if mutate_before_recheck is not None:
        assert monkeypatch is not None
        original = v._recheck

        async def recheck(*args: Any) -> None:
            mutate_before_recheck()
            await original(*args)

        monkeypatch.setattr(v, "_recheck", recheck)
    try:
        return await v.verify_module("mod", [(NAME, fd)], "127.0.0.1", port, KEY, list(exclude), timeout=5)
    finally:
        os.close(fd)
        await receiver.stop()


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    primary.mkdir()
    replica.mkdir()
    _tree(primary)
    _copy(primary, replica)
    return primary, replica


def _problems(report: dict[str, Any]) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {d["path"]: (d["problem"], tuple(d.get("fields", ()))) for d in report["differences"]}


def test_identical_trees(trees: tuple[Path, Path]) -> None:
    primary, replica = trees
    report = run(_verify(primary, replica))
    assert report["identical"], report["differences"]
    assert report["total_differences"] == 0 and report["differences"] == []
    d = report["directories"][0]
    assert d["primary_entries"] == d["secondary_entries"] >= 14
    assert d["primary_bytes_hashed"] == d["secondary_bytes_hashed"] >= 3_000_000 + (50 << 20)


def test_byte_changed_behind_the_back(trees: tuple[Path, Path]) -> None:
    primary, replica = trees
    f = replica / "a" / "b" / "f"
    st_ = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(2_500_000)
        fh.write(b"X")
    os.utime(f, ns=(st_.st_atime_ns, st_.st_mtime_ns))  # same size, same times: only the bytes differ
    report = run(_verify(primary, replica))
    assert not report["identical"]
    assert _problems(report) == {"a/b/f": ("differs", ("content",))}
    assert report["counts"] == {"missing_on_secondary": 0, "missing_on_primary": 0, "differs": 1}
    assert report["fields"] == {"content": 1}
    assert report["rechecked"] == 1 and report["settled"] == 0


def test_metadata_differences(trees: tuple[Path, Path]) -> None:
    primary, replica = trees
    os.chmod(replica / "a" / "empty", 0o600)
    os.setxattr(replica / "a" / "b" / "f", "user.color", b"red")
    os.setxattr(replica / "a-b", "user.new", b"1")
    os.chown(replica / "a-b" / "g", 1234, -1)
    os.utime(replica / "sparse", ns=(0, 10**9))
    os.unlink(replica / "sym")
    os.symlink("elsewhere", replica / "sym")
    os.chmod(replica, 0o700)
    _same_dir_times(primary, replica)
    os.utime(replica / "a", ns=(0, 10**9))
    report = run(_verify(primary, replica))
    assert _problems(report) == {
        ".": ("differs", ("mode",)),
        "a": ("differs", ("mtime",)),
        "a/b/f": ("differs", ("xattrs",)),
        "a/empty": ("differs", ("mode",)),
        "a-b": ("differs", ("xattrs",)),
        "a-b/g": ("differs", ("uid",)),
        "a/g-link": ("differs", ("uid",)),  # the same inode
        "sparse": ("differs", ("mtime",)),
        "sym": ("differs", ("mtime", "target")),  # made again there: a new target, and its own mtime
    }
    assert report["fields"] == {"mode": 2, "xattrs": 2, "uid": 2, "mtime": 3, "target": 1}


def test_missing_extra_type_and_links(trees: tuple[Path, Path]) -> None:
    primary, replica = trees
    shutil.rmtree(replica / "a" / "b")  # a directory and its content missing on the secondary
    (replica / "extra").write_bytes(b"only here")
    os.unlink(replica / "fifo")
    os.mkdir(replica / "fifo")
    os.unlink(replica / "a" / "g-link")  # the hard link became a copy
    shutil.copy2(primary / "a" / "g-link", replica / "a" / "g-link")
    _same_dir_times(primary, replica)
    report = run(_verify(primary, replica))
    assert _problems(report) == {
        "a/b": ("missing_on_secondary", ()),
        "a/b/f": ("missing_on_secondary", ()),
        "a-b/g": ("differs", ("link",)),  # first name of the inode on the primary: a/g-link
        "extra": ("missing_on_primary", ()),
        "fifo": ("differs", ("type",)),
    }
    assert report["counts"] == {"missing_on_secondary": 2, "missing_on_primary": 1, "differs": 2}


def test_excluded_patterns_ignored_on_both_sides(trees: tuple[Path, Path]) -> None:
    primary, replica = trees
    (replica / "cache" / "big.bin").write_bytes(b"different")
    (replica / "cache" / "other").write_bytes(b"extra")
    (replica / "y.tmp").write_bytes(b"extra")
    os.unlink(replica / "x.tmp")
    _same_dir_times(primary, replica)
    assert not run(_verify(primary, replica))["identical"]
    report = run(_verify(primary, replica, exclude=["cache/", "*.tmp"]))
    assert report["identical"], report["differences"]
    assert report["excluded"] == ["cache/", "*.tmp"]


def test_changes_during_verify_filtered_by_the_recheck(trees: tuple[Path, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A file still being written when the walk saw it, equal by the end: not a difference."""
    primary, replica = trees
    (primary / "a" / "empty").write_bytes(b"in flight")  # the replica has not got it yet...
    os.chmod(replica / "sparse", 0o600)  # ...and this one is a real difference

    def catch_up() -> None:  # ...by the time verify re-checks
        (replica / "a" / "empty").write_bytes(b"in flight")
        st_ = (primary / "a" / "empty").stat()
        os.utime(replica / "a" / "empty", ns=(st_.st_atime_ns, st_.st_mtime_ns))

    report = run(_verify(primary, replica, mutate_before_recheck=catch_up, monkeypatch=monkeypatch))
    assert _problems(report) == {"sparse": ("differs", ("mode",))}
    assert report["rechecked"] == 2 and report["settled"] == 1
    assert any("re-checked" in n for n in report["notes"])


def test_a_temporary_file_caught_on_one_side_by_a_re_check_is_not_a_difference(
        trees: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """An application that keeps writing a temporary file and renaming it (the demo's service does)
    has it on each side part of the time: the walk and the first re-check both catch it on the
    primary only, a later round does not. Reported once, it made verify of a busy, identical pair
    say "different" now and then. A real difference stays in every round."""
    primary, replica = trees
    (primary / "visits.tmp").write_bytes(b"being renamed")
    os.chmod(replica / "sparse", 0o600)  # a real difference
    rounds: list[int] = []
    original = v._recheck_round

    async def recheck_round(*args: Any, **kw: Any) -> None:
        await original(*args, **kw)
        rounds.append(len(rounds))
        if len(rounds) == 1:  # renamed away after that look, and the top's times equal again
            (primary / "visits.tmp").unlink()
            st_ = replica.stat()
            os.utime(primary, ns=(st_.st_atime_ns, st_.st_mtime_ns))

    monkeypatch.setattr(v, "_recheck_round", recheck_round)
    monkeypatch.setattr(v, "RECHECK_DELAY", 0.01)
    report = run(_verify(primary, replica))
    assert _problems(report) == {"sparse": ("differs", ("mode",))}
    assert report["settled"] == 2 and len(rounds) == v.RECHECK_ROUNDS  # visits.tmp and the top's mtime


def test_report_is_capped_and_counts_everything(tmp_path: Path) -> None:
    primary, replica = tmp_path / "p", tmp_path / "r"
    primary.mkdir()
    replica.mkdir()
    for i in range(150):
        (primary / f"f{i:03}").write_bytes(b"x")
    _same_dir_times(primary, replica)
    report = run(_verify(primary, replica))
    assert report["total_differences"] == 150 and report["truncated"]
    assert len(report["differences"]) == v.MAX_LISTED
    assert report["counts"]["missing_on_secondary"] == 150
    assert report["differences"][0]["path"] == "f000"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.sampled_from([b"a", b"a-b", b"a.b", b"b", b"\xff", b"A", b"a b"]),
                      min_size=1, max_size=12, unique=True),
       nested=st.lists(st.integers(0, 11), max_size=6))
def test_walk_is_in_manifest_order(tmp_path_factory: pytest.TempPathFactory, names: list[bytes],
                                   nested: list[int]) -> None:
    root = tmp_path_factory.mktemp("walk")
    for name in names:
        os.mkdir(os.path.join(os.fsencode(root), name))
    for i in nested:
        parent = os.path.join(os.fsencode(root), names[i % len(names)])
        for name in names:
            open(os.path.join(parent, name), "wb").close()
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    scanner = v.Scanner(fd)
    try:
        keys = [v.manifest_key(e.path) for e in scanner.walk()]
    finally:
        scanner.close()
        os.close(fd)
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_verify_connection_leaves_the_stream_alone(tmp_path: Path) -> None:
    """The operation stream keeps running (same connection, same sequence) during and after verify."""
    replica = tmp_path / "replica"
    replica.mkdir()
    primary = tmp_path / "primary"
    primary.mkdir()

    async def scenario() -> tuple[dict[str, Any], bool, bool]:
        receiver = Receiver("mod", {NAME: replica}, KEY)
        port = await receiver.start("127.0.0.1", 0)
        sender = await Sender.connect("127.0.0.1", port, KEY, "mod", NAME, timeout=5)
        assert await sender.submit(m.Create(0, b"f", 0o100644, 0, 0, hid=1))
        fd = os.open(primary, os.O_PATH | os.O_DIRECTORY)
        try:
            verify = asyncio.create_task(v.verify_module("mod", [(NAME, fd)], "127.0.0.1", port, KEY, [], timeout=5))
            ok = True
            for i in range(20):
                ok = ok and await sender.submit(m.Write(0, 1, i * 4096, b"w" * 4096))
            report = await verify
            ok = ok and await sender.submit(m.Close(0, 1)) and await sender.barrier()
            connected = sender.connected and receiver.stats[NAME].connected
        finally:
            os.close(fd)
            await sender.close()
            await receiver.stop()
        return report, ok, connected

    report, ok, connected = run(scenario())
    assert ok and connected
    assert (replica / "f").stat().st_size == 20 * 4096
    assert not report["identical"]  # the primary tree here is empty: f is missing on it


def test_hostile_manifest_requests_are_refused(tmp_path: Path) -> None:
    replica, outside = tmp_path / "replica", tmp_path / "outside"
    replica.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    os.symlink(outside, replica / "link")

    async def ask(port: int, request: m.ManifestRequest) -> list[m.Message]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        _, dec, backlog = await client_handshake(reader, writer, KEY, "mod", NAME, "C", purpose="verify")
        writer.write(dec.frame(request))
        out: list[m.Message] = []
        try:
            async with asyncio.timeout(5):
                while True:
                    msg = await read_message(reader, dec, backlog)
                    out.append(msg)
                    if isinstance(msg, (m.ManifestEnd, m.Error)):
                        break
        finally:
            writer.close()
        return out

    async def scenario() -> list[list[m.Message]]:
        receiver = Receiver("mod", {NAME: replica}, KEY)
        port = await receiver.start("127.0.0.1", 0)
        try:
            return [await ask(port, m.ManifestRequest(paths=[b"../outside/secret"])),
                    await ask(port, m.ManifestRequest(paths=[b"/etc/passwd"])),
                    await ask(port, m.ManifestRequest(paths=[b"link/secret"])),
                    await ask(port, m.ManifestRequest(exclude=["/"])),  # an empty pattern
                    await ask(port, m.ManifestRequest())]
        finally:
            await receiver.stop()

    escape, absolute, through_link, bad_pattern, whole = run(scenario())
    assert isinstance(escape[-1], m.Error) and isinstance(absolute[-1], m.Error)
    # Through a symlink: no entry (never followed), not an error.
    assert [type(x) for x in through_link] == [m.ManifestEnd] and through_link[-1].entries == 0
    assert isinstance(bad_pattern[-1], m.Error) and "exclude" in bad_pattern[-1].message
    entries = [e for part in whole if isinstance(part, m.ManifestPart) for e in part.entries]
    assert [e.path for e in entries] == [b"", b"link"] and entries[1].target == os.fsencode(outside)


def test_unreachable_secondary_is_a_verify_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(v.VerifyError, match="cannot reach"):
            run(v.verify_module("mod", [(NAME, fd)], "127.0.0.1", port, KEY, [], timeout=2))
        # A receiver with another key: refused, not compared.
        async def wrong_key() -> None:
            receiver = Receiver("mod", {NAME: tmp_path}, b"x" * 32)
            p = await receiver.start("127.0.0.1", 0)
            try:
                await v.verify_module("mod", [(NAME, fd)], "127.0.0.1", p, KEY, [], timeout=2)
            finally:
                await receiver.stop()

        with pytest.raises(v.VerifyError, match="refused"):
            run(wrong_key())
    finally:
        os.close(fd)


def test_keepalive_while_hashing_a_large_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    primary, replica = tmp_path / "p", tmp_path / "r"
    primary.mkdir()
    replica.mkdir()
    block = os.urandom(1 << 20)
    for d in (primary, replica):
        with open(d / "big", "wb") as f:
            f.writelines(block for _ in range(200))  # 200 MiB: hashing takes a while
    os.utime(replica / "big", ns=(0, (primary / "big").stat().st_mtime_ns))
    _same_dir_times(primary, replica)
    monkeypatch.setattr(v, "KEEPALIVE", 0.005)
    report = run(_verify(primary, replica))
    assert report["identical"], report


# ---- end to end: the service on the primary, agents, FUSE ----

fuse = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))


@pytest.mark.fuse
@fuse
def test_service_verify_end_to_end(tmp_path: Path) -> None:
    data, replica = tmp_path / "data", tmp_path / "replica"
    data.mkdir()
    replica.mkdir()
    # Opened before the secondary protects its directory: the test's way behind the receiver's back.
    behind = os.open(replica, os.O_PATH | os.O_DIRECTORY)
    cfg = ReplicationConfig(directories=[data], exclude=["*.tmp"], port=free_port())

    def work() -> None:
        (data / "d").mkdir()
        (data / "d" / "f").write_bytes(os.urandom(300_000))
        (data / "g").write_bytes(b"hello")
        os.setxattr(data / "g", "user.k", b"v")
        os.symlink("d/f", data / "l")
        (data / "skip.tmp").write_bytes(b"excluded")

    def tamper() -> None:
        fd = os.open(b"d/f", os.O_RDWR, dir_fd=behind)
        try:
            st_ = os.fstat(fd)
            os.pwrite(fd, b"\0" if os.pread(fd, 1, 1000) != b"\0" else b"\1", 1000)
            os.utime(fd, ns=(st_.st_atime_ns, st_.st_mtime_ns))
        finally:
            os.close(fd)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], str, dict[str, Any]]:
        async with running_pair(tmp_path, cfg, data, replica, timeout=2.0) as (secondary, primary):
            await wait_for(lambda: primary.status()["connected"], 5)
            await asyncio.to_thread(work)
            same = await primary.verify()
            await asyncio.to_thread(tamper)
            different = await primary.verify()
            try:
                await secondary.verify()
                refused = ""
            except v.VerifyError as exc:
                refused = str(exc)
            return same, different, refused, primary.status()

    try:
        same, different, refused, status = asyncio.run(scenario())
    finally:
        os.close(behind)
        force_unmount(data)
    assert same["identical"], same["differences"]
    assert same["directories"][0]["primary_entries"] == 5  # ., d, d/f, g, l
    assert not different["identical"]
    assert _problems(different) == {"d/f": ("differs", ("content",))}
    assert "primary" in refused and "secondary" in refused
    assert status["last_verify"]["identical"] is False


def test_a_symlink_without_an_mtime_from_a_node_of_the_previous_release_is_no_difference() -> None:
    from safekit_cloud.core.replication import messages as m

    new = m.Entry(b"sym", "l", 0o777, 0, 0, mtime_ns=10**18, target=b"t")
    old = m.Entry(b"sym", "l", 0o777, 0, 0, target=b"t")  # what the previous release sends
    assert v.compare_entries(new, old) == [] and v.compare_entries(old, new) == []
    assert v.compare_entries(new, m.Entry(b"sym", "l", 0o777, 0, 0, mtime_ns=1, target=b"t")) == ["mtime"]
