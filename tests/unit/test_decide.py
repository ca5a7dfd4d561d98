"""The mirror state machine `decide`: what a user relies on, cell by cell and scenario by scenario.

Three layers:
1. A table with one row for every ModuleState x EventKind in a typical context (what the next state
   is, which side effects run and in which order, what is persisted, what is refused and why).
2. Invariants checked over a large grid of contexts (every state, event, peer state, data status and
   generation relation): only up-to-date data serves, the VIP is taken before start_prim and released
   after stop_prim, refusals change nothing, every decision says why.
3. A two-node simulator that applies each Decision to its node and derives the other node's PeerView
   from it, so scenarios (start-up, failover, clean stop, swap, split brain, failback) and a hypothesis
   property test run through both nodes' decisions exactly as the engine would chain them.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safekit_cloud.core import decide as engine
from safekit_cloud.core.decide import checker_detail, decide
from safekit_cloud.core.types import (
    ActionKind,
    CheckerAction,
    DataStatus,
    Decision,
    Event,
    EventKind as E,
    Generation,
    Intent,
    LocalView,
    ModuleState as S,
    PeerView,
    Persisted,
)

G0 = Generation(11, (1,))  # the generation both nodes share in the table's contexts
OLDER = Generation(1, ())  # G0's ancestor
NEWER = Generation(22, (11, 1))  # written alone after G0
SIBLING = Generation(33, (11, 1))  # also written alone after G0: split brain with NEWER

STOP_PRIM = ["stop_checkers", "run_script(stop_prim)", "release_vip", "stop_replication"]
START_ALONE = ["new_generation", "take_vip", "replicate_as_primary", "run_script(start_prim)", "start_checkers"]
START_SECOND = ["replicate_as_secondary", "run_script(start_second)"]
STOP_SECOND = ["run_script(stop_second)", "stop_replication"]
BOOT = ["release_vip", "run_script(prestart)", "run_script(start_both)"]
RESTART_ON_NEW_MOUNT = ["count_restart", "stop_checkers", "run_script(stop_prim)", "replicate_as_primary",
                        "run_script(start_prim)", "start_checkers"]
RESTART_DETAIL = checker_detail(CheckerAction.RESTART, "http", "timeout after 2s")
EXAMPLES = int(os.environ.get("DECIDE_EXAMPLES", "300"))  # raise for a deeper search of the properties


def local_view(state: S, **kw: object) -> LocalView:
    persisted = kw.pop("persisted", None) or Persisted(last_state=state, generation=G0)
    base = {"module": "app", "node": "n1", "state": state, "persisted": persisted, "preferred": True,
            "has_replication": True}
    base.update(kw)
    return LocalView(**base)  # type: ignore[arg-type]


def peer_view(**kw: object) -> PeerView:
    base = {"name": "n2", "reachable": True, "state": S.SECOND, "data": DataStatus.UPTODATE, "generation": G0}
    base.update(kw)
    return PeerView(**base)  # type: ignore[arg-type]


LOST = PeerView(name="n2", reachable=False)


def names(decision: Decision) -> list[str]:
    return [str(action) for action in decision.actions]


def assert_in_order(actual: list[str], expected: list[str]) -> None:
    """`expected` appears in `actual` as a subsequence (same order, other actions may interleave)."""
    it = iter(actual)
    missing = [step for step in expected if not any(step == a for a in it)]
    assert not missing, f"{expected} not in order in {actual} (missing from {missing[0]!r})"


def index(actions: list[str], name: str) -> int:
    return actions.index(name) if name in actions else -1


# ---- 1. the table: every state x every event -----------------------------------------------------

def context(state: S, event: E) -> tuple[LocalView, PeerView]:
    """The typical situation of a node in `state`; PEER_LOST always comes with a silent peer."""
    if state == S.STOP:
        local, peer = local_view(S.STOP), LOST
    elif state == S.WAIT:
        local, peer = local_view(S.WAIT, waiting_for="peer", startup_wait=10.0), LOST
    elif state == S.ALONE:
        local = local_view(S.ALONE, persisted=Persisted(S.ALONE, can_start_alone=True, generation=G0))
        peer = LOST
    elif state == S.PRIM:
        local, peer = local_view(S.PRIM), peer_view(state=S.SECOND)
    else:
        local, peer = local_view(S.SECOND, preferred=False), peer_view(state=S.PRIM, preferred=True)
    if event == E.PEER_LOST:
        peer = replace(peer, reachable=False)
    return local, peer


DETAILS = {E.CHECKER_FAILED: RESTART_DETAIL, E.SCRIPT_FAILED: "start_prim"}


@dataclass(frozen=True)
class Expect:
    state: S
    actions: tuple[str, ...] = ()  # these, in this order (others may interleave unless exact)
    exact: bool = False
    absent: tuple[str, ...] = ()
    persisted: dict = field(default_factory=dict)  # attribute -> value; {} = don't care
    unchanged: bool = False  # nothing persisted, no actions: a no-op
    refused: bool = False
    intent: Intent | None = None
    waiting: str | None = None  # prefix of the new WAIT code
    reason: str = ""  # substring of the reason (case-insensitive)


def noop(state: S, reason: str = "") -> Expect:
    return Expect(state, exact=True, unchanged=True, reason=reason)


def refused(state: S, reason: str = "") -> Expect:
    return Expect(state, exact=True, unchanged=True, refused=True, reason=reason)


NO_VIP = ("take_vip", "release_vip")
FORCED_SECOND_WAIT = {"discard_local_data": True, "data": DataStatus.STALE, "can_start_alone": False}
FAILED_START = Expect(S.WAIT, ("run_script(stop_prim)", "release_vip"), waiting="failed:start_prim",
                      persisted={"last_state": S.WAIT}, absent=("take_vip",), reason="start_prim")

TABLE: dict[tuple[S, E], Expect] = {
    # STOP: only admin commands do anything.
    # A VIP left behind by a crashed daemon goes first, before the user's prestart.
    (S.STOP, E.START): Expect(S.WAIT, tuple(BOOT), exact=True, waiting="peer", intent=Intent.NONE,
                              persisted={"last_state": S.WAIT}, absent=("take_vip",)),
    (S.STOP, E.STOP): noop(S.STOP, "already stopped"),
    (S.STOP, E.FORCESTOP): noop(S.STOP, "already stopped"),
    (S.STOP, E.RESTART): refused(S.STOP, "start"),
    (S.STOP, E.SWAP): refused(S.STOP),
    (S.STOP, E.FORCE_PRIM): Expect(S.ALONE, tuple(BOOT + START_ALONE), exact=True, reason="forced",
                                   persisted={"can_start_alone": True, "data": DataStatus.UPTODATE,
                                              "last_state": S.ALONE}),
    (S.STOP, E.FORCE_SECOND): Expect(S.WAIT, tuple(BOOT), exact=True, waiting="peer",
                                     persisted=FORCED_SECOND_WAIT),
    **{(S.STOP, e): noop(S.STOP, "stopped") for e in (
        E.PEER_CHANGED, E.PEER_LOST, E.TICK, E.CHECKER_FAILED, E.CHECKER_RECOVERED, E.SCRIPT_FAILED,
        E.REPLICATION_LOST, E.REPLICATION_FAILED, E.RESYNC_DONE, E.RECEIVER_RETRY)},
    # WAIT (for the peer, start-up wait not over): admin commands, else keep waiting.
    (S.WAIT, E.START): noop(S.WAIT, "already started"),
    (S.WAIT, E.STOP): Expect(S.STOP, ("stop_checkers", "run_script(stop_both)"), exact=True,
                             persisted={"last_state": S.STOP}, intent=Intent.NONE),
    (S.WAIT, E.FORCESTOP): Expect(S.STOP, ("stop_checkers", "run_script(stop_both)"), exact=True,
                                  persisted={"last_state": S.STOP}, reason="forced"),
    (S.WAIT, E.RESTART): refused(S.WAIT),
    (S.WAIT, E.SWAP): refused(S.WAIT),
    (S.WAIT, E.FORCE_PRIM): Expect(S.ALONE, tuple(START_ALONE), exact=True, reason="forced",
                                   persisted={"can_start_alone": True, "last_state": S.ALONE}),
    (S.WAIT, E.FORCE_SECOND): Expect(S.WAIT, waiting="peer", persisted=FORCED_SECOND_WAIT, absent=NO_VIP),
    (S.WAIT, E.PEER_CHANGED): Expect(S.WAIT, exact=True, unchanged=True, reason="waiting for n2"),
    (S.WAIT, E.PEER_LOST): Expect(S.WAIT, exact=True, unchanged=True, reason="waiting for n2"),
    (S.WAIT, E.TICK): Expect(S.WAIT, exact=True, unchanged=True, reason="waiting for n2"),
    (S.WAIT, E.CHECKER_FAILED): noop(S.WAIT, "not primary"),
    (S.WAIT, E.CHECKER_RECOVERED): noop(S.WAIT),
    (S.WAIT, E.SCRIPT_FAILED): noop(S.WAIT),
    (S.WAIT, E.REPLICATION_LOST): noop(S.WAIT),
    (S.WAIT, E.REPLICATION_FAILED): noop(S.WAIT),
    (S.WAIT, E.RESYNC_DONE): noop(S.WAIT),
    (S.WAIT, E.RECEIVER_RETRY): noop(S.WAIT),
    # ALONE (no peer): keeps serving; leaves only on stop, force second or a failed start_prim.
    (S.ALONE, E.START): noop(S.ALONE, "already started"),
    (S.ALONE, E.STOP): Expect(S.STOP, tuple(STOP_PRIM + ["run_script(stop_both)"]), exact=True,
                              persisted={"can_start_alone": True, "last_state": S.STOP}),
    (S.ALONE, E.FORCESTOP): Expect(S.STOP, tuple(STOP_PRIM + ["run_script(stop_both)"]), exact=True,
                                   persisted={"can_start_alone": True, "last_state": S.STOP}),
    (S.ALONE, E.RESTART): Expect(S.ALONE, ("run_script(stop_prim)", "run_script(start_prim)"), exact=True),
    (S.ALONE, E.SWAP): refused(S.ALONE, "secondary"),
    (S.ALONE, E.FORCE_PRIM): noop(S.ALONE, "already primary"),
    (S.ALONE, E.FORCE_SECOND): Expect(S.WAIT, tuple(STOP_PRIM), exact=True, waiting="peer",
                                      persisted=FORCED_SECOND_WAIT),
    (S.ALONE, E.PEER_CHANGED): noop(S.ALONE, "serving alone"),
    (S.ALONE, E.PEER_LOST): noop(S.ALONE, "serving alone"),
    (S.ALONE, E.TICK): noop(S.ALONE, "serving alone"),
    (S.ALONE, E.CHECKER_FAILED): Expect(S.ALONE, ("count_restart", "run_script(stop_prim)",
                                                  "run_script(start_prim)"), absent=NO_VIP, reason="restart"),
    (S.ALONE, E.CHECKER_RECOVERED): noop(S.ALONE),
    (S.ALONE, E.SCRIPT_FAILED): FAILED_START,
    (S.ALONE, E.REPLICATION_LOST): noop(S.ALONE),  # already writing alone: no new generation
    # The agent serving the mount died: the application restarted on a new mount.
    (S.ALONE, E.REPLICATION_FAILED): Expect(S.ALONE, tuple(RESTART_ON_NEW_MOUNT), exact=True,
                                            reason="application restarted on a new mount"),
    (S.ALONE, E.RESYNC_DONE): noop(S.ALONE),
    (S.ALONE, E.RECEIVER_RETRY): noop(S.ALONE),
    # PRIM (peer an up-to-date secondary).
    (S.PRIM, E.START): noop(S.PRIM, "already started"),
    (S.PRIM, E.STOP): Expect(S.STOP, tuple(STOP_PRIM + ["run_script(stop_both)"]), exact=True,
                             persisted={"can_start_alone": False, "last_state": S.STOP}),
    (S.PRIM, E.FORCESTOP): Expect(S.STOP, tuple(STOP_PRIM + ["run_script(stop_both)"]), exact=True,
                                  persisted={"can_start_alone": False, "last_state": S.STOP}),
    (S.PRIM, E.RESTART): Expect(S.PRIM, ("run_script(stop_prim)", "run_script(start_prim)"), exact=True),
    (S.PRIM, E.SWAP): Expect(S.SECOND, tuple(STOP_PRIM + START_SECOND), exact=True, intent=Intent.HANDOVER,
                             persisted={"can_start_alone": False, "last_state": S.SECOND,
                                        "data": DataStatus.UPTODATE}, reason="swap"),
    (S.PRIM, E.FORCE_PRIM): noop(S.PRIM, "already primary"),
    (S.PRIM, E.FORCE_SECOND): Expect(S.WAIT, tuple(STOP_PRIM), exact=True, persisted=FORCED_SECOND_WAIT),
    (S.PRIM, E.PEER_CHANGED): noop(S.PRIM, "replicating"),
    (S.PRIM, E.PEER_LOST): Expect(S.ALONE, ("new_generation",), exact=True, reason="lost",
                                  persisted={"can_start_alone": True, "last_state": S.ALONE}),
    (S.PRIM, E.TICK): noop(S.PRIM, "replicating"),
    (S.PRIM, E.CHECKER_FAILED): Expect(S.PRIM, ("count_restart", "run_script(stop_prim)",
                                                 "run_script(start_prim)"), absent=NO_VIP),
    (S.PRIM, E.CHECKER_RECOVERED): noop(S.PRIM),
    (S.PRIM, E.SCRIPT_FAILED): FAILED_START,
    (S.PRIM, E.REPLICATION_LOST): Expect(S.ALONE, ("new_generation",), exact=True, reason="replication",
                                         persisted={"can_start_alone": True, "last_state": S.ALONE}),
    (S.PRIM, E.REPLICATION_FAILED): Expect(S.ALONE, tuple(["new_generation"] + RESTART_ON_NEW_MOUNT), exact=True,
                                           reason="application restarted on a new mount",
                                           persisted={"can_start_alone": True, "last_state": S.ALONE}),
    (S.PRIM, E.RESYNC_DONE): noop(S.PRIM),
    (S.PRIM, E.RECEIVER_RETRY): noop(S.PRIM),
    # SECOND (peer primary, data up to date).
    (S.SECOND, E.START): noop(S.SECOND, "already started"),
    (S.SECOND, E.STOP): Expect(S.STOP, tuple(STOP_SECOND + ["run_script(stop_both)"]), exact=True,
                               persisted={"can_start_alone": False, "last_state": S.STOP}),
    (S.SECOND, E.FORCESTOP): Expect(S.STOP, tuple(STOP_SECOND + ["run_script(stop_both)"]), exact=True,
                                    persisted={"can_start_alone": False, "last_state": S.STOP}),
    (S.SECOND, E.RESTART): Expect(S.SECOND, ("run_script(stop_second)", "run_script(start_second)"),
                                  exact=True),
    (S.SECOND, E.SWAP): Expect(S.SECOND, exact=True, intent=Intent.WANT_PRIMARY, reason="swap"),
    (S.SECOND, E.FORCE_PRIM): refused(S.SECOND, "swap"),
    (S.SECOND, E.FORCE_SECOND): Expect(S.SECOND, tuple(STOP_SECOND + START_SECOND), exact=True,
                                       persisted={"discard_local_data": True, "data": DataStatus.RESYNCING,
                                                  "can_start_alone": False}, reason="--fullsync` compares every block"),
    (S.SECOND, E.PEER_CHANGED): noop(S.SECOND, "secondary of n2"),
    (S.SECOND, E.PEER_LOST): Expect(S.ALONE, tuple(STOP_SECOND + START_ALONE), exact=True, reason="lost",
                                    persisted={"can_start_alone": True, "last_state": S.ALONE}),
    (S.SECOND, E.TICK): noop(S.SECOND, "secondary of n2"),
    (S.SECOND, E.CHECKER_FAILED): noop(S.SECOND, "ignored"),
    (S.SECOND, E.CHECKER_RECOVERED): noop(S.SECOND, "ignored"),
    (S.SECOND, E.SCRIPT_FAILED): noop(S.SECOND, "ignored"),
    (S.SECOND, E.REPLICATION_LOST): Expect(S.SECOND, exact=True, persisted={"data": DataStatus.STALE}),
    (S.SECOND, E.REPLICATION_FAILED): Expect(S.SECOND, ("count_restart", "replicate_as_secondary"), exact=True,
                                             persisted={"data": DataStatus.STALE}, reason="receiver restarted"),
    (S.SECOND, E.RESYNC_DONE): Expect(S.SECOND, ("adopt_peer_generation",), exact=True,
                                      persisted={"data": DataStatus.UPTODATE, "discard_local_data": False}),
    # A retry left over from a receiver that did not start, now running: nothing to do.
    (S.SECOND, E.RECEIVER_RETRY): noop(S.SECOND, "not needed"),
}


def test_table_covers_every_state_and_event() -> None:
    assert set(TABLE) == set(itertools.product(S, E))


def check(expect: Expect, local: LocalView, decision: Decision) -> None:
    acts = names(decision)
    assert decision.next_state == expect.state, decision.reason
    if expect.exact:
        assert acts == list(expect.actions), decision.reason
    else:
        assert_in_order(acts, list(expect.actions))
    for name in expect.absent:
        assert name not in acts, (name, acts)
    for attr, value in expect.persisted.items():
        assert decision.persisted is not None, f"nothing persisted, expected {attr}={value}"
        assert getattr(decision.persisted, attr) == value, (attr, decision.persisted)
    if expect.unchanged:
        assert decision.persisted is None and not decision.actions and not decision.changes_state
    assert bool(decision.refused) == expect.refused, decision
    if expect.intent is not None:
        assert decision.intent == expect.intent
    if expect.waiting is not None:
        assert decision.waiting_for is not None and decision.waiting_for.startswith(expect.waiting)
    assert decision.reason.strip(), "every decision says why"
    assert expect.reason.lower() in decision.reason.lower(), decision.reason


@pytest.mark.parametrize(("state", "event"), list(TABLE), ids=lambda v: v.name)
def test_every_state_and_event(state: S, event: E) -> None:
    local, peer = context(state, event)
    decision = decide(local, peer, Event(event, DETAILS.get(event, "")))
    check(TABLE[state, event], local, decision)
    assert_invariants(local, peer, Event(event, DETAILS.get(event, "")), decision)


def test_bare_event_kind_is_accepted() -> None:
    local, peer = context(S.STOP, E.START)
    assert decide(local, peer, E.START) == decide(local, peer, Event(E.START))


# ---- checker actions and script failures on a primary ---------------------------------------------

@pytest.mark.parametrize("primary", [S.PRIM, S.ALONE], ids=lambda s: s.name)
@pytest.mark.parametrize(("action", "exhausted", "expect"), [
    (CheckerAction.NONE, False, noop(S.PRIM, "action none")),
    (CheckerAction.RESTART, False, Expect(S.PRIM, ("count_restart", "run_script(stop_prim)",
                                                    "run_script(start_prim)"), absent=NO_VIP)),
    (CheckerAction.WAIT, False, Expect(S.WAIT, ("run_script(stop_prim)", "release_vip"), exact=True,
                                        waiting="checker:http", absent=("stop_checkers",))),
], ids=["none", "restart", "wait"])
def test_checker_actions_local(primary: S, action: CheckerAction, exhausted: bool, expect: Expect) -> None:
    local, peer = context(primary, E.CHECKER_FAILED)
    event = Event(E.CHECKER_FAILED, checker_detail(action, "http", "503"))
    decision = decide(replace(local, restarts_exhausted=exhausted), peer, event)
    if expect.state == S.PRIM:
        expect = replace(expect, state=primary)
    check(expect, local, decision)
    assert "http" in decision.reason


@pytest.mark.parametrize(("action", "exhausted"), [(CheckerAction.RESTART, True), (CheckerAction.STOPSTART, False)],
                         ids=["restart-limit", "stopstart"])
def test_checker_failover_hands_over_to_uptodate_secondary(action: CheckerAction, exhausted: bool) -> None:
    local, peer = context(S.PRIM, E.CHECKER_FAILED)
    decision = decide(replace(local, restarts_exhausted=exhausted), peer,
                      Event(E.CHECKER_FAILED, checker_detail(action, "http", "503")))
    check(Expect(S.SECOND, tuple(STOP_PRIM + START_SECOND), exact=True, intent=Intent.HANDOVER,
                 persisted={"can_start_alone": False}, reason="failing over to n2"), local, decision)


@pytest.mark.parametrize("primary", [S.PRIM, S.ALONE], ids=lambda s: s.name)
def test_checker_failover_without_secondary_stops_and_waits(primary: S) -> None:
    local, _ = context(primary, E.CHECKER_FAILED)
    peer = peer_view(state=S.SECOND, data=DataStatus.RESYNCING)  # cannot take over
    decision = decide(replace(local, restarts_exhausted=True), peer, Event(E.CHECKER_FAILED, RESTART_DETAIL))
    check(Expect(S.WAIT, tuple(STOP_PRIM), exact=True, waiting="restarts", reason="restart limit"),
          local, decision)
    assert not engine.eligible(replace(local, state=S.WAIT, waiting_for=decision.waiting_for))


@pytest.mark.parametrize("primary", [S.PRIM, S.ALONE], ids=lambda s: s.name)
def test_vip_takeover_failure_is_like_a_failed_start_prim(primary: S) -> None:
    local, peer = context(primary, E.SCRIPT_FAILED)
    decision = decide(local, peer, Event(E.SCRIPT_FAILED, "take_vip"))
    check(Expect(S.WAIT, tuple(STOP_PRIM), waiting="failed:take_vip", reason="take_vip"), local, decision)


@pytest.mark.parametrize("script", ["prestart", "start_both"])
def test_failed_start_scripts_stop_the_module(script: str) -> None:
    local, peer = context(S.WAIT, E.SCRIPT_FAILED)
    decision = decide(local, peer, Event(E.SCRIPT_FAILED, script))
    check(Expect(S.STOP, ("run_script(stop_both)",), exact=True, persisted={"last_state": S.STOP},
                 reason=f"{script} failed"), local, decision)


def test_other_script_failures_are_only_reported() -> None:
    local, peer = context(S.PRIM, E.SCRIPT_FAILED)
    decision = decide(local, peer, Event(E.SCRIPT_FAILED, "transition"))
    check(noop(S.PRIM, "transition"), local, decision)


# ---- refusals say why ------------------------------------------------------------------------------

@pytest.mark.parametrize(("state", "event", "peer", "why"), [
    (S.PRIM, E.SWAP, peer_view(state=S.SECOND, data=DataStatus.RESYNCING), "not an up-to-date secondary"),
    (S.PRIM, E.SWAP, peer_view(state=S.SECOND, generation=OLDER), "not an up-to-date secondary"),
    (S.SECOND, E.SWAP, LOST, "not primary"),
    (S.SECOND, E.FORCE_PRIM, peer_view(state=S.ALONE), "use swap"),
    (S.WAIT, E.FORCE_PRIM, peer_view(state=S.PRIM), "use swap"),
    (S.STOP, E.FORCE_PRIM, peer_view(state=S.ALONE), "use swap"),
    (S.WAIT, E.RESTART, LOST, "WAIT"),
    (S.ALONE, E.SWAP, LOST, "no up-to-date secondary"),
    (S.STOP, E.SWAP, peer_view(state=S.PRIM), "STOP"),
    # say what stands in the way, and what to do
    (S.PRIM, E.SWAP, peer_view(state=S.SECOND, data=DataStatus.RESYNCING), "waitstate SECOND"),
    (S.ALONE, E.SWAP, peer_view(state=S.SECOND, data=DataStatus.RESYNCING), "being resynchronised"),
    (S.ALONE, E.SWAP, peer_view(state=S.SECOND, data=DataStatus.STALE), "replication link"),
    (S.ALONE, E.SWAP, peer_view(state=S.WAIT), "n2 is WAIT"),
], ids=lambda v: getattr(v, "name", None) or str(v)[:20])
def test_refusals_change_nothing_and_say_why(state: S, event: E, peer: PeerView, why: str) -> None:
    local = local_view(state)
    decision = decide(local, peer, event)
    assert decision.refused and why in decision.refused
    assert decision.refused in decision.reason
    assert decision.next_state == state and not decision.actions and decision.persisted is None


def test_swap_refused_on_a_resyncing_secondary() -> None:
    local = local_view(S.SECOND, persisted=Persisted(S.SECOND, data=DataStatus.RESYNCING, generation=OLDER))
    decision = decide(local, peer_view(state=S.PRIM), E.SWAP)
    assert decision.refused and decision.intent is None and "waitstate SECOND" in decision.refused


def test_stopping_the_only_node_that_can_serve_says_so() -> None:
    """`stop` on a primary whose peer cannot take over (being resynchronised, say) is done, as
    asked, and its answer says that the application now runs nowhere."""
    resyncing = peer_view(state=S.SECOND, data=DataStatus.RESYNCING)
    d = decide(local_view(S.ALONE, persisted=Persisted(S.ALONE, True, generation=G0)), resyncing, E.STOP)
    assert d.next_state == S.STOP and "runs nowhere" in d.reason and not d.refused, d
    d = decide(local_view(S.PRIM), peer_view(state=S.SECOND), E.STOP)
    assert d.next_state == S.STOP and "runs nowhere" not in d.reason, d


def test_on_a_split_brain_the_refusals_name_the_command_that_resolves_it() -> None:
    """Waiting on a split brain while the peer serves, `prim` and `swap` are refused: they say to
    run `second` on the side whose changes to discard (before, `prim` said to use swap, which was
    refused on both nodes)."""
    local = local_view(S.WAIT, waiting_for="split_brain", persisted=Persisted(S.WAIT, generation=NEWER))
    peer = peer_view(state=S.ALONE, generation=SIBLING)
    prim = decide(local, peer, E.FORCE_PRIM)
    assert prim.refused and "`safekit-cloud second` on n2" in prim.refused, prim
    swap = decide(local, peer, E.SWAP)
    assert swap.refused and "safekit-cloud second" in swap.refused, swap


# ---- 2. invariants over a grid of contexts ---------------------------------------------------------

def assert_invariants(local: LocalView, peer: PeerView, event: Event, d: Decision) -> None:
    """What holds for every decision, whatever the context."""
    acts = names(d)
    was, now = local.state, d.next_state
    assert d.reason.strip(), "every decision says why"
    if d.refused:
        assert now == was and not d.actions and d.persisted is None
    if now.is_primary and not was.is_primary:
        assert event.kind == E.FORCE_PRIM or (
            local.persisted.data == DataStatus.UPTODATE and not local.persisted.discard_local_data
        ), f"only up-to-date data may serve: {local.persisted} -> {d.reason}"
        assert not engine.peer_serving(peer), "never take over from a peer seen serving"
        assert_in_order(acts, ["take_vip", "run_script(start_prim)", "start_checkers"])
        assert now == S.PRIM or "new_generation" in acts, "becoming ALONE starts a new generation"
        assert d.persisted is not None and d.persisted.data == DataStatus.UPTODATE
    # Yielding to a peer that took over (it holds the VIP already): the address goes first, so that
    # it is not on both nodes while stop_prim runs; any other step down stops the application first.
    took_over = was.is_primary and engine.peer_taking_over(local, peer) and "holds newer data than this node" in d.reason
    if was.is_primary and not now.is_primary:
        assert_in_order(acts, ["release_vip", "run_script(stop_prim)"] if took_over
                        else ["run_script(stop_prim)", "release_vip"])
        assert "take_vip" not in acts
        if now == S.SECOND:
            assert index(acts, "release_vip") < index(acts, "replicate_as_secondary")
    if "take_vip" in acts:
        assert now.is_primary and index(acts, "take_vip") < index(acts, "run_script(start_prim)")
    if "release_vip" in acts:  # leaving the primary role, or clearing a crashed daemon's VIP at start
        assert (was.is_primary and not now.is_primary) or was == S.STOP
        if was == S.STOP and now.is_primary:  # a leftover VIP goes before this node takes it afresh
            assert index(acts, "release_vip") < index(acts, "take_vip")
        assert not was.is_primary or took_over or index(acts, "release_vip") > index(acts, "run_script(stop_prim)")
    if "new_generation" in acts:
        assert now == S.ALONE
    if now == S.ALONE and was != S.ALONE:
        assert "new_generation" in acts and d.persisted is not None and d.persisted.can_start_alone
    if now == S.SECOND and was != S.SECOND:
        assert_in_order(acts, START_SECOND)
        assert d.persisted is not None and not d.persisted.can_start_alone
    if now != was:
        assert d.persisted is not None and d.persisted.last_state == now, "every transition is persisted"
    if now in (S.STOP, S.WAIT) and now != was:
        assert d.intent == Intent.NONE and not (d.persisted and d.persisted.last_state != now)
    if now == S.STOP:
        assert "run_script(stop_both)" in acts or was == S.STOP
    if d.waiting_for:
        assert now == S.WAIT or d.waiting_for == "", d


GRID_PEERS = [
    LOST,
    replace(LOST, state=S.PRIM),  # last seen as primary, now silent
    peer_view(state=S.STOP), peer_view(state=S.STOP, intent=Intent.STARTING),
    peer_view(state=S.WAIT), peer_view(state=S.WAIT, eligible=False),
    peer_view(state=S.ALONE), peer_view(state=S.PRIM), peer_view(state=S.ALONE, preferred=True),
    peer_view(state=S.SECOND), peer_view(state=S.SECOND, data=DataStatus.RESYNCING),
    peer_view(state=S.SECOND, intent=Intent.HANDOVER), peer_view(state=S.SECOND, intent=Intent.WANT_PRIMARY),
    peer_view(state=S.SECOND, data=DataStatus.STALE, eligible=False),
]
GRID_GENERATIONS = [G0, OLDER, NEWER, SIBLING]
GRID_LOCALS = [
    {}, {"preferred": False}, {"has_replication": False}, {"witness_ok": False},
    {"waiting_for": "witness"}, {"waiting_for": "split_brain"}, {"waiting_for": "stale"},
    {"startup_elapsed": 60.0, "startup_wait": 5.0}, {"restarts_exhausted": True},
    {"failback": True, "preferred": False}, {"split_brain_policy": "keep-preferred"},
    {"intent": Intent.HANDOVER},
]
GRID_PERSISTED = [
    Persisted(generation=G0), Persisted(generation=G0, can_start_alone=True),
    Persisted(generation=G0, data=DataStatus.RESYNCING), Persisted(generation=G0, data=DataStatus.STALE),
    Persisted(generation=G0, data=DataStatus.STALE, discard_local_data=True),
]
GRID_EVENTS = [Event(e) for e in E if e not in DETAILS] + [
    Event(E.CHECKER_FAILED, checker_detail(a, "c", "x")) for a in CheckerAction
] + [Event(E.SCRIPT_FAILED, "start_prim"), Event(E.SCRIPT_FAILED, "stop_prim")]


@pytest.mark.parametrize("state", list(S), ids=lambda s: s.name)
def test_invariants_over_the_grid(state: S) -> None:
    count = 0
    for peer, gen, extra, persisted, event in itertools.product(
            GRID_PEERS, GRID_GENERATIONS, GRID_LOCALS, GRID_PERSISTED, GRID_EVENTS):
        if extra.get("waiting_for") == "witness" and persisted.data != DataStatus.UPTODATE:
            continue  # unreachable: decide checks the data before it waits for a witness
        local = local_view(state, persisted=replace(persisted, last_state=state), **extra)
        peer = replace(peer, generation=gen)
        decision = decide(local, peer, event)
        try:
            assert_invariants(local, peer, event, decision)
        except AssertionError as exc:
            raise AssertionError(f"{state.name} {event} local={extra} {persisted} peer={peer}: {exc}") from exc
        count += 1
    assert count > 8_000


@pytest.mark.parametrize("local_pref,peer_pref", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("a,b", [(S.ALONE, S.ALONE), (S.ALONE, S.PRIM), (S.PRIM, S.PRIM)])
@pytest.mark.parametrize("gens", [(G0, G0), (NEWER, SIBLING), (NEWER, G0)], ids=["same", "split", "newer"])
@pytest.mark.parametrize("policy", ["manual", "keep-preferred"])
def test_two_primaries_that_see_each_other_agree_on_one(local_pref, peer_pref, a, b, gens, policy) -> None:
    n1 = local_view(a, node="n1", preferred=local_pref, split_brain_policy=policy,
                    persisted=Persisted(a, True, generation=gens[0]))
    n2 = local_view(b, node="n2", preferred=peer_pref, split_brain_policy=policy,
                    persisted=Persisted(b, True, generation=gens[1]))
    d1 = decide(n1, view_of(n2, True), E.PEER_CHANGED)
    d2 = decide(n2, view_of(n1, True), E.PEER_CHANGED)
    assert [d1.next_state.is_primary, d2.next_state.is_primary].count(True) == 1
    keeper = "n1" if d1.next_state.is_primary else "n2"
    if gens == (NEWER, G0):  # n2 has not written since n1's data left it: n1 keeps serving, whatever the preference
        assert keeper == "n1" and d2.next_state == S.SECOND, (d1, d2)
    else:
        assert keeper == ("n1" if local_pref or not peer_pref else "n2")


def test_a_paused_primary_coming_back_yields_to_the_node_that_took_over_and_wrote() -> None:
    """n1 (preferred) was primary at G0, its daemon paused (SIGSTOP) past the heartbeat timeout; n2
    took over (NEWER: G0 in its history) and acknowledged writes. n1's first heartbeats still say PRIM
    at G0: n2 must keep serving and n1 resync from it (the tie-break made n2 yield, and n2's writes
    were lost on both nodes)."""
    n1 = local_view(S.PRIM, node="n1", preferred=True, persisted=Persisted(S.PRIM, False, generation=G0))
    n2 = local_view(S.ALONE, node="n2", preferred=False, persisted=Persisted(S.ALONE, True, generation=NEWER))
    for event in (E.PEER_CHANGED, E.REPLICATION_LOST):
        d1 = decide(n1, view_of(n2, True), event)
        assert d1.next_state == S.SECOND and d1.persisted.data == DataStatus.RESYNCING, d1
        assert_in_order(names(d1), STOP_PRIM + START_SECOND)
    d2 = decide(n2, view_of(n1, True), E.PEER_CHANGED)
    assert d2.next_state == S.ALONE and not d2.actions and "keeps serving" in d2.reason, d2


@pytest.mark.parametrize("local_pref,peer_pref", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("a", [S.ALONE, S.PRIM])
@pytest.mark.parametrize("gens", [(G0, G0), (NEWER, SIBLING), (NEWER, G0)], ids=["same", "split", "newer"])
@pytest.mark.parametrize("policy", ["manual", "keep-preferred"])
@pytest.mark.parametrize("has_replication", [True, False])
def test_heartbeats_lost_one_way_the_node_that_hears_ends_the_double_primary(local_pref, peer_pref, a, gens,
                                                                              policy, has_replication) -> None:
    """n2 does not hear n1 and took over (ALONE); n1 hears n2 serve. n2 cannot see the double
    primary, so n1 stops serving whatever the tie-break says (before, a preferred n1 stayed and
    both held the VIP for as long as the fault lasted), keeping its data and its claim until n2
    hears it again. Once it does, n1 joins n2 as any node finding a primary does."""
    n1 = local_view(a, node="n1", preferred=local_pref, split_brain_policy=policy, has_replication=has_replication,
                    persisted=Persisted(a, True, generation=gens[0]))
    n2 = local_view(S.ALONE, node="n2", preferred=peer_pref, split_brain_policy=policy,
                    has_replication=has_replication, persisted=Persisted(S.ALONE, True, generation=gens[1]))
    deaf = replace(view_of(n2, True), hears_us=False)
    d1 = decide(n1, deaf, E.PEER_CHANGED)
    d2 = decide(n2, view_of(n1, False), E.PEER_LOST)
    assert (d1.next_state, d1.waiting_for) == (S.WAIT, "deaf_peer") and d2.next_state.is_primary, (d1, d2)
    assert_in_order(names(d1), STOP_PRIM)
    assert "heartbeats lost one way" in d1.reason and d1.persisted is not None
    n1 = replace(n1, state=S.WAIT, waiting_for="deaf_peer", persisted=d1.persisted)
    assert decide(n1, deaf, E.PEER_CHANGED).next_state == S.WAIT  # still not heard: nothing changes
    joined = decide(n1, view_of(n2, True), E.PEER_CHANGED)  # heard again: n2 serves
    assert not joined.next_state.is_primary, joined
    if joined.next_state == S.WAIT:
        assert joined.waiting_for == "split_brain" and has_replication and gens != (G0, G0), joined


def both_alone(has_replication: bool) -> tuple[LocalView, LocalView]:
    """n1 (preferred) and n2, both ALONE after a partition: with replicated data, a split brain."""
    gens = (NEWER, SIBLING) if has_replication else (G0, G0)
    return tuple(local_view(S.ALONE, node=n, preferred=n == "n1", has_replication=has_replication,  # type: ignore[return-value]
                            persisted=Persisted(S.ALONE, True, generation=g)) for n, g in zip(("n1", "n2"), gens))


@pytest.mark.parametrize("has_replication", [True, False])
def test_a_partition_whose_directions_heal_apart_ends_with_the_tie_break_winner_serving(has_replication) -> None:
    """A partition heals, n2 -> n1 first: n1 (preferred) hears n2 serve without hearing it and
    stops (deaf_peer). n2 then hears n1's beats queued while its address resolved, still saying
    ALONE, and yields to the tie-break too. Neither serves for a moment: n1, hearing n2 hear it and
    not serve, serves again, and n2 joins it or waits for the admin on a split brain."""
    n1, n2 = both_alone(has_replication)
    d1 = decide(n1, replace(view_of(n2, True), hears_us=False), E.PEER_CHANGED)
    d2 = decide(n2, view_of(n1, True), E.PEER_CHANGED)  # n1's stale beat: ALONE
    assert not d1.next_state.is_primary and not d2.next_state.is_primary, (d1, d2)
    n1 = replace(n1, state=d1.next_state, waiting_for=d1.waiting_for or "", persisted=d1.persisted)
    n2 = replace(n2, state=d2.next_state, waiting_for=d2.waiting_for or "", persisted=d2.persisted or n2.persisted)
    d1 = decide(n1, view_of(n2, True), E.PEER_CHANGED)
    assert d1.next_state == S.ALONE and "serves again" in d1.reason, d1
    n1 = replace(n1, state=d1.next_state, waiting_for="", persisted=d1.persisted)
    d2 = decide(n2, view_of(n1, True), E.PEER_CHANGED)
    assert not d2.next_state.is_primary, d2


@pytest.mark.parametrize("has_replication", [True, False])
def test_a_one_way_loss_healing_while_the_node_that_stops_runs_its_stop_scripts_leaves_one_primary(
        has_replication: bool) -> None:
    """n1 (preferred) stops serving for n2, which does not hear it; while n1's stop scripts run
    (its announced state is still ALONE), n2 hears it again. n2 must not yield to a node that is
    leaving: before, it did, n1 then joined n2 as it was leaving too, and nothing served."""
    n1, n2 = both_alone(has_replication)
    d1 = decide(n1, replace(view_of(n2, True), hears_us=False), E.PEER_CHANGED)
    assert (d1.next_state, d1.waiting_for) == (S.WAIT, "deaf_peer")
    d2 = decide(n2, replace(view_of(n1, True), leaving=True), E.PEER_CHANGED)  # n1 mid-stop, heard again
    assert d2.next_state == S.ALONE and "leaving" in d2.reason, d2
    n1 = replace(n1, state=S.WAIT, waiting_for="deaf_peer", persisted=d1.persisted)
    d1 = decide(n1, replace(view_of(n2, True), leaving=False), E.PEER_CHANGED)  # n1 done, n2 serves on
    assert not d1.next_state.is_primary and d1.waiting_for != "deaf_peer", d1
    # and the other way round: a node in deaf_peer waits for a peer that is leaving
    waiting = replace(n1, state=S.WAIT, waiting_for="deaf_peer")
    d1 = decide(waiting, replace(view_of(n2, True), leaving=True), E.PEER_CHANGED)
    assert (d1.next_state, d1.waiting_for) == (S.WAIT, None) and not d1.actions, d1


@pytest.mark.parametrize("peer_state", ["stopped", "lost"])
def test_without_replicated_data_a_node_that_stopped_for_a_deaf_peer_takes_over_when_it_goes(
        peer_state: str) -> None:
    """No data to protect: n1 waits (deaf_peer) while n2 serves; n2 is stopped or lost: n1
    serves, as a secondary would (the witness guard still applies to a lost peer). Before, it
    waited for ever, and nothing served."""
    n1 = local_view(S.WAIT, waiting_for="deaf_peer", has_replication=False,
                    persisted=Persisted(S.WAIT, False, generation=G0))
    peer = peer_view(state=S.STOP) if peer_state == "stopped" else LOST
    d = decide(n1, peer, E.PEER_CHANGED if peer_state == "stopped" else E.PEER_LOST)
    assert d.next_state == S.ALONE, d
    if peer_state == "lost":
        d = decide(replace(n1, witness_ok=False), peer, E.PEER_LOST)
        assert d.next_state == S.WAIT and "witness" in d.reason, d


def test_a_node_that_stopped_for_a_deaf_peer_leaves_a_restarted_peer_to_the_election() -> None:
    """n1 stopped for a peer that did not hear it; n2, which served since, restarts and waits to
    elect (eligible): n1 does not take over on that (n2 may hold the newer data)."""
    n1 = local_view(S.WAIT, waiting_for="deaf_peer",
                    persisted=Persisted(S.WAIT, False, generation=NEWER))
    n2 = peer_view(state=S.WAIT, generation=SIBLING, eligible=True)
    d = decide(n1, n2, E.PEER_CHANGED)
    assert not d.next_state.is_primary, d


def test_a_node_waiting_on_a_split_brain_does_not_serve_alone_after_a_restart() -> None:
    """n2 yielded to n1 on a split brain (partition healed) and waits, n1 serving. n2's daemon
    restarts and does not hear n1: it must not serve alone, taking the side being served from n1's
    data to its own (before, it still claimed to be the last primary and did)."""
    n2 = local_view(S.ALONE, node="n2", preferred=False, persisted=Persisted(S.ALONE, True, generation=SIBLING))
    d = decide(n2, peer_view(name="n1", state=S.ALONE, generation=NEWER, preferred=True), E.PEER_CHANGED)
    assert (d.next_state, d.waiting_for) == (S.WAIT, "split_brain") and d.persisted is not None, d
    assert not d.persisted.can_start_alone
    restarted = local_view(S.WAIT, node="n2", preferred=False, persisted=d.persisted, startup_elapsed=60.0,
                           startup_wait=5.0)
    d = decide(restarted, replace(LOST, name="n1"), E.PEER_LOST)
    assert d.next_state == S.WAIT, d
    # waiting on: nothing new to record at each tick (no log line per heartbeat)
    waiting = local_view(S.WAIT, node="n2", preferred=False, waiting_for="split_brain", persisted=d.persisted or
                         restarted.persisted)
    again = decide(waiting, peer_view(name="n1", state=S.ALONE, generation=NEWER, preferred=True), E.PEER_CHANGED)
    assert again.persisted is None and not again.actions, again


# ---- 3. a two-node simulator -----------------------------------------------------------------------

def view_of(node: LocalView, reachable: bool, *, last: PeerView | None = None) -> PeerView:
    """What the other node's PeerView says about `node` (its last heartbeat when silent)."""
    if not reachable:
        return replace(last, reachable=False) if last else PeerView(name=node.node, preferred=node.preferred)
    p = node.persisted
    return PeerView(
        name=node.node, reachable=True, state=node.state, data=p.data, generation=p.generation,
        intent=node.intent, preferred=node.preferred, eligible=engine.eligible(node),
        networks_alive=("lan",),
    )


