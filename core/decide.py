"""All failover logic of a mirror module, as one pure function.

`decide(local, peer, event)` returns a Decision: the next state, the side effects in order, and the
reason that the engine logs verbatim. No I/O, no clock: whatever a rule needs (elapsed times, witness
results, restart counts) is in the snapshot. That makes every rule testable as a table.

Rules in one paragraph (docs/concepts.md tells the long story): a node serves (ALONE/PRIM) only with
data it can prove current; it proves it by comparing data generations with a reachable peer, or, when
the peer is silent, by its own record (`can_start_alone`: it was ALONE, or an up-to-date secondary of
a primary that stopped cleanly). A secondary takes over when the primary stops, leaves the role, or is
silent on every heartbeat network, unless its data is not up to date or no witness answers.
"""

from __future__ import annotations

from dataclasses import replace

from .types import (
    Action,
    ActionKind as A,
    CheckerAction,
    DataStatus,
    Decision,
    Event,
    EventKind as E,
    GenerationOrder,
    Intent,
    LocalView,
    ModuleState as S,
    PeerView,
    Persisted,
    compare_generations,
)

# WAIT reasons that bar this node from becoming primary on its own; a peer that is primary may still
# take it as secondary.
BLOCKED_PREFIXES = ("failed:", "checker:", "restarts", "split_brain")


def run(script: str) -> Action:
    return Action(A.RUN_SCRIPT, script)


STOP_PRIMARY = (Action(A.STOP_CHECKERS), run("stop_prim"), Action(A.RELEASE_VIP), Action(A.STOP_REPLICATION))
# Stepping down for a peer that already took the VIP: the address goes first, so that it is not on
# both nodes while stop_prim runs (a database's shutdown takes seconds).
YIELD_PRIMARY = (Action(A.RELEASE_VIP), Action(A.STOP_CHECKERS), run("stop_prim"), Action(A.STOP_REPLICATION))
STOP_SECONDARY = (run("stop_second"), Action(A.STOP_REPLICATION))
START_SECONDARY = (Action(A.REPLICATE_AS_SECONDARY), run("start_second"))
# A VIP left behind by a crashed daemon must go before anything else: clients would reach a node that
# no longer serves. prestart is the user's hook to clean up the application likewise.
START_MODULE = (Action(A.RELEASE_VIP), run("prestart"), run("start_both"))


def start_primary(alone: bool) -> tuple[Action, ...]:
    generation = (Action(A.NEW_GENERATION),) if alone else ()
    return generation + (
        Action(A.TAKE_VIP), Action(A.REPLICATE_AS_PRIMARY), run("start_prim"), Action(A.START_CHECKERS),
    )


def decide(local: LocalView, peer: PeerView, event: E | Event) -> Decision:
    """The next step of module `local.module` on `local.node` after `event`."""
    if isinstance(event, E):
        event = Event(event)
    handler = _ADMIN.get(event.kind)
    if handler is not None:
        return _note_interrupted_resync(local.persisted, handler(local, peer, event))
    if local.state == S.STOP:
        return stay(local, "module stopped")
    by_state = {S.WAIT: _in_wait, S.SECOND: _in_second, S.ALONE: _in_primary, S.PRIM: _in_primary}
    return _note_interrupted_resync(local.persisted, by_state[local.state](local, peer, event))


def _note_interrupted_resync(before: Persisted, d: Decision) -> Decision:
    """A copy left by a resync (RESYNCING becomes STALE: the source lost, the link lost) stays
    marked until it is up to date again, whatever happens to it meanwhile."""
    p = d.persisted
    if p is None:
        return d
    interrupted = p.data != DataStatus.UPTODATE and (
        p.resync_interrupted or (before.data == DataStatus.RESYNCING and p.data == DataStatus.STALE))
    if interrupted == p.resync_interrupted:
        return d
    return replace(d, persisted=replace(p, resync_interrupted=interrupted))


def copy_incomplete(local: LocalView) -> bool:
    """A resync into this copy began and did not end: files it had begun may mix old and new content."""
    return local.persisted.resync_interrupted or local.persisted.data == DataStatus.RESYNCING


def incomplete_note(local: LocalView) -> str:
    """Said wherever using this copy is weighed: it is not even the state of an earlier moment."""
    if not copy_incomplete(local):
        return ""
    return ("; this node's copy is incomplete: a resync into it was interrupted, and files it had begun "
            "may hold old and new content mixed")


# ---- small constructors --------------------------------------------------------------------------

def stay(local: LocalView, reason: str, **changes: object) -> Decision:
    return Decision(local.state, reason=reason, **changes)  # type: ignore[arg-type]


def refuse(local: LocalView, why: str) -> Decision:
    return Decision(local.state, reason=f"refused: {why}", refused=why)


def wait(local: LocalView, reason: str, code: str, actions: tuple[Action, ...] = (), **persist: object) -> Decision:
    persisted = replace(local.persisted, last_state=S.WAIT, **persist) if persist or actions else None
    return Decision(S.WAIT, actions, reason, persisted=persisted, waiting_for=code, intent=Intent.NONE)


