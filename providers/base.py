"""The virtual-IP provider contract, its template methods, and the registry of providers.

A provider moves one virtual IP to the node that should receive traffic. The base class does what
every provider needs (deadline, retries with backoff and jitter on throttling, the "already mine"
check, a trace span, logging); each provider implements the small primitives `_attach`, `_detach`,
`_holder`, `_check` and `_detect`. SDK exceptions never leave a provider: they are translated into
the `ProviderError` family below, the only errors the engine catches.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger(__name__)
tracer = trace.get_tracer("safekit_cloud.providers")


class ProviderError(Exception):
    """A provider could not do what was asked. The message says what and what to do."""


class ProviderConfigError(ProviderError):
    """The provider's settings are wrong (caught at config load, or by `_check`)."""


class ProviderUnavailable(ProviderError):
    """The provider's SDK is not installed (`pip install safekit-cloud[aws]`)."""


class ProviderRetryable(ProviderError):
    """Throttling or a transient failure: the base class retries with backoff until the deadline."""


class ProviderPermissionError(ProviderError):
    """The node's identity lacks a permission the provider needs; names the permission."""


class ProviderSettings(BaseModel):
    """Base of every provider's settings model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class MoveResult:
    """What `take` or `release` did, for the log and the trace."""

    changed: bool  # False when the VIP already was where it should be
    attempts: int
    seconds: float
    detail: str = ""


class VipProvider(abc.ABC):
    """One virtual IP of one module, seen from one node.

    Quirks are class attributes so they read as data, each with the reason:
    """

    name: ClassVar[str]
    settings_model: ClassVar[type[ProviderSettings]]
    # Seconds the network takes to apply a change after the API said yes (clouds); the engine waits
    # that long before reporting the takeover done.
    propagation_delay: ClassVar[float] = 0.0
    # True: the new holder attaches before the old one detaches (routes); False: detach first
    # (an address cannot exist on two NICs at once).
    make_before_break: ClassVar[bool] = True
    # Whole budget of one take/release including retries.
    deadline: ClassVar[float] = 30.0
    first_backoff: ClassVar[float] = 0.2
    max_backoff: ClassVar[float] = 5.0

    def __init__(self, vip: str, settings: ProviderSettings, node: str):
        self.vip = vip
        self.settings = settings
        self.node = node

    # ---- the primitives each provider implements -------------------------------------------------

    @abc.abstractmethod
    async def _attach(self) -> None:
        """Make this node receive the VIP's traffic. Must be idempotent.

        Raise ProviderRetryable for throttling or transient faults, ProviderPermissionError when the
        identity lacks a right, ProviderError otherwise. Never let an SDK exception escape.
        """

    @abc.abstractmethod
    async def _detach(self) -> None:
        """Stop this node receiving the VIP's traffic, if it does. Idempotent; same errors as _attach."""

    @abc.abstractmethod
    async def _holder(self) -> str | None:
        """The node the VIP points at now: this node's name, another name, or None when nowhere or
        unknown. A read-only call; same errors as _attach."""

    @abc.abstractmethod
    async def _check(self) -> list[str]:
        """Dry run: the resources and permissions a takeover needs. Returns one line per problem."""

    @classmethod
    @abc.abstractmethod
    def _detect(cls) -> bool:
        """True when this host runs where this provider works (the cloud's metadata answers, ...)."""

    async def close(self) -> None:
        """Release sockets and clients. The default has nothing to release."""

    # ---- the template methods the engine calls ---------------------------------------------------

    async def take(self) -> MoveResult:
        """Point the VIP at this node, retrying transient failures until `deadline`."""
        return await self._move("take", self._attach, want_mine=True)

    async def release(self) -> MoveResult:
        """Stop serving the VIP on this node (nothing to do if it is elsewhere)."""
        return await self._move("release", self._detach, want_mine=False)

    async def holder(self) -> str | None:
        return await self._with_retries("holder", self._holder)

    async def check(self) -> list[str]:
        return await self._with_retries("check", self._check)

    async def _move(self, verb: str, primitive: Any, want_mine: bool) -> MoveResult:
        started = time.monotonic()
        with tracer.start_as_current_span(f"vip.{verb}") as span:
            span.set_attribute("vip.provider", self.name)
            span.set_attribute("vip.address", self.vip)
            span.set_attribute("node", self.node)
            already = await self._already(want_mine)
            if already:
                span.set_attribute("vip.changed", False)
                return MoveResult(False, 0, time.monotonic() - started, "already in place")
            attempts = await self._with_retries(verb, primitive, count_attempts=True)
            if want_mine and self.propagation_delay:
                await asyncio.sleep(self.propagation_delay)
            span.set_attribute("vip.changed", True)
            result = MoveResult(True, attempts, time.monotonic() - started)
            log.info("vip %s %s on %s: done in %.3fs (%d attempt(s))",
                     self.vip, verb, self.node, result.seconds, attempts)
            return result

    async def _already(self, want_mine: bool) -> bool:
        """Idempotence: skip the change when the VIP is already where it should be."""
        try:
            current = await self._holder()
        except ProviderError as exc:
            log.debug("holder check failed, moving anyway: %s", exc)
            return False
        return (current == self.node) if want_mine else (current != self.node)

    async def _with_retries(self, verb: str, call: Any, count_attempts: bool = False) -> Any:
        deadline = time.monotonic() + self.deadline
        backoff = self.first_backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await asyncio.wait_for(call(), max(0.1, deadline - time.monotonic()))
                return attempt if count_attempts else result
            except ProviderRetryable as exc:
                pause = min(backoff, self.max_backoff) * random.uniform(0.5, 1.5)
                if time.monotonic() + pause >= deadline:
                    raise ProviderError(f"{self.name}: {verb} of {self.vip} still failing after "
                                        f"{attempt} attempts: {exc}") from None
                log.warning("%s: %s of %s failed (%s), retry in %.2fs", self.name, verb, self.vip, exc, pause)
                await asyncio.sleep(pause)
                backoff *= 2
            except TimeoutError:
                raise ProviderError(f"{self.name}: {verb} of {self.vip} did not finish within "
                                    f"{self.deadline:g}s") from None


