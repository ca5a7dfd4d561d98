"""The admin API served for real on 127.0.0.1 (a free port), in front of a fake controller."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
from safekit_cloud.core.api import MAX_LOG_CHUNK, ApiError, build_app, read_log, serve_api
from safekit_cloud.core.client import DaemonClient, DaemonUnreachable
from safekit_cloud.core.config import ApiConfig, TLSConfig
from safekit_cloud.core.status import (
    CheckerOut,
    CommandResult,
    DecisionOut,
    ModuleOut,
    NetworkOut,
    NodeOut,
    PeerOut,
)
from safekit_cloud.core.types import ModuleState

TOKEN = "test-token-0123456789abcdef"


class FakeController:
    """Implements status.Controller over plain attributes the tests change."""

    def __init__(self, log_dir: Path, modules: tuple[str, ...] = ("app",)):
        self.states = {m: "STOP" for m in modules}
        self.data = {m: "uptodate" for m in modules}
        self.waiting_for = {m: "" for m in modules}
        self.log_dir = log_dir
        self.commands: list[tuple[str, str]] = []
        self.broken = False  # status() raises, as a bug would

    def module_names(self) -> list[str]:
        return list(self.states)

    def serving(self, module: str) -> bool:
        return ModuleState[self.states[module]].is_primary

    def log_path(self, module: str) -> str:
        return str(self.log_dir / f"{module}.log")

    async def command(self, module: str, verb: str, fullsync: bool = False) -> CommandResult:
        self.commands.append((module, verb + (" --fullsync" if fullsync else "")))
        await asyncio.sleep(0)
        if verb == "second" and self.states[module] == "STOP":
            return CommandResult(False, "the module is stopped: start it first", "STOP")
        target = {"start": "ALONE", "stop": "STOP", "forcestop": "STOP", "swap": "SECOND", "prim": "PRIM",
                  "second": "SECOND"}.get(verb, self.states[module])
        self.states[module] = target
        return CommandResult(True, f"{verb} done", target)

    def status(self) -> NodeOut:
        if self.broken:
            raise RuntimeError("engine bug\nsecond line")
        peer = PeerOut("n2", True, 7, [NetworkOut("default", True, 0.2, 0.35), NetworkOut("backup", False, None, None)])
        return NodeOut(1, "0.1.0", "c1", "n1", 42, 12.5, peer, {"sent": 10, "received": 9, "dropped_auth": 1},
                       [self._module(m) for m in self.states])

    def _module(self, name: str) -> ModuleOut:
        state = self.states[name]
        checker = CheckerOut("web", "http", True, "HTTP 200", 0, "restart", True)
        decision = DecisionOut(time.time(), "start", "STOP", state, "admin start: peer is SECOND", ["take_vip"])
        return ModuleOut(name, state, ModuleState[state].value, self.data[name], self.waiting_for[name], "",
                         self.serving(name), "198.18.0.100/24", "fake", "SECOND", "uptodate", "0a1b", 0, 3,
                         [checker], [decision], None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def served(controller: FakeController, tls: TLSConfig | None = None) -> AsyncIterator[str]:
    api = ApiConfig(listen=f"127.0.0.1:{free_port()}", tls=tls)
    runner = await serve_api(build_app(controller, TOKEN), api)
    try:
        yield f"{'https' if tls else 'http'}://{api.listen}"
    finally:
        await runner.cleanup()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(coro)


@pytest.fixture
def controller(tmp_path: Path) -> FakeController:
    return FakeController(tmp_path)


# ---- auth ----------------------------------------------------------------------------------------

def test_api_needs_the_token(controller: FakeController) -> None:
    async def scenario() -> None:
        async with served(controller) as url, aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                            {"Authorization": "Bearer "}):
                async with http.get(url + "/api/v1/status", headers=headers) as r:
                    assert r.status == 401
                    assert "token" in (await r.json())["error"]
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
            # unknown routes under /api/ answer 401 too: no route discovery without the token
            async with http.get(url + "/api/v1/nothing") as r:
                assert r.status == 401
            async with http.post(url + "/api/v1/modules/app/start") as r:
                assert r.status == 401
            assert controller.commands == []
            async with http.get(url + "/api/v1/status", headers=AUTH) as r:
                assert r.status == 200
    run(scenario())


def test_a_token_that_is_not_utf8_is_a_wrong_token_not_a_500(controller: FakeController) -> None:
    async def scenario() -> None:
        async with served(controller) as url:
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                         b"Connection: close\r\n\r\n")
            answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:80]
            assert b"missing or wrong API token" in answer
    run(scenario())


def test_a_malformed_request_is_one_warning_line_in_the_log(controller: FakeController,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Anyone who can connect could otherwise fill the daemon's log with aiohttp's tracebacks."""
    async def scenario() -> None:
        async with served(controller) as url:
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
            answer = await reader.read()
            writer.close()
            assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer[:80]
    caplog.set_level(logging.WARNING, logger="aiohttp.server")
    run(scenario())
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert records and all(r.levelno == logging.WARNING and r.exc_info is None for r in records)
    assert records[0].getMessage().startswith("api: bad request from a client: BadHttpMessage")