def no_longer_last_primary(local: LocalView) -> dict[str, object]:
    """The persisted change of a node that stops claiming it was the last primary (waiting on a
    split brain while the peer serves: after a restart that cannot hear the peer, it must not serve
    alone). Empty when it claims nothing: a wait that changes nothing is not recorded at every tick."""
    return {"can_start_alone": False} if local.persisted.can_start_alone else {}


def go_alone(local: LocalView, reason: str, prefix: tuple[Action, ...] = ()) -> Decision:
    persisted = replace(local.persisted, last_state=S.ALONE, can_start_alone=True,
                        data=DataStatus.UPTODATE, discard_local_data=False)
    return Decision(S.ALONE, prefix + start_primary(alone=True), reason,
                    persisted=persisted, waiting_for="", intent=Intent.NONE)


def go_second(local: LocalView, peer: PeerView, reason: str, prefix: tuple[Action, ...] = ()) -> Decision:
    """Join the peer as its secondary. Without replicated data there is nothing to resync."""
    if local.has_replication:
        data, extra = DataStatus.RESYNCING, ()
    else:
        data, extra = DataStatus.UPTODATE, (Action(A.ADOPT_PEER_GENERATION),)
    # Without data, joining is the whole resync: a `second` request is then fulfilled at once.
    discard = local.persisted.discard_local_data and local.has_replication
    persisted = replace(local.persisted, last_state=S.SECOND, can_start_alone=False, data=data,
                        discard_local_data=discard)
    return Decision(S.SECOND, prefix + START_SECONDARY + extra, reason,
                    persisted=persisted, waiting_for="", intent=Intent.NONE)


def data_order(local: LocalView, peer: PeerView) -> GenerationOrder:
    if local.persisted.discard_local_data:
        return GenerationOrder.PEER_NEWER
    order = compare_generations(local.persisted.generation, peer.generation)
    if order == GenerationOrder.SPLIT_BRAIN and not local.has_replication:
        return GenerationOrder.SAME  # no data could diverge: a tie, broken by preference
    return order


def split_brain_with(local: LocalView, peer: PeerView) -> bool:
    """Both nodes wrote alone since they last agreed, and neither has chosen to discard its side
    (what `status` shows on both nodes, the one serving included)."""
    return (peer.reachable and local.has_replication and not peer_discards(peer)
            and data_order(local, peer) == GenerationOrder.SPLIT_BRAIN)


def peer_taking_over(local: LocalView, peer: PeerView) -> bool:
    """The peer, still a secondary by what it announces, holds a generation newer than ours and
    started from it: a secondary starts one only to serve, so it is taking over (its start scripts
    run). A peer already back in WAIT (a failed takeover) is not: yielding to it would leave no
    node serving."""
    return (peer.reachable and peer.state == S.SECOND and local.has_replication
            and data_order(local, peer) == GenerationOrder.PEER_NEWER)


def wins_tie(local: LocalView, peer: PeerView) -> bool:
    """Both could serve: the preferred primary wins, else the lower node name (same answer on both)."""
    if local.preferred != peer.preferred:
        return local.preferred
    return local.node < peer.name


def eligible(local: LocalView) -> bool:
    """Could this node become primary on its own? (What it announces to its peer.)"""
    return (
        local.persisted.data == DataStatus.UPTODATE
        and not local.persisted.discard_local_data
        and not local.waiting_for.startswith(BLOCKED_PREFIXES)
    )


def peer_serving(peer: PeerView) -> bool:
    return peer.reachable and peer.state.is_primary


def peer_discards(peer: PeerView) -> bool:
    """The peer waits with stale data (`second` was run there): it cannot serve and will not keep its
    side of a split brain; it resyncs from whichever node serves."""
    return peer.reachable and peer.state == S.WAIT and peer.data == DataStatus.STALE


def peer_uptodate_second(local: LocalView, peer: PeerView) -> bool:
    # The current generation only: a history announced shorter than the one kept (an older peer, or
    # many modules in one datagram) must not make an up-to-date secondary look out of date.
    return (peer.reachable and peer.state == S.SECOND and peer.data == DataStatus.UPTODATE
            and (not local.has_replication or peer.generation.current == local.persisted.generation.current))


# ---- admin commands ------------------------------------------------------------------------------

def _start(local: LocalView, peer: PeerView, event: Event) -> Decision:
    if local.state != S.STOP:
        return stay(local, "already started")
    return wait(local, "started: waiting for the peer", "peer", START_MODULE)


def _stop(local: LocalView, peer: PeerView, event: Event) -> Decision:
    if local.state == S.STOP:
        return stay(local, "already stopped")
    verb = "forced stop" if event.kind == E.FORCESTOP else "stopped by admin"
    if local.state.is_primary:
        # The peer takes over when it sees us stopped; only if it cannot do we stay the newest.
        newest = not peer_uptodate_second(local, peer)
        persisted = replace(local.persisted, last_state=S.STOP, can_start_alone=newest)
        actions = STOP_PRIMARY + (run("stop_both"),)
        if newest and local.has_replication:  # said, not refused: stopping the only copy is the admin's call
            verb += (f": {peer.name} is not an up-to-date secondary, so the application runs nowhere until "
                     f"`safekit-cloud start` here")
    elif local.state == S.SECOND:
        persisted = replace(local.persisted, last_state=S.STOP, can_start_alone=False)
        actions = STOP_SECONDARY + (run("stop_both"),)
    else:
        persisted = replace(local.persisted, last_state=S.STOP)
        actions = (Action(A.STOP_CHECKERS), run("stop_both"))
    return Decision(S.STOP, actions, verb, persisted=persisted, waiting_for="", intent=Intent.NONE)


