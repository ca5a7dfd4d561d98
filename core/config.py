"""The cluster file: pydantic models, YAML loading with line numbers, `SAFEKIT_*` overrides.

`load_config` returns a validated `ClusterConfig` or raises `ConfigError` listing *every* problem with
its YAML path, line and a hint. Providers validate their own `vip` settings through the registry.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import os
import re
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import CoreSchema, PydanticCustomError, core_schema
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from .replication.exclude import check_pattern
from .types import CheckerAction

DEFAULT_CONFIG_PATH = Path("/etc/safekit-cloud/cluster.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/safekit-cloud")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
# RFC 1123 labels, plus "_": resolvers accept it and container service names use it.
HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def normal_path(path: str | PurePath) -> Path:
    """One spelling per place: `//srv` and `/srv//data/` are /srv and /srv/data on Linux (pathlib keeps
    a leading `//`, which POSIX leaves to the system)."""
    return Path("/" + str(path).lstrip("/")) if str(path).startswith("/") else Path(path)


def _absolute_path(value: Any) -> Any:
    """A configured file or directory: absolute (the daemon's working directory is arbitrary), without
    NUL (the system calls would fail), `//` and repeated slashes collapsed (one spelling per place)."""
    if not isinstance(value, (str, PurePath)):
        return value  # pydantic reports the wrong type
    text = str(value)
    if "\0" in text:
        raise ValueError(f"{text!r} holds a NUL byte: no file name can")
    if not text.startswith("/"):
        raise ValueError(f"{text!r} must be an absolute path (starting with /): the daemon's working "
                         "directory is arbitrary")
    return normal_path(text)


AbsolutePath = Annotated[Path, BeforeValidator(_absolute_path)]


def is_host(value: str) -> bool:
    """An IP address, or a host name of RFC 1123 labels and "_" (never a leading "-": it would pass for an
    option of ping); an all-numeric last label is a mistyped IPv4 address, not a name."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    name = value.removesuffix(".")  # a fully qualified name may end with a dot
    labels = name.split(".")
    return (0 < len(name) <= 253 and all(HOST_LABEL.fullmatch(label) for label in labels)
            and not labels[-1].isdigit())


def _check_host(value: str) -> str:
    if not is_host(value):
        raise ValueError(f"{value!r} is neither an IP address nor a host name (dot-separated labels of "
                         "letters, digits, '-' and '_', not starting with '-')")
    return value


MINUTE, DAY = 60.0, 86400.0
_SPANS = {MINUTE: " (a minute)", DAY: " (a day)", 7 * DAY: " (a week)", 365 * DAY: " (a year)"}


@dataclass(frozen=True)
class Duration:
    """The range of a duration, as pydantic metadata: `Annotated[float, Duration(...)]`; every duration
    of the cluster file has one, and the CLI's timeout options check theirs with it too.

    Finite: pydantic's float takes inf and nan, and a timeout of inf overflows ping's -W, asyncio and
    aiohttp at run time, while nan fails every comparison (its error named whichever bound came
    first). Above `low` (from it when `low_ok`: 0 means "never" or "no delay" for some), up to `high`:
    a day unless the field or its tool needs less."""

    high: float = DAY
    low: float = 0.0
    low_ok: bool = False
    unit: str = "seconds"

    @property
    def span(self) -> str:
        """"seconds above 0, up to 86400 (a day)": what the reference and the messages say."""
        low = f"from {_number(self.low)}" if self.low_ok else f"above {_number(self.low)},"
        return f"{self.unit} {low} up to {_number(self.high)}{_SPANS.get(self.high, '')}"

    @property
    def rule(self) -> str:
        return f"a number of {self.span}"

    def problem(self, value: float) -> str | None:
        """What is wrong with `value` ("is not a finite number", "is out of range"), or None."""
        if not math.isfinite(value):
            return "is not a finite number"
        if value < self.low or (value == self.low and not self.low_ok) or value > self.high:
            return "is out of range"
        return None

    def _check(self, value: float | None) -> float | None:
        if value is not None and (problem := self.problem(value)) is not None:
            raise ValueError(f"{_number(value)} {problem}: write {self.rule}")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))


def _number(value: float) -> str:
    """31536000, not 3.1536e+07 (:g); but 1e+300, not 301 digits."""
    value = float(value)  # the bounds may be ints
    return f"{value:.0f}" if value.is_integer() and abs(value) < 1e15 else f"{value:g}"


PositiveSeconds = Annotated[float, Duration()]  # the common case: above 0, up to a day
_NUMBERS = (int, float, int | None, float | None)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_truth_for_a_number(cls, data: Any) -> Any:
        # pydantic takes true as 1, and YAML reads yes/no/on/off as booleans: `port: yes` became port 1.
        # (A model validator: a field validator for every field would also run on the checkers' tag.)
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if isinstance(data.get(name), bool) and field.annotation in _NUMBERS:
                    raise ValueError(f"{name}: {str(data[name]).lower()} is a boolean, not a number (YAML "
                                     "reads yes, no, on and off as booleans): write a number")
        return data


