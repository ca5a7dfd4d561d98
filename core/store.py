"""Durable per-module state: what `decide` needs across daemon restarts.

Written atomically (temporary file, fsync, rename, fsync of the folder) so a crash leaves either the old
or the new record, never a torn one. A missing file is a fresh node; an unreadable one is an error that
names the file and what to do, because guessing could let a stale node serve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import msgspec

from .durable import replace_durably
from .types import DataStatus, Generation, ModuleState, Persisted

FORMAT = 1


class StateFileError(Exception):
    pass


def encode(p: Persisted) -> dict[str, object]:
    return {
        "format": FORMAT,
        "last_state": p.last_state.name,
        "can_start_alone": p.can_start_alone,
        "data": p.data.value,
        "generation": {"current": p.generation.current, "history": list(p.generation.history)},
        "discard_local_data": p.discard_local_data,
        "resync_interrupted": p.resync_interrupted,
    }


class _GenerationFile(msgspec.Struct, forbid_unknown_fields=True):
    current: int
    history: list[int]


class _StateFile(msgspec.Struct, forbid_unknown_fields=True):
    """The file as written, checked strictly: a hand-edited "false" in quotes must not read as true
    (bool("false") is True: a node could start alone, or discard its data)."""

    format: Literal[1]
    last_state: Literal[tuple(s.name for s in ModuleState)]  # type: ignore[valid-type]
    can_start_alone: bool
    data: Literal[tuple(d.value for d in DataStatus)]  # type: ignore[valid-type]
    generation: _GenerationFile
    discard_local_data: bool = False
    resync_interrupted: bool = False


def decode(text: bytes) -> Persisted:
    raw = msgspec.json.decode(text, type=_StateFile)
    return Persisted(
        last_state=ModuleState[raw.last_state],
        can_start_alone=raw.can_start_alone,
        data=DataStatus(raw.data),
        generation=Generation(raw.generation.current, tuple(raw.generation.history)),
        discard_local_data=raw.discard_local_data,
        resync_interrupted=raw.resync_interrupted,
    )


class ModuleStore:
    """The state file of one module: <state_dir>/<module>/state.json."""

    def __init__(self, state_dir: Path, module: str):
        self.folder = state_dir / module
        self.path = self.folder / "state.json"

    def load(self) -> Persisted:
        try:
            return decode(self.path.read_bytes())
        except FileNotFoundError:
            return Persisted()
        except (OSError, msgspec.DecodeError) as exc:
            raise StateFileError(
                f"{self.path} is unreadable ({exc}); this node cannot know whether its data is current. "
                f"Move the file away to start as a new node (it will wait for its peer), "
                f"or restore it from a backup"
            ) from None

    def save(self, persisted: Persisted) -> None:
        replace_durably(self.path, json.dumps(encode(persisted), indent=1), tmp=self.path.with_suffix(".tmp"))
