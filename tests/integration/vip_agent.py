"""A stand-in for the daemon in the LAN integration tests: one LAN provider living in this process
(and so in this host's network namespace), driven by one word per line on stdin: take, release,
holder, quit. Each answer is one JSON line on stdout; the first line says it is ready.

    python vip_agent.py NODE VIP SETTINGS_JSON
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from safekit_cloud.providers.base import ProviderError, create_provider


async def serve(node: str, vip: str, settings: dict[str, Any]) -> None:
    provider = create_provider("lan", vip, settings, node, ["n1", "n2"])
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": node}), flush=True)
    try:
        while line := (await reader.readline()).decode().strip():
            if line == "quit":
                break
            print(json.dumps(await answer(provider, line)), flush=True)
    finally:
        await provider.close()


async def answer(provider: Any, verb: str) -> dict[str, Any]:
    try:
        if verb == "holder":
            return {"ok": True, "holder": await provider.holder()}
        if verb in ("take", "release"):
            result = await getattr(provider, verb)()
            return {"ok": True, "changed": result.changed, "attempts": result.attempts}
        return {"ok": False, "error": "unknown command", "message": verb}
    except ProviderError as exc:
        return {"ok": False, "error": type(exc).__name__, "message": str(exc)}


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
