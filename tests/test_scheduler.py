"""Schedule arithmetic: cron weekdays, time zones across DST, catch-up, backoff."""

from __future__ import annotations

import datetime as dt
import random
import zoneinfo

from supervisor.config.schema import AgentSpec, CrashLoopSettings, Job, Retries, Schedule
from supervisor.core.cron import cron_fields
from supervisor.core.firing import Fire
from supervisor.core.timers import Timers
from supervisor.runs.agents import backoff_delay_s, cooldown_s
from supervisor.scheduling.catch_up import absorb_slot_due_after_catch_up, catch_up_due
from supervisor.scheduling.scheduler import Scheduler, make_trigger, missed_firing

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def job(**schedule) -> Job:
    return Job(id="j", command=["x"], schedule=Schedule(**schedule))


def fires(job_: Job, start: dt.datetime, count: int) -> list[dt.datetime]:
    trigger = make_trigger(job_)
    out, prev, now = [], None, start
    for _ in range(count):
        nxt = trigger.get_next_fire_time(prev, now)
        out.append(nxt)
        prev, now = nxt, nxt.astimezone(dt.UTC) + dt.timedelta(seconds=1)
    return out


def test_cron_weekday_numbers_follow_cron_not_apscheduler():
    """Weekday 0 and 7 mean Sunday and 1-5 Monday to Friday, as in crontab."""
    assert cron_fields("0 9 * * 0")["day_of_week"] == "sun"
    assert cron_fields("0 9 * * 7")["day_of_week"] == "sun"
    assert cron_fields("0 9 * * 1-5")["day_of_week"] == "mon,tue,wed,thu,fri"
    sunday = fires(job(cron="0 9 * * 0"), dt.datetime(2026, 11, 25, tzinfo=dt.UTC), 1)[0]
    assert sunday.weekday() == 6


def test_six_field_cron_has_seconds_first():
    """A six-field expression puts seconds first."""
    assert cron_fields("*/2 * * * * *") == {"second": "*/2", "minute": "*", "hour": "*",
                                            "day": "*", "month": "*",
                                            "day_of_week": "sun,mon,tue,wed,thu,fri,sat"}


def test_dst_spring_forward_skipped_hour_runs_once():
    """A 02:30 Berlin job on the spring-forward day (02:00-03:00 does not exist) fires once
    that day, at 03:30 local time, and the days around it at 02:30."""
    got = fires(job(cron="30 2 * * *", timezone="Europe/Berlin"),
                dt.datetime(2026, 3, 28, 12, tzinfo=BERLIN), 3)
    local = [g.astimezone(dt.UTC).astimezone(BERLIN) for g in got]
    assert [x.date().isoformat() for x in local] == ["2026-03-29", "2026-03-30", "2026-03-31"]
    assert (local[0].hour, local[0].minute) == (3, 30)
    assert [(x.hour, x.minute) for x in local[1:]] == [(2, 30), (2, 30)]


def test_dst_fall_back_repeated_hour_runs_once():
    """A 02:30 Berlin job on the fall-back day (02:00-03:00 happens twice) fires once."""
    got = fires(job(cron="30 2 * * *", timezone="Europe/Berlin"),
                dt.datetime(2026, 10, 24, 12, tzinfo=BERLIN), 3)
    days = [g.astimezone(BERLIN).date().isoformat() for g in got]
    assert days == ["2026-10-25", "2026-10-26", "2026-10-27"]
    utc = [g.astimezone(dt.UTC) for g in got]
    assert [(b - a).total_seconds() for a, b in zip(utc, utc[1:], strict=False)] == \
        [90000.0, 86400.0]  # 02:30 CEST, then 02:30 CET the next day: 25 h, then 24 h


def test_hourly_job_across_fall_back_keeps_one_hour_spacing():
    """An hourly job runs every 60 real minutes through the repeated hour."""
    got = fires(job(cron="0 * * * *", timezone="Europe/Berlin"),
                dt.datetime(2026, 10, 25, 0, 30, tzinfo=BERLIN), 5)
    utc = [g.astimezone(dt.UTC) for g in got]
    gaps = [(b - a).total_seconds() for a, b in zip(utc, utc[1:], strict=False)]
    assert gaps == [3600.0] * 4


def test_missed_firing_detects_any_number_of_slots_once():
    """catch-up sees a missed slot after downtime, and none when nothing was missed."""
    daily = job(cron="0 3 * * *")
    now = dt.datetime(2026, 11, 25, 12, tzinfo=dt.UTC).timestamp()
    three_days_ago = now - 3 * 86400
    assert missed_firing(daily, three_days_ago, now) is True
    this_morning = dt.datetime(2026, 11, 25, 3, tzinfo=dt.UTC).timestamp()
    assert missed_firing(daily, this_morning, now) is False
    assert missed_firing(daily, None, now) is False  # never fired: a fresh install
    assert missed_firing(job(every_s=60), now - 61, now) is True
    assert missed_firing(job(every_s=60), now - 30, now) is False