class NodeConfig(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Node name, unique in the cluster.")
    addresses: dict[str, str] = Field(
        description="IP address of this node on each heartbeat network, by network name "
        "(a plain string means the network `default`). The two nodes' addresses differ, and on one "
        "network both are IPv4 or both IPv6.",
    )

    @field_validator("addresses", mode="before")
    @classmethod
    def _plain_address(cls, value: Any) -> Any:
        return {"default": value} if isinstance(value, str) else value

    @field_validator("addresses")
    @classmethod
    def _valid_ips(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("a node needs at least one address")
        for net, addr in value.items():
            try:
                ip = ipaddress.ip_address(addr)
            except ValueError:
                raise ValueError(f"network {net!r}: {addr!r} is not an IPv4 or IPv6 address") from None
            if ip.is_unspecified or ip.is_multicast or ip == BROADCAST:
                raise ValueError(f"network {net!r}: {addr} is not a node's own address (unspecified, "
                                 "multicast or broadcast): write the address of its interface on that network")
        return value


class HeartbeatConfig(Strict):
    port: int = Field(4800, ge=1, le=65535, description="UDP port of the heartbeats, on every network.")
    interval: Annotated[float, Duration(high=10, low=0.1, low_ok=True)] = Field(
        0.5, description="Seconds between two heartbeats."
    )
    timeout: Annotated[float, Duration(high=120, low=0.5, low_ok=True)] = Field(
        3.0, description="Seconds of silence on every network before the peer is lost."
    )
    key_file: AbsolutePath = Field(
        Path("/etc/safekit-cloud/cluster.key"),
        description="Absolute path of the cluster key (64 hex digits: 32 random bytes; a longer key works, a shorter one is refused) authenticating heartbeats and replication (and encrypting the replication stream); "
        "`safekit-cloud init` writes one.",
    )
    replay_window: int = Field(64, ge=8, le=4096, description="Out-of-order datagrams accepted per peer.")

    @model_validator(mode="after")
    def _timing(self) -> HeartbeatConfig:
        if self.timeout < 3 * self.interval:
            raise ValueError(
                f"timeout {self.timeout}s is less than 3 heartbeat intervals ({3 * self.interval:g}s): "
                "one lost datagram would cause a failover; raise timeout or lower interval"
            )
        return self


class TLSConfig(Strict):
    cert_file: AbsolutePath = Field(description="Absolute path of the PEM certificate of the API.")
    key_file: AbsolutePath = Field(description="Absolute path of the PEM private key of the API.")


class ApiConfig(Strict):
    listen: str = Field(
        "127.0.0.1:9010", description="host:port of the admin API of each node: an IP address (IPv6 in "
        "brackets, [::1]:9010) or a host name, and a TCP port no replicated module uses.",
    )
    token_file: AbsolutePath = Field(
        Path("/etc/safekit-cloud/api.token"), description="Absolute path of the bearer token of the admin API."
    )
    tls: TLSConfig | None = Field(None, description="Serve the API over HTTPS with this certificate.")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not _port_digits(port) or not 0 < int(port) < 65536:
            shown = value if len(value) <= 80 else value[:77] + "..."
            raise ValueError(f"{shown!r} is not host:port with a port from 1 to 65535 (for example 127.0.0.1:9010)")
        if host.startswith("[") and host.endswith("]"):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                raise ValueError(f"{host} is not an IPv6 address (brackets are for those)") from None
        elif ":" in host:
            raise ValueError(f"{value!r}: write an IPv6 address in brackets, as in [::1]:9010")
        elif not is_host(host):
            raise ValueError(f"{host!r} is neither an IP address nor a host name (for example "
                             "127.0.0.1:9010 or [::1]:9010)")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class VipConfig(Strict):
    """The virtual IP of a module. Everything but `provider` and `address` belongs to the provider."""

    model_config = ConfigDict(extra="allow", frozen=True)
    provider: str = Field("lan", description="lan or fake (aws, gcp and azure: names reserved for the cloud "
                          "providers, refused by this version).")
    address: str = Field(
        description="Virtual IP with its prefix length, e.g. 198.18.0.100/24: a unicast host address of "
                    "that prefix, neither a node's address nor another module's virtual IP.",
    )

    @field_validator("address")
    @classmethod
    def _interface_address(cls, value: str) -> str:
        try:
            interface = ipaddress.ip_interface(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an address with prefix (e.g. 198.18.0.100/24)") from None
        ip, network = interface.ip, interface.network
        kinds = [(ip.is_unspecified, "unspecified"), (ip.is_loopback, "a loopback address"),
                 (ip.is_multicast, "a multicast address"), (ip == BROADCAST, "the broadcast address")]
        # /31, /32 (IPv6: /127, /128) have no network nor broadcast address: every address is a host's.
        if network.prefixlen < ip.max_prefixlen - 1:
            kinds.append((ip == network.network_address, f"the network address of {network}"))
            if ip.version == 4:
                kinds.append((ip == network.broadcast_address, f"the broadcast address of {network}"))
        for bad, kind in kinds:
            if bad:
                raise ValueError(f"{ip} is {kind}: a virtual IP must be a host address clients can reach "
                                 "(e.g. 198.18.0.100/24)")
        return value if "/" in value else value + ("/128" if ":" in value else "/32")

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CheckerBase(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Checker name, unique in the module.")
    interval: PositiveSeconds = Field(5.0, description="Seconds between two checks.")
    timeout: PositiveSeconds = Field(5.0, description="Seconds one check may take before it counts as failed.")
    failures: int = Field(3, ge=1, description="Consecutive failures before the action is taken.")
    action: CheckerAction = Field(CheckerAction.RESTART, description="restart, stopstart, wait or none.")
    start_delay: Annotated[float, Duration(low_ok=True)] = Field(
        0.0, description="Seconds after start_prim before the first check."
    )


class ProcessChecker(CheckerBase):
    type: Literal["process"] = Field(description="Watch a process.")
    process_name: str | None = Field(None, description="Exact process name (comm).")
    pid_file: AbsolutePath | None = Field(
        None, description="Absolute path of the file holding the pid of the process to watch."
    )
    cmdline_regex: str | None = Field(None, description="Regular expression searched in the command line.")

    @model_validator(mode="after")
    def _one_selector(self) -> ProcessChecker:
        chosen = [x for x in (self.process_name, self.pid_file, self.cmdline_regex) if x is not None]
        if len(chosen) != 1:
            raise ValueError("give exactly one of process_name, pid_file, cmdline_regex")
        if self.cmdline_regex is not None:
            try:
                pattern = re.compile(self.cmdline_regex)
            except re.error as exc:
                raise ValueError(f"cmdline_regex: {exc}") from None
            if pattern.search(""):  # "", ".*", "x?": every process matches, pid 1 included
                raise ValueError(f"cmdline_regex {self.cmdline_regex!r} matches any command line, so the check "
                                 "could never fail: write what only the application's command line holds")
        if self.process_name is not None and ("/" in self.process_name or not self.process_name.strip()):
            raise ValueError(f"process_name {self.process_name!r} is not a process name: write the program's "
                             "name as ps -o comm shows it (nginx, not /usr/sbin/nginx)")
        return self


class TcpChecker(CheckerBase):
    type: Literal["tcp"] = Field(description="Connect to a TCP port.")
    host: str = Field("127.0.0.1", description="IP address or host name to connect to.")
    port: int = Field(ge=1, le=65535, description="Port to connect to.")

    _host = field_validator("host")(_check_host)


class HttpChecker(CheckerBase):
    type: Literal["http"] = Field(description="GET a URL.")
    url: str = Field(pattern=r"^https?://", description="URL to GET: http(s)://HOST[:PORT]/PATH.")
    expect_status: int = Field(200, ge=100, le=599, description="HTTP status the answer must have.")
    body_regex: str | None = Field(
        None, description="The body must match this regular expression (Python syntax, searched)."
    )
    verify_tls: bool = Field(True, description="Check the server certificate for https URLs.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError(f"{value!r} holds a space or a control character: percent-encode it (%20)")
        parts = urllib.parse.urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            port = 0
        if not parts.hostname:
            raise ValueError(f"{value!r} has no host: write http://HOST[:PORT]/PATH "
                             "(e.g. http://127.0.0.1:8080/health)")
        if port == 0:
            raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
        _check_host(parts.hostname)
        return value

    @field_validator("body_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class CommandChecker(CheckerBase):
    type: Literal["command"] = Field(description="Run a command.")
    command: list[str] = Field(
        min_length=1, description="argv: the program (a path, or a name looked up in PATH), then its "
                                  "arguments; exit code 0 means ok.",
    )

    @field_validator("command")
    @classmethod
    def _argv(cls, value: list[str]) -> list[str]:
        if not value[0].strip():
            raise ValueError("the program (the first item) is empty: write the command to run, e.g. "
                             "[/usr/bin/pg_isready, -q]")
        for i, arg in enumerate(value):
            if "\0" in arg:
                raise ValueError(f"item {i} holds a NUL byte: no command argument can")
        return value


CheckerConfig = Annotated[
    ProcessChecker | TcpChecker | HttpChecker | CommandChecker, Field(discriminator="type")
]


class WitnessConfig(Strict):
    """A split-brain guard: a secondary that reaches no witness does not take over."""

    type: Literal["ping", "tcp"] = Field("ping", description="ping (ICMP echo) or tcp (connect).")
    address: str = Field(
        description="The witness (a router, a gateway, a third machine): an IP address or a host name."
    )
    port: int | None = Field(None, ge=1, le=65535, description="For tcp witnesses.")
    # A minute at most: a secondary that lost its peer waits for the witnesses before it takes over.
    timeout: Annotated[float, Duration(high=MINUTE)] = Field(
        1.0, description="Seconds to wait for its answer (the takeover waits for it)."
    )

    _address = field_validator("address")(_check_host)

    @model_validator(mode="after")
    def _port_for_tcp(self) -> WitnessConfig:
        if self.type == "tcp" and self.port is None:
            raise ValueError("a tcp witness needs a port")
        return self


class RestartPolicy(Strict):
    limit: int = Field(3, ge=0, description="Local restarts allowed within the window (SafeKit: 3).")
    window: Annotated[float, Duration(high=7 * DAY)] = Field(
        86400.0, description="Seconds the restart count looks back (24 h)."
    )


class ScriptsConfig(Strict):
    directory: AbsolutePath | None = Field(
        None, description="Absolute path of the folder holding prestart, start_prim, stop_prim, ... (missing ones are skipped)."
    )
    timeout: PositiveSeconds = Field(120.0, description="Seconds a script may run before its group is killed.")
    stop_timeout: PositiveSeconds = Field(60.0, description="The same for stop scripts.")


# Kernel file systems: nothing of an application's data lives there, and a mount over them breaks the node.
VIRTUAL_TOPS = frozenset({"proc", "sys", "dev"})
# The system's own directories: replicated, they would be read-only on the secondary (its system
# could no longer write there) and replaced by the other node's at a failover (its identity and
# network settings with them). Their subdirectories (/etc/myapp, /var/lib/app) are fine.
SYSTEM_DIRECTORIES = frozenset(Path(p) for p in (
    "/bin", "/boot", "/etc", "/lib", "/lib32", "/lib64", "/root", "/run", "/sbin", "/tmp", "/usr",
    "/usr/local", "/var", "/var/cache", "/var/lib", "/var/log", "/var/spool", "/var/tmp",
))


def overlapping(a: Path, b: Path) -> bool:
    """The same directory, or one inside the other."""
    return a == b or a in b.parents or b in a.parents


def _relative_fix(pattern: str, path: Path, directory: Path) -> str:
    """Why an exclude pattern spelling an absolute path under a replicated directory matches nothing,
    and how to write it."""
    if path == directory:
        return f"{pattern!r} is the replicated directory itself: leave it out of `directories` instead"
    rest = str(path.relative_to(directory)) + ("/" if pattern.endswith("/") else "")
    fix = f"write /{rest} (that path from its root)"
    name = rest.rstrip("/")
    if "/" not in name:  # one name: it may also be meant at any depth
        fix += f" or {name}/ (every directory {name})"
    return f"{pattern!r} is under {directory}, but patterns are relative to the replicated directory: {fix}"


class ReplicationConfig(Strict):
    directories: list[AbsolutePath] = Field(
        default_factory=list,
        description="Absolute paths replicated: the application's data directories. None may be inside another, "
                    "in this module or another one (exclude leaves parts of a tree out); not / nor below /proc, "
                    "/sys, /dev, nor a system directory itself (/etc, /usr, /var, /var/lib, /tmp, ...: their "
                    "subdirectories are fine).",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description='Patterns not replicated, relative to each replicated directory: "tmp/" a directory '
                    'tmp at any depth, "*.tmp" any entry so named, "/cache" or "cache/*.bin" a path from '
                    "the directory's root.",
    )
    protocol: Literal["A", "B", "C"] = Field("C", description="C: synchronous (applied on the peer); B: received; A: asynchronous.")
    port: int = Field(
        4801, ge=1, le=65535, description="TCP port of the replication stream: each replicated module its own, "
                                          "distinct from heartbeat.port and the api.listen port.",
    )
    network: str | None = Field(
        None, description="Heartbeat network whose addresses carry the stream (default: the first listed)."
    )
    timeout: PositiveSeconds = Field(
        10.0, description="Seconds without an acknowledgement before the primary continues alone. Also: a "
                          "primary whose first resync holds the application's writes this long starts a new "
                          "generation, and writes held three times this long go on even if the secondary never "
                          "confirmed (docs/replication.md, holding writes)."
    )
    journal_block: int = Field(
        4096, ge=512, le=1 << 20,
        description="Bytes per journal block while the primary is alone: a write marks the blocks it touches "
                    "and the resync resends them whole (4096 matches page-sized writes; larger blocks mean a "
                    "smaller journal but more bytes resent for scattered small writes). A power of two.",
    )
    busy_poll_us: Annotated[float, Duration(high=10_000, low_ok=True, unit="microseconds")] = Field(
        200,
        description="Longest time, in microseconds, a replication agent polls for the peer's answer or the next "
                    "request before it sleeps: cuts the latency of each synchronous write (a wake-up costs more "
                    "than the work) for some CPU while writes stream. Adaptive: a quiet stream stops polling. "
                    "0: never poll.",
    )
    agent_timeout: Annotated[float, Duration(low_ok=True)] = Field(
        120,
        description="Seconds a replication agent may go without a status line (one a second) before it is "
                    "taken for hung: its mount is aborted (the application's calls fail instead of waiting), "
                    "it is killed and the module restarts it. An fsync holds the agent meanwhile: keep it "
                    "above the longest one the disk may take (the dirty page cache written at the disk's "
                    "speed: 12 GB at 150 MB/s is 80 s); 0: never.",
    )
    resync_bandwidth: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Cap on the resync's file data, in MB/s (token bucket); none: as fast as the link goes. "
                    "Synchronous replication of the application's own writes is never capped.",
    )

    @field_validator("journal_block")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"{value} is not a power of two")
        return value

    @field_validator("directories")
    @classmethod
    def _directories(cls, value: list[Path]) -> list[Path]:
        problems = []  # every one at once, as for the rest of the file
        for path in value:
            if ".." in path.parts:
                problems.append(f"{path} has a '..' component: write the directory's own path")
            elif path == Path("/") or path.parts[1] in VIRTUAL_TOPS:
                problems.append(f"{path} cannot be replicated: name the application's own data directories")
            elif path in SYSTEM_DIRECTORIES:
                problems.append(f"{path} is a system directory: replicated, it would be read-only on the secondary "
                                "and replaced by the other node's at a failover; name the application's own "
                                f"directories inside it (e.g. {path}/app)")
        for i, path in enumerate(value):
            for other in value[:i]:
                if overlapping(path, other):
                    problems.append(f"{path} and {other} overlap: list the outer one only (its whole tree is "
                                    "replicated; leave parts out with exclude)")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, value: list[str], info: ValidationInfo) -> list[str]:
        directories = info.data.get("directories", [])  # absent when they are invalid themselves
        problems = []
        for i, pattern in enumerate(value):
            try:
                check_pattern(pattern)
            except ValueError as exc:
                problems.append(f"[{i}]: {exc}")
                continue
            # "/x" anchors x at the replicated root; a pattern spelling a replicated directory's own
            # absolute path would match nothing (there is no srv/data inside /srv/data).
            path = normal_path(pattern)
            inside = next((d for d in directories if d == path or d in path.parents), None)
            if path.is_absolute() and inside is not None:
                problems.append(f"[{i}]: {_relative_fix(pattern, path, inside)}")
        if problems:
            raise ValueError("; ".join(problems))
        return value


class ModuleConfig(Strict):
    """One protected application: its virtual IP, scripts, checkers and replicated directories."""

    name: str = Field(pattern=NAME_PATTERN, description="Module name (`-m` on the command line).")
    mode: Literal["mirror"] = Field("mirror", description="mirror: one primary, one secondary.")
    boot: bool = Field(True, description="`run` starts this module.")
    preferred_primary: str | None = Field(None, description="Node that becomes primary when both start.")
    failback: bool = Field(False, description="Return the primary role to preferred_primary automatically.")
    startup_wait: Annotated[float | None, Duration(low_ok=True)] = Field(
        None, description="Seconds to wait for the peer at start (default: the heartbeat timeout)."
    )
    split_brain: Literal["manual", "keep-preferred"] = Field(
        "manual", description="After both nodes were primary: wait for an admin, or keep the preferred."
    )
    vip: VipConfig | None = Field(None, description="The virtual IP clients use; none: no address moves.")
    scripts: ScriptsConfig = Field(ScriptsConfig(), description="The start and stop scripts of the application.")
    checkers: list[CheckerConfig] = Field(default_factory=list, description="Watch the application on the primary.")
    witnesses: list[WitnessConfig] = Field(
        default_factory=list, description="Split-brain guard: a secondary takes over only if one answers."
    )
    restart: RestartPolicy = Field(RestartPolicy(), description="How often checkers may restart the application.")
    replication: ReplicationConfig = Field(ReplicationConfig(), description="Directories replicated to the peer.")


class ClusterInfo(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Cluster name; heartbeats of other clusters are dropped.")


class ClusterConfig(BaseSettings):
    """The whole cluster file. Environment variables SAFEKIT_<SECTION>__<KEY> override it."""

    # BaseSettings for its reading of SAFEKIT_* (EnvSettingsSource); parse_config lays those over the
    # file itself (`_overlay`), which can reach into lists (SAFEKIT_MODULES__0__NAME): pydantic-settings'
    # own merge replaced the file's list with the variables' {"0": ...} mapping.

    model_config = SettingsConfigDict(
        env_prefix="SAFEKIT_", env_nested_delimiter="__", extra="forbid", frozen=True
    )
    cluster: ClusterInfo = Field(description="Cluster identity (its name is part of every heartbeat).")
    nodes: list[NodeConfig] = Field(min_length=2, max_length=2, description="The two nodes of a mirror.")
    heartbeat: HeartbeatConfig = Field(HeartbeatConfig(), description="Failure detection between the nodes.")
    api: ApiConfig = Field(ApiConfig(), description="The local admin API the CLI talks to.")
    modules: list[ModuleConfig] = Field(min_length=1, description="The applications this cluster protects.")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)

    @model_validator(mode="after")
    def _cross_checks(self) -> ClusterConfig:
        problems = cross_check(self.model_dump())
        if problems:
            # A distinct error type: parse_config reports these rules itself, one line per problem.
            text = "; ".join(f"{_format_loc(loc)}: {msg}" for loc, msg in problems)
            raise PydanticCustomError(CROSS_CHECK, "{problems}", {"problems": text})
        return self

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def peer_of(self, name: str) -> NodeConfig:
        return next(n for n in self.nodes if n.name != name)

    def module(self, name: str) -> ModuleConfig:
        for module in self.modules:
            if module.name == name:
                return module
        raise KeyError(name)

    @property
    def networks(self) -> list[str]:
        return sorted(self.nodes[0].addresses)

    def replication_network(self, module: ModuleConfig) -> str:
        """The network carrying a module's replication stream: configured, else the first listed."""
        return module.replication.network or next(iter(self.nodes[0].addresses))


Loc = tuple[Any, ...]  # a YAML path: keys and list indices
CROSS_CHECK = "cross_check"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _entries(value: Any) -> list[tuple[int, dict[str, Any]]]:
    """The mappings of a YAML list with their indices (anything else is left to field validation)."""
    return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)] if isinstance(value, list) else []


def _int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _port_digits(value.strip()):
        return int(value)
    return None


def _port_digits(text: str) -> bool:
    """ASCII digits, few enough for a port: int() of thousands of digits raises a ValueError about
    Python's own limits (field validation says what is wrong with the value)."""
    return text.isascii() and text.isdigit() and len(text) <= 5


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(value: Any) -> IPAddress | None:
    """The IP of an address (with or without prefix); None when it does not parse (field validation says why)."""
    try:
        return ipaddress.ip_interface(value).ip if isinstance(value, str) else None
    except ValueError:
        return None


def _duplicates(items: list[tuple[Loc, Any]], what: str) -> list[tuple[Loc, str]]:
    """One problem per repeated name, at the repetition."""
    first: dict[Any, Loc] = {}
    problems = []
    for loc, name in items:
        if not isinstance(name, str):
            continue
        if name in first:
            where = _format_loc(first[name][:-1])
            problems.append((loc, f"{name!r} is already the name of {where}: {what} must be unique"))
        else:
            first[name] = loc
    return problems


def cross_check(data: dict[str, Any]) -> list[tuple[Loc, str]]:
    """Rules spanning sections, as (YAML path, message) pairs.

    Works on plain data: a validated config's `model_dump()`, or the raw YAML mapping when some fields
    are invalid (pydantic then skips model validators). Missing or malformed parts are skipped: field
    validation reports them; defaults are the models' own.
    """
    problems: list[tuple[Loc, str]] = []
    nodes = _entries(data.get("nodes"))
    problems += _duplicates([(("nodes", i, "name"), n.get("name")) for i, n in nodes], "node names")
    names = [n["name"] for _, n in nodes if isinstance(n.get("name"), str)]
    all_named = isinstance(data.get("nodes"), list) and len(names) == len(data["nodes"])

    networks: list[tuple[str, list[str]]] = []  # (node, its heartbeat networks)
    for i, node in nodes:
        addresses = node.get("addresses")
        if isinstance(addresses, str):
            addresses = {"default": addresses}
        if isinstance(addresses, dict):
            networks.append((str(node.get("name", f"nodes[{i}]")), sorted(map(str, addresses))))
    if len({tuple(nets) for _, nets in networks}) > 1:
        got = ", ".join(f"{name}: {nets}" for name, nets in networks)
        why = f"every node needs an address on the same heartbeat networks, got {got}"
        problems.append((("nodes",), why))

    addresses: list[tuple[int, str, IPAddress]] = []  # (node index, network, address) of every node
    for i, node in nodes:
        raw = node.get("addresses")
        for net, address in _dict({"default": raw} if isinstance(raw, str) else raw).items():
            ip = _ip(address)
            if ip is None:
                continue
            where = ("nodes", i, "addresses", net)
            for j, other_net, other in addresses:
                if j == i:
                    continue
                if ip == other:
                    # Both nodes would claim it: heartbeats and the local node's detection go wrong.
                    why = (f"{ip} is also the address of nodes[{j}] (network {other_net!r}): each node needs "
                           "its own addresses")
                    problems.append((where, why))
                elif net == other_net and ip.version != other.version:
                    why = (f"{ip} is IPv{ip.version} but nodes[{j}] has the IPv{other.version} address {other} on "
                           f"network {net!r}: both nodes of a heartbeat network need the same IP version")
                    problems.append((where, why))
            addresses.append((i, str(net), ip))

    modules = _entries(data.get("modules"))
    problems += _duplicates([(("modules", i, "name"), m.get("name")) for i, m in modules], "module names")
    for i, module in modules:
        preferred = module.get("preferred_primary")
        if all_named and isinstance(preferred, str) and preferred not in names:
            problems.append((("modules", i, "preferred_primary"), f"{preferred!r} is not a node ({names})"))
        network = _dict(module.get("replication")).get("network")
        known = networks[0][1] if networks else []
        if isinstance(network, str) and known and network not in known:
            problems.append((("modules", i, "replication", "network"),
                             f"{network!r} is not a heartbeat network ({known})"))
        checkers = _entries(module.get("checkers"))
        problems += _duplicates([(("modules", i, "checkers", j, "name"), c.get("name")) for j, c in checkers],
                                "checker names in a module")

    vips: dict[IPAddress, int] = {}  # virtual IP -> the module that has it
    for i, module in modules:
        vip = _ip(_dict(module.get("vip")).get("address"))
        if vip is None:
            continue
        where = ("modules", i, "vip", "address")
        owner = next((j for j, _, ip in addresses if ip == vip), None)
        if owner is not None:
            why = (f"{vip} is the address of nodes[{owner}]: a virtual IP moves between the nodes, it needs an "
                   "address of its own")
            problems.append((where, why))
        if vip in vips:
            why = (f"{vip} is already the virtual IP of modules[{vips[vip]}]: each module needs its own (or make "
                   "them one module)")
            problems.append((where, why))
        else:
            vips[vip] = i

    replicated: list[tuple[int, Path]] = []  # (module index, directory) of the modules seen so far
    for i, module in modules:
        directories = _dict(module.get("replication")).get("directories")
        for d in directories if isinstance(directories, list) else []:
            if not isinstance(d, (str, Path)) or not str(d).startswith("/"):
                continue  # field validation reports it
            path = normal_path(d)
            clash = next(((j, other) for j, other in replicated if j != i and overlapping(path, other)), None)
            if clash is not None:
                why = (f"{path} overlaps {clash[1]} of modules[{clash[0]}]: a directory is replicated by one "
                       "module only (move it to that module, or make them one module)")
                problems.append((("modules", i, "replication", "directories"), why))
            replicated.append((i, path))

    default_port = HeartbeatConfig.model_fields["port"].default
    heartbeat_port = _int(_dict(data.get("heartbeat")).get("port", default_port))
    listen = _dict(data.get("api")).get("listen", ApiConfig.model_fields["listen"].default)
    api_port = _int(listen.rpartition(":")[2]) if isinstance(listen, str) else None
    used: dict[int, str] = {}  # port -> what uses it
    if heartbeat_port is not None:
        used[heartbeat_port] = "heartbeat.port"
    if api_port is not None:
        used.setdefault(api_port, "api.listen")  # TCP like the replication streams
    for i, module in modules:
        replication = _dict(module.get("replication"))
        if not replication.get("directories"):
            continue
        port = _int(replication.get("port", ReplicationConfig.model_fields["port"].default))
        if port is None:
            continue
        if port in used:
            why = (f"port {port} is already used by {used[port]}: each replicated module needs its own "
                   "port, distinct from heartbeat.port and the api.listen port")
            problems.append((("modules", i, "replication", "port"), why))
        else:
            used[port] = f"modules[{i}].replication.port"
    return problems


class ConfigError(Exception):
    """The cluster file is unusable. `problems` holds one line per error, all of them."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = Path(path)
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


HINTS = {
    "missing": "add this key",
    "extra_forbidden": "unknown key: check its spelling against docs/configuration.md",
    "int_parsing": "write a whole number",
    "int_parsing_size": "write the intended whole number",
    "model_type": "a section: write its keys (from the environment, one variable per key: "
                  "SAFEKIT_MODULES__0__NAME=web)",
    "float_parsing": "write a number",
    "finite_number": "write a number (not .inf nor .nan)",
    "bool_parsing": "write true or false",
    "literal_error": "use one of the values listed",
    "union_tag_invalid": "checker type must be process, tcp, http or command",
    "union_tag_not_found": "add `type:` (process, tcp, http or command)",
}
CHECKER_TYPES = ("process", "tcp", "http", "command")
ADD_ITEM_HINT = ("a variable changes an item the file has (SAFEKIT_MODULES__0__NAME: the first module's name), "
                 "it cannot add one: add it to the file, or set the whole list as JSON (SAFEKIT_MODULES='[...]')")
ENV_PREFIX = "SAFEKIT_"
YAML_HINT = ("fix the YAML there: indent with spaces (not tabs), close every bracket and quote, quote values "
             "holding ': ' or ' #' or starting with one of [ ] { } , & * ! | > ' \" % @ `")


MAX_DEPTH = 64  # lists and mappings inside each other: a cluster file needs 6
MAX_VALUES = 100_000  # values once aliases are expanded: a cluster file holds a few hundred


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but that the loader refuses (too deep, too large, a value Python cannot hold):
    located like a syntax error, with its own words instead of the syntax hint."""

    def __init__(self, problem: str, mark: yaml.Mark | None):
        super().__init__(problem=problem, problem_mark=mark)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with the limits a cluster file never reaches. Composing recurses once per
    nesting level (5000 `[` ended in a RecursionError); int() and datetime() raise a bare ValueError
    (a 5000-digit number, a date with month 13), located here."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"lists and mappings nested more than {MAX_DEPTH} deep: a cluster file needs a "
                               "handful of levels; check the brackets and the indentation there",
                               self.peek_event().start_mark)
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except ValueError as exc:
            if node.tag == "tag:yaml.org,2002:int":
                why = (f"a number of {len(node.value)} characters: no setting takes one that long; write the "
                       "intended value")
            else:
                kind = "a date" if node.tag == "tag:yaml.org,2002:timestamp" else "a value"
                why = f"{node.value[:40]!r} cannot be read as {kind} ({exc}): quote it to make it text, or correct it"
            raise _Refused(why, node.start_mark) from None


