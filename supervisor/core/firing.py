"""A firing: the one thing every source of work hands the pipeline.

Cron and interval timers (scheduling/scheduler.py), `after:` hand-offs, catch-up, retries, manual starts
and the cluster's claimed slots all become a Fire; it lives here, below all of them, so that
health, control, the pipeline and the PostgreSQL claims share it without importing the
scheduler.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Fire:
    """A scheduled firing, posted to the loop."""

    agent: str
    job: str
    trigger: str  # "cron", "every", "after:<agent>", "catch_up", "manual", "always", "retry"
    at: float     # wall clock of the firing
