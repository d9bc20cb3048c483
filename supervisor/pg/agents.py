"""Agent state that must be the same on every host: run leases, pause flags, cool-downs.

A run lease (`agent_leases`) is the cluster-wide form of "this agent is running": a host
takes it before starting a run of the agent, renews it with its other leases, and gives it
back when the run ends. Every expiry is on the server's clock. The overlap policy of a
firing on another host, the single instance of an `always` job, and fencing all read it:
a host that could not renew for part of the lease stops the run itself before the lease
can expire (cluster.py), so no other host can start the agent while it still runs.
Agents with `per_host: true` take no lease (one instance per host, as they ask).

Pause and crash-loop cool-downs live in `agent_flags`; each change takes a number from a
sequence so that peers pull only what changed since they last looked. A firing is checked
against the flags in the database at claim time, so a pause acknowledged on one host holds
on every host from that moment, whatever the poll cadence.
"""

from __future__ import annotations

import dataclasses

import psycopg

from .db import Database


@dataclasses.dataclass(frozen=True)
class AgentView:
    """What the cluster says about one agent right now."""
    holder: str | None         # the host whose live lease says it runs the agent
    paused_by: str | None      # the host a pause was sent to, when paused
    cooldown_host: str | None  # the host whose crash loop started a cool-down still on


def view(db: Database, agent: str) -> AgentView:
    with db.tx() as conn:
        return _views(conn, (agent,)).get(agent, AgentView(None, None, None))


def views(db: Database, agents) -> dict[str, AgentView]:
    with db.tx() as conn:
        return _views(conn, tuple(agents))


def _views(conn: psycopg.Connection, agents: tuple) -> dict[str, AgentView]:
    rows = conn.execute(
        "select a.name, l.host, f.paused, f.changed_by, f.cooldown_until > now(), "
        "f.cooldown_host from unnest(%s::text[]) as a(name) "
        "left join agent_leases l on l.agent = a.name and l.expires_at >= now() "
        "left join agent_flags f on f.agent = a.name", (list(agents),)).fetchall()
    return {name: AgentView(holder, by if paused else None, ch if cooling else None)
            for name, holder, paused, by, cooling, ch in rows}


# -- run leases ----------------------------------------------------------------------------------
def take_run_lease(db: Database, host: str, agent: str, lease_s: float) -> str | None:
    """Take the agent's run lease for `host`; None when taken, else the live holder."""
    with db.tx() as conn:
        row = conn.execute(
            "insert into agent_leases (agent, host, token, acquired_at, expires_at) values "
            "(%s, %s, nextval('agent_lease_tokens'), now(), now() + make_interval(secs => %s)) "
            "on conflict (agent) do update set host = excluded.host, run_id = '', "
            "token = excluded.token, acquired_at = now(), expires_at = excluded.expires_at, "
            "stop_requested_by = null where agent_leases.expires_at < now() "
            "returning token", (agent, host, lease_s)).fetchone()
        if row is not None:
            return None
        held = conn.execute("select host from agent_leases where agent = %s",
                            (agent,)).fetchone()
    if held is not None and held[0] == host:
        return None  # this host already runs or just claimed it: the local overlap applies
    return held[0] if held else "another host"


def record_run(db: Database, host: str, agent: str, run_id: str) -> None:
    with db.tx() as conn:
        conn.execute("update agent_leases set run_id = %s where agent = %s and host = %s",
                     (run_id, agent, host))


RELEASE_SQL = "delete from agent_leases where agent = %s and host = %s and run_id = %s"


def release_run_lease(db: Database, host: str, agent: str, run_id: str = "") -> None:
    """Give the lease of one run back (a later lease of the same agent is not touched)."""
    with db.tx() as conn:
        conn.execute(RELEASE_SQL, (agent, host, run_id))
        db.notify(conn, "agents")


def renew_run_leases(conn: psycopg.Connection, host: str, agents: list[str],
                     lease_s: float) -> dict[str, str | None]:
    """Inside renew's transaction: extend the live leases of `agents`; returns each one still
    held with who asked it to stop (`overlap: replace` elsewhere), or None."""
    rows = conn.execute(
        "update agent_leases set expires_at = now() + make_interval(secs => %s) "
        "where host = %s and agent = any(%s) and expires_at >= now() "
        "returning agent, stop_requested_by", (lease_s, host, agents)).fetchall()
    # Expired leases are gone for this host too, whether or not a peer took them yet.
    conn.execute("delete from agent_leases where host = %s and expires_at < now()", (host,))
    return dict(rows)


def request_stop(db: Database, host: str, agent: str) -> str | None:
    """Ask the host running `agent` to stop it (`overlap: replace`); returns that host."""
    with db.tx() as conn:
        row = conn.execute("update agent_leases set stop_requested_by = %s where agent = %s "
                           "and expires_at >= now() returning host", (host, agent)).fetchone()
        db.notify(conn, "agents")
    return row[0] if row else None


def running_hosts(conn: psycopg.Connection) -> dict[str, str]:
    return dict(conn.execute("select agent, host from agent_leases where expires_at >= now()"))


# -- flags -----------------------------------------------------------------------------------------
def set_paused(db: Database, host: str, agents: list[str], paused: bool) -> None:
    with db.tx() as conn:
        for agent in agents:
            conn.execute(
                "insert into agent_flags (agent, paused, changed_by, seq) values (%s, %s, %s, "
                "nextval('agent_flag_seq')) on conflict (agent) do update set paused = "
                "excluded.paused, changed_by = excluded.changed_by, changed_at = now(), "
                "seq = excluded.seq where agent_flags.paused is distinct from excluded.paused",
                (agent, paused, host))
        db.notify(conn, "agents")


def start_cooldown(db: Database, host: str, agent: str, cooldown_s: float) -> None:
    with db.tx() as conn:
        conn.execute(
            "insert into agent_flags (agent, cooldown_until, cooldown_host, seq) values (%s, "
            "now() + make_interval(secs => %s), %s, nextval('agent_flag_seq')) on conflict "
            "(agent) do update set cooldown_until = excluded.cooldown_until, cooldown_host = "
            "excluded.cooldown_host, seq = excluded.seq", (agent, cooldown_s, host))
        db.notify(conn, "agents")


def paused_changes(conn: psycopg.Connection, after_seq: int) -> tuple[dict[str, bool], int]:
    """Pause flags changed since `after_seq`, and the sequence number now reached."""
    rows = conn.execute("select agent, paused, seq from agent_flags where seq > %s order by seq",
                        (after_seq,)).fetchall()
    return {a: p for a, p, _ in rows}, max([after_seq] + [s for _, _, s in rows])


# -- hand-offs -------------------------------------------------------------------------------------
def hand_off(db: Database, to_host: str, agent: str, job: str, trigger: str) -> None:
    """A firing that must run on another host (an `after:` whose downstream is pinned there)."""
    with db.tx() as conn:
        conn.execute("insert into handoffs (host, agent, job, trigger) values (%s, %s, %s, %s)",
                     (to_host, agent, job, trigger))
        db.notify(conn, "agents")


def take_handoffs(conn: psycopg.Connection, host: str) -> list[tuple[str, str, str]]:
    return [tuple(r) for r in conn.execute(
        "delete from handoffs where host = %s returning agent, job, trigger", (host,))]
