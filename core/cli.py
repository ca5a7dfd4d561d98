"""`safekit-cloud`: the command line. It runs the daemon (`run`) or talks to the local one over the API.

The edge (`SafekitGroup.invoke`) turns every expected failure into one line on stderr and an exit
code; docs/cli.md lists the codes. `state` exits with the module's state code (0-4), so its own
failures, usage errors included, use 5: a script must never read an error as a state.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import stat
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import click
import yaml

from .client import (
    EXIT_UNREACHABLE,
    VERIFY_TIMEOUT,
    ClientError,
    DaemonClient,
    DaemonUnreachable,
    decode_status,
)
from .config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_STATE_DIR,
    ClusterConfig,
    ConfigError,
    Duration,
    load_config,
    parse_config,
)
from .init import (
    InitError,
    InitSpec,
    InitTarget,
    and_list,
    check_init_targets,
    check_nodes,
    default_secret_paths,
    file_kind,
    init_flag,
    new_api_token,
    new_cluster_key,
    parse_node_flags,
    render_cluster_file,
    write_init_files,
    written_path,
)
from .status import COMMANDS, MAX_QUERY_DIGITS, ModuleOut, NodeOut
from .types import ModuleState

log = logging.getLogger(__name__)

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
STATE_NAMES = [s.name for s in ModuleState]


@dataclass
class Globals:
    """The group's options, shared by every verb through click's context object."""

    config_path: Path
    node: str | None
    state_dir: Path
    verbose: bool
    _config: ClusterConfig | None = field(default=None, repr=False)

    def config(self) -> ClusterConfig:
        if self._config is None:
            check_config_path(self.config_path)
            self._config = load_config(self.config_path)
        return self._config

    def local_node(self) -> str | None:
        """This node's name for messages; the CLI only talks to the local API, so it is optional."""
        from .config import resolve_local_node

        try:
            return resolve_local_node(self.config(), self.node)
        except (ConfigError, OSError, ImportError):
            return self.node

    def client(self) -> DaemonClient:
        return DaemonClient.from_config(self.config().api, self.local_node)


class CliFailure(Exception):
    """A verb cannot do what was asked; the edge prints the message and exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    raise CliFailure(message, code)


def _die(message: str, code: int) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


class SafekitGroup(click.Group):
    """Catches our errors at the edge: one line (config problems: one per problem), no traceback."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as exc:
            if "state" in args:  # a bad global option before `state`: still not a state code
                exc.exit_code = EXIT_UNREACHABLE
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):  # --help, ctx.exit(), Ctrl-C at a prompt
            raise
        except click.ClickException as exc:
            if ctx.invoked_subcommand != "state":
                raise
            exc.show()
            sys.exit(EXIT_UNREACHABLE)
        except CliFailure as exc:
            _die(str(exc), _code(ctx, exc.code))
        except ConfigError as exc:
            _die(str(exc), _code(ctx, EXIT_FAILURE))
        except ClientError as exc:
            _die(str(exc), _code(ctx, exc.exit_code))
        except KeyboardInterrupt:
            _die("interrupted", _code(ctx, EXIT_INTERRUPTED))
        except OSError as exc:  # init writing files, mostly: "Permission denied: /etc/..."
            where = f": {exc.filename}" if exc.filename else ""
            _die(f"{exc.strerror or exc}{where}", _code(ctx, EXIT_FAILURE))
        except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback only with -v
            obj = ctx.find_object(Globals)
            if obj is not None and obj.verbose:
                traceback.print_exc()
            _die(f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)",
                 _code(ctx, EXIT_FAILURE))


def _code(ctx: click.Context, code: int) -> int:
    return EXIT_UNREACHABLE if ctx.invoked_subcommand == "state" else code


MAX_SECONDS = 365 * 24 * 3600.0  # a year: far beyond any wait, and socket timeouts overflow near 1e10


