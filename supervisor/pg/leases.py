"""Leases in PostgreSQL: the leader, task locks and host liveness, all timed by the server.

Every expiry is computed with the database's clock (now()), so hosts with skewed clocks
still agree on who holds what. A lease is a row, not a session advisory lock: it survives
connection pooling, and a frozen host loses it by not renewing, which a dropped TCP
connection would not prove for minutes.

The leader holds `leader.token`, a fencing token raised at every change of leader. Work only
the leader may do runs in a transaction that first locks the leader row (`fenced`) and
checks the token, so a leader that was frozen and woke up after losing its lease cannot
write: its token is stale.
"""

from __future__ import annotations

import dataclasses

import psycopg
import structlog

from .agents import renew_run_leases
from .db import Database

log = structlog.get_logger("watchkeeper.pg.leases")


class LeaseLost(RuntimeError):
    """This daemon acted as leader with a fencing token that is no longer current."""


class Leadership:
    """This host's view of the leader lease; the loop calls `renew_or_acquire` regularly."""

    def __init__(self, db: Database, host: str, lease_s: float) -> None:
        self.db = db
        self.host = host
        self.lease_s = lease_s
        self.token: int | None = None  # set while this host leads

    @property
    def leading(self) -> bool:
        return self.token is not None

    def renew_or_acquire(self) -> str | None:
        """Renew the lease, or take it if it expired; returns "elected", "lost" or None."""
        with self.db.tx() as conn:
            if self.token is not None:
                row = conn.execute(
                    "update leader set expires_at = now() + make_interval(secs => %s) "
                    "where id = 1 and holder = %s and token = %s returning token",
                    (self.lease_s, self.host, self.token)).fetchone()
                if row is not None:
                    return None
                self.token = None
                return "lost"
            # A daemon restarted under the same host name takes over its own lease at once.
            row = conn.execute(
                "update leader set holder = %s, token = token + 1, since = now(), "
                "expires_at = now() + make_interval(secs => %s) "
                "where id = 1 and (expires_at < now() or holder = %s) returning token",
                (self.host, self.lease_s, self.host)).fetchone()
            if row is None:
                return None
            self.token = row[0]
            self.db.notify(conn, "leader")
            return "elected"

    def resign(self) -> None:
        """Give the lease up at once (clean stop), so a peer takes over without waiting."""
        if self.token is None:
            return
        with self.db.tx() as conn:
            conn.execute("update leader set expires_at = '-infinity' where id = 1 and "
                         "holder = %s and token = %s", (self.host, self.token))
            self.db.notify(conn, "leader")
        self.token = None

    def fenced(self, conn: psycopg.Connection) -> None:
        """Inside a transaction: hold the leader row and prove this host still leads."""
        row = conn.execute("select holder, token, expires_at > now() from leader where id = 1 "
                           "for share").fetchone()
        if self.token is None or row != (self.host, self.token, True):
            self.token = None
            raise LeaseLost(f"host {self.host} is no longer the leader "
                            f"(leader: {row[0] or 'none'}, token {row[1]})")


def current_leader(conn: psycopg.Connection) -> dict:
    holder, token, since, alive = conn.execute(
        "select holder, token, extract(epoch from since), expires_at > now() from leader "
        "where id = 1").fetchone()
    return {"host": holder if alive else None, "token": token, "since": float(since)}


# -- hosts ------------------------------------------------------------------------------------
def register_host(db: Database, host: str, pid: int, version: str) -> None:
    with db.tx() as conn:
        conn.execute(
            "insert into hosts (name, pid, version) values (%s, %s, %s) on conflict (name) do "
            "update set pid = excluded.pid, version = excluded.version, started_at = now(), "
            "last_seen = now(), stopped = false", (host, pid, version))
        db.notify(conn, "hosts")


def host_stopped(db: Database, host: str) -> None:
    with db.tx() as conn:
        conn.execute("update hosts set stopped = true, last_seen = now() where name = %s", (host,))
        db.notify(conn, "hosts")


