"""Our FUSE layer alone, no replication: the ceiling the mirror can reach on this machine.

`python -m bench.fuse_only DIR` mounts the mirror's pass-through file system (the same
ReplicatedFS and FUSE session as the primary agent, with nothing to replicate to) over DIR, prints
`ready`, and serves until SIGTERM or SIGINT, then unmounts. Its event loop polls before sleeping
as the agents' do (busypoll.py, the default window). replication_bench.py runs every workload
on it too: the gap between this column and local is the FUSE layer's cost, the gap between this
column and the mirror is the replication's.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safekit_cloud.core.replication.busypoll import new_event_loop
from safekit_cloud.core.replication.fusefs import ReplicatedFS
from safekit_cloud.core.replication.memory import keep_freed_memory
from safekit_cloud.core.replication.mount import FuseMount


async def serve(directory: Path) -> None:
    mount = FuseMount(directory, lambda root_fd: ReplicatedFS(root_fd))
    await mount.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await mount.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python -m bench.fuse_only DIRECTORY (an existing directory to mount over)")
    keep_freed_memory()  # as the primary agent does (core/replication/memory.py)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(Path(sys.argv[1])))