def _restart(local: LocalView, peer: PeerView, event: Event) -> Decision:
    if local.state.is_primary:
        return stay(local, "application restarted by admin", actions=(run("stop_prim"), run("start_prim")))
    if local.state == S.SECOND:
        return stay(local, "secondary restarted by admin", actions=(run("stop_second"), run("start_second")))
    hint = "use start" if local.state == S.STOP else "use stop, then start"  # start is a no-op in WAIT
    return refuse(local, f"the module is {local.state.name}: nothing runs to restart ({hint})")


def _no_secondary(peer: PeerView) -> str:
    """Why the peer cannot take the primary role from this node, and what to do."""
    if not peer.reachable:
        return f"no up-to-date secondary to hand over to: {peer.name} is not heard"
    if peer.state == S.SECOND and peer.data == DataStatus.RESYNCING:
        return (f"the peer is not an up-to-date secondary yet: {peer.name} is being resynchronised (its "
                f"progress is in `safekit-cloud status`); swap once it is (`safekit-cloud waitstate SECOND` "
                f"on {peer.name} waits for that)")
    if peer.state == S.SECOND:
        return (f"the peer is not an up-to-date secondary: {peer.name} misses changes made since the "
                f"replication link was lost; it is resynchronised when the link is back")
    return f"no up-to-date secondary to hand over to: {peer.name} is {peer.state.name}"


def _swap(local: LocalView, peer: PeerView, event: Event) -> Decision:
    if local.state == S.PRIM:
        if not peer_uptodate_second(local, peer):
            return refuse(local, _no_secondary(peer))
        return hand_over(local, "swap: primary role handed to the peer")
    if local.state == S.SECOND:
        if local.persisted.data != DataStatus.UPTODATE:
            return refuse(local, "this secondary is not up to date (it is resynchronised from the primary "
                          "first: `safekit-cloud waitstate SECOND` waits for that)")
        if not peer_serving(peer):
            return refuse(local, f"{peer.name} is not primary: nothing to take over")
        return stay(local, "swap asked: waiting for the primary to hand over", intent=Intent.WANT_PRIMARY)
    if local.state == S.ALONE:
        return refuse(local, _no_secondary(peer))
    if local.waiting_for.startswith("split_brain"):
        return refuse(local, "the module waits on a split brain: keep one side with `safekit-cloud second` on "
                      "the node whose changes to discard")
    return refuse(local, f"the module is {local.state.name}, not part of a running pair")


def hand_over(local: LocalView, reason: str) -> Decision:
    """Leave the primary role on purpose; the peer (an up-to-date secondary) takes it at once."""
    persisted = replace(local.persisted, last_state=S.SECOND, can_start_alone=False, data=DataStatus.UPTODATE)
    return Decision(S.SECOND, STOP_PRIMARY + START_SECONDARY, reason,
                    persisted=persisted, intent=Intent.HANDOVER, waiting_for="")


def _force_prim(local: LocalView, peer: PeerView, event: Event) -> Decision:
    if local.state.is_primary:
        return stay(local, "already primary")
    if peer_serving(peer):
        if local.waiting_for.startswith("split_brain"):
            return refuse(local, f"{peer.name} is primary: to keep this node's changes instead of "
                          f"{peer.name}'s, run `safekit-cloud second` on {peer.name} (this node then serves)")
        return refuse(local, f"{peer.name} is primary: use swap")
    prefix: tuple[Action, ...] = ()
    if local.state == S.SECOND:
        prefix = STOP_SECONDARY
    elif local.state == S.STOP:
        prefix = START_MODULE
    warning = (" on an incomplete copy (a resync into it was interrupted: files it had begun may hold old and "
               "new content mixed; check the application's data)" if copy_incomplete(local) else "")
    return go_alone(local, f"forced primary by admin{warning}: a peer that comes back with changes of its own "
                    "waits (split brain) until `safekit-cloud second` there discards them; one without resyncs "
                    "from this node", prefix)


def _force_second(local: LocalView, peer: PeerView, event: Event) -> Decision:
    prefix: tuple[Action, ...] = ()
    if local.state.is_primary:
        prefix = STOP_PRIMARY
    elif local.state == S.STOP:
        prefix = START_MODULE
    elif local.state == S.SECOND:
        prefix = STOP_SECONDARY
    forced = replace(local, state=S.WAIT, waiting_for="",
                     persisted=replace(local.persisted, discard_local_data=True, data=DataStatus.STALE,
                                       can_start_alone=False))
    if peer_serving(peer):
        how = ("every block compared (--fullsync)" if event.detail == "fullsync" else
               "the resync compares what either side changed since they last agreed; `second --fullsync` "
               "compares every block, which also repairs a copy changed outside safekit-cloud")
        return go_second(forced, peer, f"forced secondary by admin: this node's changes are discarded and its "
                         f"copy resynchronised from the peer ({how})", prefix)
    return wait(forced, "forced secondary by admin: waiting for the peer to be primary", "peer", prefix,
                discard_local_data=True, data=DataStatus.STALE, can_start_alone=False)