def _expanded_size(root: yaml.Node) -> int:
    """How many values the document holds once its aliases are expanded, counted up to just past
    MAX_VALUES. Linear in the file: each node is counted once and its count reused for every alias of
    it, where expanding them (a "billion laughs": 9 aliases of 9 aliases of ...) is exponential."""
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in ancestors:  # an alias of an enclosing node: `&a [*a]`
            return 1
        ancestors.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        total = 1
        for child in children:
            total = min(total + size(child), MAX_VALUES + 1)
        ancestors.discard(id(node))
        sizes[id(node)] = total
        return total

    return size(root)


def load_yaml(text: str) -> tuple[Any, dict[Loc, int], list[str]]:
    """The document's data, the line of each YAML path and the keys given twice (see `_scan`).

    Composed first, then checked and scanned, then built: PyYAML builds an aliased value once, but a
    merge (`<<: [*a, *a]`) copies it, and the scan visits every alias; both are exponential in the
    nesting of aliases, so the expanded size is checked before either. Raises yaml.YAMLError."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {}, []
        if _expanded_size(root) > MAX_VALUES:
            raise _Refused(f"the aliases (*name) of this file expand it to more than {MAX_VALUES} values (a "
                           "cluster file holds a few hundred): write the values out, or alias fewer nested ones",
                           None)
        lines, duplicates = _scan(root)  # before building: a merge rewrites the nodes it reads
        return loader.construct_document(root), lines, duplicates
    finally:
        loader.dispose()


def _scan(root: yaml.Node) -> tuple[dict[Loc, int], list[str]]:
    """Map YAML paths (keys and list indices) to 1-based line numbers, for error messages; and list the
    keys given twice in one mapping (YAML would silently keep the last one, hiding a mistake)."""
    index: dict[Loc, int] = {}
    duplicates: list[str] = []

    def walk(node: yaml.Node, path: Loc, ancestors: frozenset[int]) -> None:
        if id(node) in ancestors:
            return  # an alias of an enclosing node: `&a [*a]`
        ancestors = ancestors | {id(node)}
        index.setdefault(path, node.start_mark.line + 1)  # a key's own line, not where its block starts
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key, value in node.value:
                here, mark = path + (key.value,), key.start_mark
                # `<<: *defaults` (a merge) may be repeated; safe_load refuses keys that are not scalars.
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        first = seen[key.value]
                        duplicates.append(
                            f"{_format_loc(here)} (line {mark.line + 1}): given twice in the same mapping, at "
                            f"line {first.line + 1}, column {first.column + 1} and line {mark.line + 1}, column "
                            f"{mark.column + 1} (YAML would keep the last one only): remove one of them")
                    seen.setdefault(key.value, mark)
                index[here] = mark.line + 1
                walk(value, here, ancestors)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,), ancestors)

    walk(root, (), frozenset())
    return index, duplicates


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """PyYAML's error, located in the file instead of "<unicode string>", with what to do."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow (a NUL, a control)
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        return (f"line {line}, column {column}: not valid YAML: character U+{exc.character:04X} is not allowed "
                "in a YAML file: remove it (in a double-quoted string, write an escape such as \\t)")
    if isinstance(exc, _Refused):
        where = f"line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}: " if exc.problem_mark else ""
        return where + str(exc.problem)
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = exc.problem or "syntax error"
        if exc.context and exc.context_mark is not None:
            what += (f" ({exc.context} at line {exc.context_mark.line + 1}, "
                     f"column {exc.context_mark.column + 1})")
        return f"line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {what}: {YAML_HINT}"
    return f"not valid YAML: {exc}: {YAML_HINT}"


