"""Split-brain guard: before taking over, a secondary must reach at least one witness.

A node that lost its peer *and* every witness is more likely isolated itself than facing a dead peer;
taking over then would give two primaries. Witnesses are tried concurrently and the first answer wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math

from ..config import WitnessConfig
from ..procgroup import kill_and_reap
from .tcp import os_error_text, tcp_connect

log = logging.getLogger(__name__)


def _describe(witness: WitnessConfig) -> str:
    if witness.type == "tcp":
        host = f"[{witness.address}]" if ":" in witness.address else witness.address
        return f"tcp witness {host}:{witness.port}"
    return f"ping witness {witness.address}"


def ping_argv(witness: WitnessConfig) -> list[str]:
    # -W in whole seconds: iputils before 2019 rejects fractions; we enforce the exact timeout ourselves.
    argv = ["ping", "-n", "-q", "-c", "1", "-W", str(max(1, math.ceil(witness.timeout)))]
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(witness.address).version == 6:
            argv.append("-6")
    return argv + [witness.address]


async def _ping(witness: WitnessConfig) -> None:
    proc = await asyncio.create_subprocess_exec(
        *ping_argv(witness), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )
    try:
        rc = await proc.wait()
    finally:
        await kill_and_reap(proc)  # cancelled (timeout, or another witness answered): leave no ping behind
    if rc != 0:
        raise OSError(f"no reply (ping exit {rc})")


async def probe_witness(witness: WitnessConfig) -> tuple[bool, str]:
    what = _describe(witness)
    try:
        if witness.type == "tcp":
            assert witness.port is not None
            await asyncio.wait_for(tcp_connect(witness.address, witness.port), witness.timeout)
        else:
            await asyncio.wait_for(_ping(witness), witness.timeout)
    except TimeoutError:
        return False, f"{what}: no answer within {witness.timeout:g}s"
    except FileNotFoundError:
        return False, f"{what}: the ping command is not installed"
    except OSError as exc:
        return False, f"{what}: {os_error_text(exc)}"
    return True, f"{what} answered"


async def any_witness_reachable(witnesses: list[WitnessConfig]) -> tuple[bool, str]:
    """(True, what answered) as soon as one witness answers; (False, every failure) when none did.
    True when no witness is configured: the guard is opt-in."""
    if not witnesses:
        return True, "no witness configured"
    tasks = [asyncio.create_task(probe_witness(w), name=f"witness:{w.address}") for w in witnesses]
    failures: list[str] = []
    try:
        for next_done in asyncio.as_completed(tasks):
            ok, reason = await next_done
            if ok:
                return True, reason
            failures.append(reason)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    reason = "no witness answered: " + "; ".join(failures)
    log.warning("%s", reason)
    return False, reason