_ADMIN = {
    E.START: _start, E.STOP: _stop, E.FORCESTOP: _stop, E.RESTART: _restart, E.SWAP: _swap,
    E.FORCE_PRIM: _force_prim, E.FORCE_SECOND: _force_second,
}


# ---- WAIT: decide whether to serve, join, or keep waiting ----------------------------------------

def _in_wait(local: LocalView, peer: PeerView, event: Event) -> Decision:
    if event.kind == E.CHECKER_RECOVERED and local.waiting_for.startswith("checker:"):
        local = replace(local, waiting_for="")
    elif event.kind == E.CHECKER_FAILED:
        return stay(local, "checker failure ignored: not primary")
    elif event.kind == E.SCRIPT_FAILED and event.detail in ("prestart", "start_both"):
        return Decision(S.STOP, (run("stop_both"),), f"{event.detail} failed: module stopped (see the module log)",
                        persisted=replace(local.persisted, last_state=S.STOP), waiting_for="", intent=Intent.NONE)
    elif event.kind in (E.RESYNC_DONE, E.REPLICATION_LOST, E.REPLICATION_FAILED, E.SCRIPT_FAILED,
                        E.RECEIVER_RETRY):
        return stay(local, f"{event.kind.value} ignored in WAIT")
    if local.waiting_for == "witness":
        return _wait_for_witness(local, peer)
    if local.waiting_for == "deaf_peer" and (resumed := _after_deaf_peer(local, peer)) is not None:
        return resumed
    if peer_serving(peer):
        return _join_primary(local, peer)
    if local.waiting_for.startswith("split_brain") and peer_discards(peer):
        local = replace(local, waiting_for="")  # the admin chose this side: elect again
    if local.waiting_for.startswith(BLOCKED_PREFIXES):
        return stay(local, f"waiting: {local.waiting_for}")
    if peer.reachable and peer.state == S.SECOND:
        # It was secondary of this node (we restarted): it takes over or joins; electing now would race.
        return stay(local, f"{peer.name} is secondary: waiting for it to take over", waiting_for="peer")
    if peer.reachable and peer.state == S.WAIT:
        return _elect(local, peer)
    if peer.reachable and peer.state == S.STOP:
        return _peer_stopped_at_start(local, peer)
    return _peer_silent_at_start(local, peer)


def _join_primary(local: LocalView, peer: PeerView) -> Decision:
    order = data_order(local, peer)
    if order == GenerationOrder.SPLIT_BRAIN and not (local.split_brain_policy == "keep-preferred" and peer.preferred):
        return wait(local, f"split brain: this node and {peer.name} both wrote data alone; keep one side "
                    f"with `safekit-cloud second` on the node whose changes to discard", "split_brain",
                    **no_longer_last_primary(local))
    if order == GenerationOrder.LOCAL_NEWER and local.has_replication:
        return wait(local, f"{peer.name} is primary with older data than this node: run `safekit-cloud "
                    f"second` here to discard this node's newer data, or stop {peer.name}", "split_brain",
                    **no_longer_last_primary(local))
    return go_second(local, peer, f"{peer.name} is primary: joining as secondary")


def _elect(local: LocalView, peer: PeerView) -> Decision:
    """Both nodes are up and neither serves: the one with the newest data serves."""
    order = data_order(local, peer)
    mine = eligible(local)
    if peer_discards(peer):
        order = GenerationOrder.LOCAL_NEWER  # `second` there: its data counts for nothing
    if order == GenerationOrder.SPLIT_BRAIN:
        if local.split_brain_policy == "keep-preferred" and (local.preferred or peer.preferred):
            order = GenerationOrder.LOCAL_NEWER if local.preferred else GenerationOrder.PEER_NEWER
        else:
            return wait(local, f"split brain: this node and {peer.name} both wrote data alone; choose the "
                        f"side to keep: `safekit-cloud prim` there, or `second` on the side to discard",
                        "split_brain")
    if order == GenerationOrder.LOCAL_NEWER and mine:
        return go_alone(local, f"this node has newer data than {peer.name}: serving")
    if order == GenerationOrder.PEER_NEWER and not peer.eligible and mine and not local.has_replication:
        return go_alone(local, f"{peer.name} was primary last but cannot serve; no data to lose: serving")
    if order == GenerationOrder.PEER_NEWER and not peer.eligible:
        return stay(local, f"{peer.name} has newer data but cannot serve: fix it there, or force this node "
                    f"with `safekit-cloud prim` (its changes since are lost){incomplete_note(local)}",
                    waiting_for="peer")
    if order == GenerationOrder.PEER_NEWER or not mine:
        why = "has newer data" if order == GenerationOrder.PEER_NEWER else "can serve and this node cannot"
        return stay(local, f"{peer.name} {why}: waiting for it to become primary", waiting_for="peer")
    if not peer.eligible or wins_tie(local, peer):
        return go_alone(local, f"both nodes up with the same data: this node serves "
                        f"({'preferred primary' if local.preferred else 'tie broken by node name'})")
    return stay(local, f"both nodes up with the same data: {peer.name} serves", waiting_for="peer")


