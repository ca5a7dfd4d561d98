"""`safekit-cloud init`: the starter cluster file, as a pure rendering of an `InitSpec`, and fresh secrets.

The CLI gathers the spec (from flags or prompts), renders it here, validates the text with the real
config loader before anything is written, then writes the file, the cluster key and the API token.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import secrets
import shlex
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import yaml

DEFAULT_NETWORK = "default"  # what a plain `--node n1=ADDR` names, as in the config model


class InitError(ValueError):
    """A flag or answer of `init` is unusable; the message says which and why."""


@dataclass(frozen=True)
class NodeSpec:
    name: str
    addresses: dict[str, str]  # heartbeat network -> address


@dataclass(frozen=True)
class InitSpec:
    cluster: str
    nodes: tuple[NodeSpec, ...]
    module: str
    key_file: Path
    token_file: Path
    vip: str | None = None
    interface: str | None = None
    scripts: Path | None = None
    replicate: tuple[Path, ...] = ()
    preferred: str | None = None
    api_listen: str = "127.0.0.1:9010"
    heartbeat_port: int = 4800


_NODE_FLAG = re.compile(r"^(?P<name>[^:=\s]+)(?::(?P<net>[^:=\s]+))?=(?P<addr>\S+)$")


def parse_node_flags(values: Iterable[str]) -> tuple[NodeSpec, ...]:
    """`n1=198.18.0.1`, `n1:backup=198.18.1.1` -> nodes in the order first named, networks merged."""
    nodes: dict[str, dict[str, str]] = {}
    for value in values:
        match = _NODE_FLAG.match(value.strip())
        if match is None:
            raise InitError(f"--node {value!r}: expected NAME=ADDRESS or NAME:NETWORK=ADDRESS")
        name, net, addr = match["name"], match["net"] or DEFAULT_NETWORK, match["addr"]
        addresses = nodes.setdefault(name, {})
        if net in addresses:
            raise InitError(f"--node {value!r}: node {name} already has an address on network {net}")
        addresses[net] = addr
    return tuple(NodeSpec(name, addrs) for name, addrs in nodes.items())


def check_nodes(nodes: tuple[NodeSpec, ...]) -> None:
    """What the template needs before rendering; address syntax is left to the config loader."""
    if len(nodes) != 2:
        raise InitError(f"a mirror cluster has exactly two nodes, got {len(nodes)} "
                        f"({', '.join(n.name for n in nodes) or 'none'}): pass --node twice")
    first, second = (sorted(n.addresses) for n in nodes)
    if first != second:
        raise InitError(f"both nodes need an address on the same heartbeat networks: "
                        f"{nodes[0].name} has {first}, {nodes[1].name} has {second}")
    _check_distinct_addresses(nodes)


def _check_distinct_addresses(nodes: tuple[NodeSpec, ...]) -> None:
    """Two nodes with one address: heartbeats would go to the sender itself, and `run` could not tell
    which node it is from its local addresses."""
    first, second = nodes
    for net, address in first.addresses.items():
        if _same_address(address, second.addresses[net]):
            raise InitError(f"--node: {first.name} and {second.name} both have the address {address} on network "
                            f"{net}: give each node its own address")


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)  # 2001:db8::1 is 2001:db8:0::1
    except ValueError:
        return a == b  # not an IP address: the config loader will say so


def init_flag(spec: InitSpec, loc: tuple[Any, ...]) -> str | None:
    """The flag of `init` that gave the value at `loc` (a YAML path) of the file rendered from `spec`,
    as the user typed it: what its problems name, since the file was not written. None: the template's
    own value (an environment override, say)."""
    if loc[:2] == ("cluster", "name"):
        return f"--cluster {shlex.quote(spec.cluster)}"
    if loc[:2] == ("heartbeat", "key_file"):
        return f"--key-file {shlex.quote(str(spec.key_file))}"
    if loc[:2] == ("api", "token_file"):
        return f"--token-file {shlex.quote(str(spec.token_file))}"
    if loc[:1] == ("nodes",):
        if len(loc) < 2 or not isinstance(loc[1], int) or loc[1] >= len(spec.nodes):
            return "--node"
        node = spec.nodes[loc[1]]
        nets = [loc[3]] if loc[2:3] == ("addresses",) and loc[3:4] and loc[3] in node.addresses else node.addresses
        return " ".join(f"--node {shlex.quote(_node_flag(node, net))}" for net in nets)
    if loc[:2] != ("modules", 0):
        return None
    rest = loc[2:]
    if rest[:1] == ("name",):
        return f"--module {shlex.quote(spec.module)}"
    if rest[:1] == ("preferred_primary",):
        return f"--preferred {shlex.quote(spec.preferred)}" if spec.preferred else "--preferred (the first --node)"
    if rest[:2] == ("vip", "address"):
        return f"--vip {shlex.quote(spec.vip or '')}"
    if rest[:1] == ("vip",):  # the provider's own settings: init gives it the interface only
        return f"--interface {shlex.quote(spec.interface)}" if spec.interface else "--vip"
    if rest[:1] == ("scripts",):
        return f"--scripts {shlex.quote(str(spec.scripts))}"
    if rest[:2] == ("replication", "directories"):
        return " ".join(f"--replicate {shlex.quote(str(d))}" for d in spec.replicate) or "--replicate"
    return None


def _node_flag(node: NodeSpec, net: str) -> str:
    name = node.name if net == DEFAULT_NETWORK else f"{node.name}:{net}"
    return f"{name}={node.addresses[net]}"


def new_cluster_key() -> str:
    """32 random bytes in hex: the HMAC key of heartbeats and replication, identical on both nodes."""
    return secrets.token_hex(32) + "\n"


def new_api_token() -> str:
    return secrets.token_urlsafe(32) + "\n"


# ---- rendering -----------------------------------------------------------------------------------

def scalar(value: object) -> str:
    """A YAML scalar that reads back as the same string: bare when safe, else JSON-quoted."""
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_./-]+", text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text)


def render_cluster_file(spec: InitSpec) -> str:
    """The commented starter cluster file. Pure: the same spec gives the same text."""
    check_nodes(spec.nodes)
    parts = [
        _header(spec), _cluster(spec), _nodes(spec), _heartbeat(spec), _api(spec),
        _module_head(spec), _vip(spec), _scripts(spec), _replication(spec), _checkers(), _witnesses(),
    ]
    return "\n".join(parts)


def _header(spec: InitSpec) -> str:
    return """\