def test_a_client_that_sends_half_a_request_is_disconnected(controller: FakeController) -> None:
    async def scenario() -> None:
        api = ApiConfig(listen=f"127.0.0.1:{free_port()}")
        runner = await serve_api(build_app(controller, TOKEN), api, idle_timeout=0.5)
        try:
            silent = await asyncio.open_connection(api.host, api.port)
            half = await asyncio.open_connection(api.host, api.port)
            half[1].write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-a: ")
            for reader, writer in (silent, half):
                assert await asyncio.wait_for(reader.read(), 20) == b""  # closed by the server
                writer.close()
        finally:
            await runner.cleanup()
    run(scenario())


def test_empty_token_is_refused(controller: FakeController) -> None:
    with pytest.raises(ValueError):
        build_app(controller, "")


# ---- /health -------------------------------------------------------------------------------------

def test_health_single_module(controller: FakeController) -> None:
    async def scenario() -> None:
        async with served(controller) as url, aiohttp.ClientSession() as http:
            async with http.get(url + "/health") as r:
                assert (r.status, await r.text()) == (503, "not serving\n")
            for state in ("ALONE", "PRIM"):
                controller.states["app"] = state
                async with http.get(url + "/health?module=app") as r:
                    assert (r.status, await r.text()) == (200, "serving\n")
                    assert r.headers["Cache-Control"] == "no-store"
            for state in ("SECOND", "WAIT", "STOP"):
                controller.states["app"] = state
                async with http.get(url + "/health") as r:
                    assert r.status == 503
            async with http.get(url + "/health?module=nope") as r:
                assert r.status == 404
                assert "nope" in (await r.json())["error"]
    run(scenario())


def test_health_several_modules_needs_a_name(tmp_path: Path) -> None:
    controller = FakeController(tmp_path, ("app", "db"))
    controller.states["db"] = "PRIM"

    async def scenario() -> None:
        async with served(controller) as url, aiohttp.ClientSession() as http:
            async with http.get(url + "/health") as r:
                assert r.status == 400
                error = (await r.json())["error"]
                assert "app" in error and "db" in error
            async with http.get(url + "/health?module=db") as r:
                assert r.status == 200
            async with http.get(url + "/health?module=app") as r:
                assert r.status == 503
    run(scenario())


# ---- status and commands -------------------------------------------------------------------------

def test_status_decodes_into_the_stable_schema(controller: FakeController) -> None:
    async def scenario() -> NodeOut:
        async with (served(controller) as url, aiohttp.ClientSession() as http,
                    http.get(url + "/api/v1/status", headers=AUTH) as r):
            return msgspec.json.decode(await r.read(), type=NodeOut)
    node = asyncio.run(scenario())
    assert node.schema_version == 1
    assert node.node == "n1" and node.peer.networks[0].rtt_ms == 0.35
    assert [m.name for m in node.modules] == ["app"]
    assert node.modules[0].checkers[0].name == "web"


def test_commands(controller: FakeController) -> None:
    async def scenario() -> None:
        async with served(controller) as url, aiohttp.ClientSession() as http:
            async with http.post(url + "/api/v1/modules/app/second", headers=AUTH) as r:
                assert r.status == 409
                result = msgspec.json.decode(await r.read(), type=CommandResult)
                assert not result.ok and "start it first" in result.message
            async with http.post(url + "/api/v1/modules/app/start", headers=AUTH) as r:
                assert r.status == 200
                assert msgspec.json.decode(await r.read(), type=CommandResult) == CommandResult(
                    True, "start done", "ALONE")
            async with http.post(url + "/api/v1/modules/app/explode", headers=AUTH) as r:
                assert r.status == 404
                assert "explode" in (await r.json())["error"]
            async with http.post(url + "/api/v1/modules/nope/start", headers=AUTH) as r:
                assert r.status == 404
                assert "nope" in (await r.json())["error"]
            async with http.get(url + "/api/v1/modules/app/start", headers=AUTH) as r:
                assert r.status == 405
                assert "error" in await r.json()
            async with http.get(url + "/api/v1/nothing", headers=AUTH) as r:
                assert r.status == 404
                assert "error" in await r.json()
    run(scenario())
    assert controller.commands == [("app", "second"), ("app", "start")]


