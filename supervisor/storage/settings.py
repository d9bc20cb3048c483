"""The `storage:` section: where the daemon keeps the state that several hosts must share.

`sqlite` (the default) is the embedded store under STATE_DIR, for one host. `postgresql`
shares the steward's memory, task locks, breaker, heartbeats, run records and firing claims
between every daemon configured with the same `dsn` and `schema` (supervisor/pg/).
"""

from __future__ import annotations

import socket
from typing import Literal

import msgspec

from ..core.ranges import PositiveDuration, SqlIdentifier


class StorageSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The `storage` config section."""

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    """`sqlite`: one host, state under state_dir. `postgresql`: state shared by every host
    that uses the same dsn and schema (docs/postgresql.md)."""
    dsn: str = ""
    """libpq connection string or URI, e.g. `postgresql://watchkeeper@db/watchkeeper`;
    required with backend postgresql (configload checks it)."""
    host_name: str = ""
    """This daemon's name among the hosts; empty: the machine's host name. Unique per daemon."""
    schema: SqlIdentifier = "watchkeeper"
    """PostgreSQL schema holding the tables; one schema is one pipeline."""
    leader_lease_s: PositiveDuration = 10.0
    """A leader that stops renewing is replaced after at most this long (plus poll_s)."""
    lease_s: PositiveDuration = 30.0
    """Task locks, run leases and host liveness expire this long after their daemon's last
    renewal; a daemon that cannot renew stops the runs holding them at half of it."""
    poll_s: PositiveDuration = 2.0
    """Safety-net poll of shared state (breaker, leader); NOTIFY wakes peers sooner."""
    transaction_pooling: bool = False
    """True when the dsn goes through a pooler in transaction mode (PgBouncer): LISTEN and
    server-side prepared statements are then off, and peers rely on the poll_s poll."""
    connect_timeout_s: PositiveDuration = 5.0
    """Connecting to PostgreSQL gives up after this long."""
    statement_timeout_s: PositiveDuration = 10.0
    """A statement running longer is cancelled, so a stuck server cannot freeze the loop."""

    @property
    def host(self) -> str:
        return self.host_name or socket.gethostname()