# safekit-cloud cluster file (written by `safekit-cloud init`).
# Reference of every key: docs/configuration.md. Validate after editing:
#   safekit-cloud -c THIS_FILE config check
# Install this file, the cluster key and the API token at the same paths on both nodes, then run
# `safekit-cloud run` on each (under systemd in production: docs/operations.md).
# Any key can be overridden by an environment variable SAFEKIT_<SECTION>__<KEY>.
"""


def _cluster(spec: InitSpec) -> str:
    return f"""\
# The cluster's name, shown in logs, status and traces.
cluster:
  name: {scalar(spec.cluster)}
"""


def _nodes(spec: InitSpec) -> str:
    lines = [
        "# The two nodes of the mirror, with one address per heartbeat network. Heartbeats go over",
        "# every network and the peer is only declared lost when all of them are silent, so a second",
        "# network (another subnet, a crossover link) keeps a single switch failure from causing a",
        "# failover. `safekit-cloud run` finds which node it is from its local addresses (or --node).",
        "nodes:",
    ]
    for node in spec.nodes:
        lines += [f"  - name: {scalar(node.name)}", "    addresses:"]
        lines += [f"      {scalar(net)}: {scalar(addr)}" for net, addr in node.addresses.items()]
    return "\n".join(lines) + "\n"


def _heartbeat(spec: InitSpec) -> str:
    return f"""\
# Heartbeats: UDP datagrams authenticated with HMAC-SHA256 under the cluster key (open the port
# between the nodes on every network). Failover happens `timeout` seconds after the primary died;
# 0.1 / 0.5 is the fastest setting, for a network you trust not to drop datagrams for 0.5 s.
heartbeat:
  port: {spec.heartbeat_port}
  interval: 0.5   # seconds between two heartbeats
  timeout: 3.0    # seconds of silence on every network before the peer is lost (>= 3 intervals)
  key_file: {scalar(spec.key_file)}   # 64 hex digits, the same file on both nodes, mode 0600
"""


def _api(spec: InitSpec) -> str:
    return f"""\
# The local admin API: the CLI and the web console (http://LISTEN/) use it with the bearer token;
# GET /health?module=NAME answers 200 only on the node serving the module (for load balancers:
# listen on an address they can reach, e.g. 0.0.0.0:9010, ideally with TLS).
api:
  listen: {scalar(spec.api_listen)}
  token_file: {scalar(spec.token_file)}   # mode 0600
  # tls:                                  # serve HTTPS instead of HTTP
  #   cert_file: /etc/safekit-cloud/api.crt
  #   key_file: /etc/safekit-cloud/api.key