class Seconds(click.ParamType):
    """A duration in seconds for every timeout option: a finite number from 0 (or above 0 where 0
    cannot work) to a year, checked by the cluster file's own Duration. click's FloatRange lets nan
    through (no comparison with it is ever true, so a wait on it never ends) and inf (a socket
    timeout then overflows)."""

    name = "seconds"

    def __init__(self, allow_zero: bool) -> None:
        self.range = Duration(high=MAX_SECONDS, low_ok=allow_zero)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        rule = f"use {self.range.rule}"
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number: {rule}", param, ctx)
        problem = self.range.problem(seconds)
        if problem is not None:
            self.fail(f"{value!r} {problem}: {rule}", param, ctx)
        return seconds


def check_config_path(path: Path) -> None:
    """Refuse a cluster file path that is not a regular file before load_config opens it: a FIFO
    would block it for ever, a directory gives a cryptic "Is a directory"."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: load_config says so, in its own words
    if not stat.S_ISREG(mode):
        fail(f"the cluster file {path} is {file_kind(mode)}, not a regular file: "
             "name the cluster file with -c/--config (or SAFEKIT_CONFIG)")


@click.group(cls=SafekitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", type=click.Path(path_type=str), default=DEFAULT_CONFIG_PATH,
              envvar="SAFEKIT_CONFIG", show_default=True, help="Cluster file.")
@click.option("--node", envvar="SAFEKIT_NODE", help="This node's name (default: the node whose address is local).")
@click.option("--state-dir", type=click.Path(path_type=str), default=str(DEFAULT_STATE_DIR), envvar="SAFEKIT_STATE_DIR",
              show_default=True, help="Where the daemon keeps its state and module logs.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks of internal errors.")
@click.version_option(package_name="safekit-cloud", prog_name="safekit-cloud")
@click.pass_context
def main(ctx: click.Context, config_path: str, node: str | None, state_dir: str, verbose: bool) -> None:
    """High availability for an application on two Linux nodes: mirror clusters with a virtual IP."""
    if not config_path:  # Path("") would silently be the current directory
        fail(f"-c/--config is empty: name the cluster file (default {DEFAULT_CONFIG_PATH})")
    if not state_dir.strip():  # the same
        fail(f"--state-dir is empty: name the daemon's state directory (default {DEFAULT_STATE_DIR}), or leave "
             "--state-dir out")
    ctx.obj = Globals(Path(config_path), node, Path(state_dir), verbose)
    if ctx.invoked_subcommand != "run":  # the daemon sets up its own logging
        logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")


module_option = click.option("-m", "--module", help="Module name (needed when the cluster has several).")


def pick_module(cfg: ClusterConfig, requested: str | None) -> str:
    names = [m.name for m in cfg.modules]
    if requested is not None:
        if requested not in names:
            fail(f"unknown module {requested!r} (modules of cluster {cfg.cluster.name}: {', '.join(names)})")
        return requested
    if len(names) > 1:
        fail(f"cluster {cfg.cluster.name} has several modules ({', '.join(names)}): pass -m MODULE")
    return names[0]


def find_module(modules: list[ModuleOut], name: str) -> ModuleOut:
    for module in modules:
        if module.name == name:
            return module
    fail(f"the daemon does not run module {name!r} (it runs: {', '.join(m.name for m in modules)}); "
         "restart it after changing the cluster file")


# ---- run, demo -----------------------------------------------------------------------------------

@main.command()
@click.pass_obj
def run(g: Globals) -> None:
    """Run the daemon in the foreground (under systemd in production)."""
    from .config import resolve_local_node
    from .daemon import run_daemon

    config = g.config()
    node = resolve_local_node(config, g.node)
    conflicts = state_dir_conflicts(config, g.state_dir)
    if conflicts:
        fail("; ".join(conflicts))
    sys.exit(run_daemon(config, node, g.state_dir, g.config_path, verbose=g.verbose))


@main.command()
@click.option("--fast/--default-timing", default=True, show_default=True,
              help="Heartbeat 100 ms / timeout 500 ms, or the defaults 500 ms / 3 s.")
def demo(fast: bool) -> None:
    """Two nodes and a client in network namespaces: failover shown live, then cleaned up (root)."""
    from .demo import run_demo

    sys.exit(run_demo(keep=False, fast=fast))


# ---- init, config check --------------------------------------------------------------------------

@main.command()
@click.option("--cluster", help="Cluster name.")
@click.option("--node", "nodes", multiple=True, metavar="NAME[:NETWORK]=ADDRESS",
              help="A node's address (twice at least; NAME:NETWORK=ADDRESS adds a heartbeat network).")
@click.option("--module", help="Module (application) name.")
@click.option("--vip", help="Virtual IP with prefix, e.g. 198.18.0.100/24 (provider lan).")
@click.option("--interface", help="Interface that carries the VIP, e.g. eth0 (only with --vip).")
# Paths stay strings until checked: click turns "" into Path("."), the current directory.
@click.option("--scripts", type=click.Path(path_type=str), help="Directory of the module's scripts.")
@click.option("--replicate", multiple=True, type=click.Path(path_type=str), help="Directory to replicate.")
@click.option("--preferred", help="Preferred primary node (default: the first --node).")
@click.option("--key-file", type=click.Path(path_type=str), help="Cluster key [OUTPUT_DIR/cluster.key].")
@click.option("--token-file", type=click.Path(path_type=str), help="API token [OUTPUT_DIR/api.token].")
@click.option("-o", "--output", type=click.Path(path_type=str), help="Cluster file to write [the -c path].")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.pass_obj
def init(g: Globals, output: str | None, force: bool, **flags: Any) -> None:
    """Write a commented starter cluster file, a fresh cluster key and an API token.

    Every answer can come from flags (automation); in a terminal, missing ones are asked for.
    Nothing is written unless all three files can be.
    """
    output_path = written_path(_path_flag("-o/--output", output, "the cluster file to write") or g.config_path)
    spec = _init_spec(_checked_path_flags(flags), output_path)
    text = render_cluster_file(spec)
    # never write a file that `run` would refuse; its problems name the flags (the file does not exist)
    config = parse_config(text, "init (nothing was written)", flags=functools.partial(init_flag, spec))
    conflicts = state_dir_conflicts(config, g.state_dir)  # run's own check, on this node's --state-dir
    if conflicts:
        fail(f"--replicate: {'; '.join(conflicts)} (nothing was written)")
    targets = [
        InitTarget("the cluster file", output_path, "cluster.yaml", text, 0o644),
        InitTarget("the cluster key (--key-file)", spec.key_file, "cluster.key", new_cluster_key(), 0o600),
        InitTarget("the API token (--token-file)", spec.token_file, "api.token", new_api_token(), 0o600),
    ]
    try:
        existing = check_init_targets(targets)
        if existing and not force:
            names = and_list([str(t.path) for t in existing])
            verb, pronoun = ("exists", "it") if len(existing) == 1 else ("exist", "them")
            fail(f"{names} already {verb}: pass --force to replace {pronoun} (a new cluster key must then be "
                 "copied to both nodes), or choose other paths with -o, --key-file, --token-file")
        write_init_files(targets, replace=force)
    except InitError as exc:
        fail(str(exc))
    peer = spec.nodes[1].name
    click.echo(f"wrote {output_path}, {spec.key_file} (mode 0600) and {spec.token_file} (mode 0600)\n"
               f"copy all three to the same paths on {peer}, then run `safekit-cloud run` on both nodes")


def _path_flag(option: str, value: str | None, what: str) -> Path | None:
    """A path option of init as a Path; an empty one is refused (it would mean the current directory)."""
    if value is None:
        return None
    if not value.strip():
        fail(f"{option} is empty: give {what}, or leave {option} out")
    return Path(value)


def _checked_path_flags(flags: dict[str, Any]) -> dict[str, Any]:
    checked = dict(flags)
    checked["scripts"] = _path_flag("--scripts", flags["scripts"], "the directory of the module's scripts")
    checked["replicate"] = tuple(_path_flag("--replicate", d, "a directory to replicate") for d in flags["replicate"])
    checked["key_file"] = _path_flag("--key-file", flags["key_file"], "the file to write the cluster key to")
    checked["token_file"] = _path_flag("--token-file", flags["token_file"], "the file to write the API token to")
    return checked


def _init_spec(flags: dict[str, Any], output: Path) -> InitSpec:
    """The InitSpec from flags, asking for what is missing when a person is at the terminal."""
    required_missing = [name for name in ("cluster", "module") if not flags[name]]
    if len(flags["nodes"]) < 2:
        required_missing.append("node")
    if required_missing and interactive():
        flags = _ask(flags)
    elif required_missing:
        fail(f"init needs {', '.join('--' + n for n in required_missing)} (two --node NAME=ADDRESS): "
             "pass them, or run init in a terminal to be asked")
    if flags["vip"] and not flags["interface"]:
        fail("--vip needs --interface (the LAN interface that carries the virtual IP, e.g. eth0)")
    if flags["interface"] and not flags["vip"]:
        fail("--interface is only used with --vip: add --vip ADDRESS/PREFIX, or leave --interface out")
    key_default, token_default = default_secret_paths(output)
    try:
        nodes = parse_node_flags(flags["nodes"])
        check_nodes(nodes)
    except InitError as exc:
        fail(str(exc))
    return InitSpec(
        cluster=flags["cluster"], nodes=nodes, module=flags["module"],
        key_file=written_path(flags["key_file"] or key_default),
        token_file=written_path(flags["token_file"] or token_default),
        vip=flags["vip"] or None, interface=flags["interface"] or None,
        scripts=flags["scripts"].absolute() if flags["scripts"] else None,
        replicate=tuple(p.absolute() for p in flags["replicate"]), preferred=flags["preferred"] or None,
    )


def interactive() -> bool:
    return sys.stdin.isatty()


def _ask(flags: dict[str, Any]) -> dict[str, Any]:
    """Interactive init: prompt for every answer not given as a flag."""
    answers = dict(flags)
    answers["cluster"] = flags["cluster"] or click.prompt("Cluster name", default="cluster1")
    nodes = list(flags["nodes"])
    while len(nodes) < 2:
        number = len(nodes) + 1
        name = click.prompt(f"Name of node {number}", default=f"n{number}")
        nodes.append(f"{name}={click.prompt(f'Address of {name} (heartbeat network)')}")
    answers["nodes"] = tuple(nodes)
    answers["module"] = flags["module"] or click.prompt("Module (application) name", default="app")
    if not flags["vip"]:
        answers["vip"] = click.prompt("Virtual IP with prefix, e.g. 192.0.2.100/24 (empty: none)",
                                      default="", show_default=False)
    if answers["vip"] and not flags["interface"]:
        answers["interface"] = click.prompt("Interface carrying the virtual IP", default="eth0")
    if not flags["scripts"]:
        scripts = click.prompt("Directory of the start/stop scripts (empty: none yet)", default="",
                               show_default=False)
        answers["scripts"] = Path(scripts) if scripts.strip() else None
    if not flags["replicate"]:
        dirs = click.prompt("Directories to replicate, comma-separated (empty: none)", default="",
                            show_default=False)
        answers["replicate"] = tuple(Path(d.strip()) for d in dirs.split(",") if d.strip())
    return answers


@main.group("config", cls=SafekitGroup)
def config_group() -> None:
    """Cluster file tools."""


@config_group.command("check")
@click.pass_obj
def config_check(g: Globals) -> None:
    """Validate the cluster file: print the effective config (exit 0) or every problem (exit 1)."""
    cfg = g.config()
    click.echo(f"# {g.config_path}: valid; effective configuration with defaults filled in")
    click.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False), nl=False)
    for warning in _this_node_warnings(cfg, g.state_dir):
        click.echo(f"warning: this node: {warning}", err=True)


def state_dir_conflicts(cfg: ClusterConfig, state_dir: Path) -> list[str]:
    """Replicated directories that hold the daemon's state directory, or lie inside it. The journal
    would be written through the primary's own mount (its agent waiting on itself) and under the
    secondary's read-only bind; the state would be replaced by the peer's."""
    state = Path(os.path.realpath(state_dir))
    out = []
    for module in cfg.modules:
        for directory in module.replication.directories:
            real = Path(os.path.realpath(directory))
            if real == state or state.is_relative_to(real) or real.is_relative_to(state):
                out.append(f"module {module.name}: the replicated directory {directory} and the state directory "
                           f"{state_dir} overlap: replicate the application's own directories only, or give "
                           "the daemon another --state-dir (SAFEKIT_STATE_DIR)")
    return out


def _this_node_warnings(cfg: ClusterConfig, state_dir: Path) -> list[str]:
    """What would stop the daemon or a module from working on this node, whatever the file says: the
    cluster key or API token unreadable (`run` refuses to start), the API's TLS files missing, a
    scripts directory missing (no script would run: nothing starts the application), a replicated
    directory missing, another file system mounted inside one, or one that overlaps the state
    directory. The same checks and words as where each is used."""
    from .daemon import read_token
    from .engine import EngineError, read_key
    from .replication.paths import open_replicated_dir

    out = state_dir_conflicts(cfg, state_dir)
    for read in (lambda: read_key(cfg.heartbeat.key_file), lambda: read_token(cfg.api.token_file)):
        try:
            read()
        except EngineError as exc:
            out.append(f"{exc}; `run` refuses to start without it")
    if cfg.api.tls is not None:
        for what, path in (("certificate", cfg.api.tls.cert_file), ("private key", cfg.api.tls.key_file)):
            if not path.is_file():
                out.append(f"the API's TLS {what} {path} (api.tls) is not a readable file here; `run` refuses "
                           "to start without it")
    for module in cfg.modules:
        folder = module.scripts.directory
        if folder is not None and not folder.is_dir():
            out.append(f"module {module.name}: the scripts directory {folder} (scripts.directory) does not exist "
                       "here: no script would run on this node, so nothing would start the application when it "
                       "becomes primary; create it with the scripts, or fix the path")
    for module in cfg.modules:
        for directory in module.replication.directories:
            try:
                os.close(open_replicated_dir(directory))
            except OSError as exc:
                out.append(f"module {module.name}: {exc.strerror or exc}")
    return out


# ---- commands to the daemon ----------------------------------------------------------------------

COMMAND_HELP = {
    "start": "Start the module on this node (nothing to do when already started).",
    "stop": "Stop the module on this node; a primary hands over to the secondary.",
    "restart": "Restart the application locally (stop + start scripts), no role change.",
    "swap": "Hand the primary role to the other node, cleanly.",
    "prim": "Force this node primary even if its data cannot be proved current (the peer resyncs).",
    "second": "Force this node secondary: its changes are discarded, its copy resynchronised from the peer.",
    "forcestop": "Stop at once: abort running scripts, no handover wait.",
}


def _command(verb: str) -> click.Command:
    @click.command(verb, help=COMMAND_HELP[verb])
    @module_option
    @click.pass_obj
    def command(g: Globals, module: str | None, fullsync: bool = False) -> None:
        name = pick_module(g.config(), module)
        result = g.client().command(name, verb, fullsync=fullsync)
        if not result.ok:
            fail(f"{name}: {verb} refused: {result.message.removeprefix('refused: ')} (state {result.state})")
        click.echo(f"{name}: {result.message} (state {result.state})")

    return command


for _verb in COMMANDS:
    main.add_command(_command(_verb))
click.option("--fullsync", is_flag=True,
             help="Compare every block at the resync, whatever the journal says.")(main.commands["second"])


@main.command()
@click.option("--json", "as_json", is_flag=True, help="The status JSON exactly as the API returns it.")
@module_option
@click.pass_obj
def status(g: Globals, as_json: bool, module: str | None) -> None:
    """Show this node, its peer and its modules."""
    cfg = g.config()
    wanted = pick_module(cfg, module) if module else None
    raw = g.client().status_raw()
    if as_json:
        click.echo(raw.decode())
        return
    node = decode_status(raw)
    if wanted is not None:
        find_module(node.modules, wanted)
    render_status(node, wanted)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="The report exactly as the API returns it.")
@click.option("--timeout", type=Seconds(allow_zero=False), default=VERIFY_TIMEOUT, show_default=True,
              help="Seconds to wait for the report (verify hashes all replicated data on both nodes).")
@module_option
@click.pass_obj
@click.pass_context
def verify(ctx: click.Context, g: Globals, as_json: bool, timeout: float, module: str | None) -> None:
    """Compare the module's two replicas online (content and metadata); exit 1 if they differ.

    Run it on the primary. Exit 0: identical; 1: differences (listed) or verify could not run;
    5: the daemon is not reachable.
    """
    name = pick_module(g.config(), module)
    report = g.client().verify(name, timeout=timeout)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render_verify(name, report)
    if not report.get("identical"):
        ctx.exit(EXIT_FAILURE)


_PROBLEM_TEXT = {"missing_on_secondary": "missing on the secondary", "missing_on_primary": "missing on the primary"}


def render_verify(name: str, report: dict[str, Any]) -> None:
    dirs = report.get("directories", [])
    entries = sum(d.get("primary_entries", 0) for d in dirs)
    hashed = sum(d.get("primary_bytes_hashed", 0) for d in dirs)
    scope = (f"{len(dirs)} director{'y' if len(dirs) == 1 else 'ies'}, {entries} entries, "
             f"{hashed / 1e6:.1f} MB hashed on each node, {report.get('duration_s', 0):.1f} s")
    if report.get("identical"):
        click.echo(f"{name}: replicas identical ({scope})")
    else:
        total = report.get("total_differences", 0)
        click.echo(f"{name}: {total} difference{'s' if total != 1 else ''} between the replicas ({scope})")
        listed = report.get("differences", [])
        width = max((len(d["path"]) for d in listed), default=0)
        several = len(dirs) > 1
        for diff in listed:
            problem = diff.get("problem", "")
            text = _PROBLEM_TEXT.get(problem) or ", ".join(diff.get("fields", [])) + " differ"
            where = f"{diff.get('directory', '')}: " if several else ""
            click.echo(f"  {where}{diff['path']:<{width}}  {text}")
        if total > len(listed):
            counts = ", ".join(f"{n} {_PROBLEM_TEXT.get(k, 'differing')}"
                               for k, n in report.get("counts", {}).items() if n)
            click.echo(f"  ... and {total - len(listed)} more ({counts})")
    for note in report.get("notes", []):
        click.echo(f"note: {note}")


# ---- the human status ----------------------------------------------------------------------------

def render_status(node: NodeOut, only: str | None) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    console.print(f"[bold]cluster {node.cluster}[/] node [bold]{node.node}[/] "
                  f"(safekit-cloud {node.version}, up {_duration(node.uptime)})")
    console.print(_peer_table(node))
    for module in node.modules:
        if only is None or module.name == only:
            console.print(_module_text(module), soft_wrap=True)  # long reasons: one line each, not cut at 80 columns
            if module.checkers:
                console.print(_checkers_table(module))
            console.print(_decisions_table(module))


STATE_STYLE = {"PRIM": "bold green", "ALONE": "bold green", "SECOND": "bold blue", "WAIT": "bold yellow",
               "STOP": "bold"}


def _peer_table(node: NodeOut) -> Any:
    from rich.table import Table

    peer = node.peer
    title = f"peer {peer.name}: " + ("reachable" if peer.reachable else "[red]unreachable[/]")
    table = Table("network", "heartbeats", "last heard", "RTT", title=title, title_justify="left")
    for net in peer.networks:
        table.add_row(net.network, "alive" if net.alive else "[red]silent[/]",
                      "never" if net.last_seen_ago is None else f"{net.last_seen_ago:.1f} s ago",
                      "-" if net.rtt_ms is None else f"{net.rtt_ms:.2f} ms")
    return table


def _module_text(m: ModuleOut) -> str:
    style = STATE_STYLE.get(m.state, "bold")
    peer = f"{m.peer_state} ({m.peer_data})" if m.peer_state else "unreachable"
    vip = f"{m.vip} ({m.vip_provider})" if m.vip else "none"
    torn = " (resync interrupted: files it had begun may be partly updated)" if m.resync_interrupted else ""
    lines = [
        f"\n[bold]module {m.name}[/]: [{style}]{m.state}[/] (code {m.state_code})"
        + (f", becoming {m.becoming} ({_esc(m.busy)})" if m.becoming else ""),
        f"  data {m.data}{torn}, {'serving' if m.serving else 'not serving'}, VIP {vip}, peer {peer}",
        f"  restarts {m.restarts}/{m.restart_limit}, generation {m.generation}",
    ]
    if m.split_brain:
        lines.append("  [red]split brain: both nodes wrote alone since they last agreed; nothing is merged: run "
                     "`safekit-cloud second` on the node whose changes to discard[/]")
    if m.replication:
        lines.append("  " + _esc(_replication_text(m.replication)))
    if m.waiting_for:
        lines.append(f"  [yellow]waiting for: {_esc(m.waiting_for)}[/]")
    if m.busy:
        lines.append(f"  busy: {_esc(m.busy)}")
    return "\n".join(lines)


def _replication_text(r: dict[str, Any]) -> str:
    """One line on the replication of a module: role, link, what is in flight, resync progress."""
    text = f"replication {r.get('role', '?')}"
    if r.get("start_error"):  # e.g. the receiver's port taken: the module tries again
        text += f"; did not start: {_clip(str(r['start_error']))}"
    if r.get("role") == "primary":
        text += ", connected" if r.get("connected") else ", not connected (journaling)"
        text += f", {r.get('bytes_sent', 0) / 1e6:.1f} MB sent"
        if r.get("lag_seconds"):
            text += f", lag {r['lag_seconds']:.2f} s"
        if r.get("writes_held") is not None:  # docs/replication.md, holding writes
            text += f", writes held {r['writes_held']:.1f} s (until the peer knows its copy is out of date)"
        if not r.get("connected") and r.get("last_lost"):
            text += f"; last lost: {_clip(str(r['last_lost']))}"  # why (a full disk there, say)
    elif r.get("role") == "secondary":
        receiver = (r.get("agents") or {}).get("receiver") or {}
        ended = [s.get("last_error") for s in (receiver.get("streams") or {}).values()
                 if isinstance(s, dict) and not s.get("connected") and s.get("last_error")]
        if ended:
            text += f"; last stream ended: {_clip(str(ended[0]))}"
    resync = r.get("resync")
    if isinstance(resync, dict):
        done, total = resync.get("bytes_done") or 0, resync.get("bytes_total") or 0
        eta = resync.get("eta_seconds")
        text += f"; resync {done / 1e6:.1f}/{total / 1e6:.1f} MB" + (f", ETA {eta:.0f} s" if eta else "")
    return text


def _clip(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _checkers_table(m: ModuleOut) -> Any:
    from rich.table import Table

    table = Table("checker", "type", "result", "failures", "action", "reason")
    for c in m.checkers:
        result = "pending" if c.ok is None else ("ok" if c.ok else "[red]failed[/]")
        table.add_row(c.name, c.type, result, str(c.consecutive_failures), c.action, _esc(c.reason))
    return table


def _decisions_table(m: ModuleOut) -> Any:
    from rich.table import Table

    table = Table("time", "event", "transition", "reason", title="last decisions", title_justify="left")
    for d in m.decisions[:5]:
        # the date only when it is not today's: most decisions worth reading are recent
        fmt = "%H:%M:%S" if time.time() - d.time < 12 * 3600 else "%Y-%m-%d %H:%M:%S"
        repeated = f" ({d.repeated} times in a row, the latest shown)" if d.repeated > 1 else ""
        table.add_row(time.strftime(fmt, time.localtime(d.time)), d.event,
                      f"{d.from_state} -> {d.to_state}", _esc(d.reason) + repeated)
    return table


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@main.command()
@module_option
@click.pass_obj
def state(g: Globals, module: str | None) -> None:
    """Print the module's state; exit with its code (STOP 0 WAIT 1 ALONE 2 PRIM 3 SECOND 4; 5: error)."""
    name = pick_module(g.config(), module)
    found = find_module(g.client().status().modules, name)
    click.echo(found.state)
    sys.exit(found.state_code)


