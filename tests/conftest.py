"""Shared fixtures.

`lab`: hosts in network namespaces (safekit_cloud.core.lab). Tests that use it are marked `netns`
automatically and skip, with the reason, where labs cannot be built (not root, no `ip`, ...).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from safekit_cloud.core.lab import Lab, cleanup_stale_labs, lab_supported


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.netns)


@pytest.fixture(scope="session")
def _lab_host() -> None:
    ok, why = lab_supported()
    if not ok:
        pytest.skip(f"network-namespace lab unavailable: {why}")
    cleanup_stale_labs()  # what crashed earlier runs left behind (their owner process is dead)


@pytest.fixture
def lab(_lab_host: None) -> Iterator[Lab]:
    with Lab() as built:
        yield built
