"""The breaker's rules: which limit applies to an agent's event, and the verdict it gives.

A per-agent override in `breaker.agents` wins over the global setting; a kind limit applies
only where one is configured. Pure functions of the settings: the windows count, these decide
which count is too many, and `Breaker` turns the first excess into a trip.
"""

from __future__ import annotations

import enum

import msgspec

from ..core.hashing import blake2b
from .settings import AgentLimits, BreakerSettings, SpendBudget


class Rule(enum.StrEnum):
    """Which limit tripped the breaker."""

    OUTPUTS = "outputs"
    KIND_OUTPUTS = "kind_outputs"
    DUPLICATES = "duplicates"
    LAUNCHES = "launches"
    AGENT_SPEND = "agent_spend"
    PIPELINE_SPEND = "pipeline_spend"
    PROBE = "probe"


class Trip(msgspec.Struct, frozen=True, kw_only=True):
    """What tripped the breaker; returned once per trip so exactly one alert goes out."""

    rule: Rule
    agent: str
    limit: str  # for people: "30 outputs in 600s"
    count: int | float  # outputs, launches or repeats seen; tokens or cost for spend rules
    window_s: float
    summaries: list[str]  # the agent's last output summaries, oldest first
    time: float  # wall-clock seconds since the epoch
    kind: str | None = None
    setting: str = ""  # what to raise if the trip was wrong: "limits.launches.max_runs in ..."


class Decision(msgspec.Struct, frozen=True):
    allowed: bool
    reason: str = ""
    trip: Trip | None = None  # set only on the one call that tripped the breaker


ALLOWED = Decision(True)
DENIED_OPEN = Decision(False, "breaker open")
_NO_OVERRIDES = AgentLimits()
# For an agent the configuration does not define (limits are derived per defined agent).
FALLBACK_MAX_OUTPUTS, FALLBACK_MAX_RUNS, FALLBACK_MAX_REPEATS = 30, 12, 3

_NOUNS = {
    Rule.OUTPUTS: "outputs",
    Rule.KIND_OUTPUTS: "{kind} outputs",
    Rule.DUPLICATES: "identical outputs",
    Rule.LAUNCHES: "launches",
    Rule.PROBE: "outputs while half-open",
}


def content_hash(text: str) -> str:
    """Hash for the duplicate rule; case and whitespace changes still count as the same post."""
    normal = " ".join(text.casefold().split())
    return blake2b(normal.encode(), digest_size=16).hexdigest()


def counting_limit(settings: BreakerSettings, rule: Rule, agent: str,
                   kind: str) -> tuple[int, float] | None:
    """The (max events, window_s) that apply to one counting rule, or None if none does."""
    s, over = settings, settings.agents.get(agent, _NO_OVERRIDES)
    if rule is Rule.OUTPUTS:
        out = over.outputs or s.outputs
        return out.max_outputs or FALLBACK_MAX_OUTPUTS, out.window_s
    if rule is Rule.KIND_OUTPUTS:
        out = over.kinds.get(kind) or s.kinds.get(kind)
        return None if out is None else (out.max_outputs or FALLBACK_MAX_OUTPUTS, out.window_s)
    if rule is Rule.LAUNCHES:
        runs = over.launches or s.launches
        return runs.max_runs or FALLBACK_MAX_RUNS, runs.window_s
    dup = over.duplicates or s.duplicates
    return dup.max_repeats or FALLBACK_MAX_REPEATS, dup.window_s


def launch_limit(settings: BreakerSettings, agent: str):
    """The LaunchLimit that applies to `agent` (its override, else the global one)."""
    return settings.agents.get(agent, _NO_OVERRIDES).launches or settings.launches


_SETTINGS = {
    Rule.OUTPUTS: "outputs.max_outputs",
    Rule.KIND_OUTPUTS: "kinds.{kind}.max_outputs",
    Rule.DUPLICATES: "duplicates.max_repeats",
    Rule.LAUNCHES: "launches.max_runs",
    Rule.AGENT_SPEND: "spend.max_{noun}",
}


def setting_to_raise(rule: Rule, agent: str, kind: str | None = None, noun: str = "") -> str:
    """The exact setting an operator raises when this rule tripped wrongly."""
    if rule is Rule.PIPELINE_SPEND:
        return f"breaker.pipeline_spend.max_{noun} in watchkeeper.yaml"
    if rule is Rule.PROBE:
        return "breaker.probe_outputs in watchkeeper.yaml"
    field = _SETTINGS[rule].format(kind=kind, noun=noun)
    return f"limits.{field} in agents.d/{agent}.yaml (or breaker.{field} for every agent)"


def agent_budget(settings: BreakerSettings, agent: str) -> SpendBudget:
    """The spend budget of one agent: its override, else the global `agent_spend`."""
    return settings.agents.get(agent, _NO_OVERRIDES).spend or settings.agent_spend


def limit_text(rule: Rule, limit: int | float, window_s: float, kind: str | None = None,
               noun: str = "") -> str:
    """The limit for people, as the trip alert shows it: "30 outputs in 600s"."""
    noun = noun or _NOUNS[rule].format(kind=kind)
    return f"{limit:g} {noun} in {window_s:g}s"


def longest_window_s(settings: BreakerSettings) -> float:
    """The longest window any rule looks back over: older events can never count."""
    limits = [settings.outputs, settings.launches, settings.duplicates, settings.agent_spend,
              settings.pipeline_spend, *settings.kinds.values()]
    for over in settings.agents.values():
        limits.extend(x for x in (over.outputs, over.launches, over.duplicates, over.spend)
                      if x is not None)
        limits.extend(over.kinds.values())
    return max(limit.window_s for limit in limits)
