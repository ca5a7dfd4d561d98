"""Changes made to a replicated directory while no agent watched it (a stopped module, a dead agent,
the time between a reboot and the daemon) are found at the next start and resynchronised."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest
from safekit_cloud.core.config import ReplicationConfig
from safekit_cloud.core.replication import journal as jn, unwatched
from safekit_cloud.core.replication.exclude import Excluder
from safekit_cloud.core.replication.journal import Journal, journal_path, mark_writable, writable_marker
from safekit_cloud.core.replication.service import ReplicationService

from .harness import KEY, describe_tree, force_unmount, free_port, fuse_available, wait_for


def _tree(root: Path) -> None:
    for d in ("app/sub", "app/old", "other"):
        (root / d).mkdir(parents=True)
    for f in ("app/sub/a", "app/sub/b", "app/old/gone", "other/c", "top"):
        (root / f).write_bytes(b"x" * 100)


def _after_a_tick() -> int:
    """A moment strictly after everything made so far (timestamps come from a coarse clock)."""
    time.sleep(0.2)
    now = time.time_ns()
    time.sleep(0.2)
    return now


def test_changed_since_finds_every_kind_of_change_and_only_those(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _tree(root)
    since = _after_a_tick()
    with open(root / "app/sub/a", "r+b") as f:
        f.write(b"y")  # data, same size
    os.chmod(root / "other/c", 0o600)  # metadata only
    (root / "app/sub/new").write_bytes(b"n")  # a new file
    os.unlink(root / "app/old/gone")  # a removal: shows as its directory
    os.rename(root / "app/sub/b", root / "app/sub/b2")  # a rename: its directory (and the file)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        found = set(unwatched.changed_since(fd, since, lambda p, d: False))
        assert found == {b"app/sub", b"app/old", b"other/c"}  # app/sub stands for a, new and b2
        assert unwatched.find(fd, None) == []  # watched all along: no walk at all
        (root / "created-at-the-top").write_bytes(b"t")  # the directory itself changed
        assert unwatched.changed_since(fd, since, lambda p, d: False) == [b""]  # not known to be the same
        # The same directory as the one watched: its entries, and what changed below, as before.
        found = set(unwatched.changed_since(fd, since, lambda p, d: False, same_root=True))
        assert found == {jn.entries_of(b""), b"created-at-the-top", b"app/sub", b"app/old", b"other/c"}
    finally:
        os.close(fd)


def test_the_identity_of_the_top_directory_tells_it_from_one_moved_into_its_place(tmp_path: Path) -> None:
    """The identity recorded once the directory is watched again is that of its inode: the same
    directory keeps it, one renamed into its place (or made anew, even on a reused inode) has another."""
    root, other = tmp_path / "d", tmp_path / "restored"
    root.mkdir()
    other.mkdir()
    path = journal_path(tmp_path / "state", "mod", b"/d")

    def identity(d: Path) -> str | None:
        fd = os.open(d, os.O_PATH | os.O_DIRECTORY)
        try:
            return unwatched.root_identity(fd)
        finally:
            os.close(fd)

    j = Journal.load(path)
    assert j.remembered_root() is None  # nothing recorded yet: a change at the top means everything
    j.root_id = identity(root)
    assert j.root_id is not None
    mark_writable(path)
    j.watched_again()
    assert Journal.load(path).remembered_root() == identity(root) and not writable_marker(path).exists()
    (root / "new").write_bytes(b"n")
    assert identity(root) == j.root_id  # its entries changed, not what it is
    os.rename(root, tmp_path / "away")
    os.rename(other, root)
    assert identity(root) != j.root_id


def test_a_changed_directory_recorded_at_the_stop_stands_for_its_entries_and_the_walk_goes_on(tmp_path: Path) -> None:
    """The directories' identities recorded at the stop: one whose entries changed is compared by
    its entries, and what changed inside it is found; one moved into the place of another (or
    not recorded) stands for its whole subtree."""
    root = tmp_path / "d"
    _tree(root)
    (root / "app/tmp").mkdir()
    marker = tmp_path / "mod.d.dirs"
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        assert unwatched.record_directories(fd, marker, Excluder(["tmp/"]).excluded) == 4  # app/tmp left out
        recorded = unwatched.load_directories(marker)
        assert set(recorded) == {b"app", b"app/sub", b"app/old", b"other"}
        since = _after_a_tick()
        (root / "app/sub/new").write_bytes(b"n")  # app/sub: its entries
        with open(root / "app/sub/a", "r+b") as f:
            f.write(b"y")  # and one of them
        os.rename(root / "other", tmp_path / "other.away")
        (tmp_path / "other.new").mkdir()
        os.rename(tmp_path / "other.new", root / "other")  # moved into the place of another
        found = set(unwatched.changed_since(fd, since, lambda p, d: False, same_root=True, directories=recorded))
        assert found == {jn.entries_of(b""), jn.entries_of(b"app/sub"), b"app/sub/new", b"app/sub/a", b"other"}
        assert set(unwatched.changed_since(fd, since, lambda p, d: False, same_root=True)) == {
            jn.entries_of(b""), b"app/sub", b"other"}  # nothing recorded: whole subtrees
    finally:
        os.close(fd)
    marker.write_bytes(b"torn")
    assert unwatched.load_directories(marker) == {}  # unreadable: whole subtrees, never an error


def test_a_walk_that_finds_too_much_coarsens_to_directories_rather_than_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many files changed in a few recorded directories: beyond the walk's limit, their paths are
    coarsened to those directories (compared whole), not to the whole tree, and nothing changed
    is left out."""
    root = tmp_path / "d"
    _tree(root)
    marker = tmp_path / "mod.d.dirs"
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        unwatched.record_directories(fd, marker, lambda p, d: False)
        since = _after_a_tick()
        for i in range(12):
            (root / f"app/sub/new{i}").write_bytes(b"n")
            (root / f"other/new{i}").write_bytes(b"n")
        monkeypatch.setattr(unwatched, "LIMIT", 10)
        monkeypatch.setattr(unwatched, "MAX_SUSPECTS", 2)
        found = unwatched.changed_since(fd, since, lambda p, d: False, same_root=True,
                                        directories=unwatched.load_directories(marker))
    finally:
        os.close(fd)
    assert found == [b"app/sub", b"other"]