class Pair:
    """Two nodes of one module. Each decision is applied to its node; the other sees the result."""

    def __init__(self, preferred: str | None = "n1", *, has_replication: bool = True, failback: bool = False,
                 policy: str = "manual", startup_wait: float = 5.0, seed: int = 0,
                 names: tuple[str, str] = ("n1", "n2"), parallel: bool = False) -> None:
        self.names = names
        self.parallel = parallel  # both nodes look at the same snapshot, then both act
        self.rng = random.Random(seed)
        self.nodes = {
            n: LocalView(module="app", node=n, state=S.STOP, persisted=Persisted(), preferred=(n == preferred),
                         has_replication=has_replication, failback=failback, split_brain_policy=policy,
                         startup_wait=startup_wait)
            for n in names
        }
        self.up = {n: True for n in names}  # daemon running
        self.link = True  # heartbeats (and replication) between the two
        self.last_seen: dict[str, PeerView | None] = {n: None for n in names}
        self.log: list[str] = []
        self.both_primary_streak = 0
        self.promotions: list[tuple[str, E, DataStatus]] = []

    # -- views ------------------------------------------------------------------------------------
    def other(self, name: str) -> str:
        return self.names[1] if name == self.names[0] else self.names[0]

    def connected(self) -> bool:
        return self.link and all(self.up.values())

    def peer_of(self, name: str) -> PeerView:
        other = self.other(name)
        if self.link and self.up[other]:
            view = view_of(self.nodes[other], True)
            self.last_seen[name] = view
            return view
        return view_of(self.nodes[other], False, last=self.last_seen[name])

    def state(self, name: str) -> S:
        return self.nodes[name].state

    def states(self) -> tuple[S, S]:
        return self.state(self.names[0]), self.state(self.names[1])

    def primaries(self) -> list[str]:
        return [n for n in self.names if self.up[n] and self.nodes[n].state.is_primary]

    # -- one decision -----------------------------------------------------------------------------
    def event(self, name: str, kind: E, detail: str = "", peer: PeerView | None = None) -> Decision:
        assert self.up[name], f"{name} is down"
        local, peer = self.nodes[name], peer or self.peer_of(name)
        if peer.reachable and local.state != S.STOP:
            local = replace(local, peer_seen_since_start=True)
        event = Event(kind, detail)
        d = decide(local, peer, event)
        assert_invariants(local, peer, event, d)
        self.nodes[name] = self.apply(local, peer, d)
        if d.next_state.is_primary and not local.state.is_primary:
            self.promotions.append((name, kind, local.persisted.data))
        self.log.append(f"{name} {local.state.name}--{kind.value}-->{d.next_state.name}: {d.reason} "
                        f"[{', '.join(names(d))}]")
        self.check_pair()
        return d

    def apply(self, local: LocalView, peer: PeerView, d: Decision) -> LocalView:
        persisted = d.persisted if d.persisted is not None else local.persisted
        for action in d.actions:
            gen = persisted.generation
            if action.kind == ActionKind.NEW_GENERATION:
                fresh = self.rng.getrandbits(48) | 1
                persisted = replace(persisted, generation=Generation(fresh, (gen.current,) + gen.history))
            elif action.kind == ActionKind.ADOPT_PEER_GENERATION:
                persisted = replace(persisted, generation=peer.generation)
        return replace(
            local, state=d.next_state, persisted=persisted,
            intent=local.intent if d.intent is None else d.intent,
            waiting_for=local.waiting_for if d.waiting_for is None else d.waiting_for,
        )

    def check_pair(self) -> None:
        """Two primaries that see each other: the first look may keep serving, the next must yield."""
        if self.connected() and len(self.primaries()) == 2:
            self.both_primary_streak += 1
            assert self.both_primary_streak <= 1, "two primaries that see each other:\n" + self.trace()
        else:
            self.both_primary_streak = 0

    def trace(self) -> str:
        return "\n".join(self.log[-25:])

    # -- what happens around the nodes ------------------------------------------------------------
    def settle(self, rounds: int = 12) -> None:
        """Deliver PEER_CHANGED to each running node in turn until nothing changes any more."""
        for _ in range(rounds):
            changed = False
            running = [n for n in self.names if self.up[n] and self.nodes[n].state != S.STOP]
            snapshot = {n: self.peer_of(n) for n in running}
            for name in running:
                before = self.nodes[name]
                self.event(name, E.PEER_CHANGED, peer=snapshot[name] if self.parallel else None)
                changed |= self.nodes[name] != before
            if not changed:
                return
        raise AssertionError("the pair does not settle:\n" + self.trace())

    def do(self, name: str, kind: E, detail: str = "") -> Decision:
        d = self.event(name, kind, detail)
        self.settle()
        return d

    def start(self, name: str) -> Decision:
        self.nodes[name] = replace(self.nodes[name], startup_elapsed=0.0, peer_seen_since_start=False)
        return self.do(name, E.START)

    def stop(self, name: str) -> Decision:
        return self.do(name, E.STOP)

    def elapse(self) -> None:
        """The start-up wait is over for every waiting node."""
        for name in self.names:
            if self.up[name]:
                n = self.nodes[name]
                self.nodes[name] = replace(n, startup_elapsed=n.startup_elapsed + n.startup_wait + 1)
                if n.state != S.STOP:
                    self.event(name, E.TICK)
        self.settle()

    def cut(self) -> None:
        """Every heartbeat network between the nodes goes silent."""
        was = self.link
        self.link = False
        if was:
            for name in self.names:
                if self.up[name] and self.nodes[name].state != S.STOP:
                    self.event(name, E.PEER_LOST)
        self.settle()

    def heal(self) -> None:
        self.link = True
        self.settle()

    def crash(self, name: str) -> None:
        """The node dies: its module is gone; the other sees it silent."""
        connected = self.connected()
        self.up[name] = False
        n = self.nodes[name]
        self.nodes[name] = replace(n, state=S.STOP, intent=Intent.NONE, waiting_for="")
        other = self.other(name)
        if connected and self.nodes[other].state != S.STOP:
            self.event(other, E.PEER_LOST)
        self.settle()

    def boot(self, name: str) -> None:
        """The node's daemon comes back with its persisted record and starts the module."""
        self.up[name] = True
        self.start(name)

    def set_witness(self, name: str, ok: bool) -> None:
        self.nodes[name] = replace(self.nodes[name], witness_ok=ok)
        if self.up[name] and self.nodes[name].state != S.STOP:
            self.do(name, E.TICK)

    def replication_lost(self) -> None:
        for name in self.names:
            if self.up[name] and self.nodes[name].state != S.STOP:
                self.event(name, E.REPLICATION_LOST)
        self.settle()

    def resync(self, name: str) -> bool:
        """The replication layer finished resynchronising `name` from its primary (when it can)."""
        n, peer = self.nodes[name], self.peer_of(name)
        if n.state == S.SECOND and n.persisted.data != DataStatus.UPTODATE and engine.peer_serving(peer):
            self.do(name, E.RESYNC_DONE)
            return True
        return False

    def resync_all(self) -> None:
        for name in self.names:
            self.resync(name)

    def start_both(self) -> None:
        """Both daemons start the module at the same moment, then hear each other."""
        for name in self.names:
            self.nodes[name] = replace(self.nodes[name], startup_elapsed=0.0, peer_seen_since_start=False)
            self.event(name, E.START)
        self.settle()

    def serving_pair(self) -> None:
        """Start both and let the secondary resync: n1 PRIM, n2 SECOND up to date (preferred n1)."""
        self.start_both()
        self.resync_all()


