"""Circuit breaker logic on scripted histories with a fake clock."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.breaker.breaker import (
    AgentLimits,
    Breaker,
    BreakerSettings,
    BreakerState,
    DuplicateLimit,
    LaunchLimit,
    OutputLimit,
    Rule,
    SnapshotError,
    SpendBudget,
    content_hash,
)
from supervisor.core.states import InvalidTransition


class FakeClock:
    """A clock the test moves by hand; serves as both the monotonic and the wall clock."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def make(settings: BreakerSettings | None = None, start: float = 1_000.0,
         wall_start: float = 1_700_000_000.0) -> tuple[Breaker, FakeClock, FakeClock]:
    mono, wall = FakeClock(start), FakeClock(wall_start)
    return Breaker(settings, clock=mono, wall_clock=wall), mono, wall


def outputs(limit: int, window_s: float = 600.0, **extra) -> BreakerSettings:
    return BreakerSettings(outputs=OutputLimit(max_outputs=limit, window_s=window_s), **extra)


def emit(breaker: Breaker, agent: str, n: int, clock: FakeClock, step_s: float = 1.0,
         kind: str = "article") -> list:
    decisions = []
    for i in range(n):
        decisions.append(breaker.check_output(agent, kind, summary=f"{agent} #{i}"))
        clock.advance(step_s)
    return decisions


def test_exactly_n_outputs_are_allowed():
    """N outputs inside the window are all allowed and leave the breaker closed."""
    breaker, clock, _ = make(outputs(5))
    assert all(d.allowed for d in emit(breaker, "content", 5, clock))
    assert breaker.state is BreakerState.CLOSED


def test_output_window_fill_counts_outputs_inside_the_window_only():
    """output_window_fill reports the outputs still inside the window and the limit, read-only."""
    breaker, clock, _ = make(outputs(10, window_s=60.0))
    assert breaker.output_window_fill("content") == {
        "outputs": 0, "max_outputs": 10, "window_s": 60.0}
    emit(breaker, "content", 3, clock, step_s=20.0)  # at t=0, 20, 40; the clock is now 60
    clock.advance(1.0)  # the first output has left the 60 s window
    fill = breaker.output_window_fill("content")
    assert fill == {"outputs": 2, "max_outputs": 10, "window_s": 60.0}
    assert breaker.output_window_fill("content") == fill  # reading changed nothing
    assert breaker.output_window_fill("seo")["outputs"] == 0


def test_output_n_plus_one_is_denied_and_trips_once():
    """The (N+1)th output in the window is denied and carries the one Trip record."""
    breaker, clock, wall = make(outputs(5))
    emit(breaker, "content", 5, clock)
    decision = breaker.check_output("content", "article", summary="variation 6")
    assert not decision.allowed
    assert breaker.state is BreakerState.OPEN
    trip = decision.trip
    assert trip is not None
    assert (trip.agent, trip.rule, trip.count, trip.window_s) == ("content", Rule.OUTPUTS, 6, 600)
    assert trip.limit == "5 outputs in 600s"
    assert trip.summaries[-1] == "[article] variation 6"
    assert trip.time == wall.now
    assert breaker.last_trip == trip


def test_outputs_after_trip_are_denied_without_second_trip():
    """While open every output, launch and usage report is denied as "breaker open" with no Trip."""
    breaker, clock, _ = make(outputs(2))
    trips = [d.trip for d in emit(breaker, "content", 50, clock) if d.trip]
    assert len(trips) == 1
    for decision in (breaker.check_output("seo", "page"), breaker.check_launch("seo"),
                     breaker.report_usage("seo", tokens=10)):
        assert (decision.allowed, decision.reason, decision.trip) == (False, "breaker open", None)
    assert breaker.trips_total == 1


def test_outputs_straddling_a_bucket_edge_trip():
    """47 outputs split across a 10-minute clock boundary trip a 46-per-10-minutes limit."""
    breaker, clock, _ = make(outputs(46, window_s=600), start=6_000.0 - 30)
    decisions = emit(breaker, "content", 47, clock, step_s=1.2)  # 25 before 6000, 22 after
    assert [d.allowed for d in decisions] == [True] * 46 + [False]
    assert decisions[-1].trip is not None


