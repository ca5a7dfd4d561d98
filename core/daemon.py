"""`safekit-cloud run`: the daemon process. Wires config, engine, API and signals together.

SIGTERM or SIGINT stops every module cleanly (stop scripts, VIP released: the peer takes over) and
exits 0. A second signal during that stop exits at once, leaving the application as it is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from . import client
from .api import build_app, serve_api
from .config import ClusterConfig
from .engine import Engine, EngineError
from .heartbeat import HeartbeatError
from .store import StateFileError
from .telemetry import setup_tracing, shutdown_tracing

log = logging.getLogger("safekit_cloud.daemon")


def setup_logging(node: str, verbose: bool = False) -> None:
    level = logging.DEBUG if verbose or os.environ.get("SAFEKIT_DEBUG") else logging.INFO
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{node}] %(name)s: %(message)s",
    )
    for noisy in ("aiohttp.access", "pyroute2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def read_token(path: Path) -> str:
    # The CLI's own checks (text, one line of printable ASCII, a regular file): a token the daemon
    # accepted but the CLI could not send would lock the operator out of the running daemon.
    try:
        token = client.read_token(path)
    except client.ClientError as exc:
        raise EngineError(str(exc)) from None
    if len(token) < 16:
        raise EngineError(f"API token {path} is shorter than 16 characters")
    return token


def make_state_dir(path: Path) -> None:
    """The state directory, created when missing; when it cannot be, why in words (mkdir's own
    "[Errno 17] File exists" did not say that --state-dir names a file)."""
    fix = "give --state-dir (SAFEKIT_STATE_DIR) a directory, created if missing"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise EngineError(f"the state directory {path} exists but is not a directory: {fix}") from None
    except NotADirectoryError:
        raise EngineError(f"the state directory {path} cannot be created: a part of its path is a file, "
                          f"not a directory: {fix}") from None
    except OSError as exc:
        raise EngineError(f"cannot create the state directory {path}: {exc.strerror or exc}: {fix}") from None


async def serve(config: ClusterConfig, node: str, state_dir: Path) -> int:
    from .engine import read_key

    key = read_key(config.heartbeat.key_file)
    token = read_token(config.api.token_file)
    make_state_dir(state_dir)
    engine = Engine(config, node, state_dir, key)
    await engine.start()
    try:
        runner = await serve_api(build_app(engine, token), config.api)
    except BaseException:
        await engine.close()
        raise
    log.info("node %s of cluster %s running (API on %s, modules: %s)", node, config.cluster.name,
             config.api.listen, ", ".join(engine.module_names()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: modules stop cleanly (send the signal again to exit at once)")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: os._exit(1))
    try:
        await engine.shutdown()
    finally:
        await runner.cleanup()
    return 0


def run_daemon(config: ClusterConfig, node: str, state_dir: Path, config_path: Path, verbose: bool = False) -> int:
    setup_logging(node, verbose)
    setup_tracing("safekit-cloud", node, config.cluster.name)
    try:
        return asyncio.run(serve(config, node, state_dir))
    except (EngineError, HeartbeatError, StateFileError, OSError) as exc:
        # Once, on stderr (the journal under systemd); 1 as every failure other than a usage error.
        print(f"safekit-cloud: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown_tracing()