def assert_one_primary(pair: Pair) -> None:
    assert len(pair.primaries()) == 1, pair.trace()


# ---- scenarios: start-up ---------------------------------------------------------------------------

@pytest.mark.parametrize("has_replication", [True, False])
@pytest.mark.parametrize(("preferred", "names", "winner"), [
    ("n1", ("n1", "n2"), "n1"), ("n2", ("n1", "n2"), "n2"), (None, ("n1", "n2"), "n1"),
    (None, ("zeta", "alpha"), "alpha"),
])
def test_both_start_together(preferred, names, winner, has_replication) -> None:
    pair = Pair(preferred, names=names, has_replication=has_replication)
    loser = pair.other(winner)
    pair.start_both()
    if has_replication:
        assert pair.state(winner) == S.ALONE and pair.state(loser) == S.SECOND
        assert pair.nodes[loser].persisted.data == DataStatus.RESYNCING
        pair.resync(loser)
    assert pair.state(winner) == S.PRIM and pair.state(loser) == S.SECOND, pair.trace()
    assert pair.nodes[loser].persisted.data == DataStatus.UPTODATE
    assert pair.nodes[winner].persisted.generation == pair.nodes[loser].persisted.generation
    assert not pair.nodes[winner].persisted.can_start_alone  # the secondary holds the same data


