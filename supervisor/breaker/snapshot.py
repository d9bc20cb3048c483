"""The breaker's snapshot: its state, trip record and windows as JSON-able builtins.

The daemon persists a snapshot after every state change, so a restarted daemon comes back
halted if it went down halted. Windows are measured on a monotonic clock, which means nothing
after a restart, so a snapshot holds every timestamp as wall-clock seconds and a restore
converts them back by age: time the daemon was down counts as elapsed, and a wall clock that
went backwards gives age zero, which errs towards keeping the brake on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from .rules import Rule, Trip, agent_budget, counting_limit
from .settings import BreakerSettings
from .states import BreakerState
from .windows import BreakerWindows, EventWindow, SpendWindow


class SnapshotError(ValueError):
    pass


class BreakerMemory(NamedTuple):
    """What a breaker must remember across a restart; timestamps on its monotonic clock."""

    state: BreakerState
    since: float
    last_trip: Trip | None
    trips_total: int
    windows: BreakerWindows
    windows_since: float = 0.0  # wall clock of the last reset: older stored events never count


class _Snapshot(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Persisted form; every timestamp is wall-clock seconds."""

    version: int = 1
    saved_at: float
    state: BreakerState
    since: float
    last_trip: Trip | None = None
    trips_total: int = 0
    windows: list[tuple[Rule, str, str, list[float]]] = []  # rule, agent, kind, stamps
    hashes: list[tuple[str, str, list[float]]] = []  # agent, hash, stamps; least recent first
    spend: dict[str, list[list[float]]] = {}
    pipeline_spend: list[list[float]] = []
    summaries: dict[str, list[str]] = {}
    probes: dict[str, int] = {}
    windows_since: float = 0.0


def dump_snapshot(memory: BreakerMemory, *, now: float, wall: float) -> dict[str, Any]:
    """`memory` as JSON-able builtins; `now` and `wall` are the same instant on both clocks."""

    def to_wall(t: float) -> float:
        return wall - (now - t)

    def spend(w: SpendWindow) -> list[list[float]]:
        return [[to_wall(a), to_wall(b), tok, cost] for a, b, tok, cost in w.entries]

    windows = memory.windows
    snap = _Snapshot(
        saved_at=wall, state=memory.state, since=to_wall(memory.since),
        last_trip=memory.last_trip, trips_total=memory.trips_total,
        windows=[(*k, [to_wall(t) for t in w.stamps]) for k, w in windows.counts.items()],
        hashes=[(*k, [to_wall(t) for t in w.stamps]) for k, w in windows.hashes.items()],
        spend={a: spend(w) for a, w in windows.spend.items()},
        pipeline_spend=spend(windows.pipeline_spend),
        summaries={a: list(q) for a, q in windows.summaries.items()},
        probes=dict(windows.probes), windows_since=memory.windows_since,
    )
    return msgspec.to_builtins(snap)


def load_snapshot(snapshot: dict[str, Any]) -> _Snapshot:
    """Check a dict from `dump_snapshot()`; raises SnapshotError saying what is wrong."""
    try:
        snap = msgspec.convert(snapshot, _Snapshot)
    except msgspec.ValidationError as err:
        raise SnapshotError(f"breaker snapshot is invalid: {err}; expected the dict "
                            "written by Breaker.snapshot()") from err
    if snap.version != 1:
        raise SnapshotError(f"breaker snapshot version {snap.version} is not supported; "
                            "this daemon reads version 1")
    return snap


def restore_snapshot(snap: _Snapshot, settings: BreakerSettings, *, now: float,
                     wall: float) -> BreakerMemory:
    """The memory a checked snapshot holds, its timestamps moved to the monotonic clock."""

    def to_mono(t: float) -> float:
        return now - max(0.0, wall - t)

    return BreakerMemory(snap.state, to_mono(snap.since), snap.last_trip, snap.trips_total,
                         _restore_windows(snap, settings, to_mono), snap.windows_since)


def _restore_windows(snap: _Snapshot, settings: BreakerSettings,
                     to_mono: Callable[[float], float]) -> BreakerWindows:
    # Limits come from the current settings, which may have changed while the daemon was down.
    windows = BreakerWindows(settings.pipeline_spend.window_s)
    for rule, agent, kind, stamps in snap.windows:
        limits = counting_limit(settings, rule, agent, kind)
        if limits is not None:
            windows.counts[(rule.value, agent, kind)] = EventWindow(*limits, map(to_mono, stamps))
    for agent, content_hash, stamps in snap.hashes:
        limits = counting_limit(settings, Rule.DUPLICATES, agent, "")
        windows.hashes[(agent, content_hash)] = EventWindow(*limits, map(to_mono, stamps))

    def spend(entries: list[list[float]], window_s: float) -> SpendWindow:
        return SpendWindow(window_s, ([to_mono(a), to_mono(b), tok, cost]
                                      for a, b, tok, cost in entries))

    for agent, entries in snap.spend.items():
        windows.spend[agent] = spend(entries, agent_budget(settings, agent).window_s)
    windows.pipeline_spend = spend(snap.pipeline_spend, settings.pipeline_spend.window_s)
    windows.summaries = {a: deque(q, maxlen=settings.summaries_kept)
                         for a, q in snap.summaries.items()}
    windows.probes = dict(snap.probes)
    return windows
