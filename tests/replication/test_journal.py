"""The journal on its own: block ranges, marks following the namespace, the record file (torn tails,
compaction, group commit) and the lineage rules that decide journal vs checksum resync."""

from __future__ import annotations

import asyncio
import itertools
import random
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from safekit_cloud.core.replication import journal as jn, messages as m
from safekit_cloud.core.replication.journal import INF, Journal, RangeSet, State

SYNC = b"s" * 16


# ---- RangeSet ----

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(1, 12)), max_size=40))
def test_rangeset_matches_a_plain_set(ops: list[tuple[bool, int, int]]) -> None:
    rs, ref = RangeSet(), set()
    for add, s, n in ops:
        if add:
            assert rs.add(s, s + n) == bool(set(range(s, s + n)) - ref)
            ref |= set(range(s, s + n))
        else:
            rs.remove(s, s + n)
            ref -= set(range(s, s + n))
        assert {x for a, b in rs.ranges() for x in range(a, b)} == ref
        pairs = rs.ranges()
        assert all(b < c for (_, b), (c, _) in itertools.pairwise(pairs))  # disjoint and coalesced
        for s2 in range(0, 75, 7):
            assert rs.covers(s2, s2 + 3) == (set(range(s2, s2 + 3)) <= ref)
            assert rs.overlaps(s2, s2 + 3) == bool(set(range(s2, s2 + 3)) & ref)
        assert rs.count(40) == len({x for x in ref if x < 40})


def test_rangeset_coarsens_but_never_loses_a_block() -> None:
    rs = RangeSet()
    blocks = random.Random(1).sample(range(1_000_000), 20_000)
    for b in blocks:
        rs.add(b, b + 1)
    assert len(rs) <= jn.MAX_RANGES
    assert all(rs.covers(b, b + 1) for b in blocks)


def test_mark_covered_by_data_and_cmp_together() -> None:
    mk = jn.Mark(b"f")
    mk.data.add(0, 4)
    mk.cmp.add(4, 8)
    assert mk.covered(0, 8) and mk.covered(2, 6)
    assert not mk.covered(6, 9)


# ---- marks follow the namespace ----

def test_marks_follow_renames_exchanges_and_removals() -> None:
    s = State()
    s.add_data(b"d/a", 0, 2)
    s.add_data(b"d/b", 5, 6)
    s.add_data(b"x", 1, 2)
    s.apply_ns(m.Rename(0, b"d", b"e"))
    assert set(s.marks) == {b"e/a", b"e/b", b"x"} and s.marks[b"e/a"].path == b"e/a"
    s.apply_ns(m.Rename(0, b"e/a", b"x"))  # replaces x: x's own marks are void
    assert s.marks[b"x"].data.ranges() == [(0, 2)]
    s.add_data(b"y", 7, 8)
    s.apply_ns(m.Rename(0, b"x", b"y", flags=2))  # RENAME_EXCHANGE
    assert s.marks[b"y"].data.ranges() == [(0, 2)] and s.marks[b"x"].data.ranges() == [(7, 8)]
    s.apply_ns(m.Unlink(0, b"x"))
    s.apply_ns(m.Remove(0, b"e"))
    assert set(s.marks) == {b"y"}
    s.apply_ns(m.Create(0, b"n", 0o100644, 0, 0, hid=3))
    assert s.marks[b"n"].data.covers(0, INF) and s.marks[b"n"].fresh.covers(0, INF) and s.marks[b"n"].meta
    assert [type(op) for op in s.log] == [m.Rename, m.Rename, m.Rename, m.Unlink, m.Remove, m.Create]
    assert s.log[-1].hid is None and s.log[-1].uid == 0  # replay form: structure only


def test_carried_marks_go_to_the_name_the_file_is_synchronised_through() -> None:
    """A name that becomes a link to another on the replica (the resync): what is marked for it,
    data, compared blocks and metadata, is to be sent through the other name."""
    s = State()
    s.mark(b"c").cmp.add(0, 4)
    s.add_data(b"p", 6, INF)
    s.mark(b"p").cmp.add(2, 3)
    s.add_meta(b"p")
    s.carry(b"p", b"c")
    assert set(s.marks) == {b"c"}
    c = s.marks[b"c"]
    assert c.data.ranges() == [(2, 3), (6, INF)] and c.cmp.ranges() == [(0, 4)] and c.meta
    s.carry(b"nothing marked", b"c")
    assert c.data.ranges() == [(2, 3), (6, INF)]