def _format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _without_tag(loc: Loc) -> Loc:
    """A pydantic error location without the discriminator step it inserts after a checker's index
    (modules.0.checkers.1.command.command: the first `command` is the type, the second the key)."""
    return tuple(part for n, part in enumerate(loc)
                 if not (part in CHECKER_TYPES and n >= 2 and loc[n - 2] == "checkers"
                         and isinstance(loc[n - 1], int)))


def _variable(keys: list[str]) -> str | None:
    """The SAFEKIT_* variable set for these keys, as spelled in the environment (any case)."""
    wanted = (ENV_PREFIX + "__".join(keys)).upper()
    return next((name for name in os.environ if name.upper() == wanted), None)


def _env_sources(loc: Loc, env: dict[str, Any]) -> tuple[str | None, list[str]]:
    """Which SAFEKIT_* variables set the value at `loc`: (the one that set it whole, or None; those that
    set a part of it, when it is a section)."""
    node: Any = env
    keys: list[str] = []
    for part in loc:
        if not isinstance(node, dict) or str(part) not in node:  # a list index is a key there: "0"
            break
        keys.append(str(part))
        node = node[str(part)]
    if keys and not isinstance(node, dict):  # a value (or list) the environment gave whole
        # SAFEKIT_HEARTBEAT__TIMEOUT=5 and SAFEKIT_HEARTBEAT='{"timeout": 5}' give the same data.
        found = (_variable(keys[:n]) for n in range(len(keys), 0, -1))
        return next((name for name in found if name), (ENV_PREFIX + "__".join(keys)).upper()), []
    if len(keys) < len(loc) or not keys:
        return None, []
    base = (ENV_PREFIX + "__".join(keys)).upper()
    return None, sorted(name for name in os.environ
                        if name.upper() == base or name.upper().startswith(base + "__"))


