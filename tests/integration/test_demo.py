"""The README's first command: `safekit-cloud demo` runs to its end and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safekit_cloud.core.lab import FAMILY, PID_DIR, lab_supported, stale_labs

pytestmark = [pytest.mark.netns, pytest.mark.fuse,
              pytest.mark.skipif(not lab_supported()[0], reason=lab_supported()[1]),
              pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")]

CLI = str(Path(sys.executable).with_name("safekit-cloud"))


def owner_is_gone(namespace: str) -> bool:
    prefix = namespace[: namespace.index("-", len(FAMILY)) + 1] if namespace.startswith(FAMILY) else ""
    return not prefix or not (PID_DIR / f"{prefix}.pid").exists() or prefix in stale_labs()


def namespaces() -> set[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in result.stdout.splitlines() if line.strip()}


def test_demo_fails_over_swaps_back_keeps_the_data_and_cleans_up() -> None:
    before = namespaces()
    done = subprocess.run([CLI, "demo"], capture_output=True, text=True, timeout=300, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "failover (n1 powered off -> served by n2)" in out
    assert "every acknowledged visit kept" in out, out
    assert "final state" in out and "n1 PRIM, n2 SECOND" in out
    assert "namespaces, processes and files removed" in out
    # Labs of other runs may come and go meanwhile; what is new must belong to a live owner.
    leaked = [ns for ns in namespaces() - before if owner_is_gone(ns)]
    assert not leaked, f"the demo left namespaces behind: {leaked}"
