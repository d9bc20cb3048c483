"""The daemon's record of one agent: its state machine, current run and failure counts."""

from __future__ import annotations

import random

import structlog

from ..config.schema import AgentSpec, CrashLoopSettings, Job, Retries
from ..core.firing import Fire
from ..core.states import AGENT_TRANSITIONS, AgentState, check_transition
from .runner import Run

log = structlog.get_logger("watchkeeper.agents")


class AgentRuntime:
    def __init__(self, spec: AgentSpec) -> None:
        self.spec = spec
        self.state = AgentState.IDLE
        self.run: Run | None = None
        self.queued: Fire | None = None
        self.failures = 0           # consecutive failed runs
        self.cooldowns = 0          # times it entered FAILED without a success since
        self.retry_timer = None
        self.paused = False
        self.pending_removal = False  # removed by a reload; goes once its run has ended
        self.degraded: list[str] = []
        self.last_outcome: str | None = None
        self.last_exit: str = ""
        self.last_ended: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def job(self, job_id: str) -> Job | None:
        return next((j for j in self.spec.jobs if j.id == job_id), None)

    def always_jobs(self) -> list[Job]:
        return [j for j in self.spec.jobs if j.enabled and j.schedule.always]

    def transition(self, target: AgentState, **why) -> None:
        if target == self.state:
            return
        check_transition(AGENT_TRANSITIONS, self.state, target)
        log.info("agent_state", agent=self.name, old=self.state.value, new=target.value, **why)
        self.state = target

    def cancel_retry(self) -> None:
        if self.retry_timer is not None:
            self.retry_timer.cancel()
        self.retry_timer = None


def backoff_delay_s(policy: Retries, attempt: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: backoff_s * 2^attempt, capped, +- jitter."""
    rng = rng or random.Random()
    base = min(policy.backoff_max_s, policy.backoff_s * (2 ** attempt))
    spread = base * policy.jitter
    return max(0.0, base + rng.uniform(-spread, spread))


def cooldown_s(settings: CrashLoopSettings, cooldowns: int) -> float:
    """Cool-down of the n-th consecutive crash loop: doubling, capped, never permanent."""
    return min(settings.cooldown_max_s, settings.cooldown_s * (2 ** max(0, cooldowns - 1)))
