"""In-memory-like fake provider for unit tests and the contract suite.

The "network" is a small JSON file shared by every node that names the same `state_file`, so daemons
in separate processes (the integration tests) see one VIP holder. Faults can be injected by writing
`fail_next` (a count of retryable failures) or `deny` (a permission error) into the file.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
from pathlib import Path
from typing import Any, ClassVar

from .base import ProviderPermissionError, ProviderRetryable, ProviderSettings, VipProvider


class FakeSettings(ProviderSettings):
    state_file: Path


class FakeProvider(VipProvider):
    name: ClassVar[str] = "fake"
    settings_model: ClassVar[type[ProviderSettings]] = FakeSettings
    first_backoff: ClassVar[float] = 0.01
    deadline: ClassVar[float] = 5.0
    settings: FakeSettings

    def _update(self, change: Any) -> Any:
        """Read-modify-write the shared file under an exclusive lock; `change` mutates the dict."""
        path = self.settings.state_file
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            raw = fh.read()
            state = json.loads(raw) if raw.strip() else {}
            try:
                return change(state)
            finally:  # also when an injected fault raised: its counter must go down
                fh.seek(0)
                fh.truncate()
                json.dump(state, fh)

    def _fault(self, state: dict[str, Any]) -> None:
        if state.get("deny"):
            raise ProviderPermissionError(f"fake: permission {state['deny']!r} denied to {self.node}")
        if state.get("fail_next", 0) > 0:
            state["fail_next"] -= 1
            raise ProviderRetryable("fake: throttled")

    async def _run(self, change: Any) -> Any:
        return await asyncio.to_thread(self._update, change)

    async def _attach(self) -> None:
        def attach(state: dict[str, Any]) -> None:
            self._fault(state)
            state.setdefault("holders", {})[self.vip] = self.node
            state.setdefault("log", []).append(["attach", self.node])
        await self._run(attach)

    async def _detach(self) -> None:
        def detach(state: dict[str, Any]) -> None:
            self._fault(state)
            if state.get("holders", {}).get(self.vip) == self.node:
                del state["holders"][self.vip]
            state.setdefault("log", []).append(["detach", self.node])
        await self._run(detach)

    async def _holder(self) -> str | None:
        return await self._run(lambda state: state.get("holders", {}).get(self.vip))

    async def _check(self) -> list[str]:
        try:
            await self._run(lambda state: None)
        except OSError as exc:
            return [f"fake: cannot use {self.settings.state_file}: {exc.strerror}"]
        return []

    @classmethod
    def _detect(cls) -> bool:
        return False
