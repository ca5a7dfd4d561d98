"""Runs a module's checkers: one owned task per checker, failure counting, and the two callbacks.

The set only counts and reports; the engine decides what a failure means (restart, stopstart, wait,
none) and counts restarts against the restart limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import CheckerBase, CommandChecker, HttpChecker, ProcessChecker, TcpChecker
from ..types import CheckerAction
from .base import Checker, CheckResult
from .command import CommandCheck
from .http import HttpCheck
from .process import ProcessCheck
from .tcp import TcpCheck

log = logging.getLogger(__name__)

_CHECKS: dict[type[CheckerBase], type[Checker]] = {
    ProcessChecker: ProcessCheck,
    TcpChecker: TcpCheck,
    HttpChecker: HttpCheck,
    CommandChecker: CommandCheck,
}


def build_checker(config: CheckerBase) -> Checker:
    try:
        return _CHECKS[type(config)](config)
    except KeyError:
        raise ValueError(f"no checker for {type(config).__name__}") from None


@dataclass(frozen=True)
class CheckerStatus:
    name: str
    type: str
    ok: bool | None  # None before the first check
    reason: str
    consecutive_failures: int
    last_check_ago: float | None  # seconds
    action: CheckerAction


@dataclass
class _Track:
    """Mutable bookkeeping of one checker; only its own task writes it."""

    checker: Checker
    ok: bool | None = None
    reason: str = "not checked yet"
    failures: int = 0
    fired: bool = False  # on_failure was called and the checker has not been ok since
    last_check: float | None = None  # time.monotonic()

    def reset(self) -> None:
        self.ok, self.reason, self.failures, self.fired, self.last_check = None, "not checked yet", 0, False, None


class CheckerSet:
    """The checkers of one module.

    on_failure(name, action, reason) is called once when a checker's consecutive failures reach its
    `failures` threshold (whatever its action, `none` included: the engine logs it), then not again
    until the checker was ok in between or `rearm` was called. on_recovered(name) is called when a
    checker that had fired is ok again. Both callbacks run on the event loop and must not block; an
    exception in them is logged and does not stop the checker.
    """

    def __init__(
        self,
        configs: Sequence[CheckerBase],
        on_failure: Callable[[str, CheckerAction, str], None],
        on_recovered: Callable[[str], None],
    ) -> None:
        self._tracks = [_Track(build_checker(config)) for config in configs]
        self._on_failure = on_failure
        self._on_recovered = on_recovered
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def start(self) -> None:
        """Start one task per checker; counts start from zero (a restart re-arms every checker)."""
        if self._tasks:
            return
        for track in self._tracks:
            track.reset()
            task = asyncio.create_task(self._watch(track), name=f"checker:{track.checker.name}")
            self._tasks.append(task)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def rearm(self, name: str | None = None) -> None:
        """Let a fired checker fire again at its next threshold without recovering first (for an engine
        that restarted the application without stopping the checkers)."""
        for track in self._tracks:
            if name is None or track.checker.name == name:
                track.failures, track.fired = 0, False

    def status(self) -> list[CheckerStatus]:
        now = time.monotonic()
        return [
            CheckerStatus(
                name=t.checker.name, type=t.checker.type, ok=t.ok, reason=t.reason,
                consecutive_failures=t.failures,
                last_check_ago=None if t.last_check is None else now - t.last_check,
                action=t.checker.config.action,
            )
            for t in self._tracks
        ]

    async def _watch(self, track: _Track) -> None:
        cfg = track.checker.config
        loop = asyncio.get_running_loop()
        await asyncio.sleep(cfg.start_delay)
        while True:
            began = loop.time()
            self._record(track, await track.checker.check())
            # A fixed cadence: a slow check does not stretch the interval between two checks' starts.
            await asyncio.sleep(max(0.0, cfg.interval - (loop.time() - began)))

    def _record(self, track: _Track, result: CheckResult) -> None:
        cfg = track.checker.config
        track.ok, track.reason, track.last_check = result.ok, result.reason, time.monotonic()
        if result.ok:
            if track.failures:
                log.info("checker %s ok again after %d failure(s): %s", cfg.name, track.failures, result.reason)
            track.failures = 0
            if track.fired:
                track.fired = False
                self._call(self._on_recovered, cfg.name)
            return
        track.failures += 1
        log.info("checker %s failed (%d/%d): %s", cfg.name, track.failures, cfg.failures, result.reason)
        if track.failures >= cfg.failures and not track.fired:
            track.fired = True
            log.warning("checker %s: %d consecutive failures, asking for %s: %s",
                        cfg.name, track.failures, cfg.action.value, result.reason)
            self._call(self._on_failure, cfg.name, cfg.action, result.reason)

    @staticmethod
    def _call(callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:  # a broken callback must not silence the checker
            log.exception("checker callback %r failed", callback)