@pytest.mark.parametrize("first", ["n1", "n2"])
def test_both_start_together_same_result_on_both_sides(first: str) -> None:
    """Whichever node hears the other first, the same node serves."""
    pair = Pair("n2")
    for name in (first, pair.other(first)):
        pair.event(name, E.START)
    pair.event(first, E.PEER_CHANGED)
    pair.event(pair.other(first), E.PEER_CHANGED)
    pair.settle()
    assert pair.state("n2") == S.ALONE and pair.state("n1") == S.SECOND


def test_alone_start_of_the_last_primary_waits_startup_wait_then_serves() -> None:
    pair = Pair("n2")
    pair.serving_pair()  # n2 PRIM, n1 SECOND
    pair.crash("n1")  # n2 goes ALONE: it is the last primary
    assert pair.state("n2") == S.ALONE and pair.nodes["n2"].persisted.can_start_alone
    pair.stop("n2")
    pair.up["n1"] = False
    pair.start("n2")
    assert pair.state("n2") == S.WAIT and pair.nodes["n2"].waiting_for == "peer"
    pair.nodes["n2"] = replace(pair.nodes["n2"], startup_elapsed=4.9)
    assert pair.event("n2", E.TICK).next_state == S.WAIT  # still within startup_wait
    pair.elapse()
    assert pair.state("n2") == S.ALONE, pair.trace()