def _peer_stopped_at_start(local: LocalView, peer: PeerView) -> Decision:
    if peer.intent == Intent.STARTING:
        # Its daemon booted (after a power cut of both nodes, say) and runs its start scripts: serving
        # now, as if an admin had stopped it, would make two primaries once it reaches the election.
        return stay(local, f"{peer.name}'s module is starting: waiting for it", waiting_for="peer")
    if local.startup_elapsed < local.startup_wait:
        # Its daemon may be booting and about to start the module: give the election a chance.
        return stay(local, f"{peer.name}'s module is stopped: waiting {local.startup_wait:.0f}s in case it "
                    "starts", waiting_for="peer")
    order = data_order(local, peer)
    if order in (GenerationOrder.SAME, GenerationOrder.LOCAL_NEWER) and eligible(local):
        return go_alone(local, f"{peer.name}'s module is stopped and this node's data is the newest: serving")
    if order == GenerationOrder.SPLIT_BRAIN:
        return wait(local, f"split brain with {peer.name} (stopped): choose the side to keep", "split_brain")
    return stay(local, f"{peer.name} has newer data but its module is stopped: start it there, or force this "
                f"node with `safekit-cloud prim` (its changes will be lost){incomplete_note(local)}",
                waiting_for="stale")


def _peer_silent_at_start(local: LocalView, peer: PeerView) -> Decision:
    if local.startup_elapsed < local.startup_wait and not local.peer_seen_since_start:
        return stay(local, f"waiting for {peer.name} ({local.startup_elapsed:.0f}s of "
                    f"{local.startup_wait:.0f}s)", waiting_for="peer")
    if local.persisted.can_start_alone and eligible(local):
        return go_alone(local, f"{peer.name} not seen; this node holds the newest data "
                        f"(it was the last primary): serving alone")
    return stay(local, f"{peer.name} not seen and this node cannot prove its data is current "
                f"(the peer may have served since): start {peer.name}, or force this node with "
                f"`safekit-cloud prim`{incomplete_note(local)}", waiting_for="stale")


def _wait_for_witness(local: LocalView, peer: PeerView) -> Decision:
    if peer.reachable:
        return _in_wait(replace(local, waiting_for=""), peer, Event(E.PEER_CHANGED))
    if local.witness_ok:
        return go_alone(local, f"{peer.name} still lost and a witness answers now: taking over")
    return stay(local, f"{peer.name} lost and no witness answers: not taking over (split-brain guard)")


# ---- SECOND --------------------------------------------------------------------------------------

def _in_second(local: LocalView, peer: PeerView, event: Event) -> Decision:
    uptodate = local.persisted.data == DataStatus.UPTODATE
    if event.kind == E.RESYNC_DONE:
        persisted = replace(local.persisted, data=DataStatus.UPTODATE, discard_local_data=False)
        return stay(local, "resynchronised: up to date", actions=(Action(A.ADOPT_PEER_GENERATION),),
                    persisted=persisted)
    if event.kind == E.REPLICATION_LOST:
        return stay(local, "replication link lost: this secondary is no longer up to date",
                    persisted=replace(local.persisted, data=DataStatus.STALE))
    if event.kind == E.REPLICATION_FAILED:
        # The receiver died: the primary goes on alone until it is back, so this copy falls behind.
        stale = replace(local.persisted, data=DataStatus.STALE)
        if local.restarts_exhausted:
            return stay(local, f"replication agent failed ({event.detail}) again, restart limit reached: "
                        "not restarted, this secondary is no longer up to date (see the module log)", persisted=stale)
        return stay(local, f"replication agent failed ({event.detail}): receiver restarted; up to date again "
                    "once resynchronised", actions=(Action(A.COUNT_RESTART), Action(A.REPLICATE_AS_SECONDARY)),
                    persisted=stale)
    if event.kind == E.RECEIVER_RETRY:
        if not local.receiver_down:
            return stay(local, "receiver retry not needed: the receiver runs")
        # Its start failed (its port taken...): the primary goes on alone meanwhile, so this copy
        # falls behind. Not counted as a restart: the restart limit is the application's budget.
        return stay(local, f"replication receiver did not start ({event.detail}): trying again until it "
                    "starts; this copy is not up to date meanwhile", actions=(Action(A.REPLICATE_AS_SECONDARY),),
                    persisted=replace(local.persisted, data=DataStatus.STALE))
    if event.kind in (E.CHECKER_FAILED, E.CHECKER_RECOVERED, E.SCRIPT_FAILED):
        return stay(local, f"{event.kind.value} ignored on the secondary")
    if peer_serving(peer):
        if uptodate and local.has_replication and peer.generation.current != local.persisted.generation.current:
            # The primary writes under a generation we never adopted (it went ALONE: link lost while
            # heartbeats held): our copy misses its changes until the next resync completes.
            return stay(local, f"{peer.name} writes without replicating to this node: not up to date "
                        "until resynchronised", persisted=replace(local.persisted, data=DataStatus.STALE))
        if local.intent == Intent.HANDOVER:
            return stay(local, f"{peer.name} took over", intent=Intent.NONE)
        if local.intent == Intent.WANT_PRIMARY and (peer.state != S.PRIM or not uptodate):
            return stay(local, "swap abandoned: this node is no longer an up-to-date secondary of a "
                        "replicating primary", intent=Intent.NONE)
        return stay(local, f"secondary of {peer.name}")
    if peer.reachable and peer.state == S.SECOND and peer.intent != Intent.HANDOVER:
        if local.intent == Intent.HANDOVER:
            return stay(local, f"waiting for {peer.name} to take over")
        return stay(local, "both nodes secondary: waiting (force one with `safekit-cloud prim`)")
    return _primary_gone(local, peer, event, uptodate)


