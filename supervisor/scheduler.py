"""The APScheduler adapter: turns cron and interval schedules into firings for the loop.

APScheduler only decides *when*. Its job function does nothing but post a Fire event to
the daemon's loop, which alone decides whether and how a run starts (overlap, pause,
breaker, crash loop). APScheduler never kills a hung job and sleeps on an event that does
not notice suspend or clock jumps: the loop enforces timeouts itself and calls
wakeup_on_clock_jump() on every tick.

APScheduler is imported when the first timed job appears, not before: with its imports
(asyncio, ssl, importlib.metadata) it costs ~12 MiB of RSS and ~40 ms of start-up, which a
daemon that supervises only long-running programs should not pay.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import AgentSpec, Job

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.base import BaseTrigger

# A step of the wall clock against the monotonic clock larger than this is a clock jump
# (settimeofday, NTP step, resume from suspend): the scheduler thread must recompute.
CLOCK_JUMP_S = 0.5


@dataclasses.dataclass(frozen=True)
class Fire:
    """A scheduled firing, posted from the scheduler thread to the loop."""

    agent: str
    job: str
    trigger: str  # "cron", "every", "after:<agent>", "catch_up", "manual", "always", "retry"
    at: float     # wall clock of the firing


def is_timed(job: Job) -> bool:
    """Whether APScheduler plans the job's firings (cron and interval jobs)."""
    return job.schedule.cron is not None or job.schedule.every_s is not None


def make_trigger(job: Job) -> BaseTrigger | None:
    """The APScheduler trigger of a cron or interval job; None for after/always jobs."""
    sched = job.schedule
    jitter = int(job.jitter_s) or None
    if sched.cron is not None:
        return once_per_wall_clock_cron()(**cron_fields(sched.cron), timezone=sched.timezone,
                                          jitter=jitter)
    if sched.every_s is not None:
        from apscheduler.triggers.interval import IntervalTrigger

        return IntervalTrigger(seconds=sched.every_s, timezone="UTC", jitter=jitter)
    return None


@functools.cache
def once_per_wall_clock_cron() -> type:
    """The CronTrigger subclass below, defined on first use (see the module docstring)."""
    from apscheduler.triggers.cron import CronTrigger

    class OncePerWallClockCron(CronTrigger):
        """CronTrigger that does not repeat a fixed-hour job in the hour that DST fall-back
        repeats: APScheduler 3 fires a daily 02:30 job at 02:30 CEST and again at 02:30 CET.
        Like Vixie cron, jobs whose hour field is a wildcard keep firing every real hour."""

        def get_next_fire_time(self, previous_fire_time, now):
            nxt = super().get_next_fire_time(previous_fire_time, now)
            if nxt is None or previous_fire_time is None or self._hour_is_wildcard():
                return nxt
            prev_local = previous_fire_time.astimezone(dt.UTC).astimezone(self.timezone)
            # Aware datetimes sharing a tzinfo compare by wall clock: compare instants in UTC.
            same_wall_clock = nxt.replace(tzinfo=None) == prev_local.replace(tzinfo=None)
            if same_wall_clock and nxt.astimezone(dt.UTC) != prev_local.astimezone(dt.UTC):
                after = nxt.astimezone(dt.UTC) + dt.timedelta(seconds=1)
                return super().get_next_fire_time(nxt, after)
            return nxt

        def _hour_is_wildcard(self) -> bool:
            hour = next(f for f in self.fields if f.name == "hour")
            return str(hour).startswith("*")

    return OncePerWallClockCron


DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def cron_fields(expr: str) -> dict[str, str]:
    """Crontab fields as APScheduler keywords: five fields, or six with seconds first.
    APScheduler 3 numbers weekdays from Monday=0 while cron uses Sunday=0 (or 7), so
    numeric weekdays are rewritten as names."""
    fields = expr.split()
    second = fields.pop(0) if len(fields) == 6 else "0"
    minute, hour, day, month, day_of_week = fields
    return {"second": second, "minute": minute, "hour": hour, "day": day, "month": month,
            "day_of_week": _weekday_names(day_of_week)}