"""


def _module_head(spec: InitSpec) -> str:
    preferred = spec.preferred or spec.nodes[0].name
    return f"""\
# Modules: each one is an application made highly available. A cluster may hold several, each with
# its own primary, virtual IP, scripts and checkers.
modules:
  - name: {scalar(spec.module)}
    mode: mirror
    boot: true                 # `safekit-cloud run` starts this module
    {f"preferred_primary: {scalar(preferred)}":<26} # becomes primary when both nodes start together
    failback: false            # true: hand the primary role back to it automatically when it returns
    split_brain: manual        # after both nodes were primary: wait for an admin (or keep-preferred)
"""


def _vip(spec: InitSpec) -> str:
    intro = ("    # The virtual IP clients connect to: it follows the primary. Provider lan: the address\n"
             "    # is added to the interface and announced with gratuitous ARP / unsolicited NA.\n")
    if spec.vip is None:
        return intro + ("    # vip:\n    #   provider: lan\n    #   address: 192.0.2.100/24\n"
                        "    #   interface: eth0\n")
    lines = [intro + "    vip:", "      provider: lan", f"      address: {scalar(spec.vip)}"]
    if spec.interface is not None:
        lines.append(f"      interface: {scalar(spec.interface)}")
    return "\n".join(lines) + "\n"


def _scripts(spec: InitSpec) -> str:
    directory = (f"      directory: {scalar(spec.scripts)}" if spec.scripts is not None
                 else "      # directory: /opt/app/safekit")
    return f"""\
    # Scripts that start and stop the application: prestart, start_prim, stop_prim, start_second,
    # stop_second, start_both, stop_both, transition (missing ones are skipped). Each is called with
    # (current state, next state, action); a failing start_prim leads to stop and failover.
    scripts:
{directory}
      timeout: 120             # seconds before a script's whole process group is killed
      stop_timeout: 60
"""


def _replication(spec: InitSpec) -> str:
    intro = ("    # Directories replicated synchronously from the primary to the secondary (absolute paths).\n"
             "    # Protocol C: a write the application saw complete survives the loss of the primary.\n")
    if not spec.replicate:
        return intro + "    replication:\n      directories: []\n      # - /var/lib/app\n"
    dirs = "\n".join(f"        - {scalar(d)}" for d in spec.replicate)
    return intro + f"""\
    replication:
      directories:
{dirs}
      exclude: []              # patterns not replicated, e.g. "tmp/", "*.tmp"
      protocol: C
      port: {spec.heartbeat_port + 1}               # TCP, between the nodes
"""


def _checkers() -> str:
    return """\
    # Checkers watch the application on the primary. After `failures` consecutive failures the
    # action runs: restart (stop_prim + start_prim, up to restart.limit times within restart.window,
    # then failover), stopstart (fail over to the peer), wait, or none.
    checkers: []
    #  - name: web
    #    type: http                   # process, tcp, http or command
    #    url: http://127.0.0.1:8080/
    #    interval: 5
    #    timeout: 5
    #    failures: 3
    #    action: restart
    restart:
      limit: 3
      window: 86400
"""


def _witnesses() -> str:
    return """\
    # Split-brain guard: when the peer goes silent, a secondary that reaches none of these does not
    # take over (it is probably the one cut off). A router or a third machine makes a good witness.
    witnesses: []
    #  - type: ping
    #    address: 192.0.2.254
