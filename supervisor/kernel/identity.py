"""The identity an agent runs under: a system user that is not the daemon's.

An agent's own `user:`, else `agent_user`, else a uid of its own from `agent_uid_range`
(by default [70000, 70999] when the daemon holds CAP_SETUID without being root: the
shipped unit). The daemon switches uid, gid and groups in the child before exec
(subprocess's user=, group=, extra_groups=[]), which takes root or CAP_SETUID +
CAP_SETGID. Without them (the demo, a daemon started by a user) agents run as the daemon's
user and are not isolated; the daemon says so once at start.
"""

from __future__ import annotations

import dataclasses
import os
import pwd

RESERVED_PREFIX = "watchkeeper"  # `watchkeeper-admin` signs operators' reverts and imports
CAP_SETGID, CAP_SETUID = 6, 7
# Above 65535, outside systemd's DynamicUser= range (61184-65519) and Debian's reserved ones.
DEFAULT_AGENT_UID_RANGE = [70000, 70999]


@dataclasses.dataclass(frozen=True)
class AgentIdentity:
    user: str
    uid: int
    gid: int


def name_problems(name: str) -> list[str]:
    """Why `name` cannot be an agent's name (reserved for the daemon and its operators)."""
    if name.startswith(RESERVED_PREFIX):
        return [f"{name!r} is reserved: names starting with {RESERVED_PREFIX!r} identify the "
                "daemon and its operators in history (choose another agent name)"]
    return []


def user_problems(user: str | None) -> list[str]:
    """Why `user` cannot run agents: unknown, root, or the daemon's own user."""
    if user is None:
        return []
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return [f"no such user {user!r} (create it, e.g. `useradd --system --no-create-home "
                f"{user}`, or name an existing unprivileged user)"]
    if entry.pw_uid == 0:
        return [f"{user!r} is root: agents must run unprivileged"]
    if entry.pw_uid == os.geteuid():
        return [f"{user!r} is the daemon's own user: an agent under it could switch its "
                "supervisor off (name another user)"]
    return []


def resolve(user: str) -> AgentIdentity:
    entry = pwd.getpwnam(user)
    return AgentIdentity(user, entry.pw_uid, entry.pw_gid)