def test_second_with_fullsync_reaches_the_controller_and_other_verbs_refuse_it(controller: FakeController) -> None:
    async def scenario() -> None:
        async with served(controller) as url, aiohttp.ClientSession() as http:
            async with http.post(url + "/api/v1/modules/app/start", headers=AUTH) as r:
                assert r.status == 200
            async with http.post(url + "/api/v1/modules/app/second?fullsync=1", headers=AUTH) as r:
                assert r.status == 200
            async with http.post(url + "/api/v1/modules/app/swap?fullsync=1", headers=AUTH) as r:
                assert r.status == 400
                assert "second" in (await r.json())["error"]
    run(scenario())
    assert controller.commands == [("app", "start"), ("app", "second --fullsync")]


def test_bodies_unknown_parameters_and_bad_flags_are_refused(controller: FakeController) -> None:
    """Nothing a client sends is silently ignored: a typo or an option sent in a body must not run
    another command than the one meant."""
    async def scenario() -> None:
        async with served(controller) as url, aiohttp.ClientSession() as http:
            async with http.post(url + "/api/v1/modules/app/start", headers=AUTH) as r:
                assert r.status == 200
            for path, kwargs, status, words in [
                ("/api/v1/modules/app/stop", {"json": {"fullsync": True}}, 400, "takes no body"),
                ("/api/v1/modules/app/verify", {"data": b"x" * 100}, 400, "takes no body"),
                ("/api/v1/modules/app/second?fulsync=1", {}, 400, "unknown query parameter fulsync"),
                ("/api/v1/modules/app/second?fullsync=TRUE2", {}, 400, "fullsync must be 1 or 0"),
                ("/api/v1/modules/app/stop?fullsync=banana", {}, 400, "fullsync must be 1 or 0"),
                ("/api/v1/modules/app/stop?fullsync=0", {}, 400, "fullsync goes with the command second only"),
                ("/api/v1/modules/app/log", {}, 405, "the log is read with GET"),
            ]:
                async with http.post(url + path, headers=AUTH, **kwargs) as r:
                    assert r.status == status, (path, await r.text())
                    assert words in (await r.json())["error"], path
                    if status == 405:
                        assert r.headers["Allow"] == "GET"
            async with http.post(url + "/api/v1/modules/app/second?fullsync=True", headers=AUTH) as r:
                assert r.status == 200
            for query, words in [("size=10", "unknown query parameter size"),
                                 ("offset=%C2%B2", "offset must be a whole number >= 0"),
                                 ("offset=" + "9" * 5000, "offset must be a whole number >= 0"),
                                 ("tail=%D9%A3", "tail must be a whole number >= 0")]:
                async with http.get(f"{url}/api/v1/modules/app/log?{query}", headers=AUTH) as r:
                    assert r.status == 400, query
                    assert words in (await r.json())["error"], query
    run(scenario())
    assert controller.commands == [("app", "start"), ("app", "second --fullsync")]


def test_every_route_refuses_what_it_does_not_take(controller: FakeController) -> None:
    """docs/api.md: "Nothing a client sends is ignored" held for commands and the log only: the status,
    /health and the console answered 200 to an unknown parameter or a body, and the log read the first
    of two offsets."""
    async def scenario() -> None:
        async with served(controller) as url, aiohttp.ClientSession() as http:
            for path, kwargs, words in [
                ("/api/v1/status?x=1", {}, "unknown query parameter x for /api/v1/status (it takes none)"),
                ("/api/v1/status", {"data": b"{}"}, "GET /api/v1/status takes no body"),
                ("/health?module=app&x=1", {}, "unknown query parameter x for /health (it takes module)"),
                ("/health?module=app&module=app", {}, "query parameter module given more than once for /health"),
                ("/health", {"data": b"x"}, "GET /health takes no body"),
                ("/?x=1", {}, "unknown query parameter x for / (it takes none)"),
                ("/api/v1/modules/app/log?offset=1&offset=2", {},
                 "query parameter offset given more than once for /api/v1/modules/app/log: give it once"),
                ("/api/v1/modules/app/log", {"data": b"x"}, "takes no body"),
            ]:
                async with http.get(url + path, headers=AUTH, **kwargs) as r:
                    assert r.status == 400, (path, await r.text())
                    assert words in (await r.json())["error"], path
                    assert r.headers["Cache-Control"] == "no-store", path
            async with http.get(url + "/health?module=app", headers=AUTH) as r:
                assert r.status == 503  # STOP: a parameter it takes, once
    run(scenario())


