"""The agents keep the memory they free for their next buffers (core/replication/memory.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Buffers the size of a FUSE write and of its frames, made and freed 300 times, with small
# long-lived objects made meanwhile (as statistics and journal marks are): glibc's defaults then
# return the large buffers' memory to the kernel at every free, and each new buffer's pages fault
# in again (163,075 page faults here without keep_freed_memory, 547 with it).
CHURN = textwrap.dedent("""
    import resource, sys
    from safekit_cloud.core.replication.memory import keep_freed_memory
    assert keep_freed_memory(), "mallopt refused"
    keep = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(300):
        big = bytearray(1 << 20)
        frames = [bytearray(big[j:j + (256 << 10)]) for j in range(0, 1 << 20, 256 << 10)]
        keep.append(bytes(100))
        if len(keep) > 50:
            del keep[:25]
        del big, frames
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def test_large_buffers_made_and_freed_in_a_loop_reuse_their_memory() -> None:
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, timeout=60, check=True)
    faults = int(out.stdout)
    # 300 rounds of 2 MiB: 153,600 pages if each were new; a few thousand at most once reused.
    assert faults < 5000, f"{faults} page faults: freed buffers went back to the kernel"
