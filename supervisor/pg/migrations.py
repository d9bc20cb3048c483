"""The shared schema, as numbered migrations applied in order, each exactly once.

The daemon applies missing migrations at start and `watchkeeper migrate` does it on demand;
both hold an advisory lock, so several hosts starting at once apply each migration once.
A database already past the newest migration this version knows is refused: an older
daemon must not write into a schema it does not understand.
"""

from __future__ import annotations

import structlog

from .db import MIGRATE_LOCK, Database

log = structlog.get_logger("watchkeeper.pg.migrations")

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "hosts, leader, locks, claims, runs, heartbeats, breaker, memory", """
create table hosts (
    name        text primary key,
    pid         integer not null,
    version     text not null,
    started_at  timestamptz not null default now(),
    last_seen   timestamptz not null default now(),
    stopped     boolean not null default false
);
create table leader (
    id          integer primary key check (id = 1),
    holder      text not null,
    token       bigint not null,          -- the fencing token: +1 at every change of leader
    since       timestamptz not null,
    expires_at  timestamptz not null
);
insert into leader values (1, '', 0, now(), '-infinity');
create table task_locks (
    task_id     text primary key,
    host        text not null,
    agent       text not null,
    run_id      text not null,
    pid         integer,
    acquired_at timestamptz not null,
    expires_at  timestamptz not null
);
create index task_locks_by_run on task_locks (run_id);
create table firing_claims (
    agent       text not null,
    job         text not null,
    slot        double precision not null,  -- the scheduled time (unix seconds) of the firing
    host        text not null,
    claimed_at  timestamptz not null default now(),
    primary key (agent, job, slot)
);
create index firing_claims_by_time on firing_claims (claimed_at);
create table runs (
    run_id      text primary key,
    agent       text not null,
    job         text not null,
    attempt     integer not null default 0,
    trigger     text not null default '',
    pid         integer,
    started     double precision not null,
    ended       double precision,
    exit_code   integer,
    signal      integer,
    outcome     text,
    stop_reason text not null default '',
    stop_signal text not null default '',
    degraded    text not null default '',
    host        text not null default ''
);
create index runs_by_agent on runs (agent, started);
create index runs_open on runs (host) where ended is null;
create table heartbeats (
    agent       text primary key,
    host        text not null,
    ts          double precision not null,
    pid         integer,
    run_id      text
);
create table breaker_state (
    id          integer primary key check (id = 1),
    state       text not null,
    epoch       bigint not null,           -- +1 at every trip and every reset
    since_event bigint not null,           -- events up to this id were cleared by a reset
    changed_at  timestamptz not null,
    changed_by  text not null,
    trip        jsonb
);
insert into breaker_state values (1, 'closed', 0, 0, now(), '', null);
create table breaker_events (
    id          bigserial primary key,
    host        text not null,
    event       text not null,             -- output | launch | usage
    agent       text not null,
    kind        text not null default '',
    hash        text,
    summary     text not null default '',
    tokens      bigint not null default 0,
    cost        double precision not null default 0,
    at          double precision not null  -- wall clock of the event on its host
);
create index breaker_events_by_time on breaker_events (at);
create table entries (
    id          bigserial primary key,
    namespace   text not null,
    key         text not null,
    value       text,                      -- JSON; NULL is a tombstone that keeps the version
    version     bigint not null,
    updated_at  double precision not null,
    updated_by  text not null,
    run_id      text not null,
    search      tsvector generated always as (to_tsvector('english',
                    namespace || ' ' || key || ' ' || coalesce(value, ''))) stored,
    unique (namespace, key)
);
create index entries_search on entries using gin (search);
create table history (
    seq         bigserial primary key,
    namespace   text not null, key text not null, op text not null,
    agent       text not null, run_id text not null, time double precision not null,
    old_version bigint, new_version bigint, old_value text, new_value text
);
create index history_by_key on history (namespace, key, seq);
create index history_by_agent on history (agent, seq);
create index history_by_run on history (run_id, seq);
create index history_by_time on history (time);
create table idempotency (
    agent       text not null,
    key         text not null,
    result      text not null,
    created_at  double precision not null,
    primary key (agent, key)
);
create index idempotency_by_age on idempotency (created_at);
"""),
    (2, "agent run leases, cluster-wide agent flags, firing hand-offs, outputs", """
create table agent_leases (
    agent        text primary key,
    host         text not null,
    run_id       text not null default '',
    token        bigint not null,          -- fencing token: new at every take-over
    acquired_at  timestamptz not null,
    expires_at   timestamptz not null,
    stop_requested_by text                 -- `overlap: replace` from another host
);
create sequence agent_lease_tokens;
create table agent_flags (
    agent          text primary key,
    paused         boolean not null default false,
    cooldown_until timestamptz,            -- a crash-loop cool-down, on the server's clock
    cooldown_host  text not null default '',
    changed_by     text not null default '',
    changed_at     timestamptz not null default now(),
    seq            bigint not null         -- from agent_flag_seq: peers pull changes past theirs
);
create sequence agent_flag_seq;
create table outputs (
    id          bigserial primary key,
    host        text not null,
    agent       text not null,
    run_id      text not null,
    kind        text not null,
    time        double precision not null,
    hash        text not null,
    summary     text not null,
    allowed     boolean not null
);
create index outputs_by_agent on outputs (agent, time);
create table handoffs (
    id          bigserial primary key,
    host        text not null,             -- the host that must fire it
    agent       text not null,
    job         text not null,
    trigger     text not null,
    created_at  timestamptz not null default now()
);
"""),
]

LATEST = MIGRATIONS[-1][0]


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer watchkeeper."""


def migrate(db: Database) -> list[int]:
    """Apply every missing migration in one transaction; return the versions applied."""
    conn = db.conn
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))",
                     (f"watchkeeper:{db.schema}:{MIGRATE_LOCK}",))
        conn.execute(f'create schema if not exists "{db.schema}"')
        conn.execute("select set_config('search_path', %s, true)", (db.schema,))
        conn.execute("create table if not exists schema_migrations (version integer primary "
                     "key, name text not null, applied_at timestamptz not null default now())")
        done = {v for v, in conn.execute("select version from schema_migrations")}
        if done and max(done) > LATEST:
            raise SchemaTooNew(f"schema {db.schema!r} is at version {max(done)}, this watchkeeper "
                               f"knows up to {LATEST}: upgrade watchkeeper on this host")
        applied = []
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            conn.execute(sql)
            conn.execute("insert into schema_migrations (version, name) values (%s, %s)",
                         (version, name))
            applied.append(version)
            log.info("pg_migration_applied", schema=db.schema, version=version, name=name)
    return applied


def current_version(db: Database) -> int:
    with db.tx() as conn:
        exists = conn.execute("select to_regclass('schema_migrations')").fetchone()[0]
        if exists is None:
            return 0
        return conn.execute("select coalesce(max(version), 0) from schema_migrations").fetchone()[0]