def test_no_answer_may_be_cached(controller: FakeController, tmp_path: Path) -> None:
    """A 409 (command refused) had no Cache-Control although docs/api.md says no error may be cached."""
    (tmp_path / "app.log").write_text("line\n")

    async def scenario() -> None:
        async with served(controller) as url, aiohttp.ClientSession() as http:
            async with http.post(url + "/api/v1/modules/app/second", headers=AUTH) as r:
                assert r.status == 409 and (await r.json())["ok"] is False
                assert r.headers["Cache-Control"] == "no-store"
            for method, path, status in [
                ("GET", "/api/v1/modules/app/log", 200), ("POST", "/api/v1/modules/app/start", 200),
                ("GET", "/api/v1/status", 200), ("GET", "/health", 200), ("GET", "/api/v1/nothing", 404),
                ("PUT", "/api/v1/status", 405), ("GET", "/api/v1/modules/nope/log", 404),
            ]:
                async with http.request(method, url + path, headers=AUTH) as r:
                    assert r.status == status, (method, path, await r.text())
                    assert r.headers["Cache-Control"] == "no-store", (method, path)
    run(scenario())


def test_unexpected_exception_is_a_one_line_500(controller: FakeController,
                                                caplog: pytest.LogCaptureFixture) -> None:
    controller.broken = True

    async def scenario() -> None:
        async with (served(controller) as url, aiohttp.ClientSession() as http,
                    http.get(url + "/api/v1/status", headers=AUTH) as r):
            assert r.status == 500
            body = await r.json()
            assert body == {"error": "internal error: RuntimeError: engine bug"}
            assert "Traceback" not in json.dumps(body)
    run(scenario())
    assert any(rec.exc_info for rec in caplog.records)  # the traceback went to the daemon's log


# ---- logs ----------------------------------------------------------------------------------------

def test_log_offsets(controller: FakeController, tmp_path: Path) -> None:
    log = tmp_path / "app.log"

    async def get(http: aiohttp.ClientSession, url: str, query: str) -> dict:
        async with http.get(f"{url}/api/v1/modules/app/log?{query}", headers=AUTH) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def scenario() -> None:
        async with served(controller) as url, aiohttp.ClientSession() as http:
            assert await get(http, url, "offset=0") == {"offset": 0, "text": "", "size": 0}  # no log yet
            log.write_text("one\ntwo\nthree\n")
            first = await get(http, url, "offset=0")
            assert first["text"] == "one\ntwo\nthree\n" and first["offset"] == log.stat().st_size
            assert (await get(http, url, f"offset={first['offset']}"))["text"] == ""
            with log.open("a") as fh:
                fh.write("four\n")
            nxt = await get(http, url, f"offset={first['offset']}")
            assert nxt["text"] == "four\n" and nxt["offset"] == log.stat().st_size
            assert (await get(http, url, "tail=2"))["text"] == "three\nfour\n"
            assert (await get(http, url, "tail=0"))["text"] == ""
            assert (await get(http, url, "tail=100"))["text"] == "one\ntwo\nthree\nfour\n"
            log.write_text("rotated\n")  # shorter than our offset: start again from the beginning
            again = await get(http, url, f"offset={nxt['offset']}")
            assert again["text"] == "rotated\n"
            async with http.get(f"{url}/api/v1/modules/app/log?offset=-1", headers=AUTH) as r:
                assert r.status == 400
            async with http.get(f"{url}/api/v1/modules/nope/log", headers=AUTH) as r:
                assert r.status == 404
                assert r.headers["Cache-Control"] == "no-store"  # errors are never cached either
            log.unlink()
            log.mkdir()
            async with http.get(f"{url}/api/v1/modules/app/log", headers=AUTH) as r:
                assert r.status == 500
                assert (await r.json())["error"] == f"cannot read the module log {log}: Is a directory"
    run(scenario())


