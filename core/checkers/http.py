"""HTTP checker: a GET answers with the expected status (and, optionally, a body matching a regex)."""

from __future__ import annotations

import re

import aiohttp

from ..config import HttpChecker
from .base import Checker, CheckResult
from .tcp import os_error_text

MAX_BODY = 1 << 20  # a health page is small; never buffer an accidental download


async def _read_body(response: aiohttp.ClientResponse) -> str:
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_BODY:
            break
    data = b"".join(chunks)[:MAX_BODY]
    try:
        return data.decode(response.charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know: the regex is still worth trying
        return data.decode("utf-8", errors="replace")


class HttpCheck(Checker):
    config: HttpChecker

    def __init__(self, config: HttpChecker):
        super().__init__(config)
        self._regex = re.compile(config.body_regex) if config.body_regex is not None else None

    @property
    def target(self) -> str:
        return f"GET {self.config.url}"

    async def probe(self) -> CheckResult:
        cfg = self.config
        # A fresh connection per check (force_close): a kept-alive connection would hide a server that
        # no longer accepts new ones.
        connector = aiohttp.TCPConnector(force_close=True, ssl=cfg.verify_tls)
        timeout = aiohttp.ClientTimeout(total=cfg.timeout)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.get(cfg.url, allow_redirects=False) as response,
            ):
                return await self._judge(response)
        except aiohttp.ClientConnectorError as exc:  # "Connection refused", not aiohttp's paragraph
            return CheckResult(False, f"GET {cfg.url}: cannot connect: {os_error_text(exc.os_error)}")
        except aiohttp.ClientResponseError as exc:
            # Raised only when the answer cannot be parsed (its status is judged, never raised on):
            # its "400" is aiohttp's, not the server's.
            return CheckResult(False, f"GET {cfg.url}: the answer is not valid HTTP ({exc.message})")
        except aiohttp.ClientError as exc:
            return CheckResult(False, f"GET {cfg.url}: {type(exc).__name__}: {exc}")

    async def _judge(self, response: aiohttp.ClientResponse) -> CheckResult:
        cfg = self.config
        if response.status != cfg.expect_status:
            return CheckResult(False, f"GET {cfg.url}: status {response.status}, expected {cfg.expect_status}")
        if self._regex is not None and not self._regex.search(await _read_body(response)):
            return CheckResult(False, f"GET {cfg.url}: body does not match /{cfg.body_regex}/")
        return CheckResult(True, f"GET {cfg.url}: status {response.status}")
