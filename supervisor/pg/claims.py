"""Which host runs a firing: every host's scheduler fires, one host claims the slot.

A slot is the time the schedule meant, not the moment a host noticed it, so every host
computes the same key for the same firing: for `every_s` the interval's boundary counted
from the epoch, for `cron` the latest cron time not after the firing, both read on the
database's clock (a host's own clock may be off by many seconds). The first host to
insert (agent, job, slot) into firing_claims runs it; the others skip it.
"""

from __future__ import annotations

import datetime as dt
import math
import time

from apscheduler.triggers.cron import CronTrigger

from ..config.schema import AgentSpec, Job
from ..core.cron import cron_fields
from .db import Database

CLAIMED_TRIGGERS = frozenset({"cron", "every", "catch_up"})
_LOOKBACK_S = 60.0
_MAX_LOOKBACK_S = 400 * 86400.0


def pinned_host(spec: AgentSpec, job: Job) -> str | None:
    return job.host or spec.host


def slot_of(job: Job, at: float) -> float | None:
    """The scheduled time (unix seconds) of the firing noticed at `at`; None if unscheduled."""
    sched = job.schedule
    if sched.every_s is not None:
        return math.floor(at / sched.every_s) * sched.every_s
    if sched.cron is None:
        return None
    trigger = CronTrigger(**cron_fields(sched.cron), timezone=sched.timezone)
    lookback = _LOOKBACK_S + max(job.jitter_s, 0.0)
    while lookback <= _MAX_LOOKBACK_S:
        slot = _latest(trigger, at - lookback, at)
        if slot is not None:
            return slot
        lookback *= 8
    return None


def _latest(trigger: CronTrigger, start: float, end: float) -> float | None:
    """The last fire time of `trigger` in [start, end]."""
    latest = None
    when = dt.datetime.fromtimestamp(start, dt.UTC)
    while True:
        nxt = trigger.get_next_fire_time(None, when)
        if nxt is None or nxt.timestamp() > end + 1e-6:
            return latest
        latest = nxt.timestamp()
        when = nxt + dt.timedelta(seconds=1)


def db_slot(job: Job, fired_at: float, db_offset_s: float) -> float | None:
    """The slot of a firing on the database's clock: hosts whose clocks differ still name
    the same slot for the same firing. A tolerance of a quarter period (at most 0.25 s)
    keeps a host a few milliseconds ahead of the server from naming the previous slot."""
    every_s = job.schedule.every_s
    tolerance_s = min(0.25, every_s / 4) if every_s else 0.25
    return slot_of(job, fired_at + db_offset_s + tolerance_s)


def claim_firing(db: Database, host: str, agent: str, job: Job,
                 fired_at: float) -> tuple[str | None, float | None]:
    """Claim the firing's slot, computed on the server's clock; returns (who holds the slot,
    the slot): None when this host inserted the claim just now, else the holder's name,
    this host's own included (a second firing into a slot this host already ran)."""
    with db.tx() as conn:
        before = time.time()
        db_now = float(conn.execute("select extract(epoch from clock_timestamp())").fetchone()[0])
        offset_s = db_now - (before + time.time()) / 2
    slot = db_slot(job, fired_at, offset_s)
    if slot is None:
        return None, None
    return claim(db, host, agent, job.id, slot, own_counts=False), slot


def claim(db: Database, host: str, agent: str, job: str, slot: float, *,
          own_counts: bool = True) -> str | None:
    """Claim the slot for `host`; returns None when this host runs it, else who does.
    With own_counts=False, a slot this host claimed before is reported as held by it."""
    with db.tx() as conn:
        inserted = conn.execute(
            "insert into firing_claims (agent, job, slot, host) values (%s, %s, %s, %s) "
            "on conflict do nothing returning host", (agent, job, slot, host)).fetchone()
        if inserted is not None:
            return None
        row = conn.execute("select host from firing_claims where agent = %s and job = %s "
                           "and slot = %s", (agent, job, slot)).fetchone()
    if row is not None and row[0] == host and own_counts:
        return None  # a queued firing coming back to the host that claimed it
    return row[0] if row else "another host"
