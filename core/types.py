"""Shared vocabulary of the engine: states, events, actions and immutable snapshots.

Every enum that a user or a monitoring system can see has a stable numeric code; `safekit-cloud state`
exits with ModuleState's code. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ModuleState(enum.IntEnum):
    """State of one module on one node. The values are the exit codes of `safekit-cloud state`.

    A farm node that serves is reported as UP, which shares ALONE's code 2 (see `state_name`).
    """

    STOP = 0
    WAIT = 1
    ALONE = 2
    PRIM = 3
    SECOND = 4

    @property
    def is_primary(self) -> bool:
        return self in (ModuleState.ALONE, ModuleState.PRIM)


class DataStatus(str, enum.Enum):
    """Whether a node's copy of the replicated data can serve as primary."""

    UPTODATE = "uptodate"
    RESYNCING = "resyncing"
    STALE = "stale"


class EventKind(str, enum.Enum):
    """What can happen to a module. Each is fed to `decide` with the snapshot it happened in."""

    START = "start"  # admin start (or boot)
    STOP = "stop"  # admin stop (clean, with failover to the peer)
    FORCESTOP = "forcestop"  # stop at once: abort running scripts, no handover wait
    RESTART = "restart"  # admin: restart the application locally, no role change
    SWAP = "swap"  # admin: hand the primary role to the peer
    FORCE_PRIM = "prim"  # admin: become primary even if data cannot be proved current
    FORCE_SECOND = "second"  # admin: become secondary, data resynchronised from the peer
    PEER_CHANGED = "peer_changed"  # the peer's announced state or data changed, or it came back
    PEER_LOST = "peer_lost"  # every heartbeat network silent past the timeout
    TICK = "tick"  # periodic re-evaluation (timers: startup wait, failback)
    CHECKER_FAILED = "checker_failed"  # a checker crossed its failure threshold; detail = action
    CHECKER_RECOVERED = "checker_recovered"  # every checker that asked for WAIT is ok again
    SCRIPT_FAILED = "script_failed"  # detail = script name
    REPLICATION_LOST = "replication_lost"  # replication link broke while heartbeats continue
    REPLICATION_FAILED = "replication_failed"  # this node's replication agent died; detail = why
    RESYNC_DONE = "resync_done"  # this secondary's data is now identical to the primary's
    # This secondary's receiver could not start (its port taken, ...) and the wait before trying
    # again has passed; detail = why it failed.
    RECEIVER_RETRY = "receiver_retry"


class ActionKind(str, enum.Enum):
    """Side effects the engine carries out, in the order a Decision lists them."""

    RUN_SCRIPT = "run_script"  # arg: script name
    TAKE_VIP = "take_vip"
    RELEASE_VIP = "release_vip"
    NEW_GENERATION = "new_generation"  # we write alone from now on: start a new data generation
    ADOPT_PEER_GENERATION = "adopt_peer_generation"  # our data equals the primary's
    RELEASE_WRITES = "release_writes"  # the peer cannot take over without what we hold: acknowledge it
    START_CHECKERS = "start_checkers"
    STOP_CHECKERS = "stop_checkers"
    REPLICATE_AS_PRIMARY = "replicate_as_primary"  # mount, send to the secondary (journal while ALONE)
    REPLICATE_AS_SECONDARY = "replicate_as_secondary"  # receive and apply; resync first
    STOP_REPLICATION = "stop_replication"
    COUNT_RESTART = "count_restart"


class CheckerAction(str, enum.Enum):
    """What a checker asks for when it fails (SafeKit's vocabulary)."""

    RESTART = "restart"  # stop_prim + start_prim locally, up to the restart limit, then stopstart
    STOPSTART = "stopstart"  # stop locally and fail over to the peer; come back as secondary
    WAIT = "wait"  # stop the application and wait until the checker is ok again
    NONE = "none"  # only report


class Intent(str, enum.Enum):
    """What a node announces to its peer besides its state, so handovers need no extra channel."""

    NONE = "none"
    HANDOVER = "handover"  # I left the primary role on purpose (swap/stopstart): take it now
    WANT_PRIMARY = "want_primary"  # swap asked on the secondary: primary, please hand over
    STOPPING = "stopping"  # I am stopping cleanly; take over as soon as I report STOP
    # My module is starting (its daemon just booted, or `start` was run): the STOP I report is about
    # to end, it is not an admin's stop. Announced until the start decision's actions are done.
    STARTING = "starting"


@dataclass(frozen=True)
class Generation:
    """Data generation identifiers (like DRBD's): `current` changes whenever a node writes alone.

    `history` holds this node's earlier current values, newest first. Comparing two nodes' generations
    tells which one is stale, or that both wrote alone (split brain).
    """

    current: int = 0
    history: tuple[int, ...] = ()


