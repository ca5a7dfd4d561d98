"""Write protection of the secondary's replicated directories: a read-only bind mount over each.

The receiver agent opens its directory descriptor (O_PATH) first, then bind-mounts the directory
onto itself and remounts that bind read-only. Applications resolving the directory by path now
reach the read-only mount and get EROFS for every change; the receiver's descriptor still refers
to the original (read-write) mount, and so does everything it opens beneath it, including the
/proc/self/fd magic links it uses: replicated operations keep landing. (Checked on Linux 6.x; see
docs/replication.md, "Read-only secondary".)

The protection is undone when the receiver stops (lazily, MNT_DETACH: a process whose working
directory is inside does not block it), so become_primary finds a writable directory. A marker
file in the state directory records that the mount is ours, so a service restarted after a crash
of the agent removes a protection left behind, and never a mount it did not make.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from ..durable import replace_durably
from . import mountinfo
from .journal import boot_id
from .paths import open_replicated_dir, refuse_nested_mounts
from .syscalls import (
    MNT_DETACH,
    MOUNT_ATTR_RDONLY,
    MS_BIND,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_RELATIME,
    MS_REMOUNT,
    mount,
    mount_setattr,
    move_mount_beneath,
    open_tree,
    umount2,
)

log = logging.getLogger(__name__)

# statvfs f_flag bits that a bind remount must carry over (or they would be cleared on the bind).
_CARRIED = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
            os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}


def marker_path(state_dir: Path, module: str, directory: Path) -> Path:
    safe = str(directory).strip("/").replace("/", "_") or "root"
    return Path(state_dir) / f"{module}.{safe}.readonly"


def _mount(source: bytes | None, target: bytes, flags: int) -> None:
    mount(source, target, None, flags)


def _top_mount(directory: Path) -> tuple[bool, bool] | None:
    """(read-only, self-bind) of the topmost mount exactly at `directory`, None if there is none.
    Self-bind: same device as the mount it sits on (a bind of a directory of that file system)."""
    target = os.fsencode(os.path.realpath(directory))
    by_id: dict[bytes, list[bytes]] = {}
    here: list[list[bytes]] = []
    for fields in mountinfo.entries():
        by_id[fields[0]] = fields
        if fields[4] == target:
            here.append(fields)
    parents = {f[1] for f in here}
    tops = [f for f in here if f[0] not in parents]  # nothing else is mounted on top of it
    if not tops:
        return None
    top = tops[-1]
    parent = by_id.get(top[1])
    readonly = b"ro" in top[5].split(b",")
    return readonly, parent is not None and parent[2] == top[2]


def is_protected(directory: Path) -> bool:
    top = _top_mount(directory)
    return top is not None and top[0] and top[1]


def _write_marker(marker: Path, directory: Path) -> None:
    replace_durably(marker, f"{directory}\n{boot_id()}\n")  # the boot: a reboot takes every mount away


def made_in_another_boot(marker: Path) -> bool:
    """Our bind recorded by `marker` was made before the last reboot (gone with it, not removed)."""
    try:
        lines = marker.read_text().splitlines()
    except ValueError:  # not UTF-8: not what we wrote, so it says nothing of this boot's bind
        return False
    return len(lines) > 1 and lines[1] != boot_id()


def protect(directory: Path, marker: Path) -> None:
    """Bind-mount `directory` onto itself read-only. Descriptors opened before stay writable."""
    unprotect(directory, marker)  # never stack a second one over a leftover
    target = os.fsencode(directory)
    flags = os.statvfs(directory).f_flag
    carried = 0
    for st_flag, ms_flag in _CARRIED.items():
        if flags & st_flag:
            carried |= ms_flag
    _write_marker(marker, directory)  # before the mount: a crash in between leaves no unknown mount
    _mount(target, target, MS_BIND)
    try:
        _mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | carried)
    except OSError:
        _umount(target)
        marker.unlink(missing_ok=True)
        raise
    log.info("%s is read-only for applications (replicated writes go through the receiver)", directory)


def protect_beneath(root_fd: int, directory: Path, marker: Path) -> None:
    """The primary's mount over `directory` is about to go: put our read-only bind of the real
    directory (`root_fd`, opened before that mount) *beneath* it, so that once it is unmounted
    applications reach the read-only bind at once. Unmounting first and protecting after left a
    moment, until the next role's agent protected the directory, where an application still
    running wrote to the directory directly: writes it saw succeed, outside any journal (lost, or
    left on one node only). Raises OSError where the kernel cannot (before Linux 6.5)."""
    tree = open_tree(b"", root_fd)
    try:
        mount_setattr(tree, set_flags=MOUNT_ATTR_RDONLY)
        _write_marker(marker, directory)
        try:
            move_mount_beneath(tree, os.fsencode(directory))
        except OSError:
            marker.unlink(missing_ok=True)
            raise
    finally:
        os.close(tree)
    log.info("%s is read-only for applications from the moment its replication mount goes", directory)


def open_writable(directory: Path, marker: Path) -> int:
    """An O_PATH descriptor of `directory` through which the receiver can write: the directory
    itself, or, when our read-only bind already covers it (left by the primary's agent at its stop,
    see protect_beneath), the root of a private copy of that bind with read-only cleared, attached
    nowhere (applications still see the read-only one, so there is no writable moment)."""
    if marker.exists() and is_protected(directory):
        refuse_nested_mounts(os.fsencode(os.path.realpath(directory)))
        tree = open_tree(os.fsencode(directory))
        try:
            mount_setattr(tree, clear_flags=MOUNT_ATTR_RDONLY)
        except BaseException:
            os.close(tree)
            raise
        return tree
    return open_replicated_dir(directory)


def _umount(target: bytes) -> None:
    umount2(target, MNT_DETACH)


def unprotect(directory: Path, marker: Path) -> bool:
    """Remove our read-only bind mount of `directory` if there is one (the marker says we made it);
    True if one was removed."""
    if not marker.exists():
        return False
    removed = False
    for _ in range(8):  # leftovers of repeated crashes may be stacked
        if not is_protected(directory):
            break
        try:
            _umount(os.fsencode(directory))
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                break
            raise
        removed = True
    marker.unlink(missing_ok=True)
    if removed:
        log.info("%s is writable again", directory)
    return removed
