"""Whether a `catch_up` job runs at start-up: once for the slots missed while the daemon was
down, never for a slot the schedule fires itself.

The scheduler plans each job's next slot when the agents are installed, a moment before the
catch-up decision, and the catch-up run takes a moment to start. A slot that comes due in
either moment (start-up is slow on a busy host) would run a second time as the cron firing
right after the catch-up: the two stand for one window. So catch-up stands aside for a
planned slot that is already due (that firing coalesces every missed slot), and a catch-up
run that started as the next slot came due stands for that slot too.
"""

from __future__ import annotations

from ..config.schema import AgentSpec, Job
from .scheduler import Scheduler, missed_firing


def catch_up_due(job: Job, last_fire: float | None, planned_s: float | None,
                 now_s: float) -> bool:
    """True when the job missed a slot since `last_fire` (wall clock, seconds) and its
    planned next firing `planned_s` is not already due at `now_s`."""
    if not (job.enabled and job.catch_up) or not missed_firing(job, last_fire, now_s):
        return False
    return planned_s is None or planned_s > now_s


def absorb_slot_due_after_catch_up(scheduler: Scheduler, spec: AgentSpec, job: Job,
                                   now_s: float) -> bool:
    """After a catch-up run of `job` started: if its planned slot came due meanwhile, plan
    the agent's jobs again from `now_s` so that slot does not fire too; True if it did."""
    planned = scheduler.next_fire(spec.name, job.id)
    if planned is None or planned.timestamp() > now_s:
        return False
    scheduler.remove_agent(spec.name)
    scheduler.set_agent(spec)
    return True
