"""The local admin API: status, commands and logs for the CLI and the web console, /health for probes.

Everything under /api/v1/ needs the bearer token; `/health` does not, because cloud load balancers
probe it without credentials and it reveals one bit (does this node serve the module). Every answer,
errors included, is JSON except /health (plain text, what probes log) and the console page. The
status body is `status.NodeOut`, the stable schema of docs/api.md.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from .config import ApiConfig, TLSConfig
from .replication.verify import VerifyError
from .status import COMMANDS, MAX_QUERY_DIGITS, Controller

log = logging.getLogger(__name__)

# A connection that has not sent a whole request within this, or idles this long between two, is
# closed: a client that connects and sends nothing (or half a header) must not hold a socket for ever.
IDLE_TIMEOUT = 30.0
MAX_LOG_CHUNK = 1 << 20  # one log response at most: the CLI pages with the returned offset
_TAIL_BLOCK = 64 * 1024
CONTROLLER: web.AppKey[Controller] = web.AppKey("controller", Controller)  # type: ignore[type-abstract]
TOKEN: web.AppKey[bytes] = web.AppKey("token", bytes)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FLAG_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


class ApiError(OSError):
    """The API cannot start (address in use, unreadable TLS files). An OSError so that the daemon's
    edge, which already reports I/O failures in one line, reports this one the same way."""


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    # no-store: an error cached by a proxy (a /health 404 while a module is being added) would outlive it
    return web.json_response({"error": message}, status=status, headers={"Cache-Control": "no-store", **(headers or {})})


# ---- middlewares -----------------------------------------------------------------------------------

@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON errors everywhere, and never a traceback to the client: unexpected exceptions are logged
    here with their traceback and answered with one line."""
    try:
        response = await handler(request)
        # Nothing here may be cached: a proxy keeping a status, a 409 or a log chunk would show a state
        # that has since changed (json_error, /health and the console already say so themselves).
        response.headers.setdefault("Cache-Control", "no-store")
        return response
    except web.HTTPException as exc:  # the router's 404 / 405
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return json_error(exc.status, f"{exc.reason}: {request.method} {request.path}", allow)
    except Exception as exc:
        log.exception("api: %s %s failed", request.method, request.path)
        return json_error(500, f"internal error: {type(exc).__name__}: {exc}".splitlines()[0])


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token on /api/: checked before routing's answer, so unknown routes do not leak."""
    if request.path.startswith("/api/"):
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        expected = request.app[TOKEN]
        # compare_digest: the time taken must not tell how much of a guessed token was right.
        # surrogateescape: aiohttp decodes header bytes that are not UTF-8 that way; any bytes a
        # client sends are a wrong token, never a 500.
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, expected):
            return json_error(401, "missing or wrong API token (Authorization: Bearer <api.token_file>)",
                              {"WWW-Authenticate": 'Bearer realm="safekit-cloud"'})
    return await handler(request)


# ---- handlers ------------------------------------------------------------------------------------

def _controller(request: web.Request) -> Controller:
    return request.app[CONTROLLER]


def _bad_request(request: web.Request, params: tuple[str, ...]) -> web.Response | None:
    """A body, a query parameter the route does not take, or one given twice: refused rather than
    ignored (every route calls this), so that a typo (?fulsync=1), a client that sends options in a
    body, or ?offset=1&offset=2 (which value?) does not get another answer than the one meant."""
    if request.body_exists:
        return json_error(400, f"{request.method} {request.path} takes no body: send the request without one")
    unknown = sorted(set(request.query) - set(params))
    if unknown:
        takes = f"it takes {', '.join(params)}" if params else "it takes none"
        return json_error(400, f"unknown query parameter {', '.join(unknown)} for {request.path} ({takes})")
    repeated = sorted(name for name in set(request.query) if len(request.query.getall(name)) > 1)
    if repeated:
        return json_error(400, f"query parameter {', '.join(repeated)} given more than once for {request.path}: "
                               "give it once")
    return None


def _unknown_module(controller: Controller, module: str) -> web.Response | None:
    names = controller.module_names()
    if module in names:
        return None
    return json_error(404, f"unknown module {module!r} (modules: {', '.join(names) or 'none'})")


async def health(request: web.Request) -> web.Response:
    """200 only where the module should receive traffic (PRIM/ALONE): what load balancers probe."""
    if (bad := _bad_request(request, ("module",))) is not None:
        return bad
    controller = _controller(request)
    names = controller.module_names()
    module = request.query.get("module")
    if module is None:
        if len(names) != 1:
            return json_error(400, f"several modules ({', '.join(names)}): pass ?module=NAME")
        module = names[0]
    if (missing := _unknown_module(controller, module)) is not None:
        return missing
    serving = controller.serving(module)
    # no-store: a cached "serving" from a proxy would send traffic to a node that stopped serving
    return web.Response(text="serving\n" if serving else "not serving\n", status=200 if serving else 503,
                        headers={"Cache-Control": "no-store"})


