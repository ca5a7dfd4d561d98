"""Shared helpers for the replication tests (no pytest-asyncio here: each test runs its own loop)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
KEY = b"k" * 32


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(primary tree, replica tree, a directory outside both that nothing may ever touch)."""
    out = []
    for name in ("primary", "replica", "outside"):
        d = tmp_path / name
        d.mkdir()
        out.append(d)
    (out[2] / "victim").write_bytes(b"untouched")
    return out[0], out[1], out[2]


def snapshot_outside(outside: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in outside.iterdir() if p.is_file()}


@pytest.fixture
def root_fd(dirs: tuple[Path, Path, Path]):
    fd = os.open(dirs[1], os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)
