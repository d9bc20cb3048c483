"""At start: owe the trip alert a crash kept out of this host's outbox.

The trip commits in PostgreSQL (`breaker_state`) before its alert row commits in this host's
SQLite outbox: they are two databases. A crash between the two commits leaves the cluster
halted with no alert owed anywhere, and the peers never alert for a trip they replayed. So
the host that made the trip (`changed_by`), finding the breaker open at start and no row for
the trip's alert, owes it again. The id derives from the trip (alerts.trip_alert_id): should
the first alert have gone out after all, the receiver sees a duplicate with the same id.
"""

from __future__ import annotations

import time

import msgspec
import psycopg
import structlog

from ..alerts.alerts import trip_alert
from ..breaker.breaker import Trip

log = structlog.get_logger("watchkeeper.pg.breaker")


def owe_lost_trip_alert(db, host: str, alerter, wall_clock=time.time) -> bool:
    """Send the trip alert if this host tripped the open breaker and its outbox lacks the
    alert; True when it did. An alert older than `alerts.max_age_s` would be given up at
    once (or was pruned after being settled): it is not re-derived."""
    try:
        with db.tx() as conn:
            row = conn.execute("select state, changed_by, trip from breaker_state "
                               "where id = 1").fetchone()
    except psycopg.Error as exc:  # the halt holds; only the re-derived alert is missed
        log.error("trip_alert_check_failed", error=" ".join(str(exc).split()))
        return False
    if row is None or row[0] != "open" or row[1] != host or not row[2]:
        return False
    trip = msgspec.convert(row[2], Trip)
    alert = trip_alert(trip)
    if (wall_clock() - trip.time >= alerter.settings.max_age_s
            or alerter.outbox.has(alert.alert_id)):
        return False
    log.critical("trip_alert_rederived", agent=trip.agent, alert_id=alert.alert_id,
                 hint="the trip committed in PostgreSQL but its alert row did not commit "
                      "locally (a crash between the two); sending it now")
    return alerter.send(alert)