# ---- registry: explicit, lazy ------------------------------------------------------------------

@dataclass(frozen=True)
class RegistryEntry:
    module: str
    cls: str
    extra: str  # the pip extra that brings the SDK


REGISTRY: dict[str, RegistryEntry] = {
    "lan": RegistryEntry("safekit_cloud.providers.lan.provider", "LanProvider", ""),
    "fake": RegistryEntry("safekit_cloud.providers.fake", "FakeProvider", ""),
    "aws": RegistryEntry("safekit_cloud.providers.aws.provider", "AwsProvider", "aws"),
    "gcp": RegistryEntry("safekit_cloud.providers.gcp.provider", "GcpProvider", "gcp"),
    "azure": RegistryEntry("safekit_cloud.providers.azure.provider", "AzureProvider", "azure"),
}


def provider_class(name: str) -> type[VipProvider]:
    entry = REGISTRY.get(name)
    if entry is None:
        raise ProviderConfigError(f"unknown provider {name!r} (known: {', '.join(sorted(REGISTRY))})")
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        if entry.module.startswith(getattr(exc, "name", None) or "\0"):
            raise ProviderUnavailable(f"provider {name!r} is not available in this version") from None
        hint = f"pip install 'safekit-cloud[{entry.extra}]'" if entry.extra else "reinstall safekit-cloud"
        raise ProviderUnavailable(f"provider {name!r} needs a missing package ({exc.name}): {hint}") from None
    return getattr(module, entry.cls)


def _format_errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )


def validate_settings(name: str, settings: dict[str, Any], nodes: list[str]) -> ProviderSettings:
    cls = provider_class(name)
    try:
        parsed = cls.settings_model(**settings)
    except ValidationError as exc:
        raise ProviderConfigError(_format_errors(exc)) from None
    for node_key in getattr(parsed, "per_node_keys", list)():
        if node_key not in nodes:
            raise ProviderConfigError(f"{node_key!r} is not a node of the cluster ({nodes})")
    return parsed


def create_provider(name: str, vip: str, settings: dict[str, Any], node: str, nodes: list[str]) -> VipProvider:
    cls = provider_class(name)
    return cls(vip, validate_settings(name, settings, nodes), node)
