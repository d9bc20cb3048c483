"""Cron expressions as APScheduler trigger fields, and the trigger that fires them.

Shared by the scheduler, configuration checks, breaker defaults and the PostgreSQL slot claims;
it depends only on the trigger classes (core/trigger_imports.py), never on the scheduler.
"""

from __future__ import annotations

import datetime as dt
import functools

from .trigger_imports import trigger_classes


@functools.cache
def once_per_wall_clock_cron() -> type:
    """The CronTrigger subclass below, defined on first use (see the module docstring)."""
    CronTrigger = trigger_classes()[0]  # noqa: N806 - a class

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
