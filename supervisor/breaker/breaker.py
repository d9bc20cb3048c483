"""Circuit breaker: halt the whole pipeline when any agent runs away, and say so once.

The failure this prevents: a scheduler agent looped on bad retry logic, the content agent wrote
47 variations of one article and the community agent posted one Discord message 12 times; the
pipeline melted down in 8 minutes. Any agent that exceeds a limit (outputs, outputs of one kind,
identical outputs, run launches, token or cost spend) trips the breaker: the daemon stops every
run and sends the one alert carried by the `Trip` that the tripping call returns.

Pure logic for the daemon's single-threaded loop: no threads, no I/O except the optional
`persist` callback, which receives a JSON-able snapshot after every state change. Windows are
measured on `clock` (monotonic by default) so an NTP step cannot stretch or shrink a window
while the daemon runs.

This module is the state machine and the checks the loop calls; its parts live beside it
in breaker/: settings.py (the config section), states.py (states and transitions), rules.py
(which limit applies, the verdicts), windows.py (sliding windows in bounded memory) and
snapshot.py (persistence across restarts). Their public names are importable from here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import structlog

from ..core.states import check_transition
from .rules import (
    ALLOWED,
    DENIED_OPEN,
    Decision,
    Rule,
    Trip,
    agent_budget,
    content_hash,
    counting_limit,
    limit_text,
    longest_window_s,
    setting_to_raise,
)
from .settings import (
    AgentLimits,
    BreakerSettings,
    Count,
    DuplicateLimit,
    LaunchLimit,
    OutputLimit,
    SpendBudget,
)
from .snapshot import (
    BreakerMemory,
    SnapshotError,
    dump_snapshot,
    load_snapshot,
    restore_snapshot,
)
from .states import TRANSITIONS, BreakerState
from .windows import BreakerWindows, SpendWindow

__all__ = [
    "ALLOWED", "DENIED_OPEN", "TRANSITIONS", "AgentLimits", "Breaker", "BreakerSettings",
    "BreakerState", "Count", "Decision", "DuplicateLimit", "LaunchLimit",
    "OutputLimit", "Rule", "SnapshotError", "SpendBudget", "StoredEvent", "Trip",
    "content_hash", "longest_window_s",
]

log = structlog.get_logger("watchkeeper.breaker")

_SUMMARY_CHARS = 200


class StoredEvent(NamedTuple):
    """One output, launch or spend the store recorded, for `Breaker.recount`."""

    wall: float
    agent: str
    what: str  # "output", "launch" or "usage"
    kind: str = ""
    content_hash: str = ""
    tokens: int = 0
    cost: float = 0.0


def _is_amount(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


class Breaker:
    """One breaker for the whole pipeline; the daemon's loop is its only caller."""

    def __init__(
        self,
        settings: BreakerSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        persist: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings or BreakerSettings()
        self._clock, self._wall_clock, self._persist = clock, wall_clock, persist
        self.state = BreakerState.CLOSED
        self.since = clock()
        self.last_trip: Trip | None = None
        self.trips_total = 0
        self._clear_windows()
        self.windows_since_wall = 0.0  # no reset yet: every stored event counts

    def _clear_windows(self) -> None:
        self._windows = BreakerWindows(self.settings.pipeline_spend.window_s)
        self.windows_since_wall = self._wall_clock()

    def apply_settings(self, settings: BreakerSettings) -> None:
        """Take new limits (config reload); windows adopt them on their next event."""
        self.settings = settings
        self._windows.keep_summaries(settings.summaries_kept)

    # -- state ---------------------------------------------------------------------------------

    def transition(self, to: BreakerState, *, reason: str, now: float | None = None) -> None:
        """Move to `to` if the table allows it (else states.InvalidTransition), log the change
        and persist the new state."""
        check_transition(TRANSITIONS, self.state, to, machine="breaker")
        previous, self.state = self.state, to
        self.since = self._now(now)
        log.warning("breaker_state_changed", from_state=previous.value, to_state=to.value,
                    reason=reason)
        self._save()

    def _save(self) -> None:
        if self._persist is None:
            return
        try:
            self._persist(self.snapshot())
        except Exception:
            # A full disk must not stop the brake itself; the state lives on in memory.
            log.exception("breaker_persist_failed")

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _trip(self, rule: Rule, agent: str, count: int | float, limit: int | float,
              window_s: float, now: float, kind: str | None = None, noun: str = "") -> Decision:
        trip = Trip(
            rule=rule, agent=agent, kind=kind, count=count, window_s=window_s,
            limit=limit_text(rule, limit, window_s, kind, noun),
            summaries=list(self._windows.summaries.get(agent, ())), time=self._wall_clock(),
            setting=setting_to_raise(rule, agent, kind, noun),
        )
        self.last_trip = trip
        self.trips_total += 1  # logged once, by the output gate that acts on the trip
        self.transition(BreakerState.OPEN, reason=f"{rule.value} limit exceeded by {agent}",
                        now=now)
        reason = f"{rule.value} limit: {agent} reached {count:g}, limit is {trip.limit}"
        return Decision(False, reason, trip)

    # -- the checks the loop calls ---------------------------------------------------------------

    def check_output(self, agent: str, kind: str, content_hash: str | None = None,
                     summary: str = "", now: float | None = None) -> Decision:
        """Record one output; the output that exceeds a limit is denied and trips the breaker."""
        if self.state is BreakerState.OPEN:
            return DENIED_OPEN
        now = self._now(now)
        s = self.settings
        self._windows.remember_summary(agent, f"[{kind}] {summary}"[:_SUMMARY_CHARS],
                                       s.summaries_kept)
        decision = (self._check(Rule.OUTPUTS, agent, "", now)
                    or self._check(Rule.KIND_OUTPUTS, agent, kind, now))
        if decision is None and content_hash is not None:
            decision = self._check_hash(agent, kind, content_hash, now)
        if decision is None and self.state is BreakerState.HALF_OPEN:
            probes = self._windows.count_probe(agent)
            if probes > s.probe_outputs:
                decision = self._trip(Rule.PROBE, agent, probes, s.probe_outputs,
                                      s.probe_window_s, now)
        return decision or ALLOWED

    def check_launch(self, agent: str, now: float | None = None) -> Decision:
        """Record one run launch; the launch that exceeds the limit is denied and trips."""
        if self.state is BreakerState.OPEN:
            return DENIED_OPEN
        return self._check(Rule.LAUNCHES, agent, "", self._now(now)) or ALLOWED

    def report_usage(self, agent: str, tokens: int = 0, cost: float = 0.0,
                     now: float | None = None) -> Decision:
        """Record one call's token use and cost; crossing an agent or pipeline budget trips."""
        if self.state is BreakerState.OPEN:
            return DENIED_OPEN
        now = self._now(now)
        tokens, cost = self._sane_usage(agent, tokens, cost)
        budget = agent_budget(self.settings, agent)
        window = self._windows.add_spend(agent, budget.window_s, now, tokens, cost)
        decision = self._over_budget(Rule.AGENT_SPEND, agent, budget, window, now)
        if decision is not None:
            return decision
        budget = self.settings.pipeline_spend
        window = self._windows.add_pipeline_spend(budget.window_s, now, tokens, cost)
        return self._over_budget(Rule.PIPELINE_SPEND, agent, budget, window, now) or ALLOWED

    def _sane_usage(self, agent: str, tokens: int, cost: float) -> tuple[int, float]:
        # Agents report these; a NaN would poison the running sum and disable the budget for good.
        if not _is_amount(tokens):
            log.warning("usage_tokens_ignored", agent=agent, tokens=repr(tokens))
            tokens = 0
        if not _is_amount(cost):
            log.warning("usage_cost_ignored", agent=agent, cost=repr(cost))
            cost = 0.0
        return int(tokens), float(cost)

    def _over_budget(self, rule: Rule, agent: str, budget: SpendBudget, window: SpendWindow,
                     now: float) -> Decision | None:
        if budget.max_tokens is not None and window.tokens > budget.max_tokens:
            return self._trip(rule, agent, window.tokens, budget.max_tokens, budget.window_s,
                              now, noun="tokens")
        if budget.max_cost is not None and window.cost > budget.max_cost:
            return self._trip(rule, agent, round(window.cost, 6), budget.max_cost,
                              budget.window_s, now, noun="cost")
        return None

    def _check(self, rule: Rule, agent: str, kind: str, now: float) -> Decision | None:
        limits = counting_limit(self.settings, rule, agent, kind)
        if limits is None:
            return None
        count = self._windows.count((rule.value, agent, kind), *limits, now)
        if count <= limits[0]:
            return None
        return self._trip(rule, agent, count, *limits, now, kind or None)

    def _check_hash(self, agent: str, kind: str, content_hash: str,
                    now: float) -> Decision | None:
        limits = counting_limit(self.settings, Rule.DUPLICATES, agent, kind)
        count = self._windows.count_hash((agent, content_hash), *limits, now,
                                         self.settings.max_tracked_hashes)
        if count <= limits[0]:
            return None
        return self._trip(Rule.DUPLICATES, agent, count, *limits, now, kind)

    # -- operator and housekeeping ---------------------------------------------------------------

    def reset(self, by: str, reason: str, now: float | None = None) -> bool:
        """Close the breaker and forget all windows; returns whether it was open or half-open."""
        self._clear_windows()  # logged once, by the output gate
        if self.state is BreakerState.CLOSED:
            self._save()  # the cleared windows must stay cleared after a crash
            return False
        self.transition(BreakerState.CLOSED, reason=f"reset by {by}: {reason}", now=now)
        return True

    def tick(self, now: float | None = None) -> BreakerState | None:
        """Run timed transitions and drop expired windows; returns the new state if it changed."""
        now = self._now(now)
        self._windows.sweep(now)
        s = self.settings
        if (self.state is BreakerState.OPEN and s.auto_reset_after_s is not None
                and now - self.since >= s.auto_reset_after_s):
            # Start the probe on empty windows: the entries that tripped would re-trip at once.
            self._clear_windows()
            self.transition(BreakerState.HALF_OPEN, reason="auto reset after "
                            f"{s.auto_reset_after_s:g}s", now=now)
            return self.state
        if self.state is BreakerState.HALF_OPEN and now - self.since >= s.probe_window_s:
            self.transition(BreakerState.CLOSED, reason=f"probe passed for {s.probe_window_s:g}s",
                            now=now)
            return self.state
        return None

    def recount(self, events: Iterable[StoredEvent], now: float | None = None) -> int:
        """Rebuild the windows from stored events, oldest first; returns how many counted.

        The snapshot is written only on state changes and at a graceful stop; the store holds
        every output, launch and spend the gate accepted, committed before the agent heard
        `allowed`. Recounting them at start-up means a SIGKILL never hands a runaway agent a
        fresh window.
        """
        now, wall = self._now(now), self._wall_clock()
        s, summaries = self.settings, self._windows.summaries
        windows = self._windows = BreakerWindows(s.pipeline_spend.window_s)
        windows.summaries = summaries
        counted = 0
        for event in events:
            if event.wall <= self.windows_since_wall:
                continue
            t = now - max(0.0, wall - event.wall)
            counted += 1
            if event.what == "launch":
                limits = counting_limit(s, Rule.LAUNCHES, event.agent, "")
                windows.count((Rule.LAUNCHES.value, event.agent, ""), *limits, t)
            elif event.what == "usage":
                budget = agent_budget(s, event.agent)
                windows.add_spend(event.agent, budget.window_s, t, event.tokens, event.cost)
                windows.add_pipeline_spend(s.pipeline_spend.window_s, t, event.tokens, event.cost)
            else:
                self._recount_output(event, t)
        windows.sweep(now)
        return counted

    def _recount_output(self, event: StoredEvent, t: float) -> None:
        s, windows = self.settings, self._windows
        for rule, kind in ((Rule.OUTPUTS, ""), (Rule.KIND_OUTPUTS, event.kind)):
            limits = counting_limit(s, rule, event.agent, kind)
            if limits is not None:
                windows.count((rule.value, event.agent, kind), *limits, t)
        if event.content_hash:
            limits = counting_limit(s, Rule.DUPLICATES, event.agent, event.kind)
            windows.count_hash((event.agent, event.content_hash), *limits, t,
                               s.max_tracked_hashes)
        if self.state is BreakerState.HALF_OPEN:
            windows.count_probe(event.agent)

    def output_window_fill(self, agent: str, now: float | None = None) -> dict[str, Any]:
        """{"outputs": 9, "max_outputs": 10, "window_s": 60}: how close `agent` is to its
        outputs limit. Reads only: counting a copy leaves the window untouched."""
        limit, window_s = counting_limit(self.settings, Rule.OUTPUTS, agent, "")
        window = self._windows.counts.get((Rule.OUTPUTS.value, agent, ""))
        cutoff = self._now(now) - window_s
        count = sum(1 for t in window.stamps if t > cutoff) if window is not None else 0
        return {"outputs": count, "max_outputs": limit, "window_s": window_s}

    def memory_footprint(self) -> dict[str, int]:
        """Counts of tracked keys and stored timestamps, for metrics and the bounded-memory test."""
        return self._windows.footprint()

    # -- persistence ---------------------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The breaker's state, trip record and windows as JSON-able builtins."""
        memory = BreakerMemory(self.state, self.since, self.last_trip, self.trips_total,
                               self._windows, self.windows_since_wall)
        return dump_snapshot(memory, now=self._now(now), wall=self._wall_clock())

    def restore(self, snapshot: dict[str, Any], now: float | None = None) -> None:
        """Adopt a snapshot from `snapshot()`, e.g. one saved before the daemon restarted."""
        snap = load_snapshot(snapshot)
        memory = restore_snapshot(snap, self.settings, now=self._now(now),
                                  wall=self._wall_clock())
        (self.state, self.since, self.last_trip, self.trips_total, self._windows,
         self.windows_since_wall) = memory
        # A restored closed breaker is routine: warning only when it holds the pipeline.
        (log.info if self.state is BreakerState.CLOSED else log.warning)(
            "breaker_restored", state=self.state.value, trips_total=self.trips_total,
            last_trip_agent=self.last_trip.agent if self.last_trip else None)
