"""What the kernel says about a process on the other end of the control socket.

Only kernel facts: SO_PEERCRED (pid, uid, gid, read at connect), SO_PEERGROUPS (its
supplementary groups, Linux >= 4.13) and its cgroup from /proc (its parent chain:
kernel/lineage.py). Nothing here reads the peer's environment: anyone can set WATCHKEEPER_* variables.
"""

from __future__ import annotations

import errno
import socket
import struct

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux; Python names it from 3.13 on
MAX_GROUPS = 65536


def cgroup_of(pid: int) -> str | None:
    """The peer's cgroup v2 path ("0::/path" in /proc/PID/cgroup), None if unreadable."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip() or "/"
    except OSError:
        pass
    return None


def peer_groups(sock: socket.socket, pid: int) -> set[int]:
    """The peer's supplementary groups: SO_PEERGROUPS, which needs no access to /proc of
    another uid (hidden under ProtectProc=invisible); /proc/PID/status only as a fallback
    for kernels older than 4.13."""
    size = 4 * 64
    while size <= 4 * MAX_GROUPS:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:  # more groups than fit: ask again with room
                size *= 4
                continue
            return _proc_groups(pid)
        return set(struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4]))
    return _proc_groups(pid)


def _proc_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()
