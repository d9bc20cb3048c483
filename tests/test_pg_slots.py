"""Slots named on the database's clock, whatever the host's clock says (pure logic)."""

from __future__ import annotations

import datetime as dt

import pytest

from supervisor.config.schema import Job, Schedule
from supervisor.pg.claims import db_slot

NOON = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC).timestamp()


def cron_job(expr: str) -> Job:
    return Job(id="c", command=["true"], schedule=Schedule(cron=expr, timezone="UTC"))


@pytest.mark.parametrize("host_ahead_s", [30.0, 0.0, -30.0, 0.004])
def test_cron_slot_is_the_latest_cron_time_on_the_database_clock(host_ahead_s):
    """A host whose clock is ahead or behind names, for a firing at its local noon, the
    latest minute not after the database's time, never a minute of its own clock."""
    job = cron_job("* * * * *")
    fired_local = NOON + 0.01  # the scheduler fires just after its local minute
    db_now = fired_local - host_ahead_s
    slot = db_slot(job, fired_local, db_offset_s=db_now - fired_local)
    assert slot is not None
    assert slot <= db_now + 0.25 and db_now + 0.25 - slot < 60


def test_interval_slots_of_skewed_hosts_coincide():
    """Hosts 30 s apart firing the same 10 s interval at the same moment name one slot."""
    job = Job(id="i", command=["true"], schedule=Schedule(every_s=10.0))
    db_now = NOON + 3.0
    slots = {db_slot(job, db_now + ahead, db_offset_s=-ahead) for ahead in (30.0, 0.0, -30.0)}
    assert slots == {NOON}


def test_a_host_a_few_milliseconds_ahead_still_names_the_current_slot():
    """The tolerance keeps a host 5 ms ahead of the server from naming the previous slot."""
    job = Job(id="i", command=["true"], schedule=Schedule(every_s=10.0))
    fired_local = NOON + 0.001  # its interval boundary, 5 ms before the server's
    assert db_slot(job, fired_local, db_offset_s=-0.005) == NOON
