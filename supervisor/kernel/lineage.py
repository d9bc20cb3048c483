"""Process ancestry and environment markers: who descends from whom, and which run a process
belongs to.

Every place that walks a parent-pid chain or reads a WATCHKEEPER_* marker calls this module:
the daemon's attribution of its descendants (proctree), the memory guard's ownership of a
process table (procscan), connection admission and peer placement (control/admission,
authz). One module, so the order of the checks is written once.

The order (docs/security.md: an environment variable is never evidence on its own):
  1. a run's root pid up the chain: a kernel fact that no process can forge;
  2. only without one, the nearest marker up the chain: a WATCHKEEPER_RUN_ID in the
     environment, or an earlier sighting. Orphans re-parented to the daemon have lost their
     run's root from their chain, and Chrome overwrites /proc/PID/environ of its zygotes and
     renderers when it sets their titles, so a marker is inherited from above.
A process below run B's root that sets WATCHKEEPER_RUN_ID=A is B's: with the marker first
it escaped B's process cap, memory limit and leftover stop by naming another run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

MARKER_RUN_ID = "WATCHKEEPER_RUN_ID"
MARKER_AGENT = "WATCHKEEPER_AGENT"
MARKER_STATE_DIR = "WATCHKEEPER_STATE_DIR"
_MARKERS = frozenset({MARKER_RUN_ID.encode(), MARKER_AGENT.encode(), MARKER_STATE_DIR.encode()})
INIT_PID = 1
_MAX_CHAIN = 4096


def read_markers(pid: int) -> dict[str, str]:
    """The WATCHKEEPER_* markers in a process's environment; {} when it is gone, unreadable
    or overwritten. A marker says what a process claims, never who it is."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    found = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key in _MARKERS:
            found[key.decode()] = value.decode(errors="replace")
    return found


def parent_pid(pid: int) -> int | None:
    """The parent of `pid` from /proc/PID/stat; None when it is gone or hidden."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # comm may hold spaces and parentheses; the fields after the last ')' do not.
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def ancestry(pid: int) -> list[int]:
    """pid, its parent, its grandparent... up to init; what is unreadable ends the chain."""
    chain: list[int] = []
    while pid > INIT_PID and len(chain) < _MAX_CHAIN:
        chain.append(pid)
        parent = parent_pid(pid)
        if parent is None:
            break
        pid = parent
    return chain


def subtree(children: Mapping[int, list[int]], root: int) -> list[int]:
    """Every descendant of `root` (not `root` itself) in a ppid -> children map."""
    out, seen, stack = [], {root}, list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue  # a scripted or torn table may hold a cycle
        seen.add(pid)
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def tree_of(ppids: Mapping[int, int], root: int) -> set[int]:
    """`root` and every process below it, from a pid -> ppid map."""
    return {root, *subtree(children_of(ppids), root)}


def children_of(ppids: Mapping[int, int]) -> dict[int, list[int]]:
    """ppid -> child pids, from a pid -> ppid map."""
    children: dict[int, list[int]] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    return children


class Lineage(NamedTuple):
    """What a process inherits from its ancestors about which run it belongs to."""

    root_run: str | None = None     # the run whose root pid is on the chain (kernel fact)
    nearest_run: str | None = None  # the nearest root, run marker or earlier sighting

    @property
    def run_id(self) -> str | None:
        """The kernel's answer first; the environment's only where the kernel has none."""
        return self.root_run or self.nearest_run

    def child(self, own_root_run: str | None, own_marker: str | None) -> Lineage:
        """The lineage of a process below this one, given its own root run and marker."""
        if own_root_run or own_marker:
            return Lineage(own_root_run or self.root_run, own_root_run or own_marker)
        return self