def test_alone_start_of_a_node_that_cannot_prove_its_data_waits_and_says_how_to_force() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    pair.crash("n2")  # n1 ALONE writes alone; n2 is behind
    pair.stop("n1")
    pair.up["n1"] = False
    pair.boot("n2")
    assert pair.state("n2") == S.WAIT
    pair.elapse()
    assert pair.state("n2") == S.WAIT and pair.nodes["n2"].waiting_for == "stale"
    reason = pair.log[-1]
    assert "safekit-cloud prim" in reason and "n1" in reason
    d = pair.do("n2", E.FORCE_PRIM)
    assert d.next_state == S.ALONE and "forced" in d.reason


def test_power_cut_of_both_a_booting_peer_is_not_taken_for_a_stopped_one() -> None:
    """Both nodes lose power at once; the secondary boots first and waits (it cannot prove its data
    is current). The primary's daemon then boots: until its start scripts are done its module reports
    STOP, with Intent.STARTING. Reading that STOP as an admin's stop made the waiting node serve, and
    a moment later the booted node won the election too: two primaries, then a split brain."""
    pair = Pair("n1")
    pair.serving_pair()
    for name in pair.names:  # the same instant: neither sees the other go
        pair.up[name] = False
        pair.nodes[name] = replace(pair.nodes[name], state=S.STOP, intent=Intent.NONE, waiting_for="")
    pair.boot("n2")
    pair.elapse()
    assert pair.state("n2") == S.WAIT and pair.nodes["n2"].waiting_for == "stale"
    pair.up["n1"] = True
    pair.nodes["n1"] = replace(pair.nodes["n1"], intent=Intent.STARTING)  # daemon up, start under way
    d = pair.event("n2", E.PEER_CHANGED)
    assert d.next_state == S.WAIT and "starting" in d.reason, pair.trace()
    pair.nodes["n1"] = replace(pair.nodes["n1"], intent=Intent.NONE)
    pair.start("n1")
    assert_one_primary(pair)
    assert pair.states() == (S.ALONE, S.SECOND), pair.trace()


def test_a_stopped_peer_without_starting_intent_still_lets_the_newest_serve() -> None:
    local = local_view(S.WAIT, waiting_for="peer", startup_elapsed=60.0, startup_wait=5.0,
                       persisted=Persisted(S.WAIT, generation=G0))
    stopped = PeerView(name="n2", reachable=True, state=S.STOP, data=DataStatus.UPTODATE, generation=G0)
    assert decide(local, stopped, E.PEER_CHANGED).next_state == S.ALONE
    starting = replace(stopped, intent=Intent.STARTING)
    d = decide(local, starting, E.PEER_CHANGED)
    assert d.next_state == S.WAIT and d.waiting_for == "peer"


def test_fresh_node_alone_waits() -> None:
    pair = Pair("n1")
    pair.up["n2"] = False
    pair.start("n1")
    pair.elapse()
    assert pair.state("n1") == S.WAIT and pair.nodes["n1"].waiting_for == "stale"


def test_peer_seen_since_start_skips_the_startup_wait() -> None:
    local = local_view(S.WAIT, waiting_for="peer", startup_wait=30.0, peer_seen_since_start=True,
                       persisted=Persisted(S.WAIT, can_start_alone=True, generation=G0))
    assert decide(local, LOST, E.TICK).next_state == S.ALONE


# ---- scenarios: failover -----------------------------------------------------------------------------

def test_primary_lost_secondary_goes_alone_with_new_generation() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    old = pair.nodes["n2"].persisted.generation
    pair.crash("n1")
    n2 = pair.nodes["n2"]
    assert n2.state == S.ALONE and n2.persisted.can_start_alone
    assert n2.persisted.generation.current != old.current and n2.persisted.generation.history[0] == old.current
    pair.boot("n1")  # comes back as secondary of the newer data
    assert pair.states() == (S.SECOND, S.ALONE)
    pair.resync("n1")
    assert pair.states() == (S.SECOND, S.PRIM)


def test_primary_lost_without_witness_waits_then_takes_over_when_a_witness_answers() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    pair.nodes["n2"] = replace(pair.nodes["n2"], witness_ok=False)
    pair.cut()
    assert pair.state("n2") == S.WAIT and pair.nodes["n2"].waiting_for == "witness"
    assert "witness" in pair.log[-1]
    assert pair.state("n1") == S.ALONE  # the primary keeps serving alone
    pair.set_witness("n2", True)
    assert pair.state("n2") == S.ALONE, pair.trace()


def test_witness_wait_ends_by_joining_when_the_primary_comes_back() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    pair.nodes["n2"] = replace(pair.nodes["n2"], witness_ok=False)
    pair.cut()
    pair.heal()
    assert pair.states() == (S.ALONE, S.SECOND)
    pair.resync("n2")
    assert pair.states() == (S.PRIM, S.SECOND)


def test_resyncing_secondary_that_loses_the_primary_waits_stale_and_says_its_copy_is_incomplete() -> None:
    """Its resync was under way: files it had begun may mix old and new content. The WAIT says so,
    not only "changes since the last resync are lost", and so does a forced `prim`; the mark stays
    through a daemon restart (persisted) and goes once a resync brings the copy up to date."""
    pair = Pair("n1")
    pair.start_both()
    assert pair.nodes["n2"].persisted.data == DataStatus.RESYNCING
    pair.crash("n1")
    assert pair.state("n2") == S.WAIT and pair.nodes["n2"].waiting_for == "stale"
    assert pair.nodes["n2"].persisted.data == DataStatus.STALE
    assert pair.nodes["n2"].persisted.resync_interrupted
    assert any("WAIT: n1 lost" in line and "copy is incomplete" in line for line in pair.log), pair.trace()
    forced = decide(pair.nodes["n2"], peer_view(), Event(E.FORCE_PRIM))
    assert "incomplete copy" in forced.reason and forced.next_state == S.ALONE, forced.reason
    assert forced.persisted is not None and not forced.persisted.resync_interrupted  # it is the data now
    pair.boot("n1")
    assert pair.states() == (S.ALONE, S.SECOND), pair.trace()
    assert pair.nodes["n2"].persisted.resync_interrupted, "joining again does not make the copy whole"
    pair.resync("n2")
    assert pair.states() == (S.PRIM, S.SECOND) and not pair.nodes["n2"].persisted.resync_interrupted