def test_suspects_merge_and_move() -> None:
    s = State()
    assert s.add_suspect(b"a/b")
    assert not s.add_suspect(b"a/b/c")
    assert s.add_suspect(b"a")
    assert s.suspects == {b"a"}
    s.apply_ns(m.Rename(0, b"a", b"z"))
    assert s.suspects == {b"z"}
    s.pending[7] = [b"z/q", b"w"]
    s.apply_ns(m.Rename(0, b"w", b"v"))
    s.settle_pending()
    assert s.suspects == {b"z", b"v"} and not s.pending


# ---- the file ----

def _alone(path: Path) -> Journal:
    j = Journal(path)
    j._reset(jn.RState("alone", SYNC, 5, jn.boot_id()))
    return j


def _same(a: State, b: State) -> None:
    assert {p: (mk.data, mk.fresh, mk.meta) for p, mk in a.marks.items()} == \
        {p: (mk.data, mk.fresh, mk.meta) for p, mk in b.marks.items()}
    assert a.suspects == b.suspects and a.log == b.log and a.pending == b.pending


def test_records_survive_reload_and_a_torn_tail_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = _alone(path)
    j.state.add_data(b"f", 0, 3)
    j.append(jn.RMarks(b"f", [0, 3]))
    j.state.apply_ns(m.Rename(0, b"f", b"g"))
    j.append(jn.ROps(0, [m.Rename(0, b"f", b"g")]))
    j.state.pending[4] = [b"p"]
    j.append(jn.RPending(4, [b"p"]))
    asyncio.run(j.commit())
    j.close()
    used = _used(path)
    with open(path, "r+b") as f:  # a crash mid-append: the record's start written, its end not
        f.seek(used)
        f.write(jn.encode_record(jn.RMarks(b"torn", [9, 10]))[:-3])
    k = Journal.load(path)
    assert k.kind == "alone" and k.sync == SYNC and k.generation == 5 and k.torn > 0
    _same(j.state, k.state)
    assert k.trusted and k.lineage() is None  # changes recorded: not the base state any more


def _used(path: Path) -> int:
    """Where the valid records of the journal file end."""
    data = path.read_bytes()
    return len(data) - jn.read_records(data)[1]


def _ten_files(path: Path) -> list[int]:
    """A committed journal of ten files' marks; the offsets where its records start."""
    j = _alone(path)
    for i in range(10):
        j.state.add_data(b"f%d" % i, 0, 3)
        j.append(jn.RMarks(b"f%d" % i, [0, 3]))
    asyncio.run(j.commit())
    j.close()
    data, starts, pos = path.read_bytes(), [], 0
    while pos < _used(path):
        starts.append(pos)
        pos += jn._HEAD.size + jn._HEAD.unpack_from(data, pos)[0]
    assert len(starts) == 11  # the state record, then one per file
    assert len(Journal.load(path).state.marks) == 10
    return starts


@pytest.mark.parametrize("damage", ["a byte flipped", "zeros inserted", "cut inside a record",
                                    "a byte after the end"])