def test_outputs_spread_wider_than_the_window_do_not_trip():
    """Outputs that slide out of the window stop counting, so a steady rate under the limit is fine."""
    breaker, clock, _ = make(outputs(5, window_s=60))
    decisions = emit(breaker, "content", 100, clock, step_s=13.0)
    assert all(d.allowed for d in decisions)


def test_output_exactly_one_window_old_no_longer_counts():
    """An output exactly window_s old has left the window."""
    breaker, clock, _ = make(outputs(1, window_s=60))
    assert breaker.check_output("a", "k").allowed
    clock.advance(60)
    assert breaker.check_output("a", "k").allowed


@given(limit=st.integers(1, 8), window_s=st.integers(1, 50),
       gaps=st.lists(st.integers(0, 20), min_size=1, max_size=60))
def test_first_denial_matches_a_brute_force_sliding_count(limit, window_s, gaps):
    """The first denied output is the first whose trailing window holds more than the limit."""
    breaker, clock, _ = make(outputs(limit, window_s=window_s))
    times, expected, actual = [], None, None
    for i, gap in enumerate(gaps):
        now = clock.advance(gap)
        times.append(now)
        if expected is None and sum(1 for t in times if t > now - window_s) > limit:
            expected = i
        if actual is None and not breaker.check_output("a", "k").allowed:
            actual = i
    assert actual == expected


def test_limits_count_per_agent():
    """Each agent has its own output window; one busy agent does not use another's allowance."""
    breaker, clock, _ = make(outputs(3))
    for agent in ("content", "seo", "community"):
        assert all(d.allowed for d in emit(breaker, agent, 3, clock))


def test_agent_override_replaces_global_output_limit():
    """A per-agent output limit replaces the global one for that agent only."""
    settings = outputs(3, agents={"content": AgentLimits(outputs=OutputLimit(max_outputs=10))})
    breaker, clock, _ = make(settings)
    assert all(d.allowed for d in emit(breaker, "content", 10, clock))
    assert [d.allowed for d in emit(breaker, "seo", 4, clock)] == [True] * 3 + [False]


def test_kind_override_limits_one_kind_on_top_of_agent_limit():
    """A per-(agent, kind) limit trips on that kind while other kinds still count only globally."""
    discord = OutputLimit(max_outputs=2, window_s=600)
    settings = outputs(100, agents={"community": AgentLimits(kinds={"discord_post": discord})})
    breaker, clock, _ = make(settings)
    assert all(d.allowed for d in emit(breaker, "community", 20, clock, kind="tweet"))
    decisions = emit(breaker, "community", 3, clock, kind="discord_post")
    assert [d.allowed for d in decisions] == [True, True, False]
    trip = decisions[-1].trip
    assert (trip.rule, trip.kind, trip.limit) == (Rule.KIND_OUTPUTS, "discord_post",
                                                  "2 discord_post outputs in 600s")


def test_global_kind_limit_applies_to_every_agent_unless_overridden():
    """A global per-kind limit binds every agent, and an agent's own kind limit takes precedence."""
    settings = outputs(100, kinds={"post": OutputLimit(max_outputs=1)},
                       agents={"community": AgentLimits(kinds={"post": OutputLimit(max_outputs=5)})})
    breaker, clock, _ = make(settings)
    assert all(d.allowed for d in emit(breaker, "community", 5, clock, kind="post"))
    assert [d.allowed for d in emit(breaker, "seo", 2, clock, kind="post")] == [True, False]


def test_same_content_more_than_d_times_trips():
    """The same content hash posted more than max_repeats times in the window trips the breaker."""
    settings = BreakerSettings(duplicates=DuplicateLimit(max_repeats=3, window_s=3600))
    breaker, clock, _ = make(settings)
    decisions = []
    for i in range(4):
        decisions.append(breaker.check_output("community", "discord_post", "h-same",
                                              f"Big news #{i}"))
        breaker.check_output("community", "discord_post", f"h-{i}", "other")
        clock.advance(60)
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert (decisions[-1].trip.rule, decisions[-1].trip.count) == (Rule.DUPLICATES, 4)