Flags = Callable[[Loc], str | None]  # the command-line flag that gave the value at a YAML path


def _where(loc: Loc, lines: dict[Loc, int], env: dict[str, Any] | None = None, flags: Flags | None = None) -> str:
    """`modules[0].vip (line 12)`: the path, and the line of its nearest part present in the file (or the
    SAFEKIT_* variable, or the flag, that gave the value)."""
    whole, parts = _env_sources(loc, env or {})
    if whole:
        return f"{_format_loc(loc)} (from the environment variable {whole})"
    if flags is not None and (flag := flags(loc)) is not None:
        return flag
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
    notes = ([f"line {line}"] if line else []) + ([f"overridden in part by {', '.join(parts)}"] if parts else [])
    return _format_loc(loc) + (f" ({'; '.join(notes)})" if notes else "")


def _describe(error: dict[str, Any], where: Callable[[Loc], str]) -> str:
    msg = error["msg"].removeprefix("Value error, ")
    hint = HINTS.get(error["type"], "")
    if error["type"] == "string_type" and isinstance(error.get("input"), (bool, int, float, datetime.date)):
        # YAML read `name: no` as false, `name: 2024-01-01` as a date, `name: 007` as a number.
        kind = {bool: "a boolean (yes, no, on, off, true, false)", int: "a number",
                float: "a number"}.get(type(error["input"]), "a date")
        hint = f"YAML read it as {kind}: write it in quotes, e.g. name: 'no'"
    value = error.get("input")
    if error["type"] == "list_type" and isinstance(value, dict) and all(str(k).isdigit() for k in value):
        hint = ADD_ITEM_HINT  # SAFEKIT_..._0__... for a list the file does not have
    return f"{where(_without_tag(error['loc']))}: {msg}" + (f" ({hint})" if hint and hint not in msg else "")


