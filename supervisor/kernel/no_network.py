"""Exec a command with no network: a network namespace of its own holding only loopback.

An agent with `network: false` runs through this file, already under the agent's uid:

    python -I -S kernel/no_network.py COMMAND [ARG...]

Not root, it first makes a user namespace of its own, which owns the new network namespace
(no capability needed: what Chrome's sandbox does too; under the unit RestrictNamespaces=
must allow `user` and `net`). Its uid and gid are mapped to themselves, so files, /proc and
SO_PEERCRED still show the agent's ids; loopback is brought up so local servers work; then
it execs the command in place (same pid: the daemon's run, cgroup and parent chain hold).
The capabilities a process holds in a user namespace it made are dropped at that exec (its
uid there is not 0). It fails closed: when the namespace cannot be made, the command is not
run at all. Standard library only and run with -I -S: it starts in milliseconds.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys

EXIT_NO_NAMESPACE = 126  # the shell's "found but cannot run"
EXIT_NOT_FOUND = 127
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
IFREQ = "16sh22x"  # struct ifreq: name, then the union (flags first), 40 bytes on Linux


def argv_for(argv: list[str]) -> list[str]:
    """The daemon's argv for a run of `argv` without network."""
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), *argv]


def enter_namespace() -> None:
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:  # root needs no user namespace to own a network namespace
        unshare(CLONE_NEWNET)
    else:
        unshare(CLONE_NEWUSER | CLONE_NEWNET)
        _write("/proc/self/setgroups", "deny")  # the kernel's condition for a gid_map
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    loopback_up()


def unshare(flags: int) -> None:
    """unshare(2); os.unshare exists from Python 3.12 only."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        current = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0))
        flags = struct.unpack(IFREQ, current)[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str]) -> int:
    if not argv:
        print("no_network: usage: kernel/no_network.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    try:
        enter_namespace()
    except OSError as exc:
        print(f"watchkeeper: `network: false` needs a network namespace of its own, and "
              f"making one failed ({exc}); the command was not run. Unprivileged user "
              "namespaces must be allowed (sysctl kernel.unprivileged_userns_clone=1, "
              "user.max_user_namespaces > 0; under systemd RestrictNamespaces= must allow "
              "user and net), or set `network: true`", file=sys.stderr, flush=True)
        return EXIT_NO_NAMESPACE
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"watchkeeper: cannot run {argv[0]!r}: {exc}", file=sys.stderr, flush=True)
    return EXIT_NOT_FOUND


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