async def status(request: web.Request) -> web.Response:
    if (bad := _bad_request(request, ())) is not None:
        return bad
    body = msgspec.json.encode(_controller(request).status())
    return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"})


async def command(request: web.Request) -> web.Response:
    controller = _controller(request)
    module, verb = request.match_info["module"], request.match_info["verb"]
    if (missing := _unknown_module(controller, module)) is not None:
        return missing
    if verb == "log":
        return json_error(405, f"Method Not Allowed: {request.method} {request.path} (the log is read with GET)",
                          {"Allow": "GET"})
    if verb not in COMMANDS:
        return json_error(404, f"unknown command {verb!r} (commands: {', '.join(COMMANDS)})")
    if (bad := _bad_request(request, ("fullsync",))) is not None:
        return bad
    raw = request.query.get("fullsync")
    if raw is not None and raw.lower() not in FLAG_VALUES:
        return json_error(400, f"fullsync must be 1 or 0 (or true/false, yes/no), got {raw!r}")
    fullsync = raw is not None and FLAG_VALUES[raw.lower()]
    if raw is not None and verb != "second":
        return json_error(400, "fullsync goes with the command second only")
    log.info("api: %s %s requested%s", verb, module, " (fullsync)" if fullsync else "")
    result = await (controller.command(module, verb, fullsync=True) if fullsync
                    else controller.command(module, verb))
    return web.Response(body=msgspec.json.encode(result), content_type="application/json",
                        status=200 if result.ok else 409)


async def verify(request: web.Request) -> web.Response:
    """Compare the module's replicas (runs on the primary; may take as long as hashing the data).
    200 with the report (identical or not); 409 when it cannot run (not primary, peer unreachable)."""
    controller = _controller(request)
    module = request.match_info["module"]
    if (missing := _unknown_module(controller, module)) is not None:
        return missing
    if (bad := _bad_request(request, ())) is not None:
        return bad
    run = getattr(controller, "verify", None)
    if run is None:
        return json_error(501, "this daemon cannot verify replicas")
    log.info("api: verify %s requested", module)
    try:
        report = await run(module)
    except VerifyError as exc:
        return json_error(409, f"verify {module}: {exc}")
    return web.json_response(report, headers={"Cache-Control": "no-store"})


def _int_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    # isascii: str.isdigit also takes "²" and other scripts' digits.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > MAX_QUERY_DIGITS:
        raise ValueError(f"{name} must be a whole number >= 0, got {raw[:40]!r}")
    return int(raw)


async def module_log(request: web.Request) -> web.Response:
    controller = _controller(request)
    module = request.match_info["module"]
    if (missing := _unknown_module(controller, module)) is not None:
        return missing
    if (bad := _bad_request(request, ("offset", "tail"))) is not None:
        return bad
    try:
        offset, tail = _int_param(request, "offset"), _int_param(request, "tail")
    except ValueError as exc:
        return json_error(400, str(exc))
    # file I/O in a thread: a slow disk must not stall heartbeats handled by this event loop
    path = controller.log_path(module)
    try:
        chunk = await asyncio.to_thread(read_log, path, offset, tail)
    except OSError as exc:  # the node's side (a directory where the log goes): said, not a traceback
        return json_error(500, f"cannot read the module log {path}: {exc.strerror or exc}")
    return web.json_response(chunk)


async def console(request: web.Request) -> web.Response:
    # The page holds no data (it fetches the status with the token the user types), so it needs no
    # auth; the CSP keeps it from loading or sending anything anywhere but this API.
    if (bad := _bad_request(request, ())) is not None:
        return bad
    return web.Response(text=CONSOLE_HTML, content_type="text/html", headers={
        "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                   "style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    })


# ---- log reading (runs in a thread) ------------------------------------------------------------

