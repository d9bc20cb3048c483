"""The daemon's own records in SQLite under STATE_DIR: runs, job firings, agent flags.

Only the daemon's loop writes here (one connection, one thread). Other processes
(`watchkeeper status --offline`, tests) may read it concurrently: WAL mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sqlite3
import time
from pathlib import Path

import structlog

log = structlog.get_logger("watchkeeper.store")


def _record(write):
    """A record that cannot be written (disk full, I/O error) is logged and lost: losing a
    run record is better than a loop that stops supervising because its history is full."""
    @functools.wraps(write)
    def tolerant(self, *args, **kwargs):
        try:
            return write(self, *args, **kwargs)
        except sqlite3.OperationalError as exc:
            log.error("store_write_failed", write=write.__name__, error=str(exc),
                      hint="is the state directory's disk full?")
            return None
    return tolerant

tolerant_write = _record  # for the other tables of this database (alerts/outbox.py)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    agent       TEXT NOT NULL,
    job         TEXT NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 0,
    trigger     TEXT NOT NULL DEFAULT '',
    pid         INTEGER,
    started     REAL NOT NULL,
    ended       REAL,
    exit_code   INTEGER,
    signal      INTEGER,
    outcome     TEXT,
    stop_reason TEXT NOT NULL DEFAULT '',
    stop_signal TEXT NOT NULL DEFAULT '',
    degraded    TEXT NOT NULL DEFAULT '',
    host        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS runs_agent_started ON runs(agent, started);
CREATE TABLE IF NOT EXISTS job_state (
    agent     TEXT NOT NULL,
    job       TEXT NOT NULL,
    last_fire REAL NOT NULL,
    PRIMARY KEY (agent, job)
);
CREATE TABLE IF NOT EXISTS agent_flags (
    agent  TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outputs (
    id       INTEGER PRIMARY KEY,
    agent    TEXT NOT NULL,
    run_id   TEXT NOT NULL,
    kind     TEXT NOT NULL,
    time     REAL NOT NULL,
    hash     TEXT NOT NULL,
    summary  TEXT NOT NULL,
    allowed  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outputs_agent_time ON outputs(agent, time);
CREATE TABLE IF NOT EXISTS usage (
    id      INTEGER PRIMARY KEY,
    agent   TEXT NOT NULL,
    run_id  TEXT NOT NULL,
    time    REAL NOT NULL,
    tokens  INTEGER NOT NULL,
    cost    REAL NOT NULL,
    model   TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclasses.dataclass
class RunRecord:
    run_id: str
    agent: str
    job: str
    attempt: int
    trigger: str
    pid: int | None
    started: float
    ended: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    outcome: str | None = None
    stop_reason: str = ""
    stop_signal: str = ""
    degraded: str = ""
    host: str = ""


class Store:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # A run record lost in a power cut is tolerable; NORMAL under WAL still never
        # corrupts the database, and keeps the loop's commits cheap.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        self.db.row_factory = sqlite3.Row
        self._after_commit: list = []

    @contextlib.contextmanager
    def transaction(self):
        """One transaction around everything inside; nested uses join the outer one.

        A state change and the alert it causes commit together (alerts/outbox.py), so a
        SIGKILL can lose neither one alone.
        """
        if self.db.in_transaction:
            yield self.db
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            self._after_commit.clear()
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            log.error("store_write_failed", write="transaction", error=str(exc),
                      hint="is the state directory's disk full?")
            with contextlib.suppress(sqlite3.OperationalError):
                self.db.execute("ROLLBACK")
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()

    def after_commit(self, callback) -> None:
        """Call `callback` once the current transaction commits (at once outside one)."""
        if self.db.in_transaction:
            self._after_commit.append(callback)
        else:
            callback()

    def close(self) -> None:
        self.db.close()

    # -- runs ---------------------------------------------------------------------------
    @_record
    def run_started(self, rec: RunRecord) -> None:
        fields = dataclasses.asdict(rec)
        names = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        self.db.execute(f"INSERT OR REPLACE INTO runs ({names}) VALUES ({marks})",
                        tuple(fields.values()))

    @_record
    def run_ended(self, rec: RunRecord) -> None:
        self.db.execute(
            "UPDATE runs SET ended=?, exit_code=?, signal=?, outcome=?, stop_reason=?, "
            "stop_signal=?, pid=? WHERE run_id=?",
            (rec.ended, rec.exit_code, rec.signal, rec.outcome, rec.stop_reason,
             rec.stop_signal, rec.pid, rec.run_id))

    def close_dangling_runs(self, outcome: str, now: float) -> int:
        """Runs left open by a daemon that died: mark them ended, reason daemon_lost."""
        cur = self.db.execute("UPDATE runs SET ended=?, outcome=?, stop_reason='daemon_lost' "
                              "WHERE ended IS NULL", (now, outcome))
        return cur.rowcount

    def recent_runs(self, agent: str | None = None, limit: int = 20) -> list[RunRecord]:
        if agent:
            rows = self.db.execute("SELECT * FROM runs WHERE agent=? ORDER BY started DESC "
                                   "LIMIT ?", (agent, limit))
        else:
            rows = self.db.execute("SELECT * FROM runs ORDER BY started DESC LIMIT ?", (limit,))
        return [RunRecord(**dict(r)) for r in rows]

    def last_run(self, agent: str) -> RunRecord | None:
        runs = self.recent_runs(agent, 1)
        return runs[0] if runs else None

    @_record
    def prune_runs(self, older_than_s: float, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - older_than_s
        self.db.execute("DELETE FROM outputs WHERE time < ?", (cutoff,))
        self.db.execute("DELETE FROM usage WHERE time < ?", (cutoff,))
        return self.db.execute("DELETE FROM runs WHERE ended IS NOT NULL AND ended < ?",
                               (cutoff,)).rowcount

    # -- job firings (catch-up) ---------------------------------------------------------
    @_record
    def record_fire(self, agent: str, job: str, when: float) -> None:
        self.db.execute("INSERT INTO job_state(agent, job, last_fire) VALUES (?,?,?) "
                        "ON CONFLICT(agent, job) DO UPDATE SET last_fire=excluded.last_fire",
                        (agent, job, when))

    def last_fire(self, agent: str, job: str) -> float | None:
        row = self.db.execute("SELECT last_fire FROM job_state WHERE agent=? AND job=?",
                              (agent, job)).fetchone()
        return row[0] if row else None

    # -- outputs and spend -------------------------------------------------------------------
    @_record
    def record_output(self, agent: str, run_id: str, kind: str, when: float, digest: str,
                      summary: str, allowed: bool) -> None:
        self.db.execute("INSERT INTO outputs(agent, run_id, kind, time, hash, summary, allowed) "
                        "VALUES (?,?,?,?,?,?,?)",
                        (agent, run_id, kind, when, digest, summary, int(allowed)))

    def recent_outputs(self, agent: str | None = None, limit: int = 50) -> list[dict]:
        sql = "SELECT * FROM outputs" + (" WHERE agent=?" if agent else "") + \
              " ORDER BY id DESC LIMIT ?"
        rows = self.db.execute(sql, (agent, limit) if agent else (limit,))
        return [dict(r) for r in rows]

    @_record
    def record_usage(self, agent: str, run_id: str, when: float, tokens: int, cost: float,
                     model: str) -> None:
        self.db.execute("INSERT INTO usage(agent, run_id, time, tokens, cost, model) "
                        "VALUES (?,?,?,?,?,?)", (agent, run_id, when, tokens, cost, model))

    def breaker_events(self, since: float, uncounted_triggers: tuple[str, ...] = ()) -> list:
        """Outputs, launches and spend recorded after `since` (wall clock), oldest first, as
        the breaker counts them (`Breaker.recount`); runs started by `uncounted_triggers` are
        left out, as the launch gate leaves them out."""
        from ..breaker.breaker import StoredEvent

        marks = ",".join("?" for _ in uncounted_triggers) or "''"
        rows = self.db.execute(
            "SELECT time, agent, 'output', kind, hash, 0, 0.0 FROM outputs WHERE time > ? "
            "UNION ALL SELECT started, agent, 'launch', '', '', 0, 0.0 FROM runs "
            f"WHERE started > ? AND trigger NOT IN ({marks}) "
            "UNION ALL SELECT time, agent, 'usage', '', '', tokens, cost FROM usage "
            "WHERE time > ? ORDER BY 1", (since, since, *uncounted_triggers, since))
        return [StoredEvent(*row) for row in rows]

    # -- flags and small values ------------------------------------------------------------
    @_record
    def set_paused(self, agent: str, paused: bool) -> None:
        self.db.execute("INSERT INTO agent_flags(agent, paused) VALUES (?, ?) ON CONFLICT(agent)"
                        " DO UPDATE SET paused=excluded.paused", (agent, int(paused)))

    def paused_agents(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT agent FROM agent_flags WHERE paused=1")}

    @_record
    def put_value(self, key: str, value) -> None:
        self.db.execute("INSERT INTO kv(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                        "SET value=excluded.value", (key, json.dumps(value)))

    def get_value(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default
