"""Cron and interval schedules as firings on the daemon's own loop.

APScheduler's triggers decide *when* (cron fields, time zones, DST); the loop's timer heap
(core/timers.py) does the waiting, so there is no scheduler thread. When a job's timer runs,
the job is handed on as a Fire (the daemon starts its run later in the same loop turn);
the pipeline alone decides whether and how a run starts (overlap, pause, breaker, crash loop).

The heap runs on the monotonic clock, schedules on the wall clock. A timer that comes
due while the wall clock says "not yet" (the clock stepped back) is armed again for the
rest; a wall-clock step forward or a resume from suspend, which the monotonic clock does
not see, is noticed by recheck_wall_clock() on the loop's next tick, which re-arms every
job. Missed slots coalesce into one firing, within the job's misfire_grace_s.

The triggers are imported when the first timed job appears, and without the imports
they never use (core/trigger_imports.py): a daemon that supervises only long-running programs
pays nothing for them.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from ..config.schema import AgentSpec, Job
from ..core.cron import cron_fields, once_per_wall_clock_cron
from ..core.firing import Fire
from ..core.timers import Timer, Timers
from ..core.trigger_imports import trigger_classes

if TYPE_CHECKING:
    from apscheduler.triggers.base import BaseTrigger

log = structlog.get_logger("watchkeeper.scheduler")

# A step of the wall clock against the monotonic clock larger than this is a clock jump
# (settimeofday, NTP step, resume from suspend): every job's timer is armed again.
CLOCK_JUMP_S = 0.5
# A timer that runs this early by the wall clock is armed again rather than fired.
EARLY_TOLERANCE_S = 0.001
# Past this many missed slots (a minutely job after weeks away), skip to the next slot.
MAX_SLOTS_WALKED = 10_000


def is_timed(job: Job) -> bool:
    """Whether the job fires on a trigger (cron and interval jobs)."""
    return job.schedule.cron is not None or job.schedule.every_s is not None


def make_trigger(job: Job) -> BaseTrigger | None:
    """The APScheduler trigger of a cron or interval job; None for after/always jobs."""
    sched = job.schedule
    jitter = int(job.jitter_s) or None
    if sched.cron is not None:
        return once_per_wall_clock_cron()(**cron_fields(sched.cron), timezone=sched.timezone,
                                          jitter=jitter)
    if sched.every_s is not None:
        return trigger_classes()[1](seconds=sched.every_s, timezone="UTC", jitter=jitter)
    return None


def missed_firing(job: Job, last_fire: float | None, now: float) -> bool:
    """True when the job's schedule had a slot between its last firing and now (catch-up
    runs once for any number of missed slots)."""
    if last_fire is None or not is_timed(job):
        return False
    if job.schedule.every_s is not None:
        return now - last_fire > job.schedule.every_s
    last = dt.datetime.fromtimestamp(last_fire, dt.UTC)
    nxt = make_trigger(job).get_next_fire_time(None, last + dt.timedelta(seconds=1))
    return nxt is not None and nxt.timestamp() <= now


class _Planned:
    """One timed job: its trigger, its next slot (wall clock) and the timer waiting for it."""

    __slots__ = ("agent", "job", "trigger", "next_fire", "timer")

    def __init__(self, agent: str, job: Job, trigger: BaseTrigger) -> None:
        self.agent, self.job, self.trigger = agent, job, trigger
        self.next_fire: dt.datetime | None = None
        self.timer: Timer | None = None

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Scheduler:
    def __init__(self, post: Callable[[Fire], None], clock: Callable[[], float],
                 timers: Timers | None = None) -> None:
        self._post = post
        self._clock = clock  # the wall clock (time.time), injectable for tests
        self._timers = timers if timers is not None else Timers()
        self._started = False
        self._stopped = False
        self._clock_offset = clock() - self._timers.clock()
        self._jobs: dict[str, Job] = {}
        self._planned: dict[str, _Planned] = {}

    @staticmethod
    def key(agent: str, job: str) -> str:
        return f"{agent}/{job}"

    def start(self) -> None:
        self._started = True
        for planned in self._planned.values():
            self._arm(planned)

    def shutdown(self) -> None:
        self._stopped = True
        for planned in self._planned.values():
            planned.disarm()

    def alive(self) -> bool:
        """False once shut down: no firing will come any more."""
        return not self._stopped

    def recheck_wall_clock(self) -> bool:
        """On every tick: when the wall clock stepped against the monotonic clock since the
        last call, arm every job's timer again from its wall-clock slot; True if it did."""
        offset = self._clock() - self._timers.clock()
        jumped = abs(offset - self._clock_offset) > CLOCK_JUMP_S
        self._clock_offset = offset
        if jumped:
            log.info("wall_clock_jump_noticed", jobs=len(self._planned))
            for planned in self._planned.values():
                self._arm(planned)
        return jumped

    def set_agent(self, spec: AgentSpec) -> None:
        """(Re)install every timed job of an agent; jobs it no longer has are removed."""
        wanted = {self.key(spec.name, j.id): j for j in spec.jobs if j.enabled and is_timed(j)}
        for key in [k for k in self._jobs if k.startswith(f"{spec.name}/") and k not in wanted]:
            self._remove(key)
        for key, job in wanted.items():
            if self._jobs.get(key) == job:
                continue  # unchanged: keep its next fire time
            self._remove(key)
            planned = _Planned(spec.name, job, make_trigger(job))
            planned.next_fire = planned.trigger.get_next_fire_time(None, self._now())
            self._planned[key] = planned
            self._jobs[key] = job
            self._arm(planned)

    def remove_agent(self, agent: str) -> None:
        for key in [k for k in self._jobs if k.startswith(f"{agent}/")]:
            self._remove(key)

    def _remove(self, key: str) -> None:
        self._jobs.pop(key, None)
        planned = self._planned.pop(key, None)
        if planned is not None:
            planned.disarm()

    def next_fire(self, agent: str, job: str) -> dt.datetime | None:
        planned = self._planned.get(self.key(agent, job))
        return planned.next_fire if planned else None

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)

    def _arm(self, planned: _Planned) -> None:
        planned.disarm()
        if not self._started or self._stopped or planned.next_fire is None:
            return
        delay_s = planned.next_fire.timestamp() - self._clock()
        planned.timer = self._timers.call_later(delay_s, functools.partial(self._due, planned))

    def _due(self, planned: _Planned) -> None:
        planned.timer = None
        if self._planned.get(self.key(planned.agent, planned.job.id)) is not planned:
            return  # removed or replaced meanwhile
        now_s = self._clock()
        if planned.next_fire.timestamp() > now_s + EARLY_TOLERANCE_S:
            self._arm(planned)  # the wall clock is behind: it stepped back
            return
        last = self._advance(planned, now_s)
        # Armed before the firing is handed on: whoever takes it may start the run at
        # once, and a start that raises must not end the job's schedule.
        self._arm(planned)
        late_s = now_s - last.timestamp()
        if late_s <= max(1.0, planned.job.misfire_grace_s):
            self._post(Fire(planned.agent, planned.job.id, planned.job.schedule.kind(), now_s))
        else:
            log.warning("firing_missed", agent=planned.agent, job=planned.job.id,
                        slot=last.isoformat(), late_s=round(late_s, 1),
                        misfire_grace_s=planned.job.misfire_grace_s)

    def _advance(self, planned: _Planned, now_s: float) -> dt.datetime:
        """Move next_fire past now; return the last slot at or before now (missed slots
        coalesce into it)."""
        now = dt.datetime.fromtimestamp(now_s, dt.UTC)
        last = planned.next_fire
        nxt = planned.trigger.get_next_fire_time(last, now)
        walked = 0
        while nxt is not None and nxt.timestamp() <= now_s and walked < MAX_SLOTS_WALKED:
            last, walked = nxt, walked + 1
            nxt = planned.trigger.get_next_fire_time(last, now)
        if nxt is not None and nxt.timestamp() <= now_s:
            nxt = planned.trigger.get_next_fire_time(None, now + dt.timedelta(seconds=1))
        planned.next_fire = nxt
        return last