def list_hosts(conn: psycopg.Connection, lease_s: float) -> list[dict]:
    rows = conn.execute(
        "select name, pid, version, extract(epoch from started_at), extract(epoch from "
        "last_seen), stopped, last_seen > now() - make_interval(secs => %s) from hosts "
        "order by name", (lease_s,)).fetchall()
    return [{"host": n, "pid": p, "version": v, "started": float(s), "last_seen": float(seen),
             "alive": alive and not stopped, "stopped": stopped}
            for n, p, v, s, seen, stopped, alive in rows]


# -- task locks ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LockHolder:
    task_id: str
    host: str
    agent: str
    run_id: str
    pid: int | None
    acquired_at: float
    expires_in_s: float

    def describe(self) -> str:
        return (f"agent {self.agent or '?'} (pid {self.pid} on {self.host}, run "
                f"{self.run_id or '?'}, lease ends in {max(0.0, self.expires_in_s):.0f}s)")


_HOLDER = ("select task_id, host, agent, run_id, pid, extract(epoch from acquired_at), "
           "extract(epoch from expires_at - now()) from task_locks")


def acquire_lock(db: Database, lease_s: float, task_id: str, *, host: str, agent: str,
                 run_id: str, pid: int | None) -> LockHolder | None:
    """Take the task's lock (a live holder keeps it; an expired lease is taken over).
    Returns None when taken, else the current holder."""
    with db.tx() as conn:
        row = conn.execute(
            "insert into task_locks values (%s, %s, %s, %s, %s, now(), now() + "
            "make_interval(secs => %s)) on conflict (task_id) do update set host = excluded.host, "
            "agent = excluded.agent, run_id = excluded.run_id, pid = excluded.pid, "
            "acquired_at = excluded.acquired_at, expires_at = excluded.expires_at "
            "where task_locks.expires_at < now() or task_locks.run_id = excluded.run_id "
            "returning task_id", (task_id, host, agent, run_id, pid, lease_s)).fetchone()
        if row is not None:
            return None
        held = conn.execute(_HOLDER + " where task_id = %s", (task_id,)).fetchone()
        return LockHolder(*held[:5], float(held[5]), float(held[6])) if held else None


def release_locks(db: Database, host: str, *, run_id: str, task_id: str | None = None) -> int:
    with db.tx() as conn:
        sql = "delete from task_locks where host = %s and run_id = %s"
        params: tuple = (host, run_id)
        if task_id is not None:
            sql, params = sql + " and task_id = %s", (*params, task_id)
        return conn.execute(sql, params).rowcount


def renew(db: Database, host: str, lease_s: float, run_agents: list[str] = ()
          ) -> tuple[set[tuple[str, str]], dict[str, str | None]]:
    """Extend this host's liveness, every lock lease and every run lease (agents.py) it
    still holds; returns the (run_id, task_id) pairs and the agents still held. A lease
    taken over, or only expired, while this host was away is gone."""
    with db.tx() as conn:
        agents = renew_run_leases(conn, host, list(run_agents), lease_s)
        conn.execute("update hosts set last_seen = now(), stopped = false where name = %s",
                     (host,))
        rows = conn.execute(
            "update task_locks set expires_at = now() + make_interval(secs => %s) "
            "where host = %s and expires_at >= now() returning run_id, task_id",
            (lease_s, host)).fetchall()
        # Expired but not yet taken: still ours to lose, not to keep. Dropping them here
        # makes "expired" mean the same on every host, whatever this one did while away.
        conn.execute("delete from task_locks where host = %s and expires_at < now()", (host,))
    return {(r, t) for r, t in rows}, agents


def list_locks(conn: psycopg.Connection) -> list[LockHolder]:
    rows = conn.execute(_HOLDER + " where expires_at >= now() order by task_id").fetchall()
    return [LockHolder(*r[:5], float(r[5]), float(r[6])) for r in rows]
