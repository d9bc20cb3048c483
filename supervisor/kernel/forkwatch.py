"""Forks in the daemon's own tree, told by the kernel: process caps without a 4 Hz poll.

A run's max_processes must be checked soon after its tree grows (a fork bomb makes
thousands of processes in seconds), but polling the tree four times a second kept an idle
daemon awake four times a second. The kernel's process events connector (netlink,
NETLINK_CONNECTOR/CN_IDX_PROC) reports every fork on the machine; a classic BPF filter
attached to the socket lets through only forks whose parent is one of the pids the daemon
watches (its own tree, as last walked), so the socket becomes readable only when our tree
grows and an idle daemon sleeps however busy the rest of the machine is.

Only in the initial pid namespace: the events name processes by the initial namespace's
pids (a container's daemon would watch numbers that never match). Kernels before 6.6 also
ask for CAP_NET_ADMIN, and the shipped systemd unit's RestrictAddressFamilies= refuses
AF_NETLINK. Elsewhere `open()` returns None and the caller polls as before.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

import structlog

log = structlog.get_logger("watchkeeper.forkwatch")

NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
NLMSG_DONE = 3
PROC_EVENT_FORK = 0x00000001
SO_ATTACH_FILTER = 26
# Offsets in a message: nlmsghdr (16 bytes), cn_msg (20), then proc_event: what (u32),
# cpu (u32), timestamp_ns (u64), fork data: parent_pid, parent_tgid, child_pid, child_tgid.
WHAT_OFFSET = 36
PARENT_TGID_OFFSET, CHILD_PID_OFFSET, CHILD_TGID_OFFSET = 56, 60, 64
BPF_LD_W_ABS, BPF_TAX, BPF_JEQ_K, BPF_JEQ_X, BPF_RET_K = 0x20, 0x07, 0x15, 0x1D, 0x06
ACCEPT, DROP = 0xFFFFFFFF, 0
# The inode numbers the kernel gives its initial pid and user namespaces (PROC_*_INIT_INO).
INIT_PID_NS_INO, INIT_USER_NS_INO = 0xEFFFFFFC, 0xEFFFFFFD
# cBPF programs hold at most 4096 instructions, two per pid: past this many pids every
# process fork on the machine passes (still rate-limited by the caller).
MAX_FILTERED_PIDS = 2000


def _as_loaded(value: int) -> int:
    """`value` as BPF_ABS loads it: the kernel reads words in network byte order, the
    connector writes them in host order."""
    return int.from_bytes(struct.pack("=I", value), "big")


def fork_filter(parents: set[int] | None) -> list[tuple[int, int, int, int]]:
    """A cBPF program accepting fork events of new processes (not threads: the kernel
    reports those as forks too, naming the process's parent as theirs) whose parent (tgid)
    is in `parents`; with None, of any parent."""
    prog = [(BPF_LD_W_ABS, 0, 0, WHAT_OFFSET),
            (BPF_JEQ_K, 1, 0, _as_loaded(PROC_EVENT_FORK)),
            (BPF_RET_K, 0, 0, DROP),
            # A new process is its own thread group leader: child_pid == child_tgid.
            (BPF_LD_W_ABS, 0, 0, CHILD_TGID_OFFSET),
            (BPF_TAX, 0, 0, 0),
            (BPF_LD_W_ABS, 0, 0, CHILD_PID_OFFSET),
            (BPF_JEQ_X, 1, 0, 0),
            (BPF_RET_K, 0, 0, DROP)]
    if parents is None:
        return [*prog, (BPF_RET_K, 0, 0, ACCEPT)]
    prog.append((BPF_LD_W_ABS, 0, 0, PARENT_TGID_OFFSET))
    for pid in sorted(parents):
        prog += [(BPF_JEQ_K, 0, 1, _as_loaded(pid)), (BPF_RET_K, 0, 0, ACCEPT)]
    return [*prog, (BPF_RET_K, 0, 0, DROP)]


class ForkWatch:
    """`fileno()` becomes readable when a watched pid forks; `drain()` after each wakeup."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.watched: frozenset[int] = frozenset()

    @classmethod
    def open(cls, parents: set[int]) -> ForkWatch | None:
        """A watch on forks of `parents`, or None (logged) where the kernel refuses us."""
        if not in_initial_namespaces():
            log.info("fork_watch_unavailable", error="not in the initial pid and user namespaces")
            return None
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 NETLINK_CONNECTOR)
        except OSError as exc:
            log.info("fork_watch_unavailable", error=exc.strerror)
            return None
        watch = cls(sock)
        try:
            # The filter first: from the subscription on, unrelated forks never reach us.
            watch.watch(parents)
            sock.bind((0, CN_IDX_PROC))
            listen = struct.pack("=IIIIHHI", CN_IDX_PROC, CN_VAL_PROC, 0, 0, 4, 0,
                                 PROC_CN_MCAST_LISTEN)
            sock.send(struct.pack("=IHHII", 16 + len(listen), NLMSG_DONE, 0, 0, 0) + listen)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.info("fork_watch_unavailable", error=exc.strerror)
            return None
        return watch

    def watch(self, parents: set[int]) -> None:
        """From now on, wake only for forks of these pids (the kernel swaps filters at once)."""
        prog = fork_filter(set(parents) if len(parents) <= MAX_FILTERED_PIDS else None)
        raw = b"".join(struct.pack("=HBBI", *insn) for insn in prog)
        buf = ctypes.create_string_buffer(raw, len(raw))
        fprog = struct.pack("HP", len(prog), ctypes.addressof(buf))
        self._sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        self.watched = frozenset(parents)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> int:
        """Read what is queued; return how many events (a lost batch counts as one)."""
        events = 0
        while True:
            try:
                self._sock.recv(65536)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:  # ENOBUFS: the kernel dropped some
                    raise
            events += 1

    def close(self) -> None:
        self._sock.close()



def in_initial_namespaces() -> bool:
    try:
        return (os.stat("/proc/self/ns/pid").st_ino == INIT_PID_NS_INO
                and os.stat("/proc/self/ns/user").st_ino == INIT_USER_NS_INO)
    except OSError:
        return False