def _weekday_names(spec: str) -> str:
    names: list[str] = []
    for part in spec.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            lo, hi = 0, 6
        elif "-" in base and base.replace("-", "").isdigit():
            lo, hi = (int(x) for x in base.split("-"))
        elif base.isdigit():
            lo = hi = int(base)
            if step:
                hi = 6
        else:
            return spec  # names (mon-fri) mean the same to both
        if not (0 <= lo <= 7 and 0 <= hi <= 7) or lo > hi:
            return spec  # let APScheduler report it
        for value in range(lo, hi + 1, int(step) if step else 1):
            if DAY_NAMES[value] not in names:
                names.append(DAY_NAMES[value])
    return ",".join(names) if names else spec


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


class Scheduler:
    def __init__(self, post: Callable[[Fire], None], clock: Callable[[], float]) -> None:
        self._post = post
        self._clock = clock
        self._aps: BackgroundScheduler | None = None  # created with the first timed job
        self._started = False
        self._stopped = False
        self._clock_offset = clock() - time.monotonic()
        self._jobs: dict[str, Job] = {}

    @staticmethod
    def key(agent: str, job: str) -> str:
        return f"{agent}/{job}"

    def start(self) -> None:
        self._started = True
        if self._aps is not None:
            self._aps.start()

    def shutdown(self) -> None:
        self._stopped = True
        if self._aps is not None and self._aps.running:
            self._aps.shutdown(wait=False)

    def alive(self) -> bool:
        """False once the scheduler thread has died (the watchdog stops pinging then).
        Without timed jobs there is no thread, and nothing that could die."""
        if self._aps is None:
            return not self._stopped
        thread = getattr(self._aps, "_thread", None)
        return bool(self._aps.running and thread is not None and thread.is_alive())

    def wakeup(self) -> None:
        if self._aps is not None and self._aps.running:
            self._aps.wakeup()

    def wakeup_on_clock_jump(self) -> bool:
        """Wake the scheduler thread if the wall clock stepped since the last call: its
        wait runs on the monotonic clock and would otherwise fire late (or early)."""
        offset = self._clock() - time.monotonic()
        jumped = abs(offset - self._clock_offset) > CLOCK_JUMP_S
        self._clock_offset = offset
        if jumped:
            self.wakeup()
        return jumped

    def _scheduler(self) -> BackgroundScheduler:
        if self._aps is None:
            from apscheduler.executors.pool import ThreadPoolExecutor
            from apscheduler.schedulers.background import BackgroundScheduler

            self._aps = BackgroundScheduler(
                executors={"default": ThreadPoolExecutor(max_workers=1)},
                job_defaults={"coalesce": True, "max_instances": 1},
                timezone="UTC",
            )
            if self._started and not self._stopped:
                self._aps.start()
        return self._aps

    def set_agent(self, spec: AgentSpec) -> None:
        """(Re)install every timed job of an agent; jobs it no longer has are removed."""
        wanted = {self.key(spec.name, j.id): j for j in spec.jobs if j.enabled and is_timed(j)}
        for key in [k for k in self._jobs if k.startswith(f"{spec.name}/") and k not in wanted]:
            self._remove(key)
        for key, job in wanted.items():
            if self._jobs.get(key) == job:
                continue  # unchanged: keep its next fire time
            self._remove(key)
            self._scheduler().add_job(self._fire, trigger=make_trigger(job), id=key,
                              args=(spec.name, job.id, job.schedule.kind()),
                              misfire_grace_time=max(1, int(job.misfire_grace_s)))
            self._jobs[key] = job

    def remove_agent(self, agent: str) -> None:
        for key in [k for k in self._jobs if k.startswith(f"{agent}/")]:
            self._remove(key)

    def _remove(self, key: str) -> None:
        if self._jobs.pop(key, None) is not None and self._aps is not None:
            try:
                self._aps.remove_job(key)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass

    def next_fire(self, agent: str, job: str) -> dt.datetime | None:
        if self._aps is None:
            return None
        aps_job = self._aps.get_job(self.key(agent, job))
        return aps_job.next_run_time if aps_job else None

    def _fire(self, agent: str, job: str, kind: str) -> None:
        self._post(Fire(agent, job, kind, self._clock()))