def _primary_gone(local: LocalView, peer: PeerView, event: Event, uptodate: bool) -> Decision:
    """The primary stopped, left the role, or went silent: take over if our data allows."""
    if peer.reachable and peer.state == S.SECOND:  # it handed over on purpose
        why, alone = f"{peer.name} handed over the primary role", not peer_uptodate_second(local, peer)
    elif peer.reachable:
        why, alone = f"{peer.name} stopped serving ({peer.state.name})", True
    else:
        why, alone = f"{peer.name} lost on every heartbeat network", True
    # Stale data first: a WAIT for the witness ends in a takeover once a witness answers.
    if not uptodate:
        if copy_incomplete(local):
            return wait(local, f"{why}, but this node's copy is incomplete: a resync from {peer.name} into it "
                        f"was interrupted, and files it had begun may hold old and new content mixed: not "
                        f"taking over (start {peer.name} to finish the resync; `safekit-cloud prim` would "
                        f"serve this copy as it is)", "stale", STOP_SECONDARY, data=DataStatus.STALE)
        return wait(local, f"{why}, but this node's data is not up to date: not taking over "
                    f"(start {peer.name}, or force with `safekit-cloud prim`: changes since the last "
                    f"resync are lost)", "stale", STOP_SECONDARY, data=DataStatus.STALE)
    if not peer.reachable and not local.witness_ok:
        return wait(local, f"{why} and no witness answers: not taking over (split-brain guard)",
                    "witness", STOP_SECONDARY)
    if not alone:
        persisted = replace(local.persisted, last_state=S.PRIM, can_start_alone=False)
        return Decision(S.PRIM, STOP_SECONDARY + start_primary(alone=False), f"{why}: taking over",
                        persisted=persisted, intent=Intent.NONE, waiting_for="")
    return go_alone(local, f"{why}: taking over", STOP_SECONDARY)


# ---- ALONE and PRIM ------------------------------------------------------------------------------

def _in_primary(local: LocalView, peer: PeerView, event: Event) -> Decision:
    if event.kind == E.CHECKER_FAILED:
        return _checker_failed(local, peer, event.detail)
    if event.kind == E.SCRIPT_FAILED:
        return _start_failed(local, event.detail)
    if event.kind == E.REPLICATION_FAILED:
        return _replication_failed(local, peer, event.detail)
    if event.kind in (E.RESYNC_DONE, E.CHECKER_RECOVERED, E.RECEIVER_RETRY):
        return stay(local, f"{event.kind.value} noted")
    if peer_serving(peer):
        return _both_primary(local, peer)
    if peer_taking_over(local, peer):
        return _peer_took_over(local, peer)
    if local.state == S.PRIM:
        return _in_prim(local, peer, event)
    if peer_uptodate_second(local, peer):
        if event.kind == E.REPLICATION_LOST or (held_too_long(local) and not local.replication_live):
            # Its resync ended (it took this generation) and the link went before we moved to PRIM:
            # it counts itself up to date, and what we write next reaches only the journal.
            return stay(local, f"replication link lost while {peer.name} counts itself up to date: a new data "
                        "generation marks its copy out of date", actions=(Action(A.NEW_GENERATION),))
        if local.replication_live:
            return Decision(S.PRIM, (), f"{peer.name} is an up-to-date secondary: replicating",
                            persisted=replace(local.persisted, last_state=S.PRIM, can_start_alone=False))
    released = _release_held_writes(local, peer)
    if released is not None:
        return released
    return stay(local, "serving alone" if not peer.reachable else f"serving; {peer.name} is {peer.state.name}")


HOLD_LIMITS = 3  # x replication.timeout: held writes go on even if the peer never confirmed (two faults)


def held_too_long(local: LocalView) -> bool:
    """The replication has held the application's writes for replication.timeout or more."""
    return local.writes_held is not None and local.writes_held >= local.hold_limit


def _release_held_writes(local: LocalView, peer: PeerView) -> Decision | None:
    """ALONE while the replication holds the application's writes (a live link was lost: resync.py,
    "Holding writes"): acknowledge them once the peer cannot take over without them: lost (if it was
    only cut off and takes over, this node's new generation makes that a split brain), its copy out
    of date, stopped (it compares generations at its start), or waiting without being able to serve.
    A peer still up to date as a secondary (it has not yet heard this node's new generation), or
    waiting for a witness to take over, could: wait for it, up to HOLD_LIMITS x replication.timeout,
    after which the call goes on (a peer that cannot hear this node, and no witness answering it:
    two faults; the module log says so), so that no call waits for ever."""
    if local.writes_held is None:
        return None
    if not peer.reachable:
        why = f"{peer.name} is lost; this node's writes carry a new data generation"
    elif peer.data != DataStatus.UPTODATE:
        why = f"{peer.name} no longer counts its copy up to date ({peer.state.name}, {peer.data.value})"
    elif peer.state == S.STOP or (peer.state == S.WAIT and not peer.eligible):
        why = f"{peer.name} cannot serve without hearing this node first ({peer.state.name})"
    elif local.writes_held >= HOLD_LIMITS * local.hold_limit:
        why = (f"WARNING: {peer.name} still counts its copy up to date after {local.writes_held:.0f}s (it does not "
               "hear this node): released so that the application does not wait for ever; if it takes over "
               "now, these writes are not there")
    else:
        return None
    return stay(local, f"writes held {local.writes_held:.1f}s released: {why}", actions=(Action(A.RELEASE_WRITES),))