def test_log_chunks_are_capped_and_cut_at_line_ends(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    line = "é" * 50 + "\n"  # multi-byte characters: a chunk must never split one
    log.write_text(line * 30000)  # about 3 MiB
    size = log.stat().st_size
    offset, text = 0, []
    while offset < size:
        chunk = read_log(log, offset, None)
        assert len(chunk["text"].encode()) <= MAX_LOG_CHUNK
        assert chunk["text"].endswith("\n")
        text.append(chunk["text"])
        offset = chunk["offset"]
    assert "".join(text) == line * 30000
    tail = read_log(log, None, 10**6)  # more lines than fit: the last MiB, from a line start
    assert tail["offset"] == size and tail["text"].startswith("é") and len(tail["text"].encode()) <= MAX_LOG_CHUNK


# ---- console, TLS, startup errors ----------------------------------------------------------------

def test_console_page(controller: FakeController) -> None:
    async def scenario() -> None:
        async with (served(controller) as url, aiohttp.ClientSession() as http,
                    http.get(url + "/") as r):
            assert r.status == 200 and r.content_type == "text/html"
            page = await r.text()
            assert "/api/v1/status" in page and "sessionStorage" in page
            assert "src=" not in page and "href=" not in page  # no external assets
            assert "connect-src 'self'" in r.headers["Content-Security-Policy"]
    run(scenario())


def test_listen_address_in_use_is_a_clear_error(controller: FakeController) -> None:
    async def scenario() -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with pytest.raises(ApiError, match=f"cannot listen on 127.0.0.1:{port}"):
                await serve_api(build_app(controller, TOKEN), ApiConfig(listen=f"127.0.0.1:{port}"))
    run(scenario())


def _self_signed(tmp_path: Path) -> TLSConfig:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n1.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "api.crt", tmp_path / "api.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return TLSConfig(cert_file=cert_file, key_file=key_file)


def test_tls_with_the_cli_client(controller: FakeController, tmp_path: Path) -> None:
    """The CLI's client pins the daemon's certificate (issued for n1.example, reached as 127.0.0.1)."""
    tls = _self_signed(tmp_path)
    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    api = ApiConfig(listen=f"127.0.0.1:{port}", token_file=token_file, tls=tls)
    ready, done = threading.Event(), None

    async def serve() -> None:
        nonlocal done
        done = asyncio.Event()
        runner = await serve_api(build_app(controller, TOKEN), api)
        ready.set()
        await done.wait()
        await runner.cleanup()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        client = DaemonClient.from_config(api, "n1")
        assert client.base_url.startswith("https://")
        assert client.status().node == "n1"
        assert client.command("app", "start").state == "ALONE"
        plain = DaemonClient(f"http://127.0.0.1:{port}", TOKEN, f"127.0.0.1:{port}")
        with pytest.raises(DaemonUnreachable):  # HTTP to an HTTPS port: a clean error, not a crash
            plain.status()
        (tmp_path / "other").mkdir()
        other = _self_signed(tmp_path / "other")  # a certificate the server does not have
        stranger = DaemonClient.from_config(ApiConfig(listen=api.listen, token_file=token_file, tls=other))
        with pytest.raises(Exception, match="TLS error"):
            stranger.status()
    finally:
        loop.call_soon_threadsafe(done.set)  # type: ignore[union-attr]
        thread.join(10)
        loop.close()


def test_client_connection_refused_message(tmp_path: Path) -> None:
    port = free_port()
    client = DaemonClient(f"http://127.0.0.1:{port}", TOKEN, f"127.0.0.1:{port}", node=lambda: "n1")
    with pytest.raises(DaemonUnreachable) as info:
        client.status()
    assert str(info.value) == (f"cannot reach the safekit-cloud daemon at 127.0.0.1:{port} (node n1): "
                               "is `safekit-cloud run` running? (connection refused)")
    assert info.value.__cause__ is None  # nothing for a traceback to chain


def test_a_line_longer_than_a_chunk_is_cut_between_characters(tmp_path: Path) -> None:
    log = tmp_path / "long.log"
    line = "a" + "é" * MAX_LOG_CHUNK + "\n"  # 2 MiB + 2 bytes, the first chunk's end falls inside an é
    log.write_text(line)
    offset, text = 0, []
    while offset < log.stat().st_size:
        chunk = read_log(log, offset, None)
        assert "\ufffd" not in chunk["text"]
        text.append(chunk["text"])
        offset = chunk["offset"]
    assert "".join(text) == line
