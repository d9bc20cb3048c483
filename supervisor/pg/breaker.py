"""One circuit breaker for every host: each host's Breaker sees every host's events.

Each output, launch and usage report is decided inside a transaction holding the `breaker`
advisory lock: the host first replays the events other hosts recorded since it last looked,
then decides its own event with breaker.Breaker, then records it. Decisions are therefore
made one at a time on the same sequence of events (with the same relative times), so the
limit is global and the event that crosses it trips exactly one host's check: that host
alone sends the alert (through the output gate, as on one host). Every other host trips
silently while replaying the same event, or takes the state from the `breaker_state` row,
and halts; a NOTIFY wakes them, the slow poll catches up if it is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
import psycopg
import structlog

from ..breaker.breaker import Breaker, BreakerState, Decision, Trip
from .db import BREAKER_LOCK, Database

log = structlog.get_logger("watchkeeper.pg.breaker")

_EVENT_COLUMNS = "id, host, event, agent, kind, hash, summary, tokens, cost, at"


class SharedBreaker:
    """Stands in for the output gate's Breaker; everything it does not override goes to it."""

    def __init__(self, inner: Breaker, db: Database, host: str, *,
                 on_peer_change: Callable[[BreakerState], None],
                 wall_clock: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.db = db
        self.host = host
        self.on_peer_change = on_peer_change
        self._wall, self._mono = wall_clock, clock
        self.last_event_id = 0
        self.epoch = 0
        self.peer_trip: Trip | None = None
        self._unshared_ticks = 0  # ticks in a row that could not reach the database

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    # -- the checks the output gate calls ------------------------------------------------------
    def check_output(self, agent: str, kind: str, content_hash: str | None = None,
                     summary: str = "", now: float | None = None) -> Decision:
        return self._decide("output", agent, lambda mono: self.inner.check_output(
            agent, kind, content_hash, summary, now=mono), kind=kind, hash=content_hash,
            summary=summary)

    def check_launch(self, agent: str, now: float | None = None) -> Decision:
        try:
            return self._decide("launch", agent, lambda mono: self.inner.check_launch(agent, mono))
        except (psycopg.Error, ConnectionError) as exc:
            # Limits are global: a launch the other hosts cannot count is not made.
            return Decision(False, f"shared storage unreachable, launch not counted: {exc}")

    def report_usage(self, agent: str, tokens: int = 0, cost: float = 0.0,
                     now: float | None = None) -> Decision:
        return self._decide("usage", agent, lambda mono: self.inner.report_usage(
            agent, tokens, cost, now=mono), tokens=tokens, cost=cost)

    def reset(self, by: str, reason: str, now: float | None = None) -> bool:
        with self.db.tx(lock=BREAKER_LOCK) as conn:
            self.epoch = conn.execute(
                "update breaker_state set state = 'closed', epoch = epoch + 1, changed_at = now(),"
                " changed_by = %s, since_event = (select coalesce(max(id), 0) from "
                "breaker_events) where id = 1 returning epoch", (f"{self.host}: {by}",)).fetchone()[0]
            self.db.notify(conn, "breaker")
        self.peer_trip = None
        return self.inner.reset(by, reason, now)

    def tick(self, now: float | None = None) -> BreakerState | None:
        """Timed transitions (auto reset to half-open, probe passed to closed) are taken once
        for the cluster: under the breaker lock, a host first adopts what a peer already
        wrote, and only then runs its own timer, writing any transition it takes. Every host
        thus half-opens and closes together, not each on its own clock."""
        if self.inner.state is BreakerState.CLOSED:
            return self.inner.tick(now)  # nothing timed to share: no round trip per tick
        peer_change = changed = None
        try:
            with self.db.tx(lock=BREAKER_LOCK) as conn:
                peer_change = self._catch_up(conn)
                changed = self.inner.tick(now)
                if changed is not None:
                    self.epoch = conn.execute(
                        "update breaker_state set state = %s, epoch = epoch + 1, changed_at = "
                        "now(), changed_by = %s, since_event = (select coalesce(max(id), 0) "
                        "from breaker_events) where id = 1 returning epoch",
                        (changed.value, self.host)).fetchone()[0]
                    self.db.notify(conn, "breaker")
        except (psycopg.Error, ConnectionError) as exc:
            if not self._unshared_ticks:
                log.warning("breaker_state_not_shared", error=" ".join(str(exc).split()),
                            hint="timed transitions run on this host's clock until it is back")
            self._unshared_ticks += 1
            if changed is None:  # taken before the failure: already done here, not shared
                changed = self.inner.tick(now)
            return changed
        self._unshared_ticks = 0
        if peer_change is not None:
            self.on_peer_change(peer_change)
        return changed

    # -- shared state ---------------------------------------------------------------------------
    def sync(self) -> None:
        """Catch up with the other hosts (poll or NOTIFY): their events, trips and resets."""
        with self.db.tx(lock=BREAKER_LOCK) as conn:
            change = self._catch_up(conn)
        if change is not None:
            self.on_peer_change(change)

    def _decide(self, event: str, agent: str, check: Callable[[float], Decision],
                **fields) -> Decision:
        with self.db.tx(lock=BREAKER_LOCK) as conn:
            change = self._catch_up(conn)
            at = self._wall()
            counted = self.inner.state is not BreakerState.OPEN
            decision = check(self._to_mono(at))
            if counted:
                self.last_event_id = conn.execute(
                    "insert into breaker_events (host, event, agent, kind, hash, summary, tokens,"
                    " cost, at) values (%s, %s, %s, %s, %s, %s, %s, %s, %s) returning id",
                    (self.host, event, agent, fields.get("kind", ""), fields.get("hash"),
                     fields.get("summary", ""), int(fields.get("tokens", 0) or 0),
                     float(fields.get("cost", 0.0) or 0.0), at)).fetchone()[0]
            if decision.trip is not None:
                self.epoch = conn.execute(
                    "update breaker_state set state = 'open', epoch = epoch + 1, changed_at = "
                    "now(), changed_by = %s, trip = %s where id = 1 returning epoch",
                    (self.host, msgspec.json.encode(decision.trip).decode())).fetchone()[0]
                self.db.notify(conn, "breaker")
        # After the commit: halting or resuming the pipeline never runs inside a transaction.
        if change is not None:
            self.on_peer_change(change)
        return decision

    def _catch_up(self, conn) -> BreakerState | None:
        """Replay the other hosts' new events and adopt a trip or reset made elsewhere;
        returns the new state when this host must halt (OPEN) or resume (not OPEN)."""
        state, epoch, since_event, trip, by = conn.execute(
            "select state, epoch, since_event, trip, changed_by from breaker_state "
            "where id = 1").fetchone()
        before = self.inner.state
        if epoch != self.epoch and state == "closed":
            self.inner.reset(by, "reset on another host")  # also forgets the counted events
            self.peer_trip = None
        self.last_event_id = max(self.last_event_id, since_event)
        self._replay(conn.execute(f"select {_EVENT_COLUMNS} from breaker_events where id > %s "
                                  "and host <> %s order by id", (self.last_event_id, self.host)))
        self.last_event_id = max(self.last_event_id, conn.execute(
            "select coalesce(max(id), 0) from breaker_events").fetchone()[0])
        if (epoch != self.epoch and state == "half_open"
                and self.inner.state is BreakerState.OPEN):
            # Probing starts on empty windows, as on one host (Breaker.tick).
            self.inner._clear_windows()
            self.inner.transition(BreakerState.HALF_OPEN, reason=f"auto reset on host {by}")
        if epoch != self.epoch and state == "open":
            self.peer_trip = msgspec.convert(trip, Trip) if trip else None
            if self.inner.state is not BreakerState.OPEN:
                self.inner.transition(BreakerState.OPEN, reason=f"tripped on host {by}")
            self.inner.last_trip = self.peer_trip or self.inner.last_trip
        self.epoch = epoch
        after = self.inner.state
        if (before is BreakerState.OPEN) != (after is BreakerState.OPEN):
            return after
        return None

    def _replay(self, rows) -> None:
        for _id, _host, event, agent, kind, digest, summary, tokens, cost, at in rows:
            mono = self._to_mono(at)
            if event == "output":
                self.inner.check_output(agent, kind, digest, summary, now=mono)
            elif event == "launch":
                self.inner.check_launch(agent, mono)
            else:
                self.inner.report_usage(agent, int(tokens), float(cost), now=mono)

    def _to_mono(self, wall: float) -> float:
        return self._mono() - max(0.0, self._wall() - wall)

    def replay_all(self) -> None:
        """At start: every host's events since the last reset, this host's earlier ones too."""
        with self.db.tx(lock=BREAKER_LOCK) as conn:
            state, epoch, since_event, trip, by = conn.execute(
                "select state, epoch, since_event, trip, changed_by from breaker_state "
                "where id = 1").fetchone()
            self._replay(conn.execute(f"select {_EVENT_COLUMNS} from breaker_events where "
                                      "id > %s order by id", (since_event,)))
            self.last_event_id = conn.execute(
                "select coalesce(max(id), 0) from breaker_events").fetchone()[0]
            self.epoch = epoch
            if state == "open" and self.inner.state is not BreakerState.OPEN:
                self.inner.transition(BreakerState.OPEN, reason=f"open since a trip on {by}")
            if state == "closed" and self.inner.state is not BreakerState.CLOSED:
                self.inner.reset("watchkeeper", "closed in the shared state")
            if trip:
                self.inner.last_trip = msgspec.convert(trip, Trip)