def _in_prim(local: LocalView, peer: PeerView, event: Event) -> Decision:
    too_long = held_too_long(local)
    if event.kind == E.REPLICATION_LOST or not peer_uptodate_second(local, peer) or too_long:
        if event.kind == E.REPLICATION_LOST:
            why = "replication link lost"
        elif not peer.reachable:
            why = f"{peer.name} lost on every heartbeat network"
        elif too_long:  # a first resync (after a swap) that gets no answer: the writes wait on it
            why = (f"the replication has held the application's writes {local.writes_held:.0f}s (its first resync "
                   f"got no answer): a new data generation marks {peer.name}'s copy out of date")
        else:
            why = f"{peer.name} is no longer an up-to-date secondary ({peer.state.name})"
        persisted = replace(local.persisted, last_state=S.ALONE, can_start_alone=True)
        return Decision(S.ALONE, (Action(A.NEW_GENERATION),), f"{why}: continuing alone", persisted=persisted)
    if peer.intent == Intent.WANT_PRIMARY:
        return hand_over(local, f"swap asked on {peer.name}: primary role handed over")
    if local.failback and peer.preferred and not local.preferred:
        return hand_over(local, f"failback: returning the primary role to the preferred node {peer.name}")
    return stay(local, f"replicating to {peer.name}")


def _peer_took_over(local: LocalView, peer: PeerView) -> Decision:
    """`peer_taking_over`: it took over while this node was not heard (this daemon paused, a frozen
    VM) and runs its start scripts, announcing the state it leaves until they end. This node yields
    now, what it holds unacknowledged fails (EIO), and it resyncs from the peer. Before, it went on
    alone once the link dropped: two primaries, both acknowledging writes. A peer that does not
    hear this node (heartbeats lost one way) is yielded to as when it serves: waiting with this
    node's data kept until it hears this node again."""
    if not peer.hears_us:
        return _yield_to_deaf_peer(local, peer)
    return wait(local, f"{peer.name} holds newer data than this node ({peer.state.name}, taking over: this node "
                "was not heard for the heartbeat timeout): yielding; it resyncs from "
                f"{peer.name} once {peer.name} serves", "peer", YIELD_PRIMARY,
                data=DataStatus.STALE, can_start_alone=False)


def _both_primary(local: LocalView, peer: PeerView) -> Decision:
    """Both nodes serve (a partition healed). Exactly one keeps serving, the same one on both sides."""
    if peer.leaving:  # it stops serving already (it yielded to us, or stops): yielding too would leave none
        return stay(local, f"{peer.name} is leaving the primary role: this node keeps serving")
    if not peer.hears_us:
        return _yield_to_deaf_peer(local, peer)
    # The data first: a node that wrote since the other's generation keeps serving (the other, paused
    # or cut off, has not written since: it resyncs from this one). The tie-break alone made a node
    # that took over yield to its old primary's late heartbeats and lose what it wrote meanwhile.
    order = data_order(local, peer) if local.has_replication else GenerationOrder.SAME
    if order == GenerationOrder.LOCAL_NEWER:
        return stay(local, f"{peer.name} also serves, on data older than this node's (it has not written "
                    "since): this node keeps serving")
    if order == GenerationOrder.PEER_NEWER:
        return go_second(local, peer, f"{peer.name} also serves, on newer data (this node has not written "
                         "since): yielding and resyncing from it", STOP_PRIMARY)
    if wins_tie(local, peer):
        return stay(local, f"{peer.name} also serves (partition healed): this node keeps serving")
    split = order == GenerationOrder.SPLIT_BRAIN
    if split and local.split_brain_policy != "keep-preferred":
        return wait(local, f"split brain: {peer.name} also served; this node stopped serving and keeps its "
                    f"data: `safekit-cloud second` here discards it, `safekit-cloud second` on {peer.name} "
                    f"discards {peer.name}'s instead", "split_brain",
                    STOP_PRIMARY, can_start_alone=False)  # the peer serves on: it is not the last primary
    return go_second(local, peer, f"{peer.name} also serves (partition healed): yielding and resyncing from it",
                     STOP_PRIMARY)


