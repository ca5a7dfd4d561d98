"""The signals the replication service sends its primary agents (agent.py handles them).

Signals rather than a command channel: the agents' stdin carries only the key, and these two orders
carry no data and may come at any time, also while the agent's loop is busy.
"""

from __future__ import annotations

import signal

# Heartbeats lost the peer: give the link up at once (the application's pending writes then go on
# instead of waiting for the acknowledgement timeout) and release held writes.
PEER_LOST_SIGNAL = signal.SIGUSR2
# The peer no longer counts itself an up-to-date secondary: release held writes (resync.py, "Holding
# writes"). A real-time signal, which nothing else sends; SIGRTMIN is past glibc's internal ones.
RELEASE_WRITES_SIGNAL = signal.SIGRTMIN
# The module leaves the primary role: held writes, and later ones, fail (EIO) instead of being
# acknowledged by the hold's time limit; the node is about to take the peer's data.
REFUSE_HELD_WRITES_SIGNAL = signal.SIGRTMIN + 1
