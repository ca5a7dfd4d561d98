"""The node's engine: heartbeats with the peer, one ModuleRuntime per module, the Controller the API uses.

The heartbeat carries each module's announced state (state, data status, generation, intent) as a
msgspec payload; the engine decodes the newest one into a PeerView per module. It makes no decision.
"""

from __future__ import annotations

import asyncio
import logging
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from safekit_cloud.providers.base import VipProvider, create_provider

from safekit_cloud import __version__

from .config import ClusterConfig, ModuleConfig
from .decide import split_brain_with
from .decoding import DECODE_ERRORS
from .heartbeat import Heartbeat, Link
from .init import file_kind
from .module import HISTORY_KEPT, ModuleRuntime
from .status import CommandResult, ModuleOut, NetworkOut, NodeOut, PeerOut
from .types import DataStatus, Generation, Intent, ModuleState, PeerView

if TYPE_CHECKING:
    from .replication.service import ReplicationService

log = logging.getLogger(__name__)


class ModuleAnnounce(msgspec.Struct, array_like=True, frozen=True):
    """One module as a node describes it to its peer in every heartbeat."""

    name: str
    state: int
    data: str
    gen: int
    history: list[int]
    intent: str
    eligible: bool
    leaving: bool = False  # leaving the primary role (stop scripts running); missing (older peer): False


class Announce(msgspec.Struct, array_like=True, frozen=True):
    modules: list[ModuleAnnounce]
    # Whether the sender hears this beat's receiver (it is reachable on some network): lets a node
    # that hears its peer learn that the peer does not hear it. Missing (an older peer): True.
    hears_peer: bool = True


class EngineError(Exception):
    pass


_ANNOUNCE_ENCODER = msgspec.msgpack.Encoder()


def announce_payload(modules: list[dict[str, Any]], hears_peer: bool, max_size: int) -> bytes:
    """The heartbeat payload: every module (`announce_fields`) with the whole generation history it
    keeps, which the peer compares ancestry with (a list cut to 8 made a node that had started alone
    9 times look split from its peer); only if that does not fit a datagram (many modules), shorter."""
    payload = b""
    for keep in (HISTORY_KEPT, 8, 4, 1):
        payload = _ANNOUNCE_ENCODER.encode(Announce(
            [ModuleAnnounce(**(m | {"history": m["history"][:keep]})) for m in modules], hears_peer=hears_peer))
        if len(payload) <= max_size:
            break
    return payload


KEY_BYTES = 32
KEY_HOWTO = ("write 64 hex digits (32 random bytes) there, e.g. `openssl rand -hex 32 > FILE`, or let "
             "`safekit-cloud init` write one; the same file on both nodes")


