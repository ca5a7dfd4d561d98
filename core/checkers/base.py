"""The checker contract: one probe of one resource, bounded in time, answering ok or failed with a reason."""

from __future__ import annotations

import abc
import asyncio
import logging
from dataclasses import dataclass

from ..config import CheckerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str


class Checker(abc.ABC):
    """One configured checker. `check` is the template: it bounds `probe` by the configured timeout
    and turns any exception into a failed result, so a checker task never dies of a bad check."""

    def __init__(self, config: CheckerBase):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def type(self) -> str:
        return str(getattr(self.config, "type", type(self).__name__))

    @property
    def target(self) -> str:
        """What the check talks to, for a reason that has nothing else to name it ("" if nothing)."""
        return ""

    async def check(self) -> CheckResult:
        """Probe once. Never raises (except CancelledError); returns within `config.timeout`."""
        timeout = self.config.timeout
        try:
            return await asyncio.wait_for(self.probe(), timeout)
        except TimeoutError:
            return CheckResult(False, f"{self.target + ': ' if self.target else ''}no answer within {timeout:g}s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of the probe is a failed check, by contract
            log.debug("checker %s raised", self.name, exc_info=True)
            return CheckResult(False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

    @abc.abstractmethod
    async def probe(self) -> CheckResult:
        """Look at the resource once.

        Return CheckResult(ok, reason) where reason says what was seen ("connected to 127.0.0.1:80",
        "status 500, expected 200"). May raise any exception (reported as a failure) and is cancelled
        when it overruns the timeout: it must release what it holds (sockets, child processes) on
        cancellation.
        """
