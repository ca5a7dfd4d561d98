"""TCP checker: the service accepts a connection within the timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from ..config import TcpChecker
from .base import Checker, CheckResult


async def tcp_connect(host: str, port: int) -> None:
    """Open and close one connection; raises OSError when refused or unreachable."""
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def os_error_text(exc: OSError) -> str:
    """"Connection refused" rather than asyncio's "Connect call failed ('127.0.0.1', 80)"; a host name
    that does not resolve says so (getaddrinfo's codes are not errno values: "Unknown error -2")."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror}): check the name, or use its IP address"
    return os.strerror(exc.errno) if exc.errno else str(exc)


class TcpCheck(Checker):
    config: TcpChecker

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    async def probe(self) -> CheckResult:
        where = self.target
        try:
            await tcp_connect(self.config.host, self.config.port)
        except OSError as exc:
            return CheckResult(False, f"{where}: {os_error_text(exc)}")
        return CheckResult(True, f"connected to {where}")