def test_suspects_that_stand_for_a_directory_s_entries_follow_the_journal_s_rules() -> None:
    st = jn.State()
    st.add_suspect(jn.entries_of(b""))
    st.add_suspect(jn.entries_of(b"a/b"))
    assert st.suspects == {b"\0", b"a/b/\0"}
    assert [jn.entries_dir(p) for p in sorted(st.suspects)] == [b"", b"a/b"]
    assert jn.entries_dir(b"a/b") is None
    st.add_suspect(b"a")  # the whole subtree covers its entries
    assert st.suspects == {b"\0", b"a"}
    assert jn.coarsen({b"\0", b"x/y"}, 1) == [b""]  # coarsened, it means the whole tree


def test_changed_since_skips_what_is_not_replicated(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _tree(root)
    (root / "app/tmp").mkdir()
    since = _after_a_tick()
    (root / "app/tmp/scratch").write_bytes(b"s")
    (root / "app/sub/x.tmp").write_bytes(b"s")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        excl = Excluder(["tmp/", "*.tmp"])
        assert unwatched.changed_since(fd, since, excl.excluded) == [b"app/sub"]  # its entries changed
        assert unwatched.changed_since(fd, since, lambda p, d: False) == [b"app/sub", b"app/tmp"]
    finally:
        os.close(fd)


def test_the_walk_reports_its_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large tree takes a while: the agent tells the service it is alive (its start waits for
    silence, not for a fixed time)."""
    root = tmp_path / "d"
    _tree(root)  # 4 directories and 5 files below the top
    monkeypatch.setattr(unwatched, "PROGRESS_EVERY", 2)
    seen: list[int] = []
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        assert unwatched.changed_since(fd, time.time_ns() + 10**9, lambda p, d: False, seen.append) == []
    finally:
        os.close(fd)
    assert seen == [2, 4, 6, 8]  # 9 entries looked at


def test_the_service_marker_and_a_reboot_say_since_when(tmp_path: Path) -> None:
    path = journal_path(tmp_path, "mod", b"/data")
    j = Journal.load(path)
    j.start_session(os.urandom(16), 1)
    j.close_session()
    j = Journal.load(path)
    assert j.could_be_trusted() and j.unwatched_since_ns() is None  # stopped with its agent watching
    mark_writable(path)
    first = writable_marker(path).stat().st_mtime_ns
    time.sleep(0.05)
    mark_writable(path)  # the earliest moment is kept
    assert Journal.load(path).unwatched_since_ns() == first
    j = Journal.load(path)
    j.become_source(2, [b"app/sub"])
    j.watched_again()
    assert not writable_marker(path).exists()
    j = Journal.load(path)
    assert j.kind == "alone" and j.state.suspects == {b"app/sub"} and j.trusted
    j.boot = "another boot"  # as if the journal had been written before a reboot
    assert j.unwatched_since_ns() is not None and j.unwatched_since_ns() <= time.time_ns()


def test_a_target_reports_what_changed_around_it_with_its_lineage(tmp_path: Path) -> None:
    j = Journal.load(journal_path(tmp_path, "mod", b"/data"))
    sync = os.urandom(16)
    j.target_done(sync, 1)
    j.target_clean()
    j.unwatched = [b"app/sub", b"other/c"]
    assert j.lineage_with_suspects() == (sync, [b"app/sub", b"other/c"])
    j.unwatched = [b""]
    assert j.lineage_with_suspects() == (None, [])  # everything: nothing to claim


def test_a_source_whose_directory_itself_changed_resyncs_everything(tmp_path: Path) -> None:
    j = Journal.load(journal_path(tmp_path, "mod", b"/data"))
    j.start_session(os.urandom(16), 1)
    j.close_session()
    j.become_source(2, [b""])
    assert j.kind == "invalid" and "itself changed" in j.reason


fuse = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))


# A subtree of large files (compared block by block when in doubt, not by one digest).
BULK_FILES, BULK_SIZE = 20, 128 * 1024


@pytest.mark.fuse
@fuse
@pytest.mark.parametrize("where", ["below", "top", "top-link", "cross-link", "replaced", "in-bulk", "bulk-replaced"])
def test_changes_made_while_the_module_was_stopped_are_resynchronised(tmp_path: Path, where: str) -> None:
    """Both nodes replicate, then the module stops on both. While stopped, someone changes the
    primary's directory (an edit, a new file, a removal) and the secondary's (a stray file, an edit).
    When the module starts again, the resync finds them: journal mode, comparing only those paths.
    Before, the journal resync sent nothing and the replicas stayed different, silently.
    Every case but the replaced ones compares none of the unchanged large files of `bulk`.
    - "top": entries created, removed and renamed at the top of both trees: still a journal resync,
      the top compared by its entries only;
    - "top-link": a hard link made at the top: the top's whole subtree is compared (its names must
      be found together), and the link is a link on the replica too;
    - "cross-link": a hard link made from one directory into another, with no identities recorded
      (as after a reboot with no stop): both subtrees compared, the link a link on the replica;
    - "replaced": the primary's directory was replaced by another one, prepared before the stop
      (its files' ctimes predate the stop, one differs in content only): a checksum resync;
    - "in-bulk": a file created in `bulk` on the primary, one removed there on the secondary: the
      directory is compared by its entries (it is the one there at the stop);
    - "bulk-replaced": `bulk` replaced on the primary by a copy prepared before the stop, one
      file differing in content only: `bulk` is compared whole, in a journal resync."""
    data, replica = tmp_path / "data", tmp_path / "replica"
    data.mkdir()
    replica.mkdir()
    restored = tmp_path / "restored"
    cfg = ReplicationConfig(directories=[data], port=free_port())

    def services() -> tuple[ReplicationService, ReplicationService]:
        return (ReplicationService("mod", cfg, "127.0.0.1", KEY, tmp_path / "state2", listen_address="127.0.0.1",
                                   receive_into={data: replica}),
                ReplicationService("mod", cfg, "127.0.0.1", KEY, tmp_path / "state1", timeout=2.0))

    def change_while_stopped() -> None:
        """The module is stopped on both nodes: the directories are plain, writable, watched by nobody."""
        time.sleep(0.2)
        with open(data / "app/sub/a", "r+b") as f:
            f.write(b"edited while stopped")
        (data / "app/sub/new").write_bytes(b"made while stopped")
        os.unlink(data / "app/old/gone")
        (replica / "other/stray").write_bytes(b"on the secondary only")
        with open(replica / "app/sub/b", "r+b") as f:
            f.write(b"secondary edit")
        if where in ("top", "replaced"):
            (data / "top").unlink()
        if where == "top":
            (data / "new-at-the-top").write_bytes(b"primary")
            os.symlink("app", data / "top")  # a file before: another kind under the same name
            (data / "new-dir-at-the-top").mkdir()
            (data / "new-dir-at-the-top/f").write_bytes(b"inside")
            os.rename(data / "other", data / "other-renamed")
            (replica / "stray-at-the-top").write_bytes(b"secondary")
        if where == "top-link":
            os.link(data / "app/sub/a", data / "link-at-the-top")
        if where == "cross-link":
            os.link(data / "other/c", data / "app/sub/link-elsewhere")
            for state in ("state1", "state2"):  # as after a reboot with no stop: no identities
                for f in (tmp_path / state).glob("*.dirs"):
                    f.unlink()
        if where == "replaced":
            os.rename(data, tmp_path / "data.away")
            os.rename(restored, data)
        if where == "in-bulk":
            (data / "bulk/new").write_bytes(b"n" * BULK_SIZE)
            os.unlink(replica / "bulk/0")
        if where == "bulk-replaced":
            os.rename(data / "bulk", tmp_path / "bulk.away")
            os.rename(restored, data / "bulk")

    def prepare_a_restore(tree: Path, changed: str) -> None:
        """A copy of `tree` where the file `changed` has other bytes and the same size and times:
        only a comparison finds it (the secondary leaves that file alone)."""
        shutil.copytree(tree, restored, symlinks=True)
        with open(restored / changed, "r+b") as f:
            f.write(b"restored")
        st = os.stat(tree / changed)
        os.utime(restored / changed, ns=(st.st_atime_ns, st.st_mtime_ns))

    async def scenario() -> tuple[dict, dict, dict]:
        secondary, primary = services()
        try:
            await secondary.become_secondary()
            await primary.become_primary()
            assert await wait_for(lambda: primary.status()["synced"], 20)
            await asyncio.to_thread(_tree, data)  # through the mount
            (data / "bulk").mkdir()
            for i in range(BULK_FILES):
                (data / f"bulk/{i}").write_bytes(b"b" * BULK_SIZE)
            await asyncio.sleep(0.5)
            # Before the stop: the copy's entries' ctimes are older than the stop.
            if where == "replaced":
                await asyncio.to_thread(prepare_a_restore, data, "app/old/gone")
            elif where == "bulk-replaced":
                await asyncio.to_thread(prepare_a_restore, data / "bulk", "5")
            await asyncio.sleep(0.2)
        finally:
            await primary.stop()
            await secondary.stop()
            force_unmount(data)
        assert describe_tree(data) == describe_tree(replica)
        await asyncio.to_thread(change_while_stopped)
        secondary, primary = services()
        try:
            await secondary.become_secondary()
            await primary.become_primary()
            assert await wait_for(lambda: primary.status()["synced"], 20)
            return primary.status()["last_resync"], describe_tree(data), describe_tree(replica)
        finally:
            await primary.stop()
            await secondary.stop()
            force_unmount(data)

    last, ours, theirs = asyncio.run(scenario())
    assert ours == theirs
    assert last["modes"] == (["checksum"] if where == "replaced" else ["journal"]), last
    if where in ("below", "top", "in-bulk"):
        assert last["bytes_total"] < 4 * BULK_SIZE, last  # only what changed was compared
    if where == "top":
        assert (replica / "new-dir-at-the-top/f").read_bytes() == b"inside"
        assert not (replica / "stray-at-the-top").exists() and not (replica / "other").exists()
        assert not (replica / "other-renamed/stray").exists() and os.readlink(replica / "top") == "app"
    elif where == "top-link":
        assert os.stat(replica / "link-at-the-top").st_ino == os.stat(replica / "app/sub/a").st_ino
    elif where == "cross-link":
        assert os.stat(replica / "app/sub/link-elsewhere").st_ino == os.stat(replica / "other/c").st_ino
    elif where == "in-bulk":
        assert (replica / "bulk/0").exists() and (replica / "bulk/new").exists()
    elif where == "bulk-replaced":
        assert (replica / "bulk/5").read_bytes().startswith(b"restored")
    if where == "replaced":  # what was moved into place, not what was edited before
        assert (replica / "app/old/gone").read_bytes().startswith(b"restored")
        assert not (replica / "app/sub/a").read_bytes().startswith(b"edited while stopped")
    else:
        assert (replica / "app/sub/a").read_bytes().startswith(b"edited while stopped")
        assert not (replica / "other/stray").exists() and not (replica / "app/old/gone").exists()


@pytest.mark.fuse
@fuse
def test_the_directories_are_recorded_at_a_stop_only_when_watched_until_then(tmp_path: Path) -> None:
    """A secondary's module stops: the identities of its directories are recorded under its
    read-only bind, and dropped when an agent watches the tree again. A tree already unwatched
    before the stop (its marker older) gets none: they would describe a later moment than the
    marker, and a directory swapped in between would pass for the one that was there."""
    data, replica = tmp_path / "data", tmp_path / "replica"
    data.mkdir()
    replica.mkdir()
    (replica / "sub").mkdir()
    cfg = ReplicationConfig(directories=[data], port=free_port())
    state = tmp_path / "state"
    dirs = jn.directories_marker(journal_path(state, "mod", os.fsencode(str(data))))

    async def scenario() -> None:
        secondary = ReplicationService("mod", cfg, "127.0.0.1", KEY, state, listen_address="127.0.0.1",
                                       receive_into={data: replica})
        try:
            await secondary.become_secondary()
            await secondary.stop()
            assert unwatched.load_directories(dirs).keys() == {b"sub"}
            assert writable_marker(dirs.with_suffix(".journal")).exists()
            await secondary.become_secondary()  # watched again: nothing changed, both go
            assert not dirs.exists() and not writable_marker(dirs.with_suffix(".journal")).exists()
            mark_writable(dirs.with_suffix(".journal"), time.time_ns() - 10**9)  # unwatched before
            await secondary.stop()
            assert not dirs.exists()
        finally:
            await secondary.stop()

    asyncio.run(scenario())


@pytest.mark.fuse
@fuse
def test_a_read_only_bind_removed_by_hand_while_the_daemon_was_down_is_noticed(tmp_path: Path) -> None:
    """The secondary's daemon dies (its receiver's read-only bind stays), an administrator removes
    the bind and changes the replica by hand. When the daemon is back, the service sees that the
    bind it made is gone: what changed since it was made is compared, and the replica ends identical."""
    import signal
    import subprocess

    data, replica = tmp_path / "data", tmp_path / "replica"
    data.mkdir()
    replica.mkdir()
    cfg = ReplicationConfig(directories=[data], port=free_port())

    def by_hand() -> None:
        subprocess.run(["umount", "-l", str(replica)], check=True)
        (replica / "app/stray").write_bytes(b"by hand")
        with open(replica / "app/sub/b", "r+b") as f:
            f.write(b"by hand")

    async def scenario() -> tuple[dict, dict]:
        secondary = ReplicationService("mod", cfg, "127.0.0.1", KEY, tmp_path / "state2", listen_address="127.0.0.1",
                                       receive_into={data: replica})
        primary = ReplicationService("mod", cfg, "127.0.0.1", KEY, tmp_path / "state1", timeout=2.0)
        try:
            await secondary.become_secondary()
            await primary.become_primary()
            assert await wait_for(lambda: primary.status()["synced"], 20)
            await asyncio.to_thread(_tree, data)
            await asyncio.sleep(0.5)
            receiver = secondary._agents[0].proc
            receiver.send_signal(signal.SIGKILL)  # as its daemon's death would, or worse
            await receiver.wait()
            await asyncio.to_thread(by_hand)
            await secondary.become_secondary()  # the daemon back
            assert await wait_for(lambda: primary.status()["synced"], 20)
            return describe_tree(data), describe_tree(replica)
        finally:
            await primary.stop()
            await secondary.stop()
            force_unmount(data)

    try:
        ours, theirs = asyncio.run(scenario())
    finally:
        subprocess.run(["umount", "-l", str(replica)], capture_output=True, check=False)
    assert ours == theirs and not (replica / "app/stray").exists()


def test_an_alone_journal_keeps_its_records_and_adds_what_changed_around_it(tmp_path: Path) -> None:
    """A primary alone (its secondary away) is stopped, its directory changed by hand, restarted:
    its journal keeps what it recorded and adds the paths changed meanwhile as suspects."""
    path = journal_path(tmp_path, "mod", b"/data")
    j = Journal.load(path)
    j.start_session(os.urandom(16), 1, [])
    j.close_session()
    j = Journal.load(path)
    j.become_source(2)
    j.state.add_data(b"written/alone", 0, 4)  # what the agent recorded while alone
    j.append(jn.marks_record(j.state.marks[b"written/alone"]))
    j.flush_sync()
    j = Journal.load(path)
    assert j.kind == "alone" and b"written/alone" in j.state.marks
    j.become_source(2, [b"changed/by-hand"])
    j = Journal.load(path)
    assert j.trusted and b"written/alone" in j.state.marks and j.state.suspects == {b"changed/by-hand"}
    assert "changed while unwatched" in j.reason


def test_paths_longer_than_a_system_call_takes_are_compared_whole_not_fatal(tmp_path: Path) -> None:
    """A deep tree (a directory renamed to a longer name makes one through the mount): paths below
    it pass the 4,096 bytes a system call takes once prefixed with /proc/self/fd/N. The walk (at the
    start of a primary agent: every failover) raised ENAMETOOLONG, the agent died and no node
    served; it now reports the part it cannot reach as changed (compared whole by the resync), and
    recording identities skips it."""
    root = tmp_path / "d"
    root.mkdir()
    level = os.open(root, os.O_PATH | os.O_DIRECTORY)
    names = []
    try:
        for i in range(17):  # 17 x 251 bytes of path: past 4,096 with the prefix
            name = bytes([ord("a") + i]) * 250
            os.mkdir(name, dir_fd=level)
            below = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=level)
            os.close(level)
            level, names = below, names + [name]
        os.close(os.open(b"f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=level))
        since = _after_a_tick()
        os.chmod(f"/proc/self/fd/{level}/f", 0o600)  # a change at the bottom, after `since`
    finally:
        os.close(level)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        found = unwatched.changed_since(fd, since, lambda p, d: False, same_root=True)
        assert found and all(b"/".join(names).startswith(p) for p in found), found
        assert unwatched.record_directories(fd, tmp_path / "dirs", lambda p, d: False) >= 15
    finally:
        os.close(fd)
