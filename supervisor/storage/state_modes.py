"""The daemon's files are the daemon's: modes of the state directory and its contents.

Agents reach shared state only through the control socket; the kernel enforces it when
they run under their own uid: everything here is 0600/0700 and owned by the daemon. With
agents under other uids the state directory is 0711 (they may traverse to the socket and
their own `work/<agent>`, not list or read anything else) and the socket 0666 (who may do
what on it is decided per request from peer credentials, control/handlers.py).
"""

from __future__ import annotations

import grp
import os
from pathlib import Path

DAEMON_UMASK = 0o077
PRIVATE_DIRS = ("tasks", "status", "logs")
PRIVATE_FILES = ("state.db", "memory.sqlite3", "daemon.lock")


def secure_state_dir(state_dir: Path) -> None:
    """Take back modes an older version (no umask) or an operator left open: state.db and
    memory.sqlite3 were created 0644, readable by every agent."""
    _chmod(state_dir, 0o700)
    for name in PRIVATE_DIRS:
        _chmod(state_dir / name, 0o700)
    for name in PRIVATE_FILES:
        for suffix in ("", "-wal", "-shm", "-journal"):
            _chmod(state_dir / f"{name}{suffix}", 0o600)


def open_to_agents(state_dir: Path, socket_path: Path) -> None:
    """Agents under other uids may reach the socket (and their work dir), nothing else."""
    _chmod(state_dir, 0o711)
    _chmod(socket_path, 0o666)


def socket_group_problem(group: str | None) -> str:
    """Why the daemon cannot give its socket to `group` ("" when it can)."""
    if not group:
        return ""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return (f"socket_group: no such group {group!r} (create it with `groupadd {group}`, "
                "or remove socket_group)")
    if os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups():
        return ""
    return (f"socket_group: the daemon's user (uid {os.geteuid()}) is not a member of "
            f"{group!r}, so it cannot give the control socket to that group (add it: "
            f"`usermod -aG {group} <daemon user>`, or choose one of its groups)")


def _chmod(path: Path, mode: int) -> None:
    try:
        if path.stat().st_mode & 0o7777 != mode:
            os.chmod(path, mode)
    except FileNotFoundError:
        pass