def read_key(path: Path) -> bytes:
    """The cluster key: at least 32 bytes in hex, as `init` writes it (docs/configuration.md). Checked
    to be a regular file first, as the API token is: reading a FIFO blocks `run` for ever."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise EngineError(f"the cluster key {path} (heartbeat.key_file) is {file_kind(mode)}, not a regular "
                              f"file: {KEY_HOWTO}")
        data = path.read_bytes()
    except OSError as exc:
        raise EngineError(f"cannot read the cluster key {path}: {exc.strerror} "
                          f"(create one with `safekit-cloud init`, same file on both nodes)") from None
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise EngineError(f"the cluster key {path} is not hex text (byte {exc.start + 1} is not ASCII): "
                          f"{KEY_HOWTO}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise EngineError(f"the cluster key {path} is not hexadecimal: {KEY_HOWTO}") from None
    if len(key) < KEY_BYTES:
        raise EngineError(f"the cluster key {path} is too short ({len(key)} bytes, {KEY_BYTES} at least): "
                          f"{KEY_HOWTO}")
    return key


class Engine:
    """Implements status.Controller for the API."""

    def __init__(self, config: ClusterConfig, node: str, state_dir: Path, key: bytes):
        self.config = config
        self.node = node
        self.peer = config.peer_of(node)
        self.state_dir = state_dir
        self.started = time.monotonic()
        self._decoder = msgspec.msgpack.Decoder(Announce)
        self._announced: dict[str, ModuleAnnounce] = {}
        self._peer_deaf_since: float | None = None  # since when the peer says it does not hear us
        self._peer_deaf_reported = False  # ... and we took it as deaf (logged once)
        self._boot_tasks: set[asyncio.Task[CommandResult]] = set()
        me = config.node(node)
        links = [Link(net, me.addresses[net], self.peer.addresses[net]) for net in sorted(me.addresses)]
        hb = config.heartbeat
        self.heartbeat = Heartbeat(
            cluster=config.cluster.name, node=node, peer=self.peer.name, links=links, port=hb.port, key=key,
            interval=hb.interval, timeout=hb.timeout, replay_window=hb.replay_window,
            payload=self._payload, on_change=self._peer_changed,
        )
        self.key = key
        self.modules: dict[str, ModuleRuntime] = {
            m.name: ModuleRuntime(cluster=config, config=m, node=node, state_dir=state_dir,
                                  peer_view=self.peer_view, announce=self.heartbeat.beat_now,
                                  settle=self.heartbeat.settle,
                                  provider=self._provider(m), replication=self._replication)
            for m in config.modules
        }

    def _provider(self, module: ModuleConfig) -> VipProvider | None:
        if module.vip is None:
            return None
        return create_provider(module.vip.provider, module.vip.address, module.vip.settings, self.node,
                               [n.name for n in self.config.nodes])

    def _replication(self, module: ModuleConfig, on_lost: Callable[[str], None],
                     on_resync_done: Callable[[], None],
                     on_agent_failed: Callable[[str], None]) -> ReplicationService | None:
        """The module's replication service, or None when it replicates nothing."""
        if not module.replication.directories:
            return None
        from .replication.service import ReplicationService

        network = self.config.replication_network(module)
        return ReplicationService(
            module.name, module.replication, peer_address=self.peer.addresses[network], key=self.key,
            state_dir=self.state_dir / module.name / "replication", on_link_lost=on_lost,
            listen_address=self.config.node(self.node).addresses[network], timeout=module.replication.timeout,
            on_resync_done=on_resync_done, on_agent_failed=on_agent_failed,
        )

    # ---- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        for runtime in self.modules.values():
            if runtime.config.boot:
                runtime.mark_starting()  # the first heartbeat says so: STOP here is not an admin's stop
        await self.heartbeat.start()
        for runtime in self.modules.values():
            runtime.start()
        for name, runtime in self.modules.items():
            if runtime.config.boot:
                asyncio.get_running_loop().call_soon(self._boot, name)

    def _boot(self, name: str) -> None:
        task = asyncio.create_task(self.modules[name].command("start"))
        self._boot_tasks.add(task)
        task.add_done_callback(self._boot_tasks.discard)

    async def shutdown(self) -> None:
        """Daemon stop: stop every module cleanly (the peer takes over), tell the peer, close."""
        results = await asyncio.gather(*(m.command("stop") for m in self.modules.values()),
                                       return_exceptions=True)
        for name, result in zip(self.modules, results):
            if isinstance(result, BaseException):
                log.error("module %s: stop failed: %s", name, result)
        self.heartbeat.beat_now()
        await asyncio.sleep(min(0.2, self.config.heartbeat.interval))  # let the STOP beat leave
        await self.close()

    async def close(self) -> None:
        for task in list(self._boot_tasks):
            task.cancel()
        for runtime in self.modules.values():
            await runtime.close()
        await self.heartbeat.stop()

    # ---- heartbeat payload -----------------------------------------------------------------------

    def _payload(self) -> bytes:
        return announce_payload([m.announce_fields() for m in self.modules.values()],
                                self.heartbeat.peer_status().reachable, self.heartbeat.max_payload)

    def _peer_changed(self) -> None:
        status = self.heartbeat.peer_status()
        self._announced = {}
        hears_us = True
        if status.payload is not None:
            try:
                announce = self._decoder.decode(status.payload)
                self._announced = {m.name: m for m in announce.modules}
                hears_us = announce.hears_peer
            except DECODE_ERRORS as exc:
                # Authenticated but undecodable: a peer of another version. Treat its modules as unknown.
                log.warning("peer %s: unreadable module announcement (%s)", self.peer.name, exc)
        if hears_us or not status.reachable:
            # Counted only while we hear the peer: a beat caught as a partition began must not make
            # its first beat after the partition heals (sent before it hears us again) count as old.
            if self._peer_deaf_reported and status.reachable:
                log.info("heartbeat: %s hears this node again", self.peer.name)
            self._peer_deaf_since, self._peer_deaf_reported = None, False
        elif self._peer_deaf_since is None:
            self._peer_deaf_since = time.monotonic()
        for runtime in self.modules.values():
            runtime.peer_changed()

    def peer_hears_us(self) -> bool:
        """False once the peer has said for two heartbeat timeouts that it does not hear us: not
        at the first such beat, which a healing partition sends too (its two directions may come
        back a second apart, the time a neighbour entry takes to resolve again)."""
        since = self._peer_deaf_since
        if since is None or time.monotonic() - since < 2 * self.config.heartbeat.timeout:
            return True
        if not self._peer_deaf_reported:
            self._peer_deaf_reported = True
            log.warning("heartbeat: %s does not hear this node, which hears it, for %gs (heartbeats lost "
                        "one way)", self.peer.name, time.monotonic() - since)
        return False

    def peer_view(self, module: str) -> PeerView:
        status = self.heartbeat.peer_status()
        alive = tuple(n.network for n in status.networks if n.alive)
        preferred = self.config.module(module).preferred_primary == self.peer.name
        announced = self._announced.get(module) if status.reachable else None
        if announced is None:
            return PeerView(name=self.peer.name, reachable=status.reachable, preferred=preferred,
                            networks_alive=alive, eligible=False)
        try:
            return PeerView(
                name=self.peer.name, reachable=True, state=ModuleState(announced.state),
                data=DataStatus(announced.data), generation=Generation(announced.gen, tuple(announced.history)),
                intent=Intent(announced.intent), preferred=preferred, networks_alive=alive,
                eligible=announced.eligible, hears_us=self.peer_hears_us(), leaving=announced.leaving,
            )
        except ValueError as exc:
            log.warning("peer %s: module %s announced an unknown value (%s)", self.peer.name, module, exc)
            return PeerView(name=self.peer.name, reachable=True, preferred=preferred, networks_alive=alive,
                            eligible=False)

    # ---- Controller --------------------------------------------------------------------------------

    def module_names(self) -> list[str]:
        return list(self.modules)

    def serving(self, module: str) -> bool:
        return self.modules[module].serving

    def log_path(self, module: str) -> str:
        return str(self.modules[module].log_path)

    async def command(self, module: str, verb: str, fullsync: bool = False) -> CommandResult:
        return await self.modules[module].command(verb, fullsync=fullsync)

    async def verify(self, module: str) -> dict[str, Any]:
        """Compare the module's two replicas (on the primary). Raises VerifyError when it cannot run."""
        from .replication.verify import VerifyError

        replication = self.modules[module].replication
        if replication is None:
            raise VerifyError(f"module {module} replicates no directory")
        peer = self.peer_view(module)
        if self.modules[module].state.is_primary and peer.reachable and peer.state != ModuleState.SECOND:
            raise VerifyError(f"verify compares this primary with its secondary: {peer.name} is {peer.state.name}, "
                              f"not a secondary (`safekit-cloud status` on {peer.name} says why)")
        return await replication.verify()

    def status(self) -> NodeOut:
        hb = self.heartbeat.peer_status()
        peer = PeerOut(self.peer.name, hb.reachable, hb.incarnation,
                       [NetworkOut(n.network, n.alive, n.last_seen_ago, n.rtt_ms) for n in hb.networks])
        return NodeOut(
            schema_version=1, version=__version__, cluster=self.config.cluster.name, node=self.node,
            incarnation=self.heartbeat.incarnation, uptime=time.monotonic() - self.started, peer=peer,
            heartbeat=self.heartbeat.counters, modules=[self._module_out(m) for m in self.modules.values()],
        )

    def _module_out(self, m: ModuleRuntime) -> ModuleOut:
        peer = self.peer_view(m.config.name)
        vip = m.config.vip
        return ModuleOut(
            name=m.config.name, state=m.state.name, state_code=int(m.state), data=m.persisted.data.value,
            waiting_for=m.waiting_for, busy=m.busy, serving=m.serving,
            vip=vip.address if vip else None, vip_provider=vip.provider if vip else None,
            peer_state=peer.state.name if peer.reachable else None,
            peer_data=peer.data.value if peer.reachable else None,
            generation=f"{m.persisted.generation.current:016x}", restarts=len(m.restart_times),
            restart_limit=m.config.restart.limit, checkers=m.checker_status(), decisions=list(m.decisions),
            replication=m.replication.status() if m.replication is not None else None,
            resync_interrupted=m.persisted.resync_interrupted,
            split_brain=split_brain_with(m.local_view(), peer),
            becoming=m.becoming.name if m.becoming is not None else None,
        )
