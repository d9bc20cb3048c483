"""Default breaker limits derived from each agent's declared schedule: no false halts.

Fixed defaults halted healthy pipelines: the README's `hello` agent (`every_s: 5`) went past
12 launches an hour within a minute, and a digest agent that reports the same summary every
run went past 3 identical outputs an hour. A limit left unset (`max_runs`, `max_repeats`,
`max_outputs` null) is therefore derived per agent from the most runs its own schedule can
start in the limit's window:

- launches: those runs, times (1 + retries) when restarts count, plus a headroom of 12
  (`start-now`, catch-up);
- duplicates: those runs plus 3 (a digest may repeat once per run, a post not 4 times more);
- outputs: those runs plus 30.

`always` jobs add no runs: their restarts ("always", "retry") are governed by the crash-loop
policy and do not count towards a halt unless `launches.count_restarts` is set.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Iterator

import msgspec

from .settings import AgentLimits, BreakerSettings

LAUNCH_HEADROOM = 12
DUPLICATE_HEADROOM = 3
OUTPUT_HEADROOM = 30
RESTART_TRIGGERS = ("retry", "always")  # launches the crash-loop policy governs
_CRON_HORIZON_S = 8 * 86400.0  # a week and a day: every weekday and the midnight wrap
# A schedule this dense within the horizon is regular enough that its first firings show the
# busiest window; the cap keeps a `* * * * *` job from costing a second at every (re)load.
_CRON_MAX_FIRINGS = 3000


def _cron_times(job, horizon_s: float) -> list[float]:
    """The job's next firings (wall clock) over `horizon_s`, at most _CRON_MAX_FIRINGS."""
    times = _cron_firings(job.schedule.cron, job.schedule.timezone)
    return [t for t in times if t - times[0] <= horizon_s]


@functools.lru_cache(maxsize=256)
def _cron_firings(cron: str, timezone: str) -> tuple[float, ...]:
    from ..core.cron import cron_fields, once_per_wall_clock_cron

    trigger = once_per_wall_clock_cron()(**cron_fields(cron), timezone=timezone)
    start = dt.datetime.now(dt.UTC)
    previous, now, times = None, start, []
    for _ in range(_CRON_MAX_FIRINGS):
        nxt = trigger.get_next_fire_time(previous, now)
        if nxt is None or (nxt - start).total_seconds() > _CRON_HORIZON_S + 86400.0:
            break
        times.append(nxt.timestamp())
        previous, now = nxt, nxt + dt.timedelta(microseconds=1)
    return tuple(times)


def _max_in_window(times: list[float], window_s: float) -> int:
    best, left = 0, 0
    for right, t in enumerate(times):
        while times[left] <= t - window_s:
            left += 1
        best = max(best, right - left + 1)
    return best


def job_runs_in_window(job, window_s: float) -> int:
    """The most firings of one cron or interval job in any `window_s` (0 for after/always)."""
    schedule = job.schedule
    if schedule.every_s is not None:
        return math.floor(window_s / schedule.every_s) + 1
    if schedule.cron is not None:
        return _max_in_window(_cron_times(job, _CRON_HORIZON_S + window_s), window_s)
    return 0


def runs_in_window(agents: dict, name: str, window_s: float, _seen: frozenset = frozenset()
                   ) -> int:
    """The most runs `name`'s schedule starts in any `window_s`: its timed jobs, plus one per
    run of each upstream its `after:` jobs follow."""
    spec = agents.get(name)
    if spec is None or name in _seen:
        return 0
    total = 0
    for job in spec.jobs:
        if not job.enabled:
            continue
        total += job_runs_in_window(job, window_s)
        for upstream in job.schedule.after or ():
            total += runs_in_window(agents, upstream, window_s, _seen | {name})
    return total


def _retry_factor(spec) -> int:
    return 1 + max((job.retries.max_attempts for job in spec.jobs), default=0)


def derived_limits(settings: BreakerSettings, agents: dict, name: str) -> AgentLimits:
    """`name`'s limits with every unset count derived from its schedule."""
    over = settings.agents.get(name) or AgentLimits()
    launches = over.launches or settings.launches
    if launches.max_runs is None:
        runs = runs_in_window(agents, name, launches.window_s)
        if launches.count_restarts:
            runs *= _retry_factor(agents[name])
        launches = msgspec.structs.replace(launches, max_runs=runs + LAUNCH_HEADROOM)
    duplicates = over.duplicates or settings.duplicates
    if duplicates.max_repeats is None:
        runs = runs_in_window(agents, name, duplicates.window_s)
        duplicates = msgspec.structs.replace(duplicates, max_repeats=runs + DUPLICATE_HEADROOM)
    outputs = over.outputs or settings.outputs
    if outputs.max_outputs is None:
        runs = runs_in_window(agents, name, outputs.window_s)
        outputs = msgspec.structs.replace(outputs, max_outputs=runs + OUTPUT_HEADROOM)
    return msgspec.structs.replace(over, launches=launches, duplicates=duplicates,
                                   outputs=outputs)


def limits_below_schedule(config) -> Iterator[tuple[str, int | None, str, str]]:
    """(file, line, field, problem) for each explicit launch or duplicate limit that an
    agent's own declared schedule (and retries, when restarts count) would exceed."""
    breaker = config.settings.breaker
    for name, spec in config.agents.items():
        for section, key in (("launches", "max_runs"), ("duplicates", "max_repeats")):
            yield from _below_schedule(config, breaker, name, spec, section, key)


def _below_schedule(config, breaker: BreakerSettings, name: str, spec, section: str, key: str):
    own = getattr(spec.limits, section, None) if spec.limits else None
    main = getattr(breaker.agents.get(name), section, None) if name in breaker.agents else None
    limit = own or main or getattr(breaker, section)
    if getattr(limit, key) is None:
        return
    if own is not None:
        path, field = config.agent_files[name], f"limits.{section}.{key}"
    elif main is not None:
        path, field = config.path, f"breaker.agents.{name}.{section}.{key}"
    else:
        path, field = config.path, f"breaker.{section}.{key}"
    factor = _retry_factor(spec) if getattr(limit, "count_restarts", False) else 1
    runs = runs_in_window(config.agents, name, limit.window_s) * factor
    if runs > getattr(limit, key):
        yield (str(path), _line_of(path, key), field,
               f"{name}'s schedule starts up to {runs} runs in {limit.window_s:g}s"
               f"{' counting retries' if factor > 1 else ''}, more than the limit of "
               f"{getattr(limit, key)}; raise it, or remove it to derive it from the schedule")


def _line_of(path, key: str) -> int | None:
    try:
        lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        return None
    return next((n for n, line in enumerate(lines, 1) if f"{key}:" in line), None)
