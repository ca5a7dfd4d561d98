"""The per-module state file: atomic round trip, fresh node, and an unreadable file refused loudly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safekit_cloud.core.store import ModuleStore, StateFileError
from safekit_cloud.core.types import DataStatus, Generation, ModuleState, Persisted

RECORD = Persisted(
    last_state=ModuleState.PRIM,
    can_start_alone=True,
    data=DataStatus.RESYNCING,
    generation=Generation(0x1234_5678_9ABC_DEF1, (11, 7, 3)),
    discard_local_data=True,
)


def test_round_trip(tmp_path: Path) -> None:
    store = ModuleStore(tmp_path, "app")
    store.save(RECORD)
    assert store.path == tmp_path / "app" / "state.json"
    assert ModuleStore(tmp_path, "app").load() == RECORD


def test_save_replaces_atomically_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = ModuleStore(tmp_path, "app")
    store.save(Persisted())
    store.save(RECORD)
    assert store.load() == RECORD
    assert sorted(p.name for p in store.folder.iterdir()) == ["state.json"]
    assert os.stat(store.path).st_mode & 0o777 == 0o600


def test_file_is_readable_json(tmp_path: Path) -> None:
    store = ModuleStore(tmp_path, "app")
    store.save(RECORD)
    raw = json.loads(store.path.read_text())
    assert raw["format"] == 1
    assert raw["last_state"] == "PRIM"
    assert raw["generation"] == {"current": RECORD.generation.current, "history": [11, 7, 3]}


def test_missing_file_is_a_fresh_node(tmp_path: Path) -> None:
    assert ModuleStore(tmp_path / "nothing-here", "app").load() == Persisted()
    fresh = Persisted()
    assert fresh.last_state == ModuleState.STOP and not fresh.can_start_alone
    assert fresh.generation.current == 0


def test_older_file_without_discard_flag_loads(tmp_path: Path) -> None:
    store = ModuleStore(tmp_path, "app")
    store.save(RECORD)
    raw = json.loads(store.path.read_text())
    del raw["discard_local_data"]
    store.path.write_text(json.dumps(raw))
    assert store.load().discard_local_data is False


@pytest.mark.parametrize("content", [
    "{not json",
    "",
    "[]",
    '{"format": 1}',
    ('{"format": 1, "last_state": "BOSS", "can_start_alone": false, "data": "uptodate",'
     ' "generation": {"current": 1, "history": []}}'),
    '{"format": 1, "last_state": "PRIM", "can_start_alone": false, "data": "uptodate", "generation": 5}',
    # hand edits: a boolean in quotes ("false" read as true could let a stale node start alone, or
    # make it discard its data), a format this version does not know, a history that is not a list
    ('{"format": 1, "last_state": "STOP", "can_start_alone": "false", "data": "uptodate",'
     ' "generation": {"current": 1, "history": []}}'),
    ('{"format": 1, "last_state": "STOP", "can_start_alone": false, "data": "uptodate",'
     ' "generation": {"current": 1, "history": []}, "discard_local_data": "false"}'),
    ('{"format": 99, "last_state": "STOP", "can_start_alone": false, "data": "uptodate",'
     ' "generation": {"current": 1, "history": []}}'),
    ('{"format": 1, "last_state": "STOP", "can_start_alone": false, "data": "uptodate",'
     ' "generation": {"current": 1, "history": "12"}}'),
    b"\xff\xfe not text",
])
def test_corrupt_file_names_the_file_and_what_to_do(tmp_path: Path, content: str | bytes) -> None:
    store = ModuleStore(tmp_path, "app")
    store.folder.mkdir(parents=True)
    store.path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(StateFileError) as info:
        store.load()
    message = str(info.value)
    assert str(store.path) in message
    assert "Move the file away" in message
    assert "restore it from a backup" in message