def read_log(path: str | Path, offset: int | None, tail: int | None) -> dict[str, Any]:
    """A chunk of the module log: from `offset`, or the last `tail` lines, at most MAX_LOG_CHUNK bytes.

    Returns {"offset": where the next read starts, "text": ..., "size": the file's size}. An offset
    past the end means the log was truncated or rotated: reading restarts at 0.
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            start = 0 if offset is None or offset > size else offset
            if tail is not None:
                start = max(start, _tail_start(fh, size, tail))
            fh.seek(start)
            data = fh.read(min(MAX_LOG_CHUNK, size - start))
    except FileNotFoundError:  # the module has not logged anything yet
        return {"offset": 0, "text": "", "size": 0}
    if start + len(data) < size:
        # cut at a line end, so the next chunk starts a line; a line longer than a chunk is cut
        # between two characters, so no UTF-8 sequence is split either
        data = data[: data.rindex(b"\n") + 1] if b"\n" in data else data[:utf8_boundary(data)]
    return {"offset": start + len(data), "text": data.decode("utf-8", "replace"), "size": size}


def utf8_boundary(data: bytes) -> int:
    """The length of the longest prefix of `data` that ends between two UTF-8 characters (a
    sequence cut at the end is left for the next chunk)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the lead byte (or ASCII) of the last sequence
            need = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4  # bytes it takes
            return len(data) if back >= need else len(data) - back
    return len(data)  # not UTF-8 there: cut anywhere, decoding replaces it


def _tail_start(fh: Any, size: int, lines: int) -> int:
    """Offset where the last `lines` lines start (no further back than MAX_LOG_CHUNK)."""
    if lines <= 0 or size == 0:
        return size
    floor = max(0, size - MAX_LOG_CHUNK)
    fh.seek(size - 1)
    pos = size - 1 if fh.read(1) == b"\n" else size  # a final newline ends the last line
    seen = 0
    while pos > floor:
        step = min(_TAIL_BLOCK, pos - floor)
        pos -= step
        fh.seek(pos)
        block = fh.read(step)
        end = len(block)
        while (end := block.rfind(b"\n", 0, end)) >= 0:
            seen += 1
            if seen == lines:
                return pos + end + 1
    if floor == 0:
        return 0
    fh.seek(floor)  # the window starts mid-line: skip to the next line
    first = fh.read(MAX_LOG_CHUNK).find(b"\n")
    return floor + first + 1 if first >= 0 else floor


# ---- application and server ----------------------------------------------------------------------

def build_app(controller: Controller, token: str) -> web.Application:
    if not token:
        raise ValueError("the API token is empty")  # an empty token would let an empty header in
    app = web.Application(middlewares=[errors_middleware, auth_middleware])
    app[CONTROLLER] = controller
    app[TOKEN] = token.encode()
    app.router.add_get("/", console)
    app.router.add_get("/health", health)
    app.router.add_get("/api/v1/status", status)
    app.router.add_post("/api/v1/modules/{module}/verify", verify)  # before the generic verb route
    app.router.add_post("/api/v1/modules/{module}/{verb}", command)
    app.router.add_get("/api/v1/modules/{module}/log", module_log)
    return app


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ApiError(f"api.tls: cannot load {tls.cert_file} / {tls.key_file}: {reason}") from None
    return context