"""


# ---- writing -------------------------------------------------------------------------------------

def default_secret_paths(output: Path) -> tuple[Path, Path]:
    """Cluster key and API token next to the cluster file: /etc/safekit-cloud/ gives the defaults."""
    folder = output.absolute().parent
    return folder / "cluster.key", folder / "api.token"


def written_path(path: Path) -> Path:
    """The absolute path init writes `path` at, spelled so that `run` opens that same file: every `..`
    resolved as the system resolves it. Otherwise `DIR/sub/../k` with `sub` missing is written at DIR/k
    (init creates only the directories the file really goes in) but named DIR/sub/../k in the cluster
    file, which no open() can follow. Only the part up to the last `..` is resolved: a symbolic link
    after it (the file itself, say) stays the name the cluster file gives."""
    path = path.absolute()
    if ".." not in path.parts:
        return path
    last = len(path.parts) - 1 - path.parts[::-1].index("..")
    return Path(os.path.realpath(Path(*path.parts[: last + 1]))).joinpath(*path.parts[last + 1:])


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((text for test, text in kinds if test(mode)), "not a regular file")


# ---- init: writing all three files or none -------------------------------------------------------

@dataclass
class InitTarget:
    """One file init writes. `path` is what messages name; `real` is where it goes: a symbolic link is
    followed (as open() would), so the link stays and its target is replaced."""

    label: str  # "the cluster key (--key-file)"
    path: Path
    example_name: str  # for "is a directory: name a file, e.g. DIR/cluster.key"
    content: str
    mode: int

    @property
    def real(self) -> Path:
        return Path(os.path.realpath(self.path))


def check_init_targets(targets: list[InitTarget]) -> list[InitTarget]:
    """Refuse, before anything is written, what would make init fail part-way or write one file over
    another; return the targets that already exist (regular files: replaced only with --force)."""
    for a, b in combinations(targets, 2):
        if a.real == b.real or (a.real.exists() and b.real.exists() and os.path.samefile(a.real, b.real)):
            raise InitError(f"{a.label} {a.path} and {b.label} {b.path} are the same file: give each its "
                            "own path (nothing was written)")
    existing = []
    for target in targets:
        try:
            mode = os.stat(target.real).st_mode
        except (FileNotFoundError, NotADirectoryError):
            _check_folder(target)
            continue
        if stat.S_ISDIR(mode):
            raise InitError(f"{target.label} {target.path} is a directory: name a file, e.g. "
                            f"{target.path / target.example_name} (nothing was written)")
        if not stat.S_ISREG(mode):
            raise InitError(f"{target.label} {target.path} is {file_kind(mode)}, not a regular file: "
                            "choose another path (nothing was written)")
        _check_folder(target)
        existing.append(target)
    return existing


def _check_folder(target: InitTarget) -> None:
    """The directory the file goes in, or the nearest existing one above it (init creates the missing
    ones), must be a directory this user can write in."""
    folder = target.real.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InitError(f"cannot write {target.label} {target.path}: {folder} is not a directory: "
                        "choose another path (nothing was written)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InitError(f"cannot write {target.label} {target.path}: the directory {folder} is not "
                        "writable by this user: run init as root, or choose another path (nothing was written)")


def write_init_files(targets: list[InitTarget], replace: bool) -> None:
    """Create the missing directories, write every file to a temporary file beside its target with its
    final mode, then rename them into place: a failure on the way removes what was created, so no new
    file is left behind. Without `replace`, a file that appeared since the check is kept, not replaced."""
    created_dirs: list[Path] = []
    temporaries: list[Path] = []
    replaced: list[InitTarget] = []  # existing files renamed over (--force): cannot be taken back
    new_files: list[InitTarget] = []  # files put where there was none: removed if a later one fails
    current = targets[0]
    try:
        for current in targets:
            _make_folders(current.real.parent, created_dirs)
        for current in targets:
            temporaries.append(_write_temporary(current))
        for current, temporary in zip(targets, temporaries, strict=True):
            existed = os.path.lexists(current.real)
            if replace:
                os.replace(temporary, current.real)
            else:
                _place_new(temporary, current.real)
            if existed:
                replaced.append(current)
            else:
                new_files.append(current)
    except OSError as exc:
        for path in [*temporaries, *(t.real for t in new_files)]:
            path.unlink(missing_ok=True)
        for folder in reversed(created_dirs):
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: something else wrote there meanwhile; leave it
        done = f"{and_list([str(t.path) for t in replaced])} already replaced" if replaced else "nothing was written"
        if isinstance(exc, FileExistsError) and not replace:
            raise InitError(f"{current.label} {current.path} appeared while init was writing; {done}: "
                            "pass --force to replace it") from None
        where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != current.real else ""
        raise InitError(f"cannot write {current.label} {current.path}: {exc.strerror or exc}{where}; "
                        f"{done}") from None


def and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _make_folders(folder: Path, created: list[Path]) -> None:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
        created.append(path)


def _write_temporary(target: InitTarget) -> Path:
    """The content in a new file beside the target, with its mode from the first byte (a secret is
    never briefly world-readable), flushed to disk before it is renamed into place."""
    fd, name = tempfile.mkstemp(prefix=f".{target.real.name}.", suffix=".tmp", dir=target.real.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fd, target.mode)  # mkstemp makes 0600; the cluster file is 0644, whatever the umask
            fh.write(target.content)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def _place_new(temporary: Path, target: Path) -> None:
    """Rename without replacing: link() refuses an existing name where rename() would overwrite it."""
    try:
        os.link(temporary, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        # a file system without hard links (vfat, some FUSE ones): check, then rename
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.rename(temporary, target)
        return
    os.unlink(temporary)

