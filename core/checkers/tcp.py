"""TCP checker: the service accepts a connection within the timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os

from ..config import TcpChecker
from .base import Checker, CheckResult


async def tcp_connect(host: str, port: int) -> None:
    """Open and close one connection; raises OSError when refused or unreachable."""
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def os_error_text(exc: OSError) -> str:
    """"Connection refused" rather than asyncio's "Connect call failed ('127.0.0.1', 80)"."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


class TcpCheck(Checker):
    config: TcpChecker

    async def probe(self) -> CheckResult:
        where = f"{self.config.host}:{self.config.port}"
        try:
            await tcp_connect(self.config.host, self.config.port)
        except OSError as exc:
            return CheckResult(False, f"{where}: {os_error_text(exc)}")
        return CheckResult(True, f"connected to {where}")