def test_content_hash_ignores_case_and_whitespace():
    """Reposts differing only in case or whitespace hash alike; different text does not."""
    assert content_hash("Big  news!\n") == content_hash("big news!")
    assert content_hash("Big news!") != content_hash("Big news?")


def test_duplicate_override_per_agent():
    """A per-agent duplicate limit replaces the global one for that agent."""
    settings = outputs(
        100, duplicates=DuplicateLimit(max_repeats=1),
        agents={"heartbeat": AgentLimits(duplicates=DuplicateLimit(max_repeats=50))})
    breaker, _, _ = make(settings)
    assert all(breaker.check_output("heartbeat", "ping", "same").allowed for _ in range(50))
    assert breaker.check_output("seo", "page", "x").allowed
    assert breaker.check_output("seo", "page", "x").trip is not None


def test_run_launch_limit_trips_on_one_launch_too_many():
    """Launching an agent more than max_runs times in the window is denied and trips."""
    settings = BreakerSettings(launches=LaunchLimit(max_runs=4, window_s=300))
    breaker, clock, _ = make(settings)
    decisions = []
    for _ in range(5):
        decisions.append(breaker.check_launch("scheduler"))
        clock.advance(10)
    assert [d.allowed for d in decisions] == [True] * 4 + [False]
    assert (decisions[-1].trip.rule, decisions[-1].trip.limit) == (Rule.LAUNCHES,
                                                                   "4 launches in 300s")


def test_agent_token_budget_trips():
    """An agent spending more tokens than its budget in the window trips the breaker."""
    settings = BreakerSettings(agent_spend=SpendBudget(max_tokens=1000, window_s=3600))
    breaker, clock, _ = make(settings)
    assert breaker.report_usage("content", tokens=600, cost=0.01).allowed
    clock.advance(60)
    decision = breaker.report_usage("content", tokens=500, cost=0.01)
    assert not decision.allowed
    assert (decision.trip.rule, decision.trip.count) == (Rule.AGENT_SPEND, 1100)


def test_agent_spend_expires_with_the_window():
    """Spend older than the window no longer counts against the budget."""
    settings = BreakerSettings(agent_spend=SpendBudget(max_cost=1.0, window_s=3600))
    breaker, clock, _ = make(settings)
    for _ in range(10):
        assert breaker.report_usage("content", cost=0.9).allowed
        clock.advance(3600)


def test_pipeline_cost_budget_trips_on_the_sum_of_agents():
    """The pipeline budget trips on total cost across agents even when each agent is under its own."""
    settings = BreakerSettings(agent_spend=SpendBudget(max_cost=5.0),
                               pipeline_spend=SpendBudget(max_cost=2.0))
    breaker, _, _ = make(settings)
    assert breaker.report_usage("content", cost=0.9).allowed
    assert breaker.report_usage("seo", cost=0.9).allowed
    decision = breaker.report_usage("community", cost=0.3)
    assert (decision.allowed, decision.trip.rule, decision.trip.agent) == (
        False, Rule.PIPELINE_SPEND, "community")
    assert decision.trip.limit == "2 cost in 3600s"


def test_nan_cost_is_ignored_and_does_not_disable_the_budget():
    """A NaN or negative cost report counts as zero so later reports still trip the budget."""
    breaker, _, _ = make(BreakerSettings(agent_spend=SpendBudget(max_cost=1.0)))
    assert breaker.report_usage("content", tokens=-5, cost=float("nan")).allowed
    assert not breaker.report_usage("content", cost=1.5).allowed


def test_spend_merging_never_undercounts():
    """Rapid usage reports merge into few entries yet the window still sees their full sum."""
    breaker, clock, _ = make(BreakerSettings(agent_spend=SpendBudget(max_tokens=10_000,
                                                                     window_s=3600)))
    for _ in range(9_999):
        assert breaker.report_usage("content", tokens=1).allowed
        clock.advance(0.01)
    assert breaker.memory_footprint()["spend_entries"] <= 2 * 514
    assert not breaker.report_usage("content", tokens=2).allowed


