"""The status schema: what `GET /api/v1/status` and `safekit-cloud status --json` return.

This is a documented, stable interface (docs/api.md): fields are only ever added, and
`schema_version` changes if one is ever removed or changes meaning. msgspec Structs keep encoding cheap.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

SCHEMA_VERSION = 1
COMMANDS = ("start", "stop", "restart", "swap", "prim", "second", "forcestop")
# The log's offset and tail: whole numbers of at most 18 digits (int() refuses very long strings with
# a message about Python's limits); the CLI's `log -n` takes no more, so its usage error says so.
MAX_QUERY_DIGITS = 18


class NetworkOut(msgspec.Struct, frozen=True):
    network: str
    alive: bool
    last_seen_ago: float | None  # seconds since the last authenticated heartbeat, None if never
    rtt_ms: float | None


class PeerOut(msgspec.Struct, frozen=True):
    name: str
    reachable: bool
    incarnation: int | None
    networks: list[NetworkOut]


class CheckerOut(msgspec.Struct, frozen=True):
    name: str
    type: str
    ok: bool | None  # None before the first check
    reason: str
    consecutive_failures: int
    action: str
    running: bool


class DecisionOut(msgspec.Struct, frozen=True):
    time: float  # Unix time
    event: str
    from_state: str
    to_state: str
    reason: str
    actions: list[str]
    repeated: int = 1  # the same decision taken this many times in a row (time: the latest)


class ModuleOut(msgspec.Struct, frozen=True):
    name: str
    state: str  # STOP, WAIT, ALONE, PRIM, SECOND
    state_code: int  # the exit code of `safekit-cloud state`
    data: str  # uptodate, resyncing, stale
    waiting_for: str  # why the module is in WAIT ("" otherwise)
    busy: str  # the action under way ("" when idle)
    serving: bool  # this node should receive the module's traffic (what /health answers)
    vip: str | None
    vip_provider: str | None
    peer_state: str | None  # the peer's state of this module, None when the peer is unreachable
    peer_data: str | None
    generation: str  # current data generation, hex
    restarts: int  # checker-driven restarts within the restart window
    restart_limit: int
    checkers: list[CheckerOut]
    decisions: list[DecisionOut]  # the most recent first
    replication: dict[str, Any] | None  # see docs/replication.md; None when nothing is replicated
    # A resync into this copy began and did not end: files it had begun may mix old and new content.
    resync_interrupted: bool = False
    # Both nodes wrote alone since they last agreed (seen from either node while the peer is heard);
    # nothing is merged until `second` on one of them discards its changes.
    split_brain: bool = False
    # The state the actions under way lead to (a takeover running start_prim shows SECOND -> ALONE);
    # None when no decision is being carried out, or it keeps the state.
    becoming: str | None = None


class NodeOut(msgspec.Struct, frozen=True):
    schema_version: int
    version: str
    cluster: str
    node: str
    incarnation: int
    uptime: float
    peer: PeerOut
    heartbeat: dict[str, int]  # counters: sent, received, dropped_*
    modules: list[ModuleOut]


class CommandResult(msgspec.Struct, frozen=True):
    ok: bool
    message: str
    state: str


class Controller(Protocol):
    """What the API needs from the running daemon (the engine implements it)."""

    def status(self) -> NodeOut: ...

    async def command(self, module: str, verb: str, fullsync: bool = False) -> CommandResult: ...

    def serving(self, module: str) -> bool: ...

    def module_names(self) -> list[str]: ...

    def log_path(self, module: str) -> str: ...

    async def verify(self, module: str) -> dict[str, Any]: ...
