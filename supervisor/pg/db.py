"""Connections to PostgreSQL for the daemon's loop: bounded waits, one schema, wake-up hints.

Every transaction sets its search_path and statement_timeout with SET LOCAL, so nothing
depends on session state and the same code runs behind PgBouncer in transaction mode
(where LISTEN does not work: `storage.transaction_pooling: true` leaves the poll alone).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import psycopg
import structlog

from ..errors import WatchkeeperError
from ..storage.settings import StorageSettings

log = structlog.get_logger("watchkeeper.pg")

# Advisory lock names; hashed with the schema so two pipelines on one server never contend.
STEWARD_LOCK = "steward"
BREAKER_LOCK = "breaker"
MIGRATE_LOCK = "migrate"


class StorageUnavailable(WatchkeeperError, ConnectionError):
    """PostgreSQL could not be reached with storage.dsn."""


# Outages, not bugs: a programming error in a statement must surface, not read as "down".
STORAGE_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, ConnectionError)


RECONNECT_FIRST_S = 0.2
RECONNECT_MAX_S = 2.0  # the cap bounds how late a daemon notices the database is back


class Database:
    """One connection, used by one thread (the daemon's loop); reconnects after a failure,
    with a doubling back-off so an outage does not turn every loop turn into a connect."""

    def __init__(self, settings: StorageSettings, role: str = "daemon") -> None:
        self.settings = settings
        self.schema = settings.schema
        self.role = role
        self._conn: psycopg.Connection | None = None
        self._retry_at = 0.0
        self._backoff_s = RECONNECT_FIRST_S

    def connect(self, *, autocommit: bool = True) -> psycopg.Connection:
        s = self.settings
        try:
            return psycopg.connect(
                s.dsn, autocommit=autocommit, connect_timeout=max(1, round(s.connect_timeout_s)),
                # A transaction-mode pooler may run each transaction on another server
                # connection, where a prepared statement does not exist.
                prepare_threshold=None if s.transaction_pooling else 5,
                application_name=f"watchkeeper {s.host} {self.role}"[:63],
                keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                # A link that silently drops packets must fail a statement within a quarter
                # lease: the loop blocked in it could not fence its runs (cluster.py).
                tcp_user_timeout=int(min(s.statement_timeout_s, s.lease_s / 4) * 1000))
        except psycopg.OperationalError as exc:
            raise StorageUnavailable(f"cannot connect to PostgreSQL ({_redacted(s.dsn)}): "
                                  f"{str(exc).strip()}; check storage.dsn and that the server "
                                  "accepts connections from this host") from None

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            now = time.monotonic()
            if now < self._retry_at:
                raise StorageUnavailable(f"PostgreSQL unreachable; next attempt in "
                                         f"{self._retry_at - now:.1f}s")
            if self._conn is not None:
                log.warning("pg_reconnecting", role=self.role)
                self._conn = None
            try:
                self._conn = self.connect()
            except StorageUnavailable:
                self._retry_at = now + self._backoff_s
                self._backoff_s = min(self._backoff_s * 2, RECONNECT_MAX_S)
                raise
            self._retry_at, self._backoff_s = 0.0, RECONNECT_FIRST_S
        return self._conn

    @contextlib.contextmanager
    def tx(self, lock: str | None = None, durable: bool = False) -> Iterator[psycopg.Connection]:
        """A transaction on this schema; `lock` serialises it with every host's holders of
        the same advisory lock; `durable` forces synchronous_commit whatever the server says."""
        conn = self.conn
        with conn.transaction():
            conn.execute("select set_config('search_path', %s, true), "
                         "set_config('statement_timeout', %s, true), "
                         "set_config('synchronous_commit', %s, true)",
                         (self.schema, f"{int(self.settings.statement_timeout_s * 1000)}",
                          "on" if durable else "local"))
            if lock is not None:
                conn.execute("select pg_advisory_xact_lock(hashtext(%s))",
                             (f"watchkeeper:{self.schema}:{lock}",))
            yield conn

    def notify(self, conn: psycopg.Connection, what: str) -> None:
        """Wake the other hosts when this transaction commits (a hint, never replayed)."""
        conn.execute("select pg_notify(%s, %s)", (self.channel, what))

    @property
    def channel(self) -> str:
        return f"watchkeeper_{self.schema}"

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Listener:
    """A LISTEN connection whose socket the loop watches; notifications are wake-up hints."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.conn = db.connect()
        self.conn.execute(f'listen "{db.channel}"')
        # Kept: once the server drops the connection, psycopg no longer tells the number,
        # and the loop must still unregister it before the number is reused by a socket.
        self.fd = self.conn.fileno()

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> set[str]:
        """The payloads received since the last call (duplicates folded)."""
        return {n.payload for n in self.conn.notifies(timeout=0)}

    def close(self) -> None:
        self.conn.close()


def one_line(exc: BaseException) -> str:
    """An error's text on one line (psycopg's span several), for replies and logs."""
    return " ".join(str(exc).split())


def _redacted(dsn: str) -> str:
    """The dsn without its password, for error messages."""
    import re

    dsn = re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn)
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)