@main.command()
@click.argument("wanted", metavar="STATE", type=click.Choice(STATE_NAMES, case_sensitive=False))
@module_option
@click.option("--timeout", type=Seconds(allow_zero=True), default=60.0, show_default=True,
              help="Seconds (0: look once).")
@click.pass_obj
def waitstate(g: Globals, wanted: str, module: str | None, timeout: float) -> None:
    """Wait until the module is in STATE (SECOND: with up-to-date data); exit 1 on timeout."""
    wanted = wanted.upper()
    name = pick_module(g.config(), module)
    client = g.client()
    deadline = time.monotonic() + timeout
    while True:
        last = _current_state(client, name)
        if _reached(last, wanted):
            click.echo(f"{name}: {wanted}")
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            fail(f"{name}: still not {wanted} after {timeout:g} s: {_describe_state(last)}")
        time.sleep(min(0.2, remaining))


def _current_state(client: DaemonClient, name: str) -> ModuleOut | str:
    """The module's status, or why it could not be had (the daemon may be restarting: keep polling)."""
    try:
        return find_module(client.status(timeout=5).modules, name)
    except DaemonUnreachable as exc:
        return str(exc)


def _reached(current: ModuleOut | str, wanted: str) -> bool:
    if isinstance(current, str) or current.state != wanted:
        return False
    return wanted != "SECOND" or current.data == "uptodate"


