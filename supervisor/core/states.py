"""The states an agent and a run move through, and the transitions allowed between them.

This module depends on nothing else in the package: the daemon, the status table and the
tests all read the same tables.
"""

from __future__ import annotations

import enum


class InvalidTransition(RuntimeError):
    """A state change that the transition table does not allow: always a bug in the daemon."""


class AgentState(enum.StrEnum):
    IDLE = "idle"          # nothing running, waiting for the next firing
    RUNNING = "running"    # one run is alive
    STOPPING = "stopping"  # the run was told to stop (SIGTERM sent), waiting for it to exit
    BACKOFF = "backoff"    # the last run failed; a retry is scheduled
    FAILED = "failed"      # crash loop: cooling down before it may run again
    REMOVED = "removed"    # dropped from the config by a reload


AGENT_TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    AgentState.IDLE: frozenset({AgentState.RUNNING, AgentState.REMOVED}),
    AgentState.RUNNING: frozenset({AgentState.IDLE, AgentState.STOPPING, AgentState.BACKOFF,
                                   AgentState.FAILED}),
    AgentState.STOPPING: frozenset({AgentState.IDLE, AgentState.BACKOFF, AgentState.FAILED,
                                    AgentState.REMOVED}),
    AgentState.BACKOFF: frozenset({AgentState.RUNNING, AgentState.IDLE, AgentState.REMOVED}),
    AgentState.FAILED: frozenset({AgentState.IDLE, AgentState.RUNNING, AgentState.REMOVED}),
    AgentState.REMOVED: frozenset(),
}


class RunState(enum.StrEnum):
    RUNNING = "running"
    STOPPING = "stopping"  # SIGTERM sent to the run's processes, grace period running
    KILLING = "killing"    # grace expired (or a second stop): SIGKILL sent
    EXITED = "exited"


RUN_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.RUNNING: frozenset({RunState.STOPPING, RunState.KILLING, RunState.EXITED}),
    RunState.STOPPING: frozenset({RunState.KILLING, RunState.EXITED}),
    RunState.KILLING: frozenset({RunState.EXITED}),
    RunState.EXITED: frozenset(),
}


class Outcome(enum.StrEnum):
    """How a finished run ended, as recorded in the run history."""

    SUCCEEDED = "succeeded"   # exit code 0
    FAILED = "failed"         # non-zero exit or killed by a signal it did not ask for
    TIMED_OUT = "timed_out"   # stopped by the daemon because it ran past its timeout
    STOPPED = "stopped"       # stopped by the daemon for another reason (see StopReason)
    SPAWN_FAILED = "spawn_failed"  # the command could not be started at all


class StopReason(enum.StrEnum):
    """Why the daemon stopped a run; empty when the run ended on its own."""

    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"
    REPLACED = "replaced"       # overlap policy `replace`
    REMOVED = "removed"         # agent removed or changed by a reload
    MANUAL = "manual"
    MEMORY = "memory"           # memory_max exceeded, or freed under memory pressure
    BREAKER = "breaker"         # the circuit breaker halted the pipeline
    STALE_HEARTBEAT = "stale_heartbeat"
    LEASE_LOST = "lease_lost"   # its task lock lease expired and another host may hold it
    PROCESS_CAP = "process_cap"  # more processes than the agent's max_processes


class DaemonState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RELOADING = "reloading"
    STOPPING = "stopping"     # warm stop: SIGTERM sent to runs, grace period running
    STOPPED = "stopped"


DAEMON_TRANSITIONS: dict[DaemonState, frozenset[DaemonState]] = {
    DaemonState.STARTING: frozenset({DaemonState.RUNNING, DaemonState.STOPPING}),
    DaemonState.RUNNING: frozenset({DaemonState.RELOADING, DaemonState.STOPPING}),
    DaemonState.RELOADING: frozenset({DaemonState.RUNNING, DaemonState.STOPPING}),
    DaemonState.STOPPING: frozenset({DaemonState.STOPPED}),
    DaemonState.STOPPED: frozenset(),
}


def check_transition(table: dict, current: enum.Enum, target: enum.Enum, *,
                     machine: str = "") -> None:
    """Raise InvalidTransition unless `table` allows moving from `current` to `target`;
    `machine` ("breaker") names whose state it is in the message."""
    if target not in table[current]:
        allowed = ", ".join(sorted(s.value for s in table[current])) or "none"
        prefix = f"{machine}: " if machine else ""
        raise InvalidTransition(f"{prefix}{current.value} -> {target.value} is not allowed "
                                f"(from {current.value}: {allowed})")
