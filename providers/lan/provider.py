"""LAN virtual IP: the address on a local interface, announced to the neighbours.

Taking the VIP adds the address to the node's interface over netlink (IPv6 with `nodad`, so it works
at once even if a copy lingers on the old node, instead of ending `dadfailed`), then announces it:
gratuitous ARP for IPv4, unsolicited neighbour advertisement for IPv6. The kernel sends neither for
an address added this way, and without one the neighbours keep the old node's MAC for 30-45 s
(measured); with one they switch in 1-10 ms. The first announcement goes out before `take` returns,
the others `garp_interval` apart from a background task of the provider, in case one is lost.

A LAN node sees only its own interfaces: `holder()` answers this node's name or None, never another
node's.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import Field, StringConstraints
from pyroute2 import IPRoute, NetlinkError
from safekit_cloud.core.config import MINUTE, Duration

from ..base import (
    MoveResult,
    ProviderConfigError,
    ProviderError,
    ProviderPermissionError,
    ProviderRetryable,
    ProviderSettings,
    VipProvider,
)
from .announce import Announcer

log = logging.getLogger(__name__)
T = TypeVar("T")

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
IFA_F_NODAD = 0x02
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
# Kernel answers that say "not now" rather than "never": worth the base class's retries.
RETRYABLE_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ENOBUFS, errno.EINTR, errno.ETIMEDOUT, errno.ENOMEM}

InterfaceName = Annotated[str, StringConstraints(pattern=r"^[^/\s:]{1,15}$")]


class LanSettings(ProviderSettings):
    interface: InterfaceName = Field(description="Interface that carries the VIP on every node, e.g. eth0.")
    interfaces: dict[str, InterfaceName] = Field(
        default_factory=dict, description="Per-node override: node name -> interface.")
    garp_count: int = Field(3, ge=0, le=100, description=(
        "Gratuitous ARPs / unsolicited neighbour advertisements sent after a takeover (0: none)."))
    garp_interval: Annotated[float, Duration(high=MINUTE)] = Field(
        0.2, description="Seconds between two announcements.")

    def per_node_keys(self) -> list[str]:
        """Node names used as keys (validate_settings checks they are nodes of the cluster)."""
        return list(self.interfaces)


@dataclass(frozen=True)
class _Link:
    index: int
    name: str
    mac: str | None
    up: bool
    carrier: bool


class LanProvider(VipProvider):
    name: ClassVar[str] = "lan"
    settings_model: ClassVar[type[ProviderSettings]] = LanSettings
    # Irrelevant on a LAN, where only one node can see its own address anyway; the engine detaches on
    # the old node first when it can, because two nodes answering ARP for one address alternate.
    make_before_break: ClassVar[bool] = False
    # The neighbours switch on the first announcement, sent before take() returns.
    propagation_delay: ClassVar[float] = 0.0
    # Local kernel calls: failures that are worth retrying clear within milliseconds.
    deadline: ClassVar[float] = 10.0
    first_backoff: ClassVar[float] = 0.05
    max_backoff: ClassVar[float] = 1.0
    # Needs a gratuitous ARP / unsolicited NA after attaching (the kernel sends none).
    announces: ClassVar[bool] = True
    settings: LanSettings

    def __init__(self, vip: str, settings: ProviderSettings, node: str):
        super().__init__(vip, settings, node)
        self.address = ipaddress.ip_interface(vip)
        self.ip = self.address.ip
        self.ifname = self.settings.interfaces.get(node, self.settings.interface)
        self._setting = f"vip.interfaces.{node}" if node in self.settings.interfaces else "vip.interface"
        self._announcer = Announcer(self.ip)
        self._announcing: asyncio.Task[None] | None = None

    # ---- primitives ------------------------------------------------------------------------------

    async def _attach(self) -> None:
        link = await self._netlink("adding", self._attach_sync)
        if not link.up:
            log.warning("lan: %s added to interface %s of node %s, but the interface is down",
                        self.vip, self.ifname, self.node)
        await self._announce(link)

    async def _detach(self) -> None:
        self._stop_announcing()
        await self._netlink("removing", self._detach_sync)

    async def _holder(self) -> str | None:
        mine = await self._netlink("looking for", self._holder_sync)
        return self.node if mine else None

    async def _check(self) -> list[str]:
        problems = await self._netlink("checking", self._check_sync)
        try:
            self._announcer.open()
        except OSError as exc:
            problems.append(f"cannot open a raw socket for {self._announcement} on node {self.node}: "
                            f"{exc.strerror}: the daemon needs CAP_NET_RAW (run it as root)")
        return problems

    @classmethod
    def _detect(cls) -> bool:
        return True  # an interface and a broadcast domain exist everywhere

    async def take(self) -> MoveResult:
        result = await super().take()
        if not result.changed:
            # Already ours (a restarted daemon, a repeated takeover): neighbours may still point at the
            # other node, and an announcement costs nothing.
            try:
                await self._announce(await self._netlink("reading", self._link_sync))
            except ProviderError as exc:
                log.warning("lan: cannot announce %s: %s", self.vip, exc)
        return result

    async def close(self) -> None:
        task = self._stop_announcing()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        self._announcer.close()

    # ---- netlink, in a worker thread (pyroute2's IPRoute blocks) ---------------------------------

    async def _netlink(self, doing: str, call: Callable[[IPRoute], T]) -> T:
        def work() -> T:
            with IPRoute() as ipr:
                return call(ipr)
        try:
            return await asyncio.to_thread(work)
        except NetlinkError as exc:
            raise self._translate(doing, exc.code) from None
        except OSError as exc:
            raise self._translate(doing, exc.errno or 0) from None

    def _translate(self, doing: str, code: int) -> ProviderError:
        where = f"lan: {doing} {self.vip} (interface {self.ifname}, node {self.node})"
        reason = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
        if code in (errno.EPERM, errno.EACCES):
            return ProviderPermissionError(
                f"{where}: {reason}: the daemon needs CAP_NET_ADMIN (and CAP_NET_RAW for gratuitous "
                "ARP): run it as root or grant it those capabilities")
        if code == errno.ENODEV:
            return self._no_interface()
        if code in RETRYABLE_ERRNOS:
            return ProviderRetryable(f"{where}: {reason}")
        return ProviderError(f"{where}: {reason}")

    def _no_interface(self) -> ProviderConfigError:
        return ProviderConfigError(f"lan: interface {self.ifname} does not exist on node {self.node}: "
                                   f"fix {self._setting}")

    def _link_sync(self, ipr: IPRoute) -> _Link:
        link = self._find_link(ipr)
        if link is None:
            raise self._no_interface()
        return link

    def _find_link(self, ipr: IPRoute) -> _Link | None:
        try:
            msg = ipr.link("get", ifname=self.ifname)[0]
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise
        flags = msg["flags"]
        mac = msg.get("IFLA_ADDRESS")
        return _Link(msg["index"], self.ifname, mac, bool(flags & IFF_UP), bool(flags & IFF_LOWER_UP))

    def _entries(self, ipr: IPRoute, link: _Link) -> list[tuple[int, int]]:
        """(prefix length, flags) of each copy of the VIP on the interface, whatever its prefix."""
        family = socket.AF_INET if self.ip.version == 4 else socket.AF_INET6
        found = []
        for msg in ipr.addr("dump", index=link.index, family=family):
            text = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if text and ipaddress.ip_address(text) == self.ip:
                found.append((msg["prefixlen"], msg.get("IFA_FLAGS") or msg["flags"]))
        return found

    def _attach_sync(self, ipr: IPRoute) -> _Link:
        link = self._link_sync(ipr)
        entries = self._entries(ipr, link)
        if any(_usable(flags) for _, flags in entries):
            return link
        # A copy that failed duplicate address detection (or still runs it) never becomes usable:
        # replace it with a nodad one.
        for prefixlen, _ in entries:
            self._delete(ipr, link, prefixlen)
        spec: dict[str, Any] = {"index": link.index, "address": str(self.ip),
                                "prefixlen": self.address.network.prefixlen}
        if self.ip.version == 6:
            spec["flags"] = IFA_F_NODAD
        try:
            ipr.addr("add", **spec)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # added meanwhile by someone else: fine, it is there
                raise
        return link

    def _detach_sync(self, ipr: IPRoute) -> None:
        link = self._link_sync(ipr)
        for prefixlen, _ in self._entries(ipr, link):
            self._delete(ipr, link, prefixlen)

    def _delete(self, ipr: IPRoute, link: _Link, prefixlen: int) -> None:
        try:
            ipr.addr("del", index=link.index, address=str(self.ip), prefixlen=prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EADDRNOTAVAIL:  # already gone
                raise

    def _holder_sync(self, ipr: IPRoute) -> bool:
        return any(_usable(flags) for _, flags in self._entries(ipr, self._link_sync(ipr)))

    def _check_sync(self, ipr: IPRoute) -> list[str]:
        problems = []
        link = self._find_link(ipr)
        if link is None:
            problems.append(str(self._no_interface()))
        elif not link.up:
            problems.append(f"interface {self.ifname} on node {self.node} is down: bring it up "
                            f"(ip link set {self.ifname} up)")
        elif not link.carrier:
            problems.append(f"interface {self.ifname} on node {self.node} has no carrier: check its cable "
                            "or virtual switch")
        if not _has_capability(CAP_NET_ADMIN):
            problems.append(f"the daemon on node {self.node} lacks CAP_NET_ADMIN, needed to add {self.vip} "
                            f"to {self.ifname}: run it as root or grant the capability")
        return problems

    # ---- announcements ---------------------------------------------------------------------------

    @property
    def _announcement(self) -> str:
        return "gratuitous ARP" if self.ip.version == 4 else "unsolicited neighbour advertisements"

    async def _announce(self, link: _Link) -> None:
        """First announcement now; the rest from a background task (replacing any earlier one)."""
        self._stop_announcing()
        count = self.settings.garp_count
        if count == 0:
            return
        if not link.mac or link.mac == "00:00:00:00:00:00":
            log.debug("lan: %s has no link-layer address, nothing to announce", self.ifname)
            return
        self._send(link)
        if count > 1:
            self._announcing = asyncio.create_task(self._repeat(link, count - 1),
                                                   name=f"lan-announce {self.vip}")

    async def _repeat(self, link: _Link, remaining: int) -> None:
        try:
            for _ in range(remaining):
                await asyncio.sleep(self.settings.garp_interval)
                self._send(link)
        except Exception:  # a background task has nobody to raise to
            log.exception("lan: announcing %s failed", self.vip)

    def _send(self, link: _Link) -> None:
        try:
            self._announcer.send(link.name, link.index, link.mac or "")
        except PermissionError:
            log.error("lan: cannot send %s for %s on %s of node %s: the daemon needs CAP_NET_RAW; "
                      "neighbours keep the old node's MAC until their cache expires (about 30-45 s)",
                      self._announcement, self.vip, link.name, self.node)
        except OSError as exc:
            log.warning("lan: sending %s for %s on %s failed: %s",
                        self._announcement, self.vip, link.name, exc.strerror)

    def _stop_announcing(self) -> asyncio.Task[None] | None:
        task, self._announcing = self._announcing, None
        if task is not None and not task.done():
            task.cancel()
        return task


def _usable(flags: int) -> bool:
    return not flags & (IFA_F_DADFAILED | IFA_F_TENTATIVE)


def _has_capability(cap: int) -> bool:
    """Whether the calling thread holds `cap` in its effective set (CapEff in /proc)."""
    try:
        with open("/proc/thread-self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return True  # cannot tell: let the real call report it