def test_stays_open_until_reset():
    """Without auto reset the breaker stays open however much time passes."""
    breaker, clock, _ = make(outputs(1))
    emit(breaker, "content", 2, clock)
    clock.advance(10 * 86_400)
    assert breaker.tick() is None
    assert breaker.state is BreakerState.OPEN


def test_reset_closes_and_clears_windows():
    """An operator reset closes the breaker and the agent starts on an empty window."""
    breaker, clock, _ = make(outputs(3))
    emit(breaker, "content", 4, clock)
    assert breaker.reset(by="operator", reason="fixed retry loop") is True
    assert breaker.state is BreakerState.CLOSED
    assert all(d.allowed for d in emit(breaker, "content", 3, clock))
    assert breaker.reset(by="operator", reason="again") is False


def test_auto_reset_goes_half_open_then_re_trips_on_probe_excess():
    """After auto_reset_after_s the breaker is half-open and the output past the probe budget re-trips."""
    breaker, clock, _ = make(outputs(10, auto_reset_after_s=300, probe_outputs=2))
    first = [d.trip for d in emit(breaker, "content", 11, clock, step_s=0)
             if d.trip]
    clock.advance(299)
    assert breaker.tick() is None
    clock.advance(1)
    assert breaker.tick() is BreakerState.HALF_OPEN
    decisions = emit(breaker, "content", 3, clock)
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[-1].trip.rule is Rule.PROBE
    assert decisions[-1].trip is not first[0]
    assert breaker.state is BreakerState.OPEN
    assert breaker.trips_total == 2


def test_half_open_closes_after_a_quiet_probe_window():
    """A half-open breaker closes once probe_window_s passes without a trip."""
    breaker, clock, _ = make(outputs(1, auto_reset_after_s=60, probe_window_s=120))
    emit(breaker, "content", 2, clock, step_s=0)
    clock.advance(60)
    assert breaker.tick() is BreakerState.HALF_OPEN
    assert breaker.check_output("content", "article").allowed
    clock.advance(120)
    assert breaker.tick() is BreakerState.CLOSED


def test_transition_table_rejects_closed_to_half_open():
    """A transition missing from the table raises and leaves the state unchanged."""
    breaker, _, _ = make()
    with pytest.raises(InvalidTransition,
                       match=r"breaker: closed -> half_open is not allowed \(from closed: open\)"):
        breaker.transition(BreakerState.HALF_OPEN, reason="test")
    assert breaker.state is BreakerState.CLOSED


def test_persist_callback_gets_each_state_change():
    """The persist callback receives a snapshot on every transition, starting with the trip."""
    saved = []
    breaker = Breaker(outputs(1), clock=FakeClock(), wall_clock=FakeClock(), persist=saved.append)
    breaker.check_output("content", "article")
    breaker.check_output("content", "article")
    breaker.reset(by="op", reason="ok")
    assert [s["state"] for s in saved] == ["open", "closed"]


def test_failing_persist_callback_does_not_stop_the_trip():
    """A persist callback that raises is logged and the breaker still opens."""
    def broken(_: dict) -> None:
        raise OSError("disk full")

    breaker = Breaker(outputs(1), clock=FakeClock(), wall_clock=FakeClock(), persist=broken)
    breaker.check_output("a", "k")
    assert breaker.check_output("a", "k").trip is not None
    assert breaker.state is BreakerState.OPEN


def test_snapshot_restore_keeps_open_state_and_trip():
    """A restarted daemon restoring the JSON snapshot comes back open with the same trip record."""
    breaker, clock, wall = make(outputs(2))
    trip = [d.trip for d in emit(breaker, "community", 3, clock) if d.trip][0]
    saved = json.loads(json.dumps(breaker.snapshot()))

    wall.advance(3600)  # the restart took an hour; the new process has a fresh monotonic clock
    restarted, _, _ = make(outputs(2), start=5.0, wall_start=wall.now)
    restarted.restore(saved)
    assert restarted.state is BreakerState.OPEN
    assert restarted.last_trip == trip
    assert restarted.check_output("community", "post").reason == "breaker open"


