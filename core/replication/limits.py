"""Writing application data under the application's own space limits.

The primary agent runs as root, and its writes are what the file system sees: without this, an
application running as `postgres` could fill the blocks ext4 reserves for root (5 % by default,
kept so that root's services and our own journal can still write on a full disk: root's
file-system uid or CAP_SYS_RESOURCE may use them), and would pass over its disk quota
(CAP_SYS_RESOURCE lifts it). Around each backing write or fallocate made for
a handle that a non-root user opened, the agent's thread takes that user's file-system uid
(`setfsuid`) and leaves CAP_SYS_RESOURCE out of its effective capabilities; the other file-system
capabilities (CAP_FSETID, CAP_DAC_OVERRIDE...) stay, so the write itself behaves as before (no
set-user-ID bit cleared behind the mount's back, which keeps the replica's modes equal). Both are
per-thread credentials: the event loop's thread holds them only for that one system call.

The secondary's receiver keeps root's limits: it must be able to store whatever the primary stored.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

_CAP_VERSION_3 = 0x20080522
_CAP_SYS_RESOURCE = 24
_CAP_SYS_ADMIN = 21


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.setfsuid.argtypes = [ctypes.c_uint32]
_libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]


class UserLimits:
    """`enter(uid)` before a space-allocating system call made for user `uid`, `leave()` right after,
    with no await in between. Inactive (both do nothing) unless this process runs as root: then
    there is nothing to lift."""

    def __init__(self) -> None:
        self._header = _CapHeader(_CAP_VERSION_3, 0)
        self._full = (_CapData * 2)()
        self._limited = (_CapData * 2)()
        self.active = False
        if os.geteuid() != 0:
            return
        if _libc.capget(ctypes.byref(self._header), self._full) != 0:
            log.warning("capget failed (%s): writes through the mount are not held to the application's "
                        "reserved-block and quota limits", os.strerror(ctypes.get_errno()))
            return
        ctypes.memmove(self._limited, self._full, ctypes.sizeof(self._full))
        self._limited[0].effective &= ~(1 << _CAP_SYS_RESOURCE)
        self.active = True

    def enter(self, uid: int) -> bool:
        """Take `uid`'s limits; False (nothing done) for root or when inactive."""
        if not uid or not self.active:
            return False
        _libc.setfsuid(uid)  # drops the file-system capabilities from the effective set...
        if _libc.capset(ctypes.byref(self._header), self._limited) != 0:  # ...given back here
            _libc.setfsuid(0)
            return False
        return True

    def leave(self) -> None:
        if _libc.capset(ctypes.byref(self._header), self._full) != 0:
            log.error("capset failed (%s) giving the agent back its capabilities", os.strerror(ctypes.get_errno()))
        _libc.setfsuid(0)


def effective_capabilities(status: str) -> int:
    """The CapEff mask of a /proc/PID/status text (0 when absent)."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split(":", 1)[1].strip(), 16)
    return 0


def caller_is_admin(pid: int) -> bool:
    """Whether process `pid` holds CAP_SYS_ADMIN, which a local file system asks of a caller before
    it lists trusted.* extended attributes. False when it cannot be read (the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            return bool(effective_capabilities(f.read()) >> _CAP_SYS_ADMIN & 1)
    except OSError:
        return False