def test_catch_up_stands_aside_for_a_slot_that_came_due_during_start_up():
    """A slot that comes due between the scheduler planning it and the catch-up decision
    runs once, as the cron firing, not also as a catch-up."""
    tick = Job(id="tick", command=["true"], catch_up=True, schedule=Schedule(cron="*/2 * * * * *"))
    slot_s = dt.datetime(2026, 11, 25, 12, 0, 10, tzinfo=dt.UTC).timestamp()
    last_fire_s = slot_s - 20  # killed ten windows ago
    clock = {"now_s": slot_s - 0.3}
    fires: list[Fire] = []
    timers = Timers(clock=lambda: clock["now_s"])
    sched = Scheduler(fires.append, lambda: clock["now_s"], timers)
    sched.start()
    sched.set_agent(AgentSpec(agent="ticker", jobs=[tick]))  # plans the slot 0.3 s ahead
    planned_s = sched.next_fire("ticker", "tick").timestamp()
    assert planned_s == slot_s
    assert catch_up_due(tick, last_fire_s, planned_s, clock["now_s"])  # not due yet: catch up
    clock["now_s"] = slot_s + 0.05  # a slow start-up: the slot came due before catch-up
    assert not catch_up_due(tick, last_fire_s, planned_s, clock["now_s"])
    timers.run_due()
    assert [(f.trigger, f.at) for f in fires] == [("cron", slot_s + 0.05)]


def test_catch_up_run_that_starts_as_a_slot_comes_due_stands_for_that_slot():
    """A catch-up decided just before a slot, whose run starts once the slot has come due,
    stands for that slot: the cron timer does not run the window a second time."""
    tick = Job(id="tick", command=["true"], catch_up=True, schedule=Schedule(cron="*/2 * * * * *"))
    spec = AgentSpec(agent="ticker", jobs=[tick])
    slot_s = dt.datetime(2026, 11, 25, 12, 0, 10, tzinfo=dt.UTC).timestamp()
    clock = {"now_s": slot_s - 0.3}
    fires: list[Fire] = []
    timers = Timers(clock=lambda: clock["now_s"])
    sched = Scheduler(fires.append, lambda: clock["now_s"], timers)
    sched.start()
    sched.set_agent(spec)
    assert not absorb_slot_due_after_catch_up(sched, spec, tick, clock["now_s"])  # still ahead
    clock["now_s"] = slot_s + 0.02  # the catch-up run's spawn took the clock past the slot
    assert absorb_slot_due_after_catch_up(sched, spec, tick, clock["now_s"])
    timers.run_due()
    assert fires == []
    assert sched.next_fire("ticker", "tick").timestamp() == slot_s + 2


def test_backoff_doubles_and_caps_with_bounded_jitter():
    """Retry delays double from backoff_s, stop at backoff_max_s, and jitter stays in bounds."""
    policy = Retries(backoff_s=5, backoff_max_s=60, jitter=0.2)
    rng = random.Random(1)
    for attempt, base in [(0, 5), (1, 10), (2, 20), (3, 40), (4, 60), (10, 60)]:
        delays = [backoff_delay_s(policy, attempt, rng) for _ in range(200)]
        assert base * 0.8 <= min(delays) and max(delays) <= base * 1.2


def test_crash_loop_cooldown_doubles_and_never_exceeds_the_cap():
    """The n-th consecutive cool-down doubles from cooldown_s up to cooldown_max_s."""
    settings = CrashLoopSettings(cooldown_s=30, cooldown_max_s=3600)
    assert [cooldown_s(settings, n) for n in (1, 2, 3, 8, 20)] == [30, 60, 120, 3600, 3600]


def test_a_firing_whose_start_fails_keeps_the_job_scheduled():
    """When handing a firing on raises, the job's next slot is armed anyway and fires."""
    wall, mono, fired = [1_000_000.0], [0.0], []

    def start(fire):
        fired.append(fire.at)
        if len(fired) == 1:
            raise OSError("spawn failed")

    timers = Timers(clock=lambda: mono[0])
    scheduler = Scheduler(start, lambda: wall[0], timers)
    scheduler.set_agent(AgentSpec(agent="a", jobs=[job(cron="*/10 * * * * *")]))
    scheduler.start()
    for _ in range(2):
        wall[0] += 10
        mono[0] += 10
        timers.run_due(_swallow)
    assert fired == [1_000_010.0, 1_000_020.0]


def _swallow(fn) -> None:
    """What the daemon's loop does with a failing timer callback: log it and go on."""
    try:
        fn()
    except OSError:
        pass