def test_restore_keeps_window_entries_by_age():
    """Window entries survive a restart by wall-clock age, so downtime counts as elapsed time."""
    breaker, clock, wall = make(outputs(3, window_s=600))
    emit(breaker, "content", 3, clock, step_s=0)
    saved = breaker.snapshot()

    wall.advance(100)
    soon, _, _ = make(outputs(3, window_s=600), start=7.0, wall_start=wall.now)
    soon.restore(saved)
    assert soon.check_output("content", "article").trip is not None

    wall.advance(600)
    later, _, _ = make(outputs(3, window_s=600), start=7.0, wall_start=wall.now)
    later.restore(saved)
    assert later.check_output("content", "article").allowed


def test_restore_half_open_keeps_auto_reset_timing():
    """An open breaker restored after its auto-reset delay goes half-open on the next tick."""
    breaker, clock, wall = make(outputs(1, auto_reset_after_s=600))
    emit(breaker, "content", 2, clock)
    saved = breaker.snapshot()
    wall.advance(900)
    restarted, _, _ = make(outputs(1, auto_reset_after_s=600), start=3.0, wall_start=wall.now)
    restarted.restore(saved)
    assert restarted.tick() is BreakerState.HALF_OPEN


def test_restore_rejects_garbage_with_a_hint():
    """Restoring something that is not a breaker snapshot raises SnapshotError naming the problem."""
    breaker, _, _ = make()
    with pytest.raises(SnapshotError, match="expected the dict written by Breaker.snapshot"):
        breaker.restore({"state": "melted"})


def test_millions_of_old_events_leave_memory_bounded():
    """A million outputs with distinct hashes, pruned as they age, leave bounded deques and tables."""
    settings = outputs(50, window_s=60, max_tracked_hashes=1000,
                       kinds={"article": OutputLimit(max_outputs=50, window_s=60)},
                       launches=LaunchLimit(max_runs=1000, window_s=60))
    breaker, clock, _ = make(settings)
    check = breaker.check_output
    for i in range(1_000_000):
        clock.now += 1.5  # 40 per minute, under the limit of 50
        if not check(f"agent{i % 2}", "article", str(i)).allowed:
            raise AssertionError(f"output {i} denied")
        if i % 50 == 0:
            breaker.check_launch(f"agent{i % 2}")
    footprint = breaker.memory_footprint()
    assert footprint["windows"] <= 6
    assert footprint["hashes"] <= 1000
    assert all(len(w.stamps) <= 51 for w in breaker._windows.counts.values())
    clock.advance(3600)
    breaker.tick()
    assert breaker.memory_footprint() == {"windows": 0, "hashes": 0, "stamps": 0,
                                          "spend_entries": 0}


def test_settings_reject_unknown_keys_and_bad_values():
    """Config with an unknown key or a zero limit fails with the key's path and what is valid."""
    with pytest.raises(msgspec.ValidationError, match=r"unknown field `max_output` - at `\$.outputs`"):
        msgspec.convert({"outputs": {"max_output": 5}}, BreakerSettings)
    with pytest.raises(msgspec.ValidationError, match=r">= 1 - at `\$.outputs.max_outputs`"):
        msgspec.convert({"outputs": {"max_outputs": 0}}, BreakerSettings)


def test_settings_name_overrides_for_unknown_agents():
    """Overrides for an agent the config does not define are reported with the defined names."""
    settings = BreakerSettings(agents={"contnet": AgentLimits()})
    with pytest.raises(ValueError, match="unknown agent.*contnet.*defined agents are: content, seo"):
        settings.check_agents(["seo", "content"])


def test_apply_settings_takes_effect_on_next_output():
    """New limits from a config reload apply to windows that already hold entries."""
    breaker, clock, _ = make(outputs(10))
    emit(breaker, "content", 5, clock)
    breaker.apply_settings(outputs(5))
    assert breaker.check_output("content", "article").trip is not None
