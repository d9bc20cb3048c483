"""Who gets a control connection: a cap per peer process, a pool reserved for agent runs,
and an idle timeout.

1,000 idle connections once exhausted the 256-connection cap: `status` failed and agents'
`emit` failed 28 of 40 times with "daemon not running". Now one process holds at most
MAX_CONNECTIONS_PER_PEER connections; the last RESERVED_FOR_RUNS slots go only to processes
of a live run (checked by ancestry, the way run authentication does it); and a connection
that sends nothing for the idle timeout is closed, unless it belongs to a run (an agent's
SDK keeps one connection for its whole run).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

MAX_CONNECTIONS = 256
RESERVED_FOR_RUNS = 32
MAX_CONNECTIONS_PER_PEER = 64


class Admission:
    """Counts connections per peer pid and decides on each new one."""

    def __init__(self, is_run_peer: Callable[[int], bool] | None = None) -> None:
        self.is_run_peer = is_run_peer or (lambda _pid: False)
        self.per_peer: Counter[int] = Counter()
        self.total = 0

    def refusal(self, pid: int) -> str | None:
        """None to admit a connection from `pid`; why not otherwise."""
        if self.total >= MAX_CONNECTIONS:
            return "too many connections"
        if self.per_peer[pid] >= MAX_CONNECTIONS_PER_PEER:
            return f"process {pid} already has {MAX_CONNECTIONS_PER_PEER} connections"
        if self.total >= MAX_CONNECTIONS - RESERVED_FOR_RUNS and not self.is_run_peer(pid):
            return "only agent runs may use the last connections"
        return None

    def admitted(self, pid: int) -> None:
        self.per_peer[pid] += 1
        self.total += 1

    def released(self, pid: int) -> None:
        self.total -= 1
        self.per_peer[pid] -= 1
        if self.per_peer[pid] <= 0:
            del self.per_peer[pid]


def run_peer_check(pipeline) -> Callable[[int], bool]:
    """Whether a pid is one of a live run's processes: it descends from a run's root, or,
    orphaned into the daemon (its subreaper), carries the id of a live run."""
    from ..kernel.lineage import MARKER_RUN_ID, ancestry, read_markers

    def is_run_peer(pid: int) -> bool:
        me = os.getpid()
        for ancestor in ancestry(pid):
            if ancestor in pipeline.runs_by_pid:
                return True
            if ancestor == me:  # an orphan the daemon adopted: its environment tells
                return read_markers(pid).get(MARKER_RUN_ID) in pipeline.runs
        return False
    return is_run_peer