class GenerationOrder(str, enum.Enum):
    SAME = "same"
    LOCAL_NEWER = "local_newer"
    PEER_NEWER = "peer_newer"
    SPLIT_BRAIN = "split_brain"


def compare_generations(local: Generation, peer: Generation) -> GenerationOrder:
    """Which side holds the newer data. Generation 0 means "never initialised": older than anything."""
    if local.current == peer.current:
        return GenerationOrder.SAME
    if peer.current == 0 or peer.current in local.history:
        return GenerationOrder.LOCAL_NEWER
    if local.current == 0 or local.current in peer.history:
        return GenerationOrder.PEER_NEWER
    return GenerationOrder.SPLIT_BRAIN


@dataclass(frozen=True)
class Persisted:
    """What a module remembers across daemon restarts, written atomically at every transition."""

    last_state: ModuleState = ModuleState.STOP
    # True only where this node's data is known to be the newest of the cluster: it was ALONE, or an
    # up-to-date secondary whose primary stopped cleanly. A node that cannot prove it waits.
    can_start_alone: bool = False
    data: DataStatus = DataStatus.UPTODATE
    generation: Generation = Generation()
    # Set by `second`: our data must be replaced by the peer's (full resync) whatever generations say.
    discard_local_data: bool = False
    # A resync into this copy stopped before its end: files it had begun may hold old and new
    # content mixed, so the copy is not even the state of an earlier moment. Cleared once up to date.
    resync_interrupted: bool = False


@dataclass(frozen=True)
class PeerView:
    """The peer's module as its last authenticated heartbeat described it."""

    name: str
    reachable: bool = False
    state: ModuleState = ModuleState.STOP
    data: DataStatus = DataStatus.STALE
    generation: Generation = Generation()
    intent: Intent = Intent.NONE
    preferred: bool = False  # the peer is this module's preferred primary
    # The peer could become primary: its data is up to date and nothing (a failure, a checker, a
    # split brain) blocks it. Announced by the peer itself.
    eligible: bool = True
    # Networks on which the peer was heard within the timeout, by name.
    networks_alive: tuple[str, ...] = ()
    witness_ok: bool = True  # split-brain guard result for this node (True when none is configured)
    # The peer hears this node: False once its heartbeats have said, for two heartbeat timeouts, that
    # it does not (heartbeats lost one way: it may take over while this node still serves).
    hears_us: bool = True
    # The peer is carrying out a decision that leaves the primary role (its stop scripts run): its
    # announced state is still the primary one until they end.
    leaving: bool = False


@dataclass(frozen=True)
class LocalView:
    """This node's module as the engine sees it when an event happens."""

    module: str
    node: str
    state: ModuleState
    persisted: Persisted
    preferred: bool  # this node is the preferred primary
    has_replication: bool  # the module replicates directories (split brain matters)
    intent: Intent = Intent.NONE
    failback: bool = False
    split_brain_policy: str = "manual"  # manual | keep-preferred
    restarts_exhausted: bool = False  # restart limit reached within the window
    waiting_for: str = ""  # the reason of the current WAIT, if any
    startup_elapsed: float = 0.0  # seconds since START while in WAIT without a peer
    startup_wait: float = 0.0  # how long to wait for the peer at start before deciding alone
    witness_ok: bool = True  # at least one witness answered (True when none configured)
    peer_seen_since_start: bool = False
    # Replication (True without any): the primary's link is synchronous (resync done, link held since);
    # how long its agents have held the application's writes (None: they hold none; resync.py).
    replication_live: bool = True
    writes_held: float | None = None
    hold_limit: float = 10.0  # replication.timeout: how long writes may be held before the engine acts
    receiver_down: bool = False  # this node should receive but its receiver could not start


@dataclass(frozen=True)
class Event:
    kind: EventKind
    detail: str = ""


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    arg: str = ""

    def __str__(self) -> str:
        return f"{self.kind.value}({self.arg})" if self.arg else self.kind.value


@dataclass(frozen=True)
class Decision:
    """The value `decide` returns: where to go, what to do on the way, and why (logged verbatim)."""

    next_state: ModuleState
    actions: tuple[Action, ...] = ()
    reason: str = ""
    persisted: Persisted | None = None  # new persisted record, None when unchanged
    intent: Intent | None = None  # new announced intent, None when unchanged
    waiting_for: str | None = None  # new WAIT reason ("" clears it), None when unchanged
    refused: str = ""  # an admin command that cannot be carried out here, and why
    labels: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def changes_state(self) -> bool:
        return bool(self.actions) or self.persisted is not None
