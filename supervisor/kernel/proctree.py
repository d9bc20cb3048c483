"""The daemon's view of the processes it started: subreaper, reaping, and attribution of
every descendant to the run it came from.

Agents' children may escape their process group (Puppeteer starts Chrome in a session
of its own) and lose their parent link once reparented; which run a descendant belongs to
is decided by the one rule in kernel/lineage.py.
"""

from __future__ import annotations

import ctypes
import os
import signal

import psutil

from .lineage import MARKER_RUN_ID, MARKER_STATE_DIR, Lineage, read_markers, subtree

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphans of our descendants get reparented to us instead of init, so we reap them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_children() -> list[tuple[int, int]]:
    """waitpid(-1, WNOHANG) until nothing is left to reap: [(pid, raw status)]."""
    reaped = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        reaped.append((pid, status))
    return reaped


def direct_children(pid: int | None = None) -> set[int] | None:
    """Children of `pid` from /proc/PID/task/*/children (one small read per thread, not a
    scan of every process); None where the kernel does not offer the file."""
    pid = pid or os.getpid()
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            # os.open/os.read: three syscalls, where open() adds five (fstat, ioctl, lseek...)
            fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        try:
            found.update(int(c) for c in _read_all(fd).split())
        except OSError:
            return None
        finally:
            os.close(fd)
    return found


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def last_pid_created() -> int | None:
    """The pid most recently handed out in our pid namespace (/proc/loadavg's last field).
    While it stays the same, nothing forked anywhere, so no process tree has grown."""
    try:
        with open("/proc/loadavg", "rb", buffering=0) as f:
            return int(f.read(128).split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def live_descendants(root_pid: int) -> list[int]:
    """Every live descendant of root_pid (not root_pid itself)."""
    return subtree(tree_children(root_pid), root_pid)


def tree_children(root_pid: int) -> dict[int, list[int]]:
    """ppid -> children for the subtree under root_pid, walked through /proc/PID/task/*/
    children: its cost follows the size of our tree, not of every process on the host (a
    full scan costs ~7 ms per 100 host processes, every tick). Falls back to the full scan
    where the kernel lacks those files."""
    children: dict[int, list[int]] = {}
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        kids = direct_children(pid)
        if kids is None:
            if pid == root_pid:
                return children_map()
            continue  # it exited while we walked
        if kids:
            children[pid] = list(kids)
            stack.extend(kids)
    return children


def children_map() -> dict[int, list[int]]:
    """ppid -> child pids of every process, from one /proc scan."""
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info["ppid"]
        if ppid is not None:
            children.setdefault(ppid, []).append(proc.pid)
    return children


def attribute_tree(children: dict[int, list[int]], root_pid: int, run_roots: dict[int, str],
                   known: dict[int, str]) -> dict[int, str]:
    """Map each descendant of root_pid in a tree already walked (tree_children) to its run
    (lineage.Lineage): parents come before their children, so each process costs one
    environment read, not a walk up its chain with a read per link (a fork bomb of 1,500
    processes blocked the loop in that walk)."""
    owners: dict[int, str] = {}
    stack = [(kid, Lineage()) for kid in children.get(root_pid, [])]
    while stack:
        pid, parent = stack.pop()
        root = run_roots.get(pid)
        marker = None if root else read_markers(pid).get(MARKER_RUN_ID) or known.get(pid)
        line = parent.child(root, marker)
        if line.run_id:
            owners[pid] = line.run_id
        stack.extend((kid, line) for kid in children.get(pid, []))
    return owners


def processes_of_state_dir(state_dir: str, exclude: set[int]) -> list[int]:
    """Processes anywhere on the machine started for this state dir (leftovers of a daemon
    that died): they carry WATCHKEEPER_STATE_DIR in their environment."""
    found = []
    for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
        if pid in exclude:
            continue
        if read_markers(pid).get(MARKER_STATE_DIR) == state_dir:
            found.append(pid)
    return found


def send_signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def send_group_signal(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def process_group(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def group_has_members(pgid: int, pids: list[int]) -> bool:
    """Whether one of `pids` (our own descendants) is still in process group `pgid`: only
    then may the group be signalled after its leader is gone, since a group id is free for
    reuse once its last member has left."""
    return any(process_group(pid) == pgid for pid in pids)


def is_alive(pid: int) -> bool:
    """True for a live process that is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe_status(status: int) -> tuple[int | None, int | None]:
    """(exit code, signal) from a raw waitpid status."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return None, None


def signal_name(sig: int | None) -> str:
    if sig is None:
        return ""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)