def test_damage_to_durable_records_makes_the_journal_untrusted(tmp_path: Path, damage: str) -> None:
    """Reading stops at the first bad record; the records after it said what else changed. Taking
    the damage for a torn tail trusted a journal that left those files out: a journal resync then
    left the replica different, silently."""
    path = tmp_path / "j"
    starts = _ten_files(path)
    data = bytearray(path.read_bytes())
    if damage == "a byte flipped":
        data[starts[3] + jn._HEAD.size + 2] ^= 0xFF
    elif damage == "zeros inserted":
        data[starts[2]:starts[2]] = bytes(100)
    elif damage == "cut inside a record":
        del data[(starts[5] + starts[6]) // 2:]
    else:
        data[_used(path) + 5000] = 1
    path.write_bytes(bytes(data))
    k = Journal.load(path)
    assert not k.trusted and k.kind == "invalid"
    assert k.reason.startswith("damaged journal: the ") and "are not what a crash during a write leaves" in k.reason


def test_a_crash_during_a_write_of_several_records_keeps_the_journal(tmp_path: Path) -> None:
    """The torn write's header may be on disk and its payload not (zeros), or part of the payload."""
    path = tmp_path / "j"
    _ten_files(path)
    used = _used(path)
    record = jn.encode_record(jn.RMarks(b"late", [0, 9]))
    for written in (jn._HEAD.size, len(record) - 1):
        with open(path, "r+b") as f:
            f.seek(used)
            f.write(record[:written] + bytes(len(record)))
        k = Journal.load(path)
        assert k.trusted and len(k.state.marks) == 10, written


def test_compaction_keeps_the_meaning(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = _alone(path)
    rng = random.Random(3)
    for i in range(300):
        p = b"d%d/f%d" % (i % 5, i % 17)
        j.state.add_data(p, rng.randrange(1000), rng.randrange(1000, 2000))
        j.append(jn.marks_record(j.state.marks[p]))
        if i % 7 == 0:
            op = m.Rename(0, b"d%d" % (i % 5), b"d%d" % ((i + 1) % 5))
            j.state.apply_ns(op)
            j.append(jn.ROps(0, [op]))
        if i % 11 == 0:
            op = m.Unlink(0, p)
            j.state.apply_ns(op)
            j.append(jn.ROps(0, [op]))
    asyncio.run(j.commit())
    before = Journal.load(path)
    j.compact()
    j.close()
    after = Journal.load(path)
    _same(before.state, after.state)
    _same(j.state, after.state)
    assert j._size < before._size  # (the file itself is allocated ahead: its size says nothing)


def test_an_overflowed_log_stays_overflowed_through_a_compaction(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_LOG namespace operations the replay log is capped and the journal cannot be
    replayed (checksum resync). A compaction writes the capped log, which reloads as exactly
    MAX_LOG operations: without the overflow recorded, a crash then left a journal trusted whose
    later operations were gone (renames missing on the replica after a journal resync)."""
    monkeypatch.setattr(jn, "MAX_LOG", 20)
    path = tmp_path / "j"
    j = _alone(path)
    for i in range(25):
        op = m.Rename(0, b"f%d" % i, b"g%d" % i)
        j.state.apply_ns(op)
        j.append(jn.ROps(0, [op]))
    asyncio.run(j.commit())
    assert j.state.overflow and len(j.state.log) == 20
    j.compact()
    j.close()
    reloaded = Journal.load(path)
    assert reloaded.state.overflow
    reloaded.become_source()
    assert reloaded.kind == "invalid" and "overflowed" in reloaded.reason


def test_group_commit_shares_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = _alone(tmp_path / "j")
    calls = []
    real = j._write
    monkeypatch.setattr(j, "_write", lambda data: (calls.append(len(data)), real(data)))

    async def writer(i: int) -> None:
        for k in range(10):
            j.append(jn.RMarks(b"f%d" % i, [k, k + 1]))
            await j.commit()

    async def main() -> None:
        await asyncio.gather(*(writer(i) for i in range(50)))

    asyncio.run(main())
    assert len(calls) <= 2 * 10 + 2  # 500 records: about one fsync per round, not per record
    assert len(Journal.load(tmp_path / "j").state.marks) == 50


# ---- lineage: what a node reports, what a primary starts from ----

def test_lineage_rules(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = Journal.load(path)
    assert j.kind == "invalid" and j.lineage() is None  # no file: nothing known
    j.target_done(SYNC, 9)
    assert Journal.load(path).lineage() == SYNC  # same boot: the page cache survived
    j._reset(jn.RState("target", SYNC, 9, "another-boot"))
    assert Journal.load(path).lineage() is None  # rebooted without a clean stop
    j.target_clean()
    assert Journal.load(path).lineage() == SYNC
    j.start_session(SYNC, 9)
    assert Journal.load(path).lineage() is None  # crash while replicating: in-flight ops unknown
    j.close_session()
    assert Journal.load(path).lineage() == SYNC


def test_become_source(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = Journal.load(path)
    j.start_session(SYNC, 1)
    k = Journal.load(path)
    k.become_source(2)
    assert k.kind == "invalid" and not k.trusted  # the session did not end cleanly
    j.close_session()
    k = Journal.load(path)
    k.become_source(2)
    assert k.trusted and k.sync == SYNC and k.state.empty
    # A trusted journal goes on; intents left unsettled by a crash become suspects.
    k.state.add_data(b"f", 0, 1)
    k.append(jn.RMarks(b"f", [0, 1]))
    k.state.pending[3] = [b"a", b"b"]
    k.append(jn.RPending(3, [b"a", b"b"]))
    k.flush_sync()
    again = Journal.load(path)
    again.become_source()
    assert again.trusted and again.state.suspects == {b"a", b"b"} and b"f" in again.state.marks
    assert Journal.load(path).state.suspects == {b"a", b"b"}


def test_alone_from_session_is_one_record(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = Journal.load(path)
    j.start_session(SYNC, 1)
    mk = jn.Mark(b"f")
    mk.data.add(3, 4)
    j.alone_from_session([mk], [b"d/x"])
    asyncio.run(j.commit())
    k = Journal.load(path)
    assert k.trusted and k.state.marks[b"f"].data.ranges() == [(3, 4)] and k.state.suspects == {b"d/x"}


def test_block_size_change_rescales_marks(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = _alone(path)
    j.state.add_data(b"f", 3, 5)  # bytes 12288..20480 at 4 KiB
    j.append(jn.RMarks(b"f", [3, 5]))
    j.flush_sync()
    k = Journal.load(path, block=65536)
    assert k.state.marks[b"f"].data.ranges() == [(0, 1)]


def test_a_failed_journal_write_is_not_trusted_after_a_restart(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "j"
    j = _alone(path)

    def full(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(j, "_write", full)
    j.append(jn.RMarks(b"f", [0, 1]))
    asyncio.run(j.commit())  # the waiting call is released, not stuck
    assert not j.trusted and j.failed
    assert not Journal.load(path).trusted


# ---- activity log (a session's in-flight paths) ----

def _session(path: Path) -> Journal:
    j = Journal(path)
    j.start_session(SYNC, 7)
    return j


def _commit(j: Journal) -> None:
    asyncio.run(j.commit())


def test_activity_log_claims_only_after_a_closed_epoch_and_only_open_epochs(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = _session(path)
    j.note_active(0, [b"a", b"d/x"])
    _commit(j)
    crashed = Journal.load(path)  # no epoch closed yet: what preceded the session is not claimed
    assert crashed.crash_suspects() is None and crashed.lineage_with_suspects() == (None, [])
    j.note_active(1, [b"b"])
    j.close_epoch(0)
    j.note_active(1, [b"d/y"])
    _commit(j)
    crashed = Journal.load(path)
    assert crashed.closed == 0
    assert crashed.crash_suspects() == [b"b", b"d/y"]  # epoch 0 (a, d/x) is on both nodes
    assert crashed.lineage_with_suspects() == (SYNC, [b"b", b"d/y"])
    j.close_session()  # a clean stop claims the lineage exactly
    assert Journal.load(path).lineage_with_suspects() == (SYNC, [])


def test_crashed_session_becomes_an_alone_journal_with_its_suspects(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = _session(path)
    j.close_epoch(0)
    j.note_active(1, [b"d/f", b"g"])
    _commit(j)
    k = Journal.load(path)
    k.become_source(9)
    assert (k.kind, k.sync, k.trusted) == ("alone", SYNC, True)
    assert k.state.suspects == {b"d/f", b"g"} and k.generation == 7
    reloaded = Journal.load(path)
    assert (reloaded.kind, reloaded.state.suspects) == ("alone", {b"d/f", b"g"})


def test_activity_records_are_not_written_outside_a_session(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = Journal(path)
    j.target_done(SYNC, 1)
    j.note_active(0, [b"a"])
    j.close_epoch(0)
    _commit(j)
    assert Journal.load(path).kind == "target" and not Journal.load(path).active


def test_closing_epochs_rewrites_a_grown_activity_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jn, "COMPACT_MIN", 4096)
    path = tmp_path / "j"
    j = _session(path)
    for e in range(40):
        j.note_active(e, [b"dir/file-%04d" % i for i in range(e * 20, e * 20 + 20)])
        if e:
            j.close_epoch(e - 1)
        _commit(j)
    records, _ = jn.read_records(path.read_bytes())
    assert len(records) < 20  # rewritten meanwhile: the session, the last closes and the open epochs
    crashed = Journal.load(path)
    assert crashed.closed == 38 and crashed.crash_suspects() == sorted(b"dir/file-%04d" % i for i in range(780, 800))


def test_coarsen_keeps_every_path_covered() -> None:
    paths = [b"a/b/c", b"a/b/d", b"a/e", b"x/y", b"x/z/w", b"q"]
    assert jn.coarsen(paths, 10) == sorted(paths)
    assert jn.coarsen([b"a/b", b"a/b/c", b"a"], 10) == [b"a"]  # nested: the outer one
    for limit in range(1, 7):
        out = jn.coarsen(paths, limit)
        assert len(out) <= limit
        assert all(any(p == t or p.startswith(t + b"/") or not t for t in out) for p in paths)
    assert jn.coarsen(paths, 1) == [b""]


def test_a_record_whose_string_is_not_utf8_ends_the_log_like_a_torn_tail() -> None:
    good = jn.encode_record(jn.RMarks(b"a", [1, 2]))
    payload = b"\x92\xa5state\xa2\xff\xfe"  # right checksum, a string field (kind) that is not UTF-8
    bad = jn._HEAD.pack(len(payload), zlib.crc32(payload)) + payload
    records, rest = jn.read_records(good + bad)
    assert [type(r) for r in records] == [jn.RMarks] and rest == len(bad)


def test_a_lineage_keeps_the_exclusion_patterns_it_was_made_under(tmp_path: Path) -> None:
    path = jn.journal_path(tmp_path, "mod", b"/data")
    j = Journal.load(path)
    j.target_done(b"s" * 16, 1, ["*.tmp"])
    j.target_clean()
    assert Journal.load(path).exclude == ["*.tmp"]
    j = Journal.load(path)
    j.become_source(2)  # alone from that lineage: the same patterns
    assert Journal.load(path).exclude == ["*.tmp"]
    j.start_session(b"t" * 16, 2, ["tmp/"])  # a new lineage, made under other patterns
    j.close_session()
    assert Journal.load(path).exclude == ["tmp/"]
    j.invalidate("test")
    assert Journal.load(path).exclude is None



def test_a_recorded_identity_that_is_not_text_counts_as_another_directory(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """It made every start of the agent fail with a UnicodeDecodeError, on both roles."""
    path = jn.journal_path(tmp_path, "mod", b"/data")
    jn.root_marker(path).write_bytes(b"\xff\xfe\x00garbage")
    j = Journal.load(path)
    assert j.remembered_root() is None  # no identity to match: the directory is compared whole
    assert f"the identity recorded in {jn.root_marker(path)} cannot be read" in caplog.text


@pytest.mark.parametrize("suffix", [".journal", ".dirs", ".root", ".writable", ".tmp"])
def test_a_directory_where_a_state_file_goes_is_refused_at_once(tmp_path: Path, suffix: str) -> None:
    """A receiver accepted the stream and every checksum resync failed at its end (EISDIR), then
    started again, whole, every half second."""
    path = jn.journal_path(tmp_path, "mod", b"/data")
    (place := path.with_suffix(suffix)).mkdir()
    with pytest.raises(OSError, match=f"{place} is a directory, where safekit-cloud keeps a file of its own: "
                                      "remove it"):
        Journal.load(path)


def test_resync_progress_past_its_estimate_shows_no_more_than_100_percent() -> None:
    """The totals are estimated when the data phase starts. Appends meanwhile take the work past
    the estimate: the total shown follows what is done and the ETA is unknown, not 0; truncates
    leave it below: at the end the totals are what was done."""
    from safekit_cloud.core.replication.resync import Progress

    p = Progress("checksum", phase="data", bytes_total=100, files_total=2)
    p.bytes_done, p.files_done = 40, 1
    snap = p.snapshot()
    assert (snap["bytes_total"], snap["files_total"]) == (100, 2) and snap["eta_seconds"] is not None
    p.bytes_done, p.files_done = 150, 3
    snap = p.snapshot()
    assert (snap["bytes_total"], snap["bytes_done"], snap["files_total"]) == (150, 150, 3)
    assert snap["eta_seconds"] is None
    p.bytes_done = 90
    p.finish()
    snap = p.snapshot()
    assert (snap["phase"], snap["bytes_total"], snap["files_total"]) == ("done", 90, 3)