def test_a_stale_copy_that_no_resync_touched_is_not_called_incomplete() -> None:
    pair = Pair("n1")
    pair.start_both()
    pair.resync("n2")
    pair.replication_lost()  # n1 goes on alone: n2 is stale, its copy whole (as of the last resync)
    assert pair.nodes["n2"].persisted.data == DataStatus.STALE, pair.trace()
    pair.crash("n1")
    assert pair.state("n2") == S.WAIT and not pair.nodes["n2"].persisted.resync_interrupted
    assert not any("incomplete" in line for line in pair.log), pair.trace()


def test_resyncing_secondary_without_witness_never_takes_over() -> None:
    """The witness wait must not launder stale data: when a witness answers, it is still stale."""
    pair = Pair("n1")
    pair.start_both()
    pair.nodes["n2"] = replace(pair.nodes["n2"], witness_ok=False)
    pair.crash("n1")
    pair.set_witness("n2", True)
    pair.elapse()
    assert pair.state("n2") == S.WAIT, pair.trace()


# ---- scenarios: clean stop and restart order ---------------------------------------------------------

def stop_both_primary_first() -> Pair:
    pair = Pair("n1")
    pair.serving_pair()
    pair.stop("n1")
    assert pair.states() == (S.STOP, S.ALONE), pair.trace()  # the secondary took over
    assert not pair.nodes["n1"].persisted.can_start_alone
    pair.stop("n2")
    assert pair.nodes["n2"].persisted.can_start_alone
    return pair  # n1 stopped first, n2 last


def test_clean_stop_of_the_primary_the_secondary_takes_over() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    d = pair.event("n1", E.STOP)
    assert d.next_state == S.STOP and index(names(d), "release_vip") >= 0
    d2 = pair.event("n2", E.PEER_CHANGED)
    assert d2.next_state == S.ALONE and "stopped" in d2.reason


@pytest.mark.parametrize("daemon_up", [True, False], ids=["peer-daemon-up", "peer-daemon-down"])
def test_restart_last_stopped_first_serves_other_joins(daemon_up: bool) -> None:
    pair = stop_both_primary_first()
    pair.up["n1"] = daemon_up
    pair.start("n2")
    pair.elapse()
    assert pair.state("n2") == S.ALONE, pair.trace()
    pair.up["n1"] = True
    pair.start("n1")
    assert pair.states() == (S.SECOND, S.ALONE)


def test_restart_first_stopped_first_waits_until_the_other_starts() -> None:
    pair = stop_both_primary_first()
    pair.start("n1")  # n2's daemon runs, its module is stopped: it has newer data
    assert pair.state("n1") == S.WAIT and pair.nodes["n1"].waiting_for == "peer"  # it may start soon
    pair.elapse()
    assert pair.state("n1") == S.WAIT and pair.nodes["n1"].waiting_for == "stale"
    assert "n2" in pair.log[-1] and "prim" in pair.log[-1]
    pair.start("n2")
    assert pair.states() == (S.SECOND, S.ALONE), pair.trace()


def test_restart_first_stopped_alone_waits() -> None:
    pair = stop_both_primary_first()
    pair.up["n2"] = False
    pair.start("n1")
    pair.elapse()
    assert pair.state("n1") == S.WAIT and pair.nodes["n1"].waiting_for == "stale"


def test_stop_secondary_then_primary_primary_restarts_alone() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    pair.stop("n2")
    assert pair.state("n1") == S.ALONE  # new generation: n2 is behind now
    pair.stop("n1")
    for name in ("n2", "n1"):
        pair.start(name)
        pair.elapse()
    assert pair.states() == (S.ALONE, S.SECOND)


def test_both_restart_together_after_clean_stop_the_newest_serves() -> None:
    pair = stop_both_primary_first()
    pair.start_both()
    assert pair.states() == (S.SECOND, S.ALONE)


# ---- scenarios: swap ---------------------------------------------------------------------------------

@pytest.mark.parametrize("asked_on", ["n1", "n2"], ids=["from-primary", "from-secondary"])
def test_swap_exchanges_roles_without_two_primaries(asked_on: str) -> None:
    pair = Pair("n1")
    pair.serving_pair()
    generation = pair.nodes["n1"].persisted.generation
    d = pair.event(asked_on, E.SWAP)
    assert not d.refused
    for _ in range(6):  # one look at a time, checking every step
        for name in pair.names:
            pair.event(name, E.PEER_CHANGED)
            assert len(pair.primaries()) <= 1, pair.trace()
    assert pair.states() == (S.SECOND, S.PRIM), pair.trace()
    n1, n2 = pair.nodes["n1"], pair.nodes["n2"]
    assert n1.intent == Intent.NONE and n2.intent == Intent.NONE
    assert n1.persisted.data == DataStatus.UPTODATE
    assert n2.persisted.generation == generation  # a clean handover: no new generation, no resync
    pair.do("n1", E.SWAP)
    assert pair.states() == (S.PRIM, S.SECOND)


def test_swap_handover_releases_the_vip_before_the_peer_takes_it() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    d1 = pair.event("n1", E.SWAP)
    assert index(names(d1), "release_vip") >= 0 and pair.state("n1") == S.SECOND
    d2 = pair.event("n2", E.PEER_CHANGED)
    assert d2.next_state == S.PRIM and "new_generation" not in names(d2)
    assert_in_order(names(d2), STOP_SECOND + ["take_vip", "replicate_as_primary", "run_script(start_prim)"])


# ---- scenarios: forced commands ----------------------------------------------------------------------

def test_forced_prim_on_a_waiting_node_and_the_other_resyncs() -> None:
    pair = stop_both_primary_first()
    pair.up["n2"] = False
    pair.start("n1")
    pair.elapse()
    assert pair.state("n1") == S.WAIT
    d = pair.do("n1", E.FORCE_PRIM)
    assert d.next_state == S.ALONE and "new_generation" in names(d)
    pair.up["n2"] = True
    pair.start("n2")  # n2 had newer data: both wrote alone since their common generation
    assert pair.state("n2") == S.WAIT and pair.nodes["n2"].waiting_for.startswith("split_brain")
    pair.do("n2", E.FORCE_SECOND)
    assert pair.states() == (S.ALONE, S.SECOND)
    pair.resync("n2")
    assert pair.states() == (S.PRIM, S.SECOND)
    assert not pair.nodes["n2"].persisted.discard_local_data


def test_forced_second_on_the_primary_hands_over_with_full_resync() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    d = pair.do("n1", E.FORCE_SECOND)
    assert "release_vip" in names(d)
    assert pair.states() == (S.SECOND, S.ALONE), pair.trace()
    n1 = pair.nodes["n1"]
    assert n1.persisted.discard_local_data and n1.persisted.data == DataStatus.RESYNCING
    pair.resync("n1")
    assert pair.states() == (S.SECOND, S.PRIM)


def test_forced_prim_while_the_peer_serves_is_refused() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    d = pair.do("n2", E.FORCE_PRIM)
    assert d.refused and "swap" in d.refused and pair.states() == (S.PRIM, S.SECOND)


# ---- scenarios: checkers and script failures ---------------------------------------------------------

def test_checker_restarts_until_the_limit_then_fails_over() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    for _ in range(3):
        d = pair.do("n1", E.CHECKER_FAILED, RESTART_DETAIL)
        assert d.next_state == S.PRIM and names(d)[0] == "count_restart"
    pair.nodes["n1"] = replace(pair.nodes["n1"], restarts_exhausted=True)
    d = pair.do("n1", E.CHECKER_FAILED, RESTART_DETAIL)
    assert d.next_state == S.SECOND and "restart limit" in d.reason
    assert pair.states() == (S.SECOND, S.PRIM), pair.trace()


def test_checker_stopstart_fails_over_and_comes_back_as_secondary() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    pair.do("n1", E.CHECKER_FAILED, checker_detail(CheckerAction.STOPSTART, "proc", "gone"))
    assert pair.states() == (S.SECOND, S.PRIM)


def test_checker_wait_on_alone_and_recovered() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    pair.crash("n2")
    d = pair.do("n1", E.CHECKER_FAILED, checker_detail(CheckerAction.WAIT, "db", "down"))
    assert d.next_state == S.WAIT and pair.nodes["n1"].waiting_for == "checker:db"
    assert "release_vip" in names(d) and "stop_checkers" not in names(d)
    pair.do("n1", E.TICK)
    assert pair.state("n1") == S.WAIT
    pair.do("n1", E.CHECKER_RECOVERED)
    assert pair.state("n1") == S.ALONE, pair.trace()


def test_checker_wait_on_prim_lets_the_secondary_take_over() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    pair.do("n1", E.CHECKER_FAILED, checker_detail(CheckerAction.WAIT, "db", "down"))
    assert pair.state("n2").is_primary and not pair.state("n1").is_primary, pair.trace()


def test_checker_none_only_reports() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    d = pair.do("n1", E.CHECKER_FAILED, checker_detail(CheckerAction.NONE, "http", "slow"))
    assert not d.actions and pair.states() == (S.PRIM, S.SECOND) and "http" in d.reason


def test_start_prim_failure_waits_failed_and_the_peer_takes_over() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    d = pair.event("n1", E.SCRIPT_FAILED, "start_prim")
    assert d.next_state == S.WAIT and d.waiting_for == "failed:start_prim" and "start_prim" in d.reason
    assert not engine.eligible(pair.nodes["n1"])
    pair.settle()
    assert pair.state("n2").is_primary, pair.trace()


def test_start_prim_failure_without_peer_stays_waiting() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    pair.crash("n2")
    pair.do("n1", E.SCRIPT_FAILED, "start_prim")
    pair.elapse()
    assert pair.state("n1") == S.WAIT and pair.nodes["n1"].waiting_for == "failed:start_prim"


# ---- scenarios: partitions and split brain -----------------------------------------------------------

def partitioned(has_replication: bool, policy: str = "manual", preferred: str | None = "n1") -> Pair:
    pair = Pair(preferred, has_replication=has_replication, policy=policy)
    pair.serving_pair()
    pair.cut()
    assert pair.states() == (S.ALONE, S.ALONE), pair.trace()
    return pair


def test_partition_healed_without_replication_one_yields() -> None:
    pair = partitioned(has_replication=False)
    pair.heal()
    assert pair.states() == (S.ALONE, S.SECOND) or pair.states() == (S.PRIM, S.SECOND), pair.trace()
    assert pair.state("n1") == S.PRIM  # no data to resync: at once a replicating pair


def test_partition_healed_with_replication_manual_policy_loser_waits_split_brain() -> None:
    pair = partitioned(has_replication=True)
    pair.heal()
    assert pair.state("n1") == S.ALONE and pair.state("n2") == S.WAIT, pair.trace()
    assert pair.nodes["n2"].waiting_for.startswith("split_brain")
    assert "split brain" in "\n".join(pair.log[-4:])
    pair.do("n2", E.FORCE_SECOND)  # the admin discards n2's changes
    assert pair.states() == (S.ALONE, S.SECOND)


def test_partition_healed_with_replication_keep_preferred_loser_becomes_second() -> None:
    pair = partitioned(has_replication=True, policy="keep-preferred", preferred="n2")
    pair.heal()
    assert pair.states() == (S.SECOND, S.ALONE), pair.trace()
    pair.resync("n1")
    assert pair.states() == (S.SECOND, S.PRIM)


def test_split_brain_after_both_wrote_then_both_restart_waits() -> None:
    pair = partitioned(has_replication=True)
    pair.stop("n1")
    pair.stop("n2")
    pair.heal()
    pair.start_both()
    assert pair.states() == (S.WAIT, S.WAIT)
    assert all(pair.nodes[n].waiting_for.startswith("split_brain") for n in pair.names)


