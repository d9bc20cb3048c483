"""The `[breaker]` config section: the limits every agent's outputs, launches and spend must keep.

Settings only; `rules.py` picks the limit that applies to one agent and kind.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import msgspec

from ..core.ranges import Amount, PositiveDuration

Count = Annotated[int, msgspec.Meta(ge=1)]


class _Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class OutputLimit(_Settings):
    """At most `max_outputs` outputs in any `window_s` seconds."""

    max_outputs: Count | None = None
    """Outputs allowed in the window; the next one trips the breaker. null: the most runs the
    agent's schedule starts in the window plus 30 (30 for a kind limit)."""
    window_s: PositiveDuration = 600.0
    """Length of the sliding window."""


class LaunchLimit(_Settings):
    """At most `max_runs` run launches of one agent in any `window_s` seconds."""

    max_runs: Count | None = None
    """Run launches of one agent allowed in the window. null: the most runs the agent's
    schedule starts in the window (times 1 + retries when `count_restarts`) plus 12."""
    window_s: PositiveDuration = 3600.0
    """Length of the sliding window."""
    count_restarts: bool = False
    """Count runs started by a retry or an `always` restart; by default the crash-loop policy
    (back-off, cool-down, one alert) governs those and they never halt the pipeline."""


class DuplicateLimit(_Settings):
    """One content hash may appear at most `max_repeats` times per agent in `window_s`."""

    max_repeats: Count | None = None
    """Times the same content may be emitted in the window. null: the most runs the agent's
    schedule starts in the window plus 3 (a digest may repeat once per run)."""
    window_s: PositiveDuration = 3600.0
    """Length of the sliding window."""


class SpendBudget(_Settings):
    """Token and cost budget per `window_s`; a budget left as None is not enforced."""

    max_tokens: Count | None = None
    """Tokens allowed in the window; null: not enforced."""
    max_cost: Amount | None = None
    """Cost allowed in the window (the unit agents report); null: not enforced."""
    window_s: PositiveDuration = 3600.0
    """Length of the sliding window."""


class AgentLimits(_Settings):
    """Per-agent overrides; a field left as None falls back to the global setting."""

    outputs: OutputLimit | None = None
    kinds: dict[str, OutputLimit] = {}
    """Limits per output kind for this agent."""
    launches: LaunchLimit | None = None
    duplicates: DuplicateLimit | None = None
    spend: SpendBudget | None = None


class BreakerSettings(_Settings):
    """The `[breaker]` config section.

    `outputs` limits every agent's outputs of all kinds; `kinds` adds a limit on one kind of
    output (e.g. `discord_post`) for every agent, which `agents.<name>.kinds` overrides. With
    `auto_reset_after_s` unset only an operator closes the breaker; when set, an open breaker
    turns HALF_OPEN after that long, lets each agent make `probe_outputs` outputs, re-trips on
    the next one, and closes once `probe_window_s` passes without a trip.
    """

    outputs: OutputLimit = msgspec.field(default_factory=OutputLimit)
    kinds: dict[str, OutputLimit] = {}
    """Limits per output kind, for every agent."""
    launches: LaunchLimit = msgspec.field(default_factory=LaunchLimit)
    duplicates: DuplicateLimit = msgspec.field(default_factory=DuplicateLimit)
    agent_spend: SpendBudget = msgspec.field(default_factory=SpendBudget)
    pipeline_spend: SpendBudget = msgspec.field(default_factory=SpendBudget)
    agents: dict[str, AgentLimits] = {}
    """Per-agent overrides by agent name (an agent file's `limits:` wins)."""
    auto_reset_after_s: PositiveDuration | None = None
    """Go half-open this long after a trip; null: only `watchkeeper breaker reset` closes it."""
    probe_outputs: Count = 3
    """Outputs each agent may make while half-open before it re-trips."""
    probe_window_s: PositiveDuration = 600.0
    """Half-open closes after this long without a trip."""
    summaries_kept: Count = 5
    """Summaries of the last outputs kept per agent for the trip alert."""
    max_tracked_hashes: Count = 4096
    """Content hashes remembered per agent for the duplicate rule."""

    def check_agents(self, known: Iterable[str]) -> None:
        """Raise ValueError naming overrides for agents the config does not define."""
        known = set(known)
        unknown = sorted(set(self.agents) - known)
        if unknown:
            raise ValueError(
                f"breaker.agents has overrides for unknown agent(s) {', '.join(unknown)}; "
                f"defined agents are: {', '.join(sorted(known)) or '(none)'}"
            )