def _yield_to_deaf_peer(local: LocalView, peer: PeerView) -> Decision:
    """Heartbeats lost one way: the peer took over without hearing this node, so it cannot see the
    double primary nor yield; only this node can end it, whatever the tie-break says. It waits
    (`deaf_peer`) with its data kept: it joins the peer once heard again (`_join_primary`: a split
    brain waits for the admin as usual), or serves again if the peer, hearing it, no longer serves
    (a healing partition whose directions came back one after the other, the peer then yielding
    to the tie-break too)."""
    return wait(local, f"{peer.name} serves and does not hear this node (heartbeats lost one way): this node "
                f"stopped serving and keeps its data until {peer.name} hears it again", "deaf_peer",
                STOP_PRIMARY, can_start_alone=False)


def _after_deaf_peer(local: LocalView, peer: PeerView) -> Decision | None:
    """In WAIT after `_yield_to_deaf_peer`: what to do, or None to decide as any WAIT does."""
    if peer_serving(peer) and not peer.hears_us:
        return stay(local, f"{peer.name} serves and still does not hear this node: waiting")
    if peer_serving(peer) and peer.leaving:
        return stay(local, f"{peer.name} is leaving the primary role: waiting for it to finish")
    # The peer yielded to the tie-break (SECOND, or WAIT on a split brain); not a peer that waits
    # to elect (its daemon restarted, say): it may hold the newer data, the election decides.
    yielded = peer.state == S.SECOND or (peer.state == S.WAIT and not peer.eligible)
    if peer.reachable and peer.hears_us and yielded and eligible(local):
        return go_alone(local, f"{peer.name} hears this node again and does not serve: this node, which stopped "
                        "only because it was not heard, serves again")
    if not local.has_replication and not peer_serving(peer):
        # No data to protect: the peer that served is gone or stopped, take over as a secondary would.
        if not peer.reachable and not local.witness_ok:
            return stay(local, f"{peer.name} lost and no witness answers: not taking over (split-brain guard)")
        return go_alone(local, f"{peer.name} no longer serves; no replicated data to lose: serving")
    return None


def checker_detail(action: CheckerAction, checker: str, reason: str) -> str:
    """The CHECKER_FAILED event's detail: which checker failed, why, and what it asks for."""
    return f"{action.value}|{checker}|{reason}"


def _checker_failed(local: LocalView, peer: PeerView, detail: str) -> Decision:
    action_name, checker, why = (detail.split("|", 2) + ["", ""])[:3]
    action = CheckerAction(action_name)
    reason = f"{checker}: {why}" if why else checker
    if action == CheckerAction.NONE:
        return stay(local, f"checker failed ({reason}): action none")
    if action == CheckerAction.RESTART and not local.restarts_exhausted:
        # Checkers stop and start around the restart so they count failures afresh afterwards.
        return stay(local, f"checker failed ({reason}): restarting the application",
                    actions=(Action(A.COUNT_RESTART), Action(A.STOP_CHECKERS), run("stop_prim"), run("start_prim"),
                             Action(A.START_CHECKERS)))
    if action == CheckerAction.WAIT:
        return wait(local, f"checker failed ({reason}): application stopped until it recovers",
                    f"checker:{checker}", STOP_PRIMARY[1:3])
    why = "restart limit reached" if action == CheckerAction.RESTART else "stopstart"
    if local.state == S.PRIM and peer_uptodate_second(local, peer):
        return hand_over(local, f"checker failed ({reason}), {why}: failing over to {peer.name}")
    return wait(local, f"checker failed ({reason}), {why}, and no up-to-date secondary can take over: "
                f"application stopped; fix it, then `safekit-cloud stop` and `start`", "restarts", STOP_PRIMARY)


def _replication_failed(local: LocalView, peer: PeerView, why: str) -> Decision:
    """This node's replication agent died: the mount it served is gone (the application's files
    answer ENOTCONN) and the link with it. Restarted like a checker's restart, on a new mount: the
    application stopped, replication started again (journaling: ALONE, a new generation if it was
    replicating, the secondary resynchronised when it reconnects), the application started. Past
    the restart limit: handed over to an up-to-date secondary, else stopped."""
    if not local.restarts_exhausted:
        generation = (Action(A.NEW_GENERATION),) if local.state == S.PRIM else ()
        actions = generation + (Action(A.COUNT_RESTART), Action(A.STOP_CHECKERS), run("stop_prim"),
                                Action(A.REPLICATE_AS_PRIMARY), run("start_prim"), Action(A.START_CHECKERS))
        return Decision(S.ALONE, actions, f"replication agent failed ({why}): application restarted on a new mount",
                        persisted=replace(local.persisted, last_state=S.ALONE, can_start_alone=True))
    if local.state == S.PRIM and peer_uptodate_second(local, peer):
        return hand_over(local, f"replication agent failed ({why}), restart limit reached: failing over to "
                         f"{peer.name}")
    return wait(local, f"replication agent failed ({why}), restart limit reached, and no up-to-date secondary "
                "can take over: application stopped; see the module log, then `safekit-cloud stop` and `start`",
                "restarts", STOP_PRIMARY)


def _start_failed(local: LocalView, step: str) -> Decision:
    """start_prim or the VIP takeover failed: this node cannot serve; stop and let the peer try."""
    if step not in ("start_prim", "take_vip", "replicate_as_primary"):
        return stay(local, f"script {step} failed (see the module log)")
    return wait(local, f"{step} failed: application stopped, failing over (see the module log)",
                f"failed:{step}", STOP_PRIMARY)