def _describe_state(current: ModuleOut | str) -> str:
    if isinstance(current, str):
        return current
    text = f"state {current.state}, data {current.data}"
    return text + (f", waiting for: {current.waiting_for}" if current.waiting_for else "")


@main.command("log")
@click.option("-f", "--follow", is_flag=True, help="Keep printing what is appended (Ctrl-C to stop).")
@module_option
@click.option("-n", "--lines", type=click.IntRange(min=0, max=10**MAX_QUERY_DIGITS - 1),
              help="Only the last LINES lines [whole log].")
@click.pass_obj
def log_cmd(g: Globals, follow: bool, module: str | None, lines: int | None) -> None:
    """Print the module log."""
    name = pick_module(g.config(), module)
    client = g.client()
    try:
        offset = _print_log(client, name, None, lines)
        while follow:
            time.sleep(0.5)
            offset = _print_log(client, name, offset, None)
    except KeyboardInterrupt:
        return  # the way to end `log -f`: not an error


def _print_log(client: DaemonClient, module: str, offset: int | None, tail: int | None) -> int:
    """Print from `offset` (or the last `tail` lines) to the current end; return the next offset."""
    chunk = client.log(module, offset=offset, tail=tail)
    while True:
        click.echo(chunk["text"], nl=False)
        offset = int(chunk["offset"])
        if not chunk["text"] or offset >= int(chunk.get("size", offset)):
            return offset
        chunk = client.log(module, offset=offset)


if __name__ == "__main__":
    main(prog_name="safekit-cloud")
