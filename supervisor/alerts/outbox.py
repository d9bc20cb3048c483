"""The alert outbox: every alert is a row in state.db before any sink is tried.

An alert that lived only in memory was lost when the webhook was down for 15 s at the trip,
or when the daemon was SIGKILLed, OOM-killed or restarted a second after it: the pipeline sat
halted all night and nobody was told. Here the alert row and one delivery row per sink are
inserted in the transaction of the state change that causes the alert (the trip, the reset),
and a delivery row is marked only after its sink acknowledged. Whatever is not marked is sent
again, after a restart too: at-least-once per sink, the alert's id lets a receiver drop the
rare duplicate.

Only the daemon's loop calls this (the store's one writer); the sender (alerts/sender.py)
reports results back to the loop. A mark that cannot be written (full disk) is logged and
lost: the alert is then sent again, never dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import NamedTuple

import msgspec

from ..storage.store import tolerant_write
from .alerts import Alert

SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_outbox (
    alert_id  TEXT PRIMARY KEY,
    kind      TEXT NOT NULL,
    agent     TEXT,
    created   REAL NOT NULL,
    alert     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alert_deliveries (
    alert_id     TEXT NOT NULL,
    sink         TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    first_failed REAL,
    last_error   TEXT NOT NULL DEFAULT '',
    delivered    REAL,
    given_up     REAL,
    PRIMARY KEY (alert_id, sink)
);
CREATE INDEX IF NOT EXISTS alert_deliveries_open ON alert_deliveries(delivered, given_up);
"""

_OPEN = "d.delivered IS NULL AND d.given_up IS NULL"


class Delivery(NamedTuple):
    """One alert still owed to one sink."""

    alert: Alert
    sink: str
    attempts: int
    first_failed: float | None


class Undelivered(NamedTuple):
    """What `status`, the STATUS line and metrics show about the outbox."""

    count: int
    oldest_age_s: float
    last_error: str

    def as_dict(self) -> dict:
        return {"undelivered": self.count, "oldest_age_s": round(self.oldest_age_s, 1),
                "last_error": self.last_error}


class Outbox:
    """Alert rows and their per-sink delivery rows in the daemon's store."""

    def __init__(self, store) -> None:
        self.store = store
        store.db.executescript(SCHEMA)

    @property
    def _db(self):
        return self.store.db

    def add(self, alert: Alert, sinks: list[str]) -> Alert:
        """Insert the alert (with a fresh stable id) and a delivery row per sink."""
        alert = msgspec.structs.replace(alert, alert_id=alert.alert_id or uuid.uuid4().hex)
        with self.store.transaction():
            self._db.execute("INSERT INTO alert_outbox(alert_id, kind, agent, created, alert) "
                             "VALUES (?,?,?,?,?)",
                             (alert.alert_id, alert.kind.value, alert.agent, alert.time,
                              msgspec.json.encode(alert).decode()))
            self._db.executemany("INSERT INTO alert_deliveries(alert_id, sink) VALUES (?,?)",
                                 [(alert.alert_id, sink) for sink in sinks])
        return alert

    @tolerant_write
    def add_sink(self, alert_id: str, sink: str) -> None:
        """Owe an alert to one more sink (escalation); a second call changes nothing."""
        self._db.execute("INSERT OR IGNORE INTO alert_deliveries(alert_id, sink) VALUES (?,?)",
                         (alert_id, sink))

    @tolerant_write
    def delivered(self, alert_id: str, sink: str, now: float | None = None) -> None:
        self._db.execute("UPDATE alert_deliveries SET delivered=?, attempts=attempts+1 "
                         "WHERE alert_id=? AND sink=?", (now or time.time(), alert_id, sink))

    @tolerant_write
    def failed(self, alert_id: str, sink: str, error: str, now: float | None = None) -> None:
        now = now or time.time()
        self._db.execute("UPDATE alert_deliveries SET attempts=attempts+1, last_error=?, "
                         "first_failed=COALESCE(first_failed, ?) WHERE alert_id=? AND sink=?",
                         (error, now, alert_id, sink))

    @tolerant_write
    def give_up(self, alert_id: str, sink: str, error: str, now: float | None = None) -> None:
        self._db.execute("UPDATE alert_deliveries SET given_up=?, last_error=? "
                         "WHERE alert_id=? AND sink=?", (now or time.time(), error, alert_id,
                                                         sink))

    def has(self, alert_id: str) -> bool:
        """Whether the alert was ever put in the outbox (and not yet pruned)."""
        return self._db.execute("SELECT 1 FROM alert_outbox WHERE alert_id=?",
                                (alert_id,)).fetchone() is not None

    def first_failed(self, alert_id: str, sink: str) -> float | None:
        """When `sink` first failed on the alert (wall clock), None if it never has."""
        row = self._db.execute("SELECT first_failed FROM alert_deliveries "
                               "WHERE alert_id=? AND sink=?", (alert_id, sink)).fetchone()
        return row[0] if row else None

    def pending(self) -> list[Delivery]:
        """Every delivery not yet made nor given up, oldest alert first."""
        rows = self._db.execute(
            "SELECT o.alert, d.sink, d.attempts, d.first_failed FROM alert_deliveries d "
            f"JOIN alert_outbox o USING (alert_id) WHERE {_OPEN} ORDER BY o.created, d.sink")
        return [Delivery(msgspec.json.decode(r[0], type=Alert), r[1], r[2], r[3]) for r in rows]

    def undelivered(self, now: float | None = None) -> Undelivered:
        """Alerts some sink still owes: their count, the oldest one's age, the last error."""
        row = self._db.execute(
            "SELECT COUNT(DISTINCT o.alert_id), MIN(o.created) FROM alert_deliveries d "
            f"JOIN alert_outbox o USING (alert_id) WHERE {_OPEN}").fetchone()
        error = self._db.execute(
            f"SELECT d.last_error FROM alert_deliveries d WHERE {_OPEN} AND d.last_error != '' "
            "ORDER BY d.first_failed DESC LIMIT 1").fetchone()
        count, oldest = row[0] or 0, row[1]
        age_s = max(0.0, (now or time.time()) - oldest) if oldest is not None else 0.0
        return Undelivered(count, age_s, error[0] if error else "")

    def delivered_to(self, alert_id: str) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT sink FROM alert_deliveries WHERE alert_id=? AND delivered IS NOT NULL",
            (alert_id,))]

    def prune(self, older_than_s: float, now: float | None = None) -> None:
        """Forget alerts older than `older_than_s` that no sink still owes."""
        cutoff = (now or time.time()) - older_than_s
        self._db.execute(
            "DELETE FROM alert_deliveries WHERE alert_id IN (SELECT alert_id FROM alert_outbox "
            "WHERE created < ?) AND (delivered IS NOT NULL OR given_up IS NOT NULL)", (cutoff,))
        self._db.execute("DELETE FROM alert_outbox WHERE created < ? AND alert_id NOT IN "
                         "(SELECT alert_id FROM alert_deliveries)", (cutoff,))