@pytest.mark.parametrize("keep", ["n1", "n2"])
def test_split_brain_resolved_by_second_on_the_side_to_discard(keep: str) -> None:
    """The WAIT reason says `second` on the side to discard is enough: it must be."""
    pair = partitioned(has_replication=True)
    pair.stop("n1")
    pair.stop("n2")
    pair.heal()
    pair.start_both()
    assert pair.states() == (S.WAIT, S.WAIT), pair.trace()
    discard = pair.other(keep)
    pair.do(discard, E.FORCE_SECOND)
    assert pair.state(keep) == S.ALONE and pair.state(discard) == S.SECOND, pair.trace()


@pytest.mark.parametrize("keep", ["n1", "n2"])
def test_split_brain_resolved_by_prim_then_second(keep: str) -> None:
    pair = partitioned(has_replication=True)
    pair.stop("n1")
    pair.stop("n2")
    pair.heal()
    pair.start_both()
    assert pair.states() == (S.WAIT, S.WAIT), pair.trace()
    pair.do(keep, E.FORCE_PRIM)
    assert pair.state(keep) == S.ALONE
    discard = pair.other(keep)
    assert pair.state(discard) == S.WAIT
    pair.do(discard, E.FORCE_SECOND)
    assert pair.state(discard) == S.SECOND


def test_split_brain_advice_on_the_yielding_primary_works() -> None:
    """After a healed partition the loser waits; its reason names `second` on the side to discard."""
    pair = partitioned(has_replication=True)
    pair.heal()
    reasons = [line for line in pair.log if "split brain" in line]
    assert "`safekit-cloud second` here" in reasons[0] and "`safekit-cloud second` on n1" in reasons[0]
    assert "`safekit-cloud second` on the node whose changes to discard" in reasons[-1]


@pytest.mark.parametrize("discard", ["n1", "n2"], ids=["discard-serving-side", "discard-waiting-side"])
def test_split_brain_after_healed_partition_resolved_by_second_on_either_side(discard: str) -> None:
    pair = partitioned(has_replication=True)
    pair.heal()
    assert pair.states() == (S.ALONE, S.WAIT)
    pair.do(discard, E.FORCE_SECOND)
    keep = pair.other(discard)
    assert pair.state(keep) == S.ALONE and pair.state(discard) == S.SECOND, pair.trace()
    pair.resync(discard)
    assert pair.state(keep) == S.PRIM and not pair.nodes[discard].persisted.discard_local_data


def test_split_brain_loser_keeps_its_side_after_the_winner_stops() -> None:
    pair = partitioned(has_replication=True)
    pair.heal()
    assert pair.do("n2", E.FORCE_PRIM).refused  # n1 still serves: use swap (or `second` on n1)
    pair.stop("n1")
    assert pair.do("n2", E.FORCE_PRIM).next_state == S.ALONE
    pair.start("n1")
    assert pair.state("n1") == S.WAIT and pair.nodes["n1"].waiting_for.startswith("split_brain")
    pair.do("n1", E.FORCE_SECOND)
    assert pair.states() == (S.SECOND, S.ALONE), pair.trace()


def test_forced_second_without_replication_is_done_once_joined() -> None:
    pair = Pair("n1", has_replication=False)
    pair.serving_pair()
    pair.do("n1", E.FORCE_SECOND)
    assert pair.states() == (S.SECOND, S.PRIM)
    assert not pair.nodes["n1"].persisted.discard_local_data and engine.eligible(pair.nodes["n1"])
    pair.stop("n2")
    assert pair.state("n1") == S.ALONE


def test_restart_limit_advice_works() -> None:
    """WAIT after the restart limit with no secondary: `start` is a no-op, stop then start serves again."""
    pair = Pair("n1")
    pair.serving_pair()
    pair.crash("n2")
    pair.nodes["n1"] = replace(pair.nodes["n1"], restarts_exhausted=True)
    d = pair.do("n1", E.CHECKER_FAILED, RESTART_DETAIL)
    assert d.next_state == S.WAIT and "`safekit-cloud stop` and `start`" in d.reason
    assert pair.do("n1", E.START).reason == "already started" and pair.state("n1") == S.WAIT
    assert "stop, then start" in pair.do("n1", E.RESTART).refused
    pair.nodes["n1"] = replace(pair.nodes["n1"], restarts_exhausted=False)  # the engine's window
    pair.stop("n1")
    pair.start("n1")
    pair.elapse()
    assert pair.state("n1") == S.ALONE, pair.trace()


# ---- scenarios: replication link lost while heartbeats continue -------------------------------------

@pytest.mark.parametrize("first", ["n1", "n2"])
def test_replication_lost_prim_goes_alone_secondary_stale_and_never_takes_over(first: str) -> None:
    pair = Pair("n1")
    pair.serving_pair()
    gen = pair.nodes["n1"].persisted.generation
    for name in (first, pair.other(first)):
        pair.event(name, E.REPLICATION_LOST)
    pair.settle()
    n1, n2 = pair.nodes["n1"], pair.nodes["n2"]
    assert n1.state == S.ALONE and n1.persisted.generation.current != gen.current
    assert n1.persisted.can_start_alone
    assert n2.state == S.SECOND and n2.persisted.data == DataStatus.STALE
    assert not engine.eligible(n2)
    pair.crash("n1")
    assert pair.state("n2") == S.WAIT and pair.nodes["n2"].waiting_for == "stale", pair.trace()


def test_replication_back_resync_then_prim() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    pair.replication_lost()
    pair.resync("n2")
    assert pair.states() == (S.PRIM, S.SECOND)


# ---- scenarios: failback -----------------------------------------------------------------------------

@pytest.mark.parametrize("failback", [True, False])
def test_failback_to_the_preferred_node(failback: bool) -> None:
    pair = Pair("n1", failback=failback)
    pair.serving_pair()
    pair.crash("n1")
    assert pair.state("n2") == S.ALONE
    pair.boot("n1")
    assert pair.states() == (S.SECOND, S.ALONE)  # not while it resyncs
    pair.resync("n1")
    if failback:
        assert pair.states() == (S.PRIM, S.SECOND), pair.trace()
        assert "failback" in "\n".join(pair.log)
    else:
        assert pair.states() == (S.SECOND, S.PRIM)


# ---- property: random histories on two nodes -----------------------------------------------------------

NODE = st.sampled_from(["n1", "n2"])
OPS = st.one_of(
    st.tuples(st.just("start"), NODE),
    st.tuples(st.just("stop"), NODE),
    st.tuples(st.just("forcestop"), NODE),
    st.tuples(st.just("swap"), NODE),
    st.tuples(st.just("prim"), NODE),
    st.tuples(st.just("second"), NODE),
    st.tuples(st.just("restart"), NODE),
    st.tuples(st.just("crash"), NODE),
    st.tuples(st.just("boot"), NODE),
    st.tuples(st.just("cut")),
    st.tuples(st.just("heal")),
    st.tuples(st.just("elapse")),
    st.tuples(st.just("replication_lost")),
    st.tuples(st.just("resync"), NODE),
    st.tuples(st.just("witness"), NODE, st.booleans()),
    st.tuples(st.just("checker"), NODE, st.sampled_from(list(CheckerAction)), st.booleans()),
    st.tuples(st.just("recover"), NODE),
    st.tuples(st.just("start_prim_failed"), NODE),
    st.tuples(st.just("agent_died"), NODE, st.booleans()),
)
ADMIN = {"start": E.START, "stop": E.STOP, "forcestop": E.FORCESTOP, "swap": E.SWAP, "prim": E.FORCE_PRIM,
         "second": E.FORCE_SECOND, "restart": E.RESTART}


def run_op(pair: Pair, op: tuple) -> None:
    kind, *args = op
    name = args[0] if args else ""
    if name and not pair.up[name] and kind != "boot":
        return
    if kind == "start":
        if pair.state(name) == S.STOP:
            pair.start(name)
    elif kind in ADMIN:
        pair.do(name, ADMIN[kind])
    elif kind == "crash":
        pair.crash(name)
    elif kind == "boot":
        if not pair.up[name]:
            pair.boot(name)
    elif kind == "cut":
        pair.cut()
    elif kind == "heal":
        pair.heal()
    elif kind == "elapse":
        pair.elapse()
    elif kind == "replication_lost":
        if pair.connected():
            pair.replication_lost()
    elif kind == "resync":
        pair.resync(name)
    elif kind == "witness":
        pair.set_witness(name, args[1])
    elif kind == "checker":
        if pair.state(name).is_primary:
            pair.nodes[name] = replace(pair.nodes[name], restarts_exhausted=args[2])
            pair.do(name, E.CHECKER_FAILED, checker_detail(args[1], "c", "failed"))
    elif kind == "recover":
        if pair.state(name) != S.STOP:
            pair.do(name, E.CHECKER_RECOVERED)
    elif kind == "start_prim_failed" and pair.state(name).is_primary:
        pair.do(name, E.SCRIPT_FAILED, "start_prim")
    elif kind == "agent_died" and pair.state(name) != S.STOP:
        # This node's replication agent died (the primary's mount, or the secondary's receiver).
        pair.nodes[name] = replace(pair.nodes[name], restarts_exhausted=args[1])
        pair.do(name, E.REPLICATION_FAILED, "agent exited with -9")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(OPS, min_size=1, max_size=40),
    preferred=st.sampled_from(["n1", "n2", None]),
    has_replication=st.booleans(),
    failback=st.booleans(),
    policy=st.sampled_from(["manual", "keep-preferred"]),
    seed=st.integers(0, 2**16),
    parallel=st.booleans(),
)
def test_random_histories_never_two_primaries_and_never_stale_data_serving(
        ops, preferred, has_replication, failback, policy, seed, parallel) -> None:
    pair = Pair(preferred, has_replication=has_replication, failback=failback, policy=policy, seed=seed,
                parallel=parallel)
    pair.start_both()
    for op in ops:
        run_op(pair, op)
        # settled: two nodes that see each other never both serve
        if pair.connected():
            assert len(pair.primaries()) <= 1, pair.trace()
    for name, kind, data in pair.promotions:
        assert data == DataStatus.UPTODATE or kind == E.FORCE_PRIM, (name, kind, data, pair.trace())


@settings(max_examples=EXAMPLES // 2, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(OPS, min_size=1, max_size=30),
    preferred=st.sampled_from(["n1", "n2", None]),
    has_replication=st.booleans(),
    policy=st.sampled_from(["manual", "keep-preferred"]),
    seed=st.integers(0, 2**16),
)
def test_random_histories_end_in_a_serving_pair_unless_an_admin_is_needed(
        ops, preferred, has_replication, policy, seed) -> None:
    """No deadlock: once the storm is over, a node that can serve serves and the other joins it."""
    pair = Pair(preferred, has_replication=has_replication, policy=policy, seed=seed)
    pair.start_both()
    for op in ops:
        run_op(pair, op)
    pair.heal()
    for name in pair.names:
        pair.nodes[name] = replace(pair.nodes[name], witness_ok=True, restarts_exhausted=False)
        if not pair.up[name]:
            pair.boot(name)
        elif pair.state(name) == S.STOP:
            pair.start(name)
    for _ in range(3):
        pair.elapse()
        pair.resync_all()
    blocked = [n for n in pair.names if pair.state(n) == S.WAIT
               and pair.nodes[n].waiting_for.startswith(("split_brain", *engine.BLOCKED_PREFIXES))]
    if blocked or not any(engine.eligible(pair.nodes[n]) or pair.state(n).is_primary for n in pair.names):
        return  # an admin decision is needed (and the WAIT reason says which)
    assert len(pair.primaries()) == 1, pair.trace()
    assert S.SECOND in pair.states(), pair.trace()


def test_second_on_the_newest_node_lets_the_older_one_serve() -> None:
    """`second` means: throw my data away and take the peer's, even when mine is newer."""
    pair = Pair("n2")
    pair.serving_pair()  # n2 PRIM
    pair.stop("n1")
    assert pair.state("n2") == S.ALONE  # writes alone: newer than n1
    pair.do("n2", E.FORCE_SECOND)
    pair.start("n1")
    pair.elapse()
    assert pair.states() == (S.ALONE, S.SECOND), pair.trace()


