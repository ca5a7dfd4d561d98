"""The CLI's side of the admin API: a small blocking HTTP client (urllib) for the local daemon.

Blocking on purpose: every CLI verb makes one request at a time, so an event loop would add nothing
but start-up time. Failures become `ClientError`s whose message is the one line the CLI prints.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import stat
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from .config import ApiConfig
from .decoding import DECODE_ERRORS
from .status import CommandResult, NodeOut

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # status, logs: the daemon answers these from memory
# Commands may wait for stop/start scripts (their default timeouts are 60 s and 120 s) on the way.
COMMAND_TIMEOUT = 600.0
VERIFY_TIMEOUT = 6 * 3600.0  # verify hashes every replicated byte on both nodes
EXIT_UNREACHABLE = 5  # also `state`'s "no state": a daemon that is not running is not a module state


class ClientError(Exception):
    """A request to the daemon failed; the message is one line for the user."""

    exit_code = 1


class DaemonUnreachable(ClientError):
    exit_code = EXIT_UNREACHABLE


class AnswerTimeout(DaemonUnreachable):
    """The daemon accepted the request and did not answer within the timeout."""


class RequestFailed(ClientError):
    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


TOKEN_REDO = "copy it again from the other node, or regenerate it with `safekit-cloud init --force`"


def read_token(path: Path) -> str:
    """The bearer token: one line of printable ASCII, what `init` writes and an HTTP header can carry."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):  # a FIFO would block the read for ever
            raise ClientError(f"the API token file {path} is not a regular file: point api.token_file "
                              "at the token `safekit-cloud init` wrote")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ClientError(f"cannot read the API token {path}: no such file "
                          "(api.token_file; `safekit-cloud init` writes it)") from None
    except PermissionError:
        raise ClientError(f"cannot read the API token {path}: permission denied "
                          "(run as root or as the daemon's user)") from None
    except OSError as exc:
        raise ClientError(f"cannot read the API token {path}: {exc.strerror}") from None
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ClientError(f"the API token file {path} is not text (byte {exc.start + 1} is not UTF-8): "
                          f"{TOKEN_REDO}") from None
    if not token:
        raise ClientError(f"the API token file {path} is empty")
    bad = _unsendable_character(token)
    if bad:
        raise ClientError(f"the API token file {path} holds {bad} inside the token, which must be one line "
                          f"of printable ASCII: {TOKEN_REDO}")
    return token


def _unsendable_character(token: str) -> str | None:
    """What in the token an HTTP header cannot carry: urllib refuses a line break, and a non-ASCII
    character goes out as Latin-1 (or not at all) and so never matches the daemon's token."""
    for char in token:
        if " " <= char <= "~":
            continue
        if char in "\r\n":
            return "a line break"
        if char.isascii() or not char.isprintable():
            return f"a control character ({char!r})"
        return f"a non-ASCII character ({char!r})"
    return None


