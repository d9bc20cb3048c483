"""Which host runs a firing: every host's scheduler fires, one host claims the slot.

A slot is the time the schedule meant, not the moment a host noticed it, so every host
computes the same key for the same firing: for `every_s` the interval's boundary counted
from the epoch, for `cron` the latest cron time not after the firing. The first host to
insert (agent, job, slot) into firing_claims runs it; the others skip it.
"""

from __future__ import annotations

import datetime as dt
import math

from apscheduler.triggers.cron import CronTrigger

from ..config import AgentSpec, Job
from ..scheduler import cron_fields
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


def claim(db: Database, host: str, agent: str, job: str, slot: float) -> str | None:
    """Claim the slot for `host`; returns None when this host runs it, else who does."""
    with db.tx() as conn:
        inserted = conn.execute(
            "insert into firing_claims (agent, job, slot, host) values (%s, %s, %s, %s) "
            "on conflict do nothing returning host", (agent, job, slot, host)).fetchone()
        if inserted is not None:
            return None
        row = conn.execute("select host from firing_claims where agent = %s and job = %s "
                           "and slot = %s", (agent, job, slot)).fetchone()
    if row is not None and row[0] == host:
        return None  # a queued firing coming back to the host that claimed it
    return row[0] if row else "another host"