def can_switch_user() -> bool:
    """Root, or both CAP_SETUID and CAP_SETGID in the effective set."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps >> CAP_SETUID & 1 and caps >> CAP_SETGID & 1)
    except (OSError, ValueError):
        pass
    return False


class Identities:
    """Which identity each agent's runs get; the daemon's loop asks at each spawn.

    An agent's own `user:` first, then `agent_user`, then a uid of its own from
    `agent_uid_range` (no passwd entry needed, like systemd's DynamicUser=)."""

    def __init__(self, default_user: str | None, specs=(),
                 uid_range: list[int] | None = None) -> None:
        self.default_user = default_user
        self.isolated = can_switch_user()
        if uid_range is None and self.isolated and os.geteuid() != 0:
            # Given CAP_SETUID without root (the shipped unit): isolation is what they are
            # for, so agents get uids of their own unless the operator chose users.
            uid_range = DEFAULT_AGENT_UID_RANGE
        self.dynamic = allocate_uids(sorted(s.name for s in specs if not s.user), uid_range) \
            if uid_range and not default_user else {}

    def for_agent(self, spec) -> AgentIdentity | None:
        if not self.isolated:
            return None
        user = spec.user or self.default_user
        if user is not None:
            return resolve(user)
        uid = self.dynamic.get(spec.name)
        return AgentIdentity(f"uid {uid}", uid, uid) if uid is not None else None

    def uids(self, specs) -> set[int]:
        found = set()
        for spec in specs:
            identity = self.for_agent(spec)
            if identity is not None:
                found.add(identity.uid)
        return found

    def not_isolated_reason(self, specs) -> str:
        """"" when every agent runs under a user of its own kind; else why not, once."""
        users = [spec.user or self.default_user or self.dynamic.get(spec.name)
                 for spec in specs]
        if self.isolated and all(users):
            return ""
        if not self.isolated and any(users):
            return (f"the daemon (uid {os.geteuid()}) has neither root nor CAP_SETUID and "
                    "CAP_SETGID: agents run as the daemon's user, not as their `user:`")
        if users and not all(users):
            return ("agents without `user:` (and no `agent_user` or `agent_uid_range`) run "
                    f"as the daemon's own user (uid {os.geteuid()}): they can read and "
                    "write its state")
        return ""


def allocate_uids(names: list[str], uid_range: list[int]) -> dict[str, int]:
    """A uid of its own for each agent, from [first, last]: the same for a name as long as
    no other name hashes to it first (so a work dir keeps its owner across restarts); uids
    that have a passwd entry are skipped (they are somebody's)."""
    import zlib

    first, last = uid_range
    size = last - first + 1
    taken: set[int] = set()
    out: dict[str, int] = {}
    for name in names:
        start = zlib.crc32(name.encode()) % size
        for step in range(size):
            uid = first + (start + step) % size
            if uid not in taken and not _has_passwd_entry(uid):
                taken.add(uid)
                out[name] = uid
                break
    return out


def _has_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def uid_range_problems(uid_range: list[int] | None, agents: int) -> list[str]:
    """Why `agent_uid_range` cannot give each agent a uid of its own."""
    if uid_range is None:
        return []
    if len(uid_range) != 2 or not 0 < uid_range[0] <= uid_range[1] < 2**31 - 1:
        return [f"{uid_range} must be [first, last] with 0 < first <= last (a range of "
                "unused uids, e.g. [70000, 70999])"]
    if uid_range[0] <= os.geteuid() <= uid_range[1]:
        return [f"{uid_range} holds the daemon's own uid {os.geteuid()}"]
    if uid_range[1] - uid_range[0] + 1 < agents:
        return [f"{uid_range} has fewer uids than the {agents} agents need"]
    return []


def prepare_work_dir(state_dir, agent: str, identity: AgentIdentity | None):
    """STATE_DIR/work/<agent>: the agent's own directory (0700, owned by its uid), the one
    place under the state dir it may write; every other file there is the daemon's."""
    base = state_dir / "work"
    base.mkdir(exist_ok=True)
    if base.stat().st_mode & 0o777 != 0o711:  # the daemon's umask (077) would close it
        base.chmod(0o711)
    path = base / agent
    path.mkdir(mode=0o700, exist_ok=True)
    if identity is not None and path.stat().st_uid != identity.uid:
        try:
            os.chown(path, identity.uid, identity.gid)
        except PermissionError:  # no CAP_CHOWN (the unit does not grant it): an ACL instead
            grant_dir_to(path, identity.uid)
    return path


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF


def grant_dir_to(path, uid: int) -> None:
    """Give `uid` rwx on a directory the daemon owns, by a POSIX ACL (user::rwx,
    user:uid:rwx, group::---, mask::rwx, other::---): an owner may set its file's ACL
    without any capability, unlike chown."""
    import struct

    entries = [(ACL_USER_OBJ, 7, ACL_UNDEFINED_ID), (ACL_USER, 7, uid),
               (ACL_GROUP_OBJ, 0, ACL_UNDEFINED_ID), (ACL_MASK, 7, ACL_UNDEFINED_ID),
               (ACL_OTHER, 0, ACL_UNDEFINED_ID)]
    blob = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(path, "system.posix_acl_access", blob)


PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4


def drop_ambient_capabilities() -> bool:
    """Clear the ambient set systemd gave us (AmbientCapabilities=): the daemon keeps its
    effective capabilities, but a child switching between two non-root uids would keep an
    ambient set across exec, and an agent must not get CAP_SETUID."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


PR_SET_DUMPABLE = 4


def make_undumpable() -> bool:
    """No ptrace, /proc/PID/mem or /proc/PID/environ of the daemon for processes of its own
    uid (agents that share it, in the demo): the kernel then asks for CAP_SYS_PTRACE. It
    also means no core dump of the daemon."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def readable_by_others(agents_dir, files) -> list[str]:
    """Agent files (env secrets inside) that an agent's uid could read: the daemon reads
    them and passes each agent its own env at spawn; agents.d should be 0750 root:daemon."""
    import stat

    found = []
    try:
        if stat.S_IMODE(os.stat(agents_dir).st_mode) & 0o001 == 0:
            return []  # others cannot even enter the directory
    except OSError:
        return []
    for path in files:
        try:
            if stat.S_IMODE(os.stat(path).st_mode) & 0o004:
                found.append(str(path))
        except OSError:
            continue
    return found
