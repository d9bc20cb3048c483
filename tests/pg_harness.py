"""Several real daemons sharing one PostgreSQL schema, for the tests/test_postgres_*.py suites."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import psycopg
from harness import DaemonProc

ROOT = Path(__file__).resolve().parent.parent
PG_DSN = os.environ.get("WATCHKEEPER_TEST_PG_DSN",
                        "host=127.0.0.1 port=5432 dbname=test user=postgres")


def _reachable() -> bool:
    try:
        psycopg.connect(PG_DSN, connect_timeout=2).close()
        return True
    except psycopg.Error:
        return False


pg_available = _reachable()
PG_MISSING = f"PostgreSQL not reachable at {PG_DSN} (set WATCHKEEPER_TEST_PG_DSN)"


def new_schema(prefix: str) -> str:
    return f"wkt_{prefix}_{secrets.token_hex(4)}"


def drop_schema(schema: str) -> None:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'drop schema if exists "{schema}" cascade')


def query(schema: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of `sql` run in `schema`, on a connection of the test's own."""
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute("select set_config('search_path', %s, false)", (schema,))
        return conn.execute(sql, params).fetchall()


def storage(schema: str, host: str, **overrides) -> dict:
    return {"backend": "postgresql", "dsn": PG_DSN, "schema": schema, "host_name": host,
            "leader_lease_s": 2.0, "lease_s": 3.0, "poll_s": 0.5, **overrides}


def start(daemons: list[DaemonProc]) -> list[DaemonProc]:
    """Start each daemon; their agents import this checkout's SDK, whatever their cwd."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    for d in daemons:
        d.start(extra_env={"PYTHONPATH": path})
    return daemons


def hosts(root: Path, schema: str, agents: dict, count: int = 2, storage_overrides=None,
          **settings) -> list[DaemonProc]:
    """`count` daemons (h1, h2, ...), each with its own state dir, on one schema; not started."""
    return [DaemonProc(Path(root) / f"h{i}", agents,
                       storage=storage(schema, f"h{i}", **(storage_overrides or {})), **settings)
            for i in range(1, count + 1)]