def _environment_problems(exc: SettingsError) -> list[str]:
    """A SAFEKIT_* variable pydantic-settings could not parse: name it and say what it must hold."""
    cause = exc.__cause__
    if not isinstance(cause, json.JSONDecodeError):
        return [f"environment: {exc}"]
    problems = []
    for name, value in sorted(os.environ.items()):
        if name.upper().startswith(ENV_PREFIX) and value == cause.doc:  # the text that failed to parse
            loc = tuple(name[len(ENV_PREFIX):].lower().split("__"))
            problems.append(
                f"{_format_loc(loc)} (from the environment variable {name}): not valid JSON ({cause.msg}, "
                f"character {cause.pos + 1}): a variable that sets a list or a whole section must hold JSON, "
                "e.g. SAFEKIT_HEARTBEAT='{\"timeout\": 5}'; one key is set with SAFEKIT_<SECTION>__<KEY>=value")
    return problems or [f"environment: {exc}"]


def parse_config(text: str, source: str = "<config>", flags: Flags | None = None) -> ClusterConfig:
    """The validated config of `text`, or a ConfigError naming every problem's YAML path and line.

    `flags`: the text was rendered from command-line flags (init) and is no file anyone can open, so
    problems name the flag that gave the value (None: its YAML path), never a line."""
    try:
        data, lines, problems = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_yaml_problem(exc, text)]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, ["the file must be a YAML mapping with cluster, nodes and modules"])
    if flags is not None:
        lines = {}
    for key in [key for key in data if not isinstance(key, str)]:  # `1: x`: not even a keyword argument
        where = _where((str(key),), lines) if (str(key),) in lines else _format_loc(())
        problems.append(f"{where}: key {key!r} is not a section name ({HINTS['extra_forbidden']})")
        del data[key]
    try:
        env = EnvSettingsSource(ClusterConfig)()
    except SettingsError as exc:  # a SAFEKIT_* variable that cannot be parsed (JSON for lists, ...)
        raise ConfigError(source, problems + _environment_problems(exc)) from None

    def where(loc: Loc) -> str:
        return _where(loc, lines, env, flags)

    overlaid: list[str] = []
    data = _overlay(data, env, (), overlaid)
    if overlaid:  # a list index the file does not have: the rest would only repeat it
        raise ConfigError(source, problems + overlaid)
    try:
        cfg = ClusterConfig(**data)
    except ValidationError as exc:
        # Field errors make pydantic skip the cross-section rules and the providers never see their
        # settings: check both on the raw data (with the environment's overrides) so that every problem
        # is reported at once. Cross-check errors of the model itself are reported from here too.
        plain = data
        errors = [_describe(e, where) for e in exc.errors() if e["type"] != CROSS_CHECK]
        rules = cross_check(plain) + validate_providers(plain)
        errors += [f"{where(loc)}: {msg}" for loc, msg in rules]
        if not errors:  # cannot happen unless the rules disagree with the model: keep pydantic's words
            errors = [_describe(e, where) for e in exc.errors()]
        raise ConfigError(source, problems + list(dict.fromkeys(errors))) from None
    problems += [f"{where(loc)}: {msg}" for loc, msg in validate_providers(cfg.model_dump())]
    if problems:
        raise ConfigError(source, problems)
    return cfg


