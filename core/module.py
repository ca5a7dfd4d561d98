"""One protected application on this node: snapshot -> decide -> act, one event at a time.

A `ModuleRuntime` owns the module's event loop task, its scripts runner, checkers, virtual IP provider
and (for replicated modules) replication service. Events are processed strictly one after another, each
decision's actions carried out in order before the next event is looked at, so two transitions never
interleave. The state it announces to the peer changes only once a decision's actions are done: a
primary that stops announces STOP after it released the VIP, never before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
from opentelemetry import trace
from safekit_cloud.providers.base import ProviderError, VipProvider

from .checkers.runner import CheckerSet
from .checkers.witness import any_witness_reachable
from .config import ClusterConfig, ModuleConfig
from .decide import checker_detail, decide, eligible
from .scripts import ScriptRunner
from .status import CheckerOut, CommandResult, DecisionOut
from .store import ModuleStore
from .types import (
    Action,
    ActionKind as A,
    CheckerAction,
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

log = logging.getLogger(__name__)
tracer = trace.get_tracer("safekit_cloud.engine")

ADMIN_EVENTS = {
    "start": E.START, "stop": E.STOP, "forcestop": E.FORCESTOP, "restart": E.RESTART,
    "swap": E.SWAP, "prim": E.FORCE_PRIM, "second": E.FORCE_SECOND,
}
# Scripts whose failure means the application cannot serve here: the rest of the decision is dropped
# and `decide` hears about it.
CRITICAL_STEPS = ("prestart", "start_both", "start_prim", "take_vip", "replicate_as_primary")
HISTORY_KEPT = 16
# A secondary's receiver that did not start is started again after this wait, doubled each time.
RECEIVER_RETRY_FIRST = 1.0
RECEIVER_RETRY_MAX = 30.0


class ModuleRuntime:
    def __init__(self, *, cluster: ClusterConfig, config: ModuleConfig, node: str, state_dir: Path,
                 peer_view: Callable[[str], PeerView], announce: Callable[[], None],
                 settle: Callable[[], Awaitable[None]] | None = None,
                 provider: VipProvider | None, replication: Callable[..., Any] | None = None) -> None:
        self.cluster = cluster
        self.config = config
        self.node = node
        self.peer_name = cluster.peer_of(node).name
        self._peer_view = peer_view
        self._announce = announce
        self._settle = settle  # the heartbeat's: the peer's view is current (after a pause of this process)
        self.provider = provider
        # The replication service (None without replicated directories) reports through events.
        self.replication = replication(
            config, lambda why: self._post(Event(E.REPLICATION_LOST, why)),
            lambda: self._post(Event(E.RESYNC_DONE)),
            lambda why: self._post(Event(E.REPLICATION_FAILED, why)),
        ) if replication is not None else None
        self.store = ModuleStore(state_dir, config.name)
        self.log_path = self.store.folder / "module.log"
        self.persisted: Persisted = self.store.load()
        self.state = S.STOP
        self.intent = Intent.NONE
        self.waiting_for = ""
        self.busy = ""
        self.becoming: S | None = None  # the state a decision's actions lead to, while they run
        self.decisions: collections.deque[DecisionOut] = collections.deque(maxlen=20)
        self.restart_times: collections.deque[float] = collections.deque()
        self.started_at = 0.0
        self.peer_seen_since_start = False
        self.starting = False  # a start is queued or being carried out: announced as Intent.STARTING
        # Carrying out a decision that leaves the primary role (its stop scripts run): announced at
        # once, while the state announced is still the primary one, so the peer does not yield to it.
        self.leaving = False
        self.witness_ok = True
        self.vip_held = False
        self._queue: asyncio.Queue[tuple[Event, asyncio.Future[CommandResult] | None]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.scripts = ScriptRunner(module=config.name, node=node, config=config.scripts,
                                    env=self._script_env(), log_file=self.log_path)
        self.checkers = CheckerSet(config.checkers, self._on_checker_failure, self._on_checker_recovered)
        self._checkers_running = False
        self._fullsync_pending = False  # `second --fullsync`: compare every block at the next resync
        # A receiver that could not start (its port taken, ...): why, how many times in a row, and
        # the timer that posts RECEIVER_RETRY (owned here: cancelled by any later replication action).
        self._receiver_down = ""
        self._receiver_failures = 0
        self._receiver_retry: asyncio.TimerHandle | None = None

    # ---- wiring ----------------------------------------------------------------------------------

    def _script_env(self) -> dict[str, str]:
        return {
            "SAFEKIT_CLUSTER": self.cluster.cluster.name,
            "SAFEKIT_MODULE": self.config.name,
            "SAFEKIT_NODE": self.node,
            "SAFEKIT_PEER": self.peer_name,
            "SAFEKIT_VIP": self.config.vip.address.split("/")[0] if self.config.vip else "",
        }

    def start(self) -> None:
        self.store.folder.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._loop(), name=f"module-{self.config.name}")

    async def close(self) -> None:
        """Cancel the loop (after `shutdown`, or on a crash path). Leaves the application as it is."""
        self._cancel_receiver_retry()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.checkers.stop()
        await self.scripts.close()
        if self.replication is not None:
            await self.replication.stop()
        if self.provider is not None:
            await self.provider.close()

    def peer_changed(self) -> None:
        """Heartbeat callback: the peer's view changed; re-evaluate soon."""
        self._wake.set()

    def mark_starting(self) -> None:
        """The daemon will start this module: say so from the first heartbeat on (Intent.STARTING)."""
        self.starting = self.state == S.STOP

    async def command(self, verb: str, fullsync: bool = False) -> CommandResult:
        if verb == "start":
            self.mark_starting()
        if verb == "forcestop":
            await self.scripts.abort()
        if verb == "second" and fullsync:
            self._fullsync_pending = True  # consumed when this node next starts receiving
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        detail = "fullsync" if verb == "second" and fullsync else ""
        self._queue.put_nowait((Event(ADMIN_EVENTS[verb], detail), future))
        self._wake.set()
        return await future

    # ---- the loop --------------------------------------------------------------------------------

    async def _loop(self) -> None:
        tick = self.cluster.heartbeat.interval
        while True:
            if self._queue.empty():
                try:
                    await asyncio.wait_for(self._wake.wait(), tick)
                except TimeoutError:
                    pass
            self._wake.clear()
            if not self._queue.empty():
                event, future = self._queue.get_nowait()
            else:
                peer = self._peer_view(self.config.name)
                event, future = Event(E.PEER_CHANGED if peer.reachable else E.PEER_LOST), None
            try:
                result = await self.handle(event)
            except Exception as exc:  # a bug must not kill the module loop: log it and keep serving
                log.exception("module %s: error while handling %s", self.config.name, event.kind.value)
                result = CommandResult(False, f"internal error: {exc}", self.state.name)
            if event.kind == E.START and self.starting:
                self.starting = False
                self._announce()
            if future is not None and not future.done():
                future.set_result(result)

    async def handle(self, event: Event) -> CommandResult:
        if self._settle is not None:
            await self._settle()
        peer = self._peer_view(self.config.name)
        if peer.reachable:
            self.peer_seen_since_start = True
        if not self._witness_needed(peer):
            return await self._decide_and_act(event, peer, None)
        # A takeover without the peer is being considered: its span starts now, so the witness check
        # is one of its children; _carry_out renames it (failover, transition, ...) once decided.
        with tracer.start_as_current_span("takeover_check") as span:
            return await self._decide_and_act(event, peer, span)

    async def _decide_and_act(self, event: Event, peer: PeerView, span: trace.Span | None) -> CommandResult:
        await self._refresh_witness(peer)
        decision = decide(self.local_view(), peer, event)
        if not self._changes_anything(decision):
            return CommandResult(not decision.refused, decision.reason, self.state.name)
        await self._carry_out(decision, event, peer, span)
        return CommandResult(not decision.refused, decision.reason, self.state.name)

    def _changes_anything(self, d: Decision) -> bool:
        return bool(
            d.refused or d.actions or d.persisted is not None or d.next_state != self.state
            or (d.intent is not None and d.intent != self.intent)
            or (d.waiting_for is not None and d.waiting_for != self.waiting_for)
        )

    def local_view(self) -> LocalView:
        now = time.monotonic()
        window = self.config.restart.window
        while self.restart_times and now - self.restart_times[0] > window:
            self.restart_times.popleft()
        startup_wait = self.config.startup_wait
        if startup_wait is None:
            startup_wait = self.cluster.heartbeat.timeout
        return LocalView(
            module=self.config.name, node=self.node, state=self.state, persisted=self.persisted,
            preferred=self.config.preferred_primary == self.node,
            has_replication=bool(self.config.replication.directories),
            intent=self.intent, failback=self.config.failback, split_brain_policy=self.config.split_brain,
            restarts_exhausted=len(self.restart_times) >= self.config.restart.limit,
            waiting_for=self.waiting_for, startup_elapsed=now - self.started_at,
            startup_wait=startup_wait, witness_ok=self.witness_ok,
            peer_seen_since_start=self.peer_seen_since_start,
            replication_live=self.replication is None or self.replication.live,
            writes_held=None if self.replication is None else self.replication.writes_held(),
            hold_limit=self.config.replication.timeout,
            receiver_down=bool(self._receiver_down),
        )

    def _witness_needed(self, peer: PeerView) -> bool:
        """A takeover without the peer is being considered and witnesses are configured."""
        considered = not peer.reachable and (self.state == S.SECOND or self.waiting_for in ("witness", "deaf_peer"))
        return considered and bool(self.config.witnesses)

    async def _refresh_witness(self, peer: PeerView) -> None:
        """Ask the witnesses only when a takeover without the peer is being considered."""
        if not self._witness_needed(peer):
            self.witness_ok = True
            return
        with tracer.start_as_current_span("witness_check") as span:
            self.witness_ok, why = await any_witness_reachable(self.config.witnesses)
            span.set_attribute("witness.ok", self.witness_ok)
            span.set_attribute("witness.detail", why)
        log.info("module %s: witness check: %s", self.config.name, why)

    # ---- carrying out a decision -------------------------------------------------------------

    async def _carry_out(self, d: Decision, event: Event, peer: PeerView, outer: trace.Span | None) -> None:
        old = self.state
        failover = old == S.SECOND and d.next_state.is_primary and not peer.reachable
        span_name = "failover" if failover else "transition" if d.next_state != old else "decision"
        line = (f"{event.kind.value}{'(' + event.detail + ')' if event.detail else ''}: {old.name} -> "
                f"{d.next_state.name}: {d.reason}" + (f" [{', '.join(map(str, d.actions))}]" if d.actions else ""))
        log.info("module %s: %s", self.config.name, line)
        self._module_log(line)
        self._record_decision(DecisionOut(time.time(), event.kind.value, old.name, d.next_state.name,
                                          d.reason, [str(a) for a in d.actions]))
        if outer is not None:  # opened by handle() before the witness check: already current
            outer.update_name(span_name)
            opened = contextlib.nullcontext(outer)
        else:
            opened = tracer.start_as_current_span(span_name)
        with opened as span:
            span.set_attribute("module", self.config.name)
            span.set_attribute("node", self.node)
            span.set_attribute("event", event.kind.value)
            span.set_attribute("from_state", old.name)
            span.set_attribute("to_state", d.next_state.name)
            span.set_attribute("reason", d.reason)
            if failover:
                with tracer.start_as_current_span("detection") as det:
                    det.set_attribute("peer", peer.name)
                    det.set_attribute("heartbeat.timeout", self.cluster.heartbeat.timeout)
            generation = self.persisted.generation
            await self._save(self._next_persisted(d, peer))
            if self.persisted.generation != generation:
                self._announce()  # the peer learns at once that its copy no longer holds everything
            if old == S.PRIM and d.next_state == S.ALONE and not peer.reachable and self.replication is not None:
                # Writes waiting for the dead peer's acknowledgement go on now: after the new generation
                # is on disk, so the peer, if it was only cut off, finds a split brain, not older data.
                self.replication.peer_lost()
            if event.kind == E.START:
                self.started_at, self.peer_seen_since_start = time.monotonic(), peer.reachable
                self.restart_times.clear()  # an admin start is a fresh start: the restart limit too
            if old.is_primary and not d.next_state.is_primary:
                self.leaving = True
                self._announce()
                if self.replication is not None:
                    self.replication.refuse_held_writes()  # never acknowledged now: the peer's data wins
            # Shown in status while the actions run (a takeover's start_prim can take minutes);
            # the state itself, and what heartbeats announce, change once they are done.
            self.becoming = d.next_state if d.next_state != old else None
            if d.next_state != old:
                await self._script("transition", old, d.next_state, event)
            try:
                failed = await self._run_actions(d, event, old, peer)
            finally:
                self.leaving = False
                self.becoming = None
            self.state = d.next_state
            if d.intent is not None:
                self.intent = d.intent
            if d.waiting_for is not None:
                self.waiting_for = d.waiting_for
            await self._reconcile_checkers()
            self.busy = ""
        self._announce()
        if failed:
            self._queue.put_nowait((Event(E.SCRIPT_FAILED, failed), None))

    def _record_decision(self, out: DecisionOut) -> None:
        """Most recent first; the same decision again (a retry that fails alike) is counted on the
        latest entry, so that repeats do not push the decisions that explain them out of status."""
        last = self.decisions[0] if self.decisions else None
        if last is not None and (last.event, last.from_state, last.to_state, last.reason, last.actions) == (
                out.event, out.from_state, out.to_state, out.reason, out.actions):
            self.decisions[0] = msgspec.structs.replace(out, repeated=last.repeated + 1)
        else:
            self.decisions.appendleft(out)

    def _next_persisted(self, d: Decision, peer: PeerView) -> Persisted:
        p = d.persisted or self.persisted
        kinds = {a.kind for a in d.actions}
        if A.NEW_GENERATION in kinds:
            history = ((p.generation.current,) if p.generation.current else ()) + p.generation.history
            p = replace(p, generation=Generation(random.getrandbits(63) | 1, history[:HISTORY_KEPT]))
        if A.ADOPT_PEER_GENERATION in kinds and peer.generation.current:
            p = replace(p, generation=peer.generation)
        return p

    async def _save(self, persisted: Persisted) -> None:
        if persisted != self.persisted:
            await asyncio.to_thread(self.store.save, persisted)
            self.persisted = persisted

    async def _run_actions(self, d: Decision, event: Event, old: S, peer: PeerView) -> str:
        """Carry out the actions in order; returns the critical step that failed, or ""."""
        for action in d.actions:
            self.busy = str(action)
            ok = await self._act(action, d, event, old)
            step = action.arg if action.kind == A.RUN_SCRIPT else action.kind.value
            if not ok and step in CRITICAL_STEPS:
                self._module_log(f"{action} failed: remaining actions dropped")
                return step
        return ""

    async def _act(self, action: Action, d: Decision, event: Event, old: S) -> bool:
        kind = action.kind
        if kind == A.RUN_SCRIPT:
            return await self._script(action.arg, old, d.next_state, event)
        if kind == A.TAKE_VIP:
            return await self._vip(take=True)
        if kind == A.RELEASE_VIP:
            return await self._vip(take=False)
        if kind == A.START_CHECKERS:
            self._start_checkers()
        elif kind == A.STOP_CHECKERS:
            await self._stop_checkers()
        elif kind == A.COUNT_RESTART:
            self.restart_times.append(time.monotonic())
        elif kind in (A.REPLICATE_AS_PRIMARY, A.REPLICATE_AS_SECONDARY, A.STOP_REPLICATION):
            return await self._replication(kind, d.next_state)
        elif kind == A.RELEASE_WRITES and self.replication is not None:
            self.replication.release_writes()
        return True

    async def _script(self, name: str, old: S, new: S, event: Event) -> bool:
        with tracer.start_as_current_span(f"script {name}") as span:
            result = await self.scripts.run(name, old.name, new.name, event.kind.value)
            span.set_attribute("script.ran", result.ran)
            span.set_attribute("script.ok", result.ok)
        if result.ran and not result.ok:
            why = "timed out" if result.timed_out else f"exit code {result.returncode}"
            log.error("module %s: script %s failed (%s): %s", self.config.name, name, why,
                      result.output_tail.strip().splitlines()[-1:] or "")
        return result.ok

    async def _vip(self, take: bool) -> bool:
        if self.provider is None:
            return True
        try:
            if take:
                await self.provider.take()
            else:
                await self.provider.release()
        except ProviderError as exc:
            log.error("module %s: virtual IP %s %s failed: %s", self.config.name, self.provider.vip,
                      "takeover" if take else "release", exc)
            self._module_log(f"virtual IP {'takeover' if take else 'release'} failed: {exc}")
            return False
        self.vip_held = take
        return True

    async def _replication(self, kind: A, next_state: S) -> bool:
        if self.replication is None:
            return True
        self._cancel_receiver_retry()
        try:
            generation = self.persisted.generation.current or None
            if kind == A.REPLICATE_AS_PRIMARY:
                # PRIM (not ALONE): the peer counts itself up to date, so what the first resync has not
                # yet sent must not be acknowledged (resync.py, "Holding writes").
                await self.replication.become_primary(base_generation=generation, hold_writes=next_state == S.PRIM)
            elif kind == A.REPLICATE_AS_SECONDARY:
                # Without --fullsync the replication layer still compares blocks unless its lineage
                # proves this tree is exactly the journal's base (it never is after a split brain).
                await self.replication.become_secondary(generation=generation, fullsync=self._fullsync_pending)
                self._fullsync_pending = False
            else:
                await self.replication.stop()
        except (OSError, RuntimeError) as exc:
            log.error("module %s: replication %s failed: %s", self.config.name, kind.value, exc)
            self._module_log(f"replication {kind.value} failed: {exc}")
            if kind == A.REPLICATE_AS_SECONDARY:
                self._retry_receiver(str(exc))
            return False
        self._receiver_down, self._receiver_failures = "", 0
        return True

    def _retry_receiver(self, why: str) -> None:
        """This secondary's receiver did not start: try again after a wait that doubles each time
        (RECEIVER_RETRY_FIRST .. RECEIVER_RETRY_MAX), until it starts or the role changes."""
        delay = min(RECEIVER_RETRY_MAX, RECEIVER_RETRY_FIRST * 2 ** min(self._receiver_failures, 16))
        self._receiver_failures += 1
        self._receiver_down = why
        self._module_log(f"replication receiver did not start: trying again in {delay:g} s")
        self._receiver_retry = asyncio.get_running_loop().call_later(
            delay, self._post, Event(E.RECEIVER_RETRY, why))

    def _cancel_receiver_retry(self) -> None:
        if self._receiver_retry is not None:
            self._receiver_retry.cancel()
            self._receiver_retry = None

    # ---- checkers ------------------------------------------------------------------------------

    def _start_checkers(self) -> None:
        if not self._checkers_running and self.config.checkers:
            self.checkers.start()
            self._checkers_running = True

    async def _stop_checkers(self) -> None:
        if self._checkers_running:
            await self.checkers.stop()
            self._checkers_running = False

    async def _reconcile_checkers(self) -> None:
        """Checkers watch the application where it runs, and a WAIT that waits for one of them."""
        if self.state.is_primary or self.waiting_for.startswith("checker:"):
            self._start_checkers()
        else:
            await self._stop_checkers()

    def _post(self, event: Event) -> None:
        """Queue an event from a callback (checkers, replication); handled in order by the loop."""
        self._queue.put_nowait((event, None))
        self._wake.set()

    def _on_checker_failure(self, name: str, action: CheckerAction, reason: str) -> None:
        self._post(Event(E.CHECKER_FAILED, checker_detail(action, name, reason)))

    def _on_checker_recovered(self, name: str) -> None:
        self._post(Event(E.CHECKER_RECOVERED, name))

    # ---- what the engine reports ---------------------------------------------------------------

    def _module_log(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            with open(self.log_path, "a") as fh:  # small appends; the page cache absorbs them
                fh.write(f"{stamp} {self.config.name} {line}\n")
        except OSError as exc:
            log.warning("module %s: cannot write %s: %s", self.config.name, self.log_path, exc)

    @property
    def serving(self) -> bool:
        return self.state.is_primary and not self.busy.startswith("run_script(stop")

    def announce_fields(self) -> dict[str, Any]:
        return {
            "name": self.config.name, "state": int(self.state), "data": self.persisted.data.value,
            "gen": self.persisted.generation.current, "history": list(self.persisted.generation.history),
            "intent": (Intent.STARTING if self.starting and self.state == S.STOP else self.intent).value,
            "eligible": eligible(self.local_view()), "leaving": self.leaving,
        }

    def checker_status(self) -> list[CheckerOut]:
        return [CheckerOut(c.name, c.type, c.ok, c.reason, c.consecutive_failures, c.action.value,
                           self._checkers_running) for c in self.checkers.status()]