def client_ssl_context(cert_file: Path) -> ssl.SSLContext:
    """Trust exactly the daemon's own certificate (pinning): the CLI talks to 127.0.0.1, which a
    certificate issued for the node's name would not match, so the name is not what we check."""
    try:
        context = ssl.create_default_context(cafile=str(cert_file))
    except (OSError, ssl.SSLError) as exc:
        raise ClientError(f"cannot load the API certificate {cert_file}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a CA-issued leaf is its own anchor here
    return context


def connect_host(listen_host: str) -> str:
    """The address to reach a daemon listening on `listen_host` from this machine."""
    if listen_host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if listen_host == "::":
        return "::1"
    return listen_host


@dataclass
class DaemonClient:
    base_url: str
    token: str
    address: str  # host:port, for messages
    ssl_context: ssl.SSLContext | None = None
    # This node's name for messages, found only when one is printed: finding it from the local
    # addresses costs a netlink import that `state` in a monitoring loop should not pay.
    node: str | Callable[[], str | None] | None = None
    token_file: Path | None = None  # where the token came from: what a 401 names

    @classmethod
    def from_config(cls, api: ApiConfig, node: str | Callable[[], str | None] | None = None) -> DaemonClient:
        host = connect_host(api.host)
        netloc = f"[{host}]:{api.port}" if ":" in host else f"{host}:{api.port}"
        context = client_ssl_context(api.tls.cert_file) if api.tls else None
        return cls(f"{'https' if context else 'http'}://{netloc}", read_token(api.token_file), netloc, context, node,
                   api.token_file)

    @property
    def where(self) -> str:
        """"127.0.0.1:9010 (node n1)": what error messages name."""
        node = self.node() if callable(self.node) else self.node
        return self.address + (f" (node {node})" if node else "")

    # ---- the API --------------------------------------------------------------------------------

    def status_raw(self, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        return self._request("GET", "/api/v1/status", timeout=timeout)[1]

    def status(self, timeout: float = DEFAULT_TIMEOUT) -> NodeOut:
        return decode_status(self.status_raw(timeout))

    def command(self, module: str, verb: str, timeout: float = COMMAND_TIMEOUT,
                fullsync: bool = False) -> CommandResult:
        path = f"/api/v1/modules/{_q(module)}/{_q(verb)}" + ("?fullsync=1" if fullsync else "")
        _, body = self._request("POST", path, accept=(200, 409), timeout=timeout)
        try:
            return msgspec.json.decode(body, type=CommandResult)
        except DECODE_ERRORS as exc:
            raise ClientError(f"unexpected answer from the daemon at {self.where}: {exc}") from None

    def verify(self, module: str, timeout: float = VERIFY_TIMEOUT) -> dict[str, Any]:
        """The verify report of the module's replicas (RequestFailed 409: verify could not run)."""
        try:
            _, body = self._request("POST", f"/api/v1/modules/{_q(module)}/verify", timeout=timeout)
        except AnswerTimeout:
            # Not an unreachable daemon: a verify hashes every replicated byte on both nodes. The
            # daemon runs it to its end (a client leaving does not cancel it) and keeps the result.
            raise ClientError(f"no verify report from the daemon at {self.where} within {timeout:g} s: a verify "
                              "hashes all replicated data on both nodes; run it again with a larger --timeout. "
                              "The verify under way runs to its end: `safekit-cloud status --json` shows its "
                              "result as replication.last_verify") from None
        try:
            report = json.loads(body)
        except ValueError as exc:
            raise ClientError(f"unexpected answer from the daemon at {self.where}: {exc}") from None
        if not isinstance(report, dict) or "identical" not in report:
            raise ClientError(f"unexpected answer from the daemon at {self.where}: no verify report")
        return report

    def log(self, module: str, offset: int | None = None, tail: int | None = None) -> dict[str, Any]:
        query = {k: str(v) for k, v in (("offset", offset), ("tail", tail)) if v is not None}
        path = f"/api/v1/modules/{_q(module)}/log" + ("?" + urllib.parse.urlencode(query) if query else "")
        try:
            return json.loads(self._request("GET", path)[1])
        except ValueError as exc:
            raise ClientError(f"unexpected answer from the daemon at {self.where}: {exc}") from None

    # ---- transport --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, accept: tuple[int, ...] = (200,),
                 timeout: float = DEFAULT_TIMEOUT) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base_url + path, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Accept": "application/json"})
        log.debug("%s %s", method, request.full_url)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.ssl_context) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if exc.code in accept:
                return exc.code, body
            message = _error_message(exc.code, body)
            if exc.code == 401 and self.token_file is not None:
                # The API cannot know which file the CLI read: say it, and the usual causes.
                message += (f": the daemon at {self.where} refused the token of {self.token_file} (api.token_file): "
                            "it must hold the token that daemon read when it started; restart the daemon after "
                            "writing a new token, or copy that token there")
            raise RequestFailed(exc.code, message) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise self._transport_error(exc) from None

    def _transport_error(self, exc: BaseException) -> ClientError:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, ssl.SSLError):
            return ClientError(f"TLS error with the daemon at {self.where}: "
                               f"{getattr(reason, 'verify_message', None) or reason.reason or reason}")
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return AnswerTimeout(f"the safekit-cloud daemon at {self.where} did not answer in time")
        return DaemonUnreachable(f"cannot reach the safekit-cloud daemon at {self.where}: "
                                 f"is `safekit-cloud run` running? ({_describe_reason(reason)})")


def decode_status(body: bytes) -> NodeOut:
    try:
        return msgspec.json.decode(body, type=NodeOut)
    except DECODE_ERRORS as exc:
        raise ClientError(f"the daemon's status does not match this CLI's schema: {exc}") from None


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _error_message(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace").strip().splitlines()[0] if body.strip() else ""
    return f"{message or 'no details'} (HTTP {status})"


def _describe_reason(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason) or type(reason).__name__