class OneLineBadRequests(logging.Filter):
    """aiohttp logs every malformed request (a bad header, a TLS hello on plain HTTP) at ERROR with a
    traceback: anyone who can connect could fill the daemon's log with them. One warning line each."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            first = (str(exc).splitlines() or [""])[0][:200]
            record.msg, record.args = "api: bad request from a client: %s%s", (type(exc).__name__,
                                                                                f": {first}" if first else "")
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


async def serve_api(app: web.Application, api_config: ApiConfig, idle_timeout: float = IDLE_TIMEOUT) -> web.AppRunner:
    """Serve `app` on api.listen (HTTPS when api.tls is set). Call `runner.cleanup()` to stop."""
    context = server_ssl_context(api_config.tls) if api_config.tls else None
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, OneLineBadRequests) for f in server_log.filters):
        server_log.addFilter(OneLineBadRequests())
    # access_log None: load balancers probe /health every few seconds, which would drown the log;
    # commands are logged by the handler. handler_cancellation False: a CLI that goes away (Ctrl-C)
    # must not cancel a transition half-way. keepalive_timeout: aiohttp counts it from the connection's
    # start too, which is what closes a silent or half-sent request (a request being handled is never cut).
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=False,
                           keepalive_timeout=idle_timeout)
    await runner.setup()
    site = web.TCPSite(runner, api_config.host, api_config.port, ssl_context=context, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ApiError(f"api.listen: cannot listen on {api_config.listen}: {exc.strerror or exc}") from None
    log.info("api: listening on %s://%s", "https" if context else "http", api_config.listen)
    return runner


# ---- the web console -----------------------------------------------------------------------------

CONSOLE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>safekit-cloud</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{background:#1f2d3d;color:#fff;padding:10px 16px;display:flex;gap:16px;align-items:center}
header h1{font-size:17px;margin:0}#meta{opacity:.8}#err{color:#b00020;padding:8px 16px}
main{padding:8px 16px}section{background:#fff;border-radius:6px;padding:10px 14px;margin:10px 0;
box-shadow:0 1px 2px #0002}h2{font-size:15px;margin:0 0 6px}table{border-collapse:collapse;width:100%}
td,th{text-align:left;padding:3px 8px;border-bottom:1px solid #eee;vertical-align:top}th{color:#666;font-weight:600}
.st{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-weight:600;background:#888}
.PRIM,.ALONE{background:#1a7f37}.SECOND{background:#0969da}.WAIT{background:#bf8700}.STOP{background:#6e7781}
.ok{color:#1a7f37}.bad{color:#b00020}form{display:flex;gap:8px}input{flex:1;padding:4px}
</style></head><body>
<header><h1>safekit-cloud</h1><span id="meta"></span></header>
<div id="err"></div>
<main>
<section id="login" hidden><h2>API token</h2><form id="f">
<input id="tok" type="password" autocomplete="off" placeholder="contents of api.token_file">
<button>Show status</button></form></section>
<div id="view"></div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function table(head, rows) {
  const t = el("table"), h = el("tr");
  head.forEach((c) => h.appendChild(el("th", c)));
  t.appendChild(h);
  rows.forEach((r) => { const tr = el("tr"); r.forEach((c) => tr.appendChild(c instanceof Node ? wrap(c) : el("td", c))); t.appendChild(tr); });
  return t;
}
function wrap(node) { const td = el("td"); td.appendChild(node); return td; }
function yes(v, good, bad) { return el("span", v ? good : bad, v ? "ok" : "bad"); }
function ago(s) { return s === null ? "never" : s.toFixed(1) + " s ago"; }
function peer(p) {
  const s = el("section");
  s.appendChild(el("h2", "Peer " + p.name + (p.reachable ? " (reachable)" : " (unreachable)")));
  s.appendChild(table(["network", "alive", "last heard", "RTT"], p.networks.map((n) =>
    [n.network, yes(n.alive, "alive", "silent"), ago(n.last_seen_ago),
     n.rtt_ms === null ? "-" : n.rtt_ms.toFixed(2) + " ms"])));
  return s;
}
function module(m) {
  const s = el("section"), h = el("h2", "Module " + m.name + " ");
  h.appendChild(el("span", m.state, "st " + m.state));
  s.appendChild(h);
  s.appendChild(table(["data", "serving", "VIP", "peer", "waiting for", "busy", "restarts"], [[
    m.data, yes(m.serving, "serving", "not serving"),
    m.vip ? m.vip + " (" + m.vip_provider + ")" : "-",
    m.peer_state ? m.peer_state + " / " + m.peer_data : "unreachable",
    m.waiting_for || "-", m.busy || "-", m.restarts + " / " + m.restart_limit]]));
  if (m.checkers.length) {
    s.appendChild(el("h2", "Checkers"));
    s.appendChild(table(["name", "type", "result", "failures", "action", "reason"], m.checkers.map((c) =>
      [c.name, c.type, c.ok === null ? "pending" : yes(c.ok, "ok", "failed"),
       String(c.consecutive_failures), c.action, c.reason])));
  }
  s.appendChild(el("h2", "Last decisions"));
  s.appendChild(table(["time", "event", "transition", "reason"], m.decisions.slice(0, 5).map((d) =>
    [new Date(d.time * 1000).toLocaleTimeString(), d.event, d.from_state + " \\u2192 " + d.to_state, d.reason])));
  return s;
}
function render(st) {
  $("meta").textContent = "cluster " + st.cluster + " \\u00b7 node " + st.node + " \\u00b7 version " +
    st.version + " \\u00b7 up " + Math.round(st.uptime) + " s";
  const v = $("view");
  v.replaceChildren(peer(st.peer), ...st.modules.map(module));
}
async function refresh() {
  const token = sessionStorage.getItem("safekit-token");
  if (!token) { $("login").hidden = false; return; }
  try {
    const r = await fetch("/api/v1/status", {headers: {Authorization: "Bearer " + token}, cache: "no-store"});
    if (r.status === 401) { sessionStorage.removeItem("safekit-token"); $("login").hidden = false;
      $("err").textContent = "wrong token"; return; }
    if (!r.ok) { $("err").textContent = (await r.json()).error || r.statusText; return; }
    $("login").hidden = true; $("err").textContent = "";
    render(await r.json());
  } catch (e) { $("err").textContent = "daemon unreachable: " + e; }
}
$("f").addEventListener("submit", (e) => {
  e.preventDefault(); sessionStorage.setItem("safekit-token", $("tok").value.trim()); $("tok").value = ""; refresh();
});
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""