def _overlay(base: Any, override: Any, loc: Loc, problems: list[str]) -> Any:
    """The environment's values (`override`, from EnvSettingsSource) laid over the file's (`base`):
    mappings key by key, lists item by item where a variable names an index (SAFEKIT_MODULES__0__NAME
    gives {"modules": {"0": {"name": ...}}}), anything else replaced whole. An index the list does not
    have is added to `problems`: a variable changes an item of the file, it cannot add one."""
    if not isinstance(override, dict):
        return override
    if isinstance(base, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _overlay(base.get(key), value, loc + (key,), problems) if key in base else value
        return merged
    if not isinstance(base, list):
        return override
    items = list(base)
    for key, value in override.items():
        if key.isascii() and key.isdigit() and int(key) < len(items):
            items[int(key)] = _overlay(items[int(key)], value, loc + (int(key),), problems)
            continue
        prefix = (ENV_PREFIX + "__".join(map(str, loc + (key,)))).upper()
        names = ", ".join(sorted(n for n in os.environ if n.upper() == prefix or n.upper().startswith(prefix + "__")))
        valid = f"0 to {len(items) - 1}" if items else "none"
        problems.append(f"{_format_loc(loc)} (from the environment variable {names}): {key!r} is not an index of "
                        f"this list, which has {len(items)} item(s) in the file (indices: {valid}); {ADD_ITEM_HINT}")
    return items


def validate_providers(data: dict[str, Any]) -> list[tuple[Loc, str]]:
    """Each module's VIP provider validates its own settings (imported lazily through the registry).

    Plain data as for `cross_check`; returns (YAML path, message) pairs."""
    from safekit_cloud.providers.base import ProviderError, validate_settings

    nodes = [n["name"] for _, n in _entries(data.get("nodes")) if isinstance(n.get("name"), str)]
    problems: list[tuple[Loc, str]] = []
    for i, module in _entries(data.get("modules")):
        vip = module.get("vip")
        if not isinstance(vip, dict):
            continue
        settings = {key: value for key, value in vip.items() if key not in ("provider", "address")}
        try:
            validate_settings(str(vip.get("provider") or "lan"), settings, nodes)
        except ProviderError as exc:
            problems.append((("modules", i, "vip"), str(exc)))
    return problems


def load_config(path: Path | str) -> ClusterConfig:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, ["file not found (create one with `safekit-cloud init`)"]) from None
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        why = f"not UTF-8 text: byte {exc.start} (line {line}) is 0x{raw[exc.start]:02x}: save the file as UTF-8"
        raise ConfigError(path, [why]) from None
    return parse_config(text, str(path))


def local_addresses() -> set[str]:
    """Addresses configured on this host's interfaces (in the current network namespace)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()}


def resolve_local_node(cfg: ClusterConfig, requested: str | None = None) -> str:
    """The node this daemon plays: `--node`, else SAFEKIT_NODE, else the node owning a local address."""
    requested = requested or os.environ.get("SAFEKIT_NODE")
    names = [n.name for n in cfg.nodes]
    if requested:
        if requested not in names:
            raise ConfigError("--node", [f"{requested!r} is not a node of cluster {cfg.cluster.name} ({names})"])
        return requested
    mine = local_addresses()
    matches = [n.name for n in cfg.nodes if set(n.addresses.values()) & mine]
    if len(matches) == 1:
        return matches[0]
    why = "no node's address" if not matches else f"addresses of several nodes ({matches})"
    raise ConfigError(
        "--node", [f"{why} is configured on this host ({socket.gethostname()}); pass --node NAME"]
    )