def test_secondary_of_a_primary_writing_under_a_new_generation_becomes_stale_and_never_takes_over() -> None:
    """Replication link lost while heartbeats hold: the primary went ALONE with a new generation."""
    newer = Generation(G0.current + 1, (G0.current,))
    second = local_view(S.SECOND)
    decision = decide(second, peer_view(state=S.ALONE, generation=newer), E.PEER_CHANGED)
    assert decision.next_state == S.SECOND and decision.persisted is not None
    assert decision.persisted.data == DataStatus.STALE
    stale = replace(second, persisted=decision.persisted)
    lost = decide(stale, LOST, E.PEER_LOST)
    assert not lost.next_state.is_primary and lost.waiting_for == "stale"
    # once resynchronised (and the generation adopted) it is up to date again, and no longer marked
    synced = decide(stale, peer_view(state=S.ALONE, generation=newer), E.RESYNC_DONE)
    assert synced.persisted is not None and synced.persisted.data == DataStatus.UPTODATE
    adopted = replace(stale, persisted=replace(synced.persisted, generation=newer))
    assert decide(adopted, peer_view(state=S.ALONE, generation=newer), E.PEER_CHANGED).persisted is None


# ---- this node's replication agent died ------------------------------------------------------------

def test_a_dead_replication_agent_past_the_restart_limit_fails_over_or_stops() -> None:
    local, peer = context(S.PRIM, E.REPLICATION_FAILED)
    event = Event(E.REPLICATION_FAILED, "agent /srv/data exited with -9")
    d = decide(replace(local, restarts_exhausted=True), peer, event)
    check(Expect(S.SECOND, tuple(STOP_PRIM + START_SECOND), exact=True, intent=Intent.HANDOVER,
                 reason="failing over to n2"), local, d)
    assert "exited with -9" in d.reason
    alone, _ = context(S.ALONE, E.REPLICATION_FAILED)
    d = decide(replace(alone, restarts_exhausted=True), peer_view(data=DataStatus.STALE), event)
    check(Expect(S.WAIT, tuple(STOP_PRIM), exact=True, waiting="restarts", reason="restart limit"), alone, d)


def test_a_dead_receiver_past_the_restart_limit_is_left_down() -> None:
    local, peer = context(S.SECOND, E.REPLICATION_FAILED)
    d = decide(replace(local, restarts_exhausted=True), peer, Event(E.REPLICATION_FAILED, "receiver exited"))
    check(Expect(S.SECOND, (), exact=True, persisted={"data": DataStatus.STALE}, reason="not restarted"), local, d)


def test_a_receiver_that_did_not_start_is_started_again_without_using_the_restart_budget() -> None:
    """Its port was taken (say): the retry starts it again, marks this copy out of date (the
    primary goes on alone meanwhile) and is not counted against the application's restart limit;
    past that limit it is still tried, as nothing else would bring the secondary back."""
    local, peer = context(S.SECOND, E.RECEIVER_RETRY)
    event = Event(E.RECEIVER_RETRY, "bind on 198.18.0.1:4801: address already in use")
    for exhausted in (False, True):
        down = replace(local, receiver_down=True, restarts_exhausted=exhausted)
        d = decide(down, peer, event)
        check(Expect(S.SECOND, ("replicate_as_secondary",), exact=True, persisted={"data": DataStatus.STALE},
                     reason="receiver did not start"), down, d)
        assert "address already in use" in d.reason


def test_a_dead_agent_is_restarted_then_the_pair_replicates_again() -> None:
    pair = Pair("n1")
    pair.serving_pair()
    d = pair.do("n1", E.REPLICATION_FAILED, "agent /srv/data exited with -9")
    assert d.next_state == S.ALONE and "replicate_as_primary" in names(d), pair.trace()
    pair.do("n2", E.PEER_CHANGED)  # the primary writes under a new generation: n2 is stale
    assert pair.nodes["n2"].persisted.data == DataStatus.STALE, pair.trace()
    pair.do("n2", E.RESYNC_DONE)  # the new agent reconnected and resynchronised it
    pair.do("n1", E.PEER_CHANGED)
    assert pair.states() == (S.PRIM, S.SECOND), pair.trace()


# ---- holding writes, the link and the generation ------------------------------------------------

def alone_with_uptodate_peer(**kw: object) -> tuple[LocalView, PeerView]:
    """n1 ALONE at G0; n2 an up-to-date secondary that took G0 (its resync just ended)."""
    local = local_view(S.ALONE, persisted=Persisted(S.ALONE, True, generation=G0), **kw)
    return local, peer_view(state=S.SECOND, data=DataStatus.UPTODATE, generation=G0)


def test_alone_moves_to_prim_only_once_its_replication_is_live() -> None:
    """Heartbeats alone said "up-to-date secondary": an ALONE node whose link had gone moved to PRIM
    with its writes reaching only the journal, and a secondary taking over lost them."""
    local, peer = alone_with_uptodate_peer(replication_live=False)
    d = decide(local, peer, E.PEER_CHANGED)
    assert d.next_state == S.ALONE and "new_generation" not in names(d), d
    d = decide(replace(local, replication_live=True), peer, E.PEER_CHANGED)
    assert d.next_state == S.PRIM, d


def test_alone_that_loses_the_link_to_a_secondary_counting_itself_up_to_date_starts_a_new_generation() -> None:
    local, peer = alone_with_uptodate_peer(replication_live=False)
    d = decide(local, peer, E.REPLICATION_LOST)
    assert d.next_state == S.ALONE and names(d) == ["new_generation"], d
    # Once the new generation is announced, the secondary knows its copy is out of date.
    n2 = local_view(S.SECOND, node="n2", preferred=False, persisted=Persisted(S.SECOND, False, generation=G0))
    d2 = decide(n2, peer_view(name="n1", state=S.ALONE, generation=NEWER, preferred=True), E.PEER_CHANGED)
    assert d2.persisted is not None and d2.persisted.data == DataStatus.STALE, d2


def test_a_secondary_announcing_a_shorter_history_is_still_up_to_date() -> None:
    """The heartbeat used to carry 8 of the 16 generations kept: a secondary that took the primary's
    generation had a shorter history, and the pair stayed ALONE / SECOND for good."""
    local = local_view(S.ALONE, replication_live=True,
                       persisted=Persisted(S.ALONE, True, generation=Generation(99, tuple(range(1, 17)))))
    peer = peer_view(state=S.SECOND, data=DataStatus.UPTODATE, generation=Generation(99, tuple(range(1, 9))))
    assert decide(local, peer, E.PEER_CHANGED).next_state == S.PRIM


@pytest.mark.parametrize("peer,released", [
    (peer_view(state=S.SECOND, data=DataStatus.UPTODATE, generation=G0), False),  # has not seen the new generation
    (peer_view(state=S.SECOND, data=DataStatus.STALE, generation=G0), True),
    (peer_view(state=S.SECOND, data=DataStatus.RESYNCING, generation=G0), True),
    (peer_view(state=S.WAIT, data=DataStatus.UPTODATE, generation=G0, eligible=False), True),
    (peer_view(state=S.WAIT, data=DataStatus.UPTODATE, generation=G0, eligible=True), False),  # a witness away
    (peer_view(state=S.STOP, data=DataStatus.UPTODATE, generation=G0), True),
    (LOST, True),
], ids=["uptodate-second", "stale-second", "resyncing-second", "wait", "wait-to-take-over", "stop", "lost"])
def test_held_writes_are_released_once_the_peer_cannot_take_over_without_them(peer: PeerView, released: bool) -> None:
    local = local_view(S.ALONE, persisted=Persisted(S.ALONE, True, generation=NEWER), writes_held=0.4,
                       replication_live=False)
    d = decide(local, peer, E.PEER_CHANGED if peer.reachable else E.PEER_LOST)
    assert ("release_writes" in names(d)) == released and d.next_state == S.ALONE, d
    if not released:
        assert not d.actions, d
    nothing_held = decide(replace(local, writes_held=None), peer, E.PEER_CHANGED)
    assert "release_writes" not in names(nothing_held)


def test_held_writes_go_on_after_three_replication_timeouts_with_a_warning() -> None:
    """A peer that never hears this node's new generation (heartbeats lost one way, no witness
    answering it): the application must not wait for ever."""
    local = local_view(S.ALONE, persisted=Persisted(S.ALONE, True, generation=NEWER), writes_held=29.0,
                       hold_limit=10.0)
    peer = peer_view(state=S.SECOND, data=DataStatus.UPTODATE, generation=G0)
    assert "release_writes" not in names(decide(local, peer, E.PEER_CHANGED))
    d = decide(replace(local, writes_held=30.0), peer, E.PEER_CHANGED)
    assert names(d) == ["release_writes"] and "WARNING" in d.reason, d


def test_a_primary_whose_first_resync_gets_no_answer_starts_a_new_generation() -> None:
    """After a swap the new primary holds its writes until its first resync is done; one that gets no
    answer (a receiver that accepts and never answers) must not hold them for ever, nor acknowledge
    them while the secondary counts itself up to date: a new generation marks it out of date, then
    the writes are released as after a lost link."""
    local = local_view(S.PRIM, writes_held=10.5, hold_limit=10.0, replication_live=False)
    peer = peer_view(state=S.SECOND, data=DataStatus.UPTODATE, generation=G0)
    d = decide(local, peer, E.PEER_CHANGED)
    assert d.next_state == S.ALONE and names(d) == ["new_generation"] and "first resync" in d.reason, d
    assert decide(replace(local, writes_held=3.0), peer, E.PEER_CHANGED).next_state == S.PRIM


# ---- a primary that was not heard while its peer took over ------------------------------------------

@pytest.mark.parametrize("state", [S.PRIM, S.ALONE], ids=lambda s: s.name)
@pytest.mark.parametrize("event", [E.REPLICATION_LOST, E.PEER_CHANGED, E.TICK], ids=lambda e: e.name)
def test_a_primary_whose_secondary_took_over_on_newer_data_yields_before_the_takeover_ends(
        state: S, event: E) -> None:
    """This daemon was paused past the heartbeat timeout; the secondary took over (a new generation
    from ours) and still announces SECOND while its start scripts run. This node must stop serving
    now: going on alone (it did, on the link lost) made two primaries acknowledging writes."""
    local = local_view(state, persisted=Persisted(state, True, generation=G0))
    peer = peer_view(state=S.SECOND, data=DataStatus.UPTODATE, generation=NEWER)
    d = decide(local, peer, Event(event))
    # The VIP first: the peer holds it already, it must not be on both nodes while stop_prim runs.
    check(Expect(S.WAIT, ("release_vip", "stop_checkers", "run_script(stop_prim)", "stop_replication"), exact=True,
                 waiting="peer", reason="holds newer data",
                 persisted={"data": DataStatus.STALE, "can_start_alone": False}), local, d)
    # Once the peer serves, this node joins it and is resynchronised from it.
    waiting = replace(local, state=S.WAIT, waiting_for="peer", persisted=d.persisted)
    joined = decide(waiting, replace(peer, state=S.ALONE), Event(E.PEER_CHANGED))
    assert joined.next_state == S.SECOND and "replicate_as_secondary" in names(joined), joined


def test_a_secondary_at_our_generation_or_older_does_not_make_a_primary_yield() -> None:
    local = local_view(S.PRIM, persisted=Persisted(S.PRIM, False, generation=G0))
    for gen in (G0, OLDER):
        d = decide(local, peer_view(state=S.SECOND, data=DataStatus.UPTODATE, generation=gen), Event(E.PEER_CHANGED))
        assert d.next_state in (S.PRIM, S.ALONE), d


def test_a_peer_whose_takeover_failed_does_not_make_the_primary_yield() -> None:
    """It started a newer generation, then its start_prim failed and it waits: yielding too would
    leave no node serving; this node keeps serving (the peer then finds the split brain)."""
    local = local_view(S.ALONE, persisted=Persisted(S.ALONE, True, generation=G0))
    peer = peer_view(state=S.WAIT, data=DataStatus.UPTODATE, generation=NEWER, eligible=False)
    d = decide(local, peer, Event(E.PEER_CHANGED))
    assert d.next_state == S.ALONE and not d.actions, d
