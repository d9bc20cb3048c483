"""Default limits derived from each agent's schedule: the documented example agents and the
demo pipeline run a simulated day without a trip; a crash-looping `always` agent is contained
without halting the healthy one; check-config names a limit the schedule would exceed."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from harness import DaemonProc, py, wk
from support import wait_until

from supervisor.breaker.breaker import Breaker, content_hash
from supervisor.breaker.defaults import _cron_times
from supervisor.config.load import load_config
from supervisor.features.output_gate import merged_breaker_settings

ROOT = Path(__file__).resolve().parent.parent
DAY_S = 86400.0


def readme_agents() -> dict[str, str]:
    """The agent files README.md and docs/agents.md show, by agent name."""
    readme = (ROOT / "README.md").read_text()
    agents = {"hello": re.search(r"agents\.d/hello\.yaml <<'EOF'\n(.*?)\nEOF", readme, re.S)[1]}
    for text in (readme, (ROOT / "docs/agents.md").read_text()):
        for name, body in re.findall(r"```yaml\n# agents\.d/(\w+)\.yaml[^\n]*\n(.*?)```", text,
                                     re.S):
            agents[name] = body
    return agents


def example_config(tmp_path: Path):
    (tmp_path / "agents.d").mkdir()
    (tmp_path / "watchkeeper.yaml").write_text(f"state_dir: {tmp_path / 'state'}\n")
    agents = readme_agents()
    assert {"hello", "seo", "digest"} <= set(agents)
    agents.setdefault("content", "jobs: [{id: main, command: [\"true\"], schedule: {every_s: 60}}]")
    for name, body in agents.items():
        (tmp_path / "agents.d" / f"{name}.yaml").write_text(body.rstrip("\n") + "\n")
    return load_config(tmp_path / "watchkeeper.yaml")


def launch_times(config, name: str, horizon_s: float, seen=frozenset()) -> list[float]:
    """When each run of `name` starts over `horizon_s`, exactly as its schedule declares."""
    times: list[float] = []
    for job in config.agents[name].jobs:
        schedule = job.schedule
        if schedule.every_s is not None:
            times += [i * schedule.every_s for i in range(int(horizon_s // schedule.every_s))]
        elif schedule.cron is not None:
            cron = list(_cron_times(job, horizon_s))
            times += [t - cron[0] for t in cron] if cron else []
        elif schedule.always:
            times.append(0.0)
        for upstream in schedule.after or ():
            if upstream not in seen:
                times += [t + 1.0 for t in launch_times(config, upstream, horizon_s,
                                                        seen | {name})]
    return sorted(times)


def simulate_day(config) -> list:
    """Every agent's launches, each run making one output identical to its last (a digest),
    through one breaker on a fake clock; returns the trips."""
    clock = [0.0]
    breaker = Breaker(merged_breaker_settings(config), clock=lambda: clock[0],
                      wall_clock=lambda: 1e9 + clock[0])
    events = sorted((t, name) for name in config.agents
                    for t in launch_times(config, name, DAY_S))
    trips = []
    for t, name in events:
        clock[0] = t
        for decision in (breaker.check_launch(name),
                         breaker.check_output(name, "digest", content_hash(f"{name} digest"))):
            if decision.trip is not None:
                trips.append(decision.trip)
    return trips


def test_documented_example_agents_run_a_simulated_day_without_a_trip(tmp_path):
    """README's hello and seo and docs/agents.md's digest, each as declared, never trip a
    default limit in 24 simulated hours, digests repeated every run."""
    config = example_config(tmp_path)
    assert simulate_day(config) == []


def test_demo_pipeline_runs_a_simulated_day_without_a_trip():
    """The bundled demo pipeline, as configured, never trips in 24 simulated hours."""
    config = load_config(ROOT / "config/watchkeeper.yaml")
    assert simulate_day(config) == []


def test_fixed_limit_below_the_schedule_trips_in_the_simulation(tmp_path):
    """The simulation does catch a limit the schedule exceeds: hello with max_runs 12 trips."""
    example_config(tmp_path)
    hello = tmp_path / "agents.d/hello.yaml"
    hello.write_text(hello.read_text() + "limits: {launches: {max_runs: 12}}\n")
    trips = simulate_day(load_config(tmp_path / "watchkeeper.yaml"))
    assert trips and trips[0].agent == "hello" and trips[0].rule.value == "launches"
    assert "limits.launches.max_runs" in trips[0].setting


def test_check_config_warns_with_file_and_line_when_a_schedule_exceeds_a_limit(tmp_path):
    """check-config names file:line and the setting when an agent's own schedule would exceed
    an explicit launch limit, and still exits 0."""
    example_config(tmp_path)
    hello = tmp_path / "agents.d/hello.yaml"
    hello.write_text(hello.read_text() + "limits:\n  launches: {max_runs: 12}\n")
    result = wk("--config", str(tmp_path / "watchkeeper.yaml"), "check-config")
    assert result.returncode == 0, result.stderr
    line = len(hello.read_text().splitlines())
    assert f"{hello}:{line}: limits.launches.max_runs: warning:" in result.stderr
    assert "721 runs in 3600s" in result.stderr


CRASHER = "import sys; sys.exit(1)"
HEALTHY = "import sys; open(sys.argv[1], 'a').write('ran\\n')"


def test_crash_looping_always_agent_is_contained_and_the_healthy_one_keeps_running(tmp_path):
    """A crash-looping `always` agent backs off and cools down with one alert for the whole
    episode and no halt, even with a tiny launch limit, while a healthy agent keeps running."""
    record = tmp_path / "healthy.txt"
    agents = {
        "crasher": {"jobs": [{"id": "main", "command": py(CRASHER), "schedule": {"always": True},
                              "retries": {"backoff_s": 0.05, "backoff_max_s": 0.1}}],
                    "limits": {"launches": {"max_runs": 2, "window_s": 3600}}},
        "healthy": {"jobs": [{"id": "main", "command": [*py(HEALTHY), str(record)],
                              "schedule": {"every_s": 0.3}}]},
    }
    crash_loop = {"failures": 3, "cooldown_s": 0.3, "cooldown_max_s": 0.5}
    alerts = {"rate_limit": {"per_key_interval_s": 0.01}}  # only the episode rule limits
    with DaemonProc(tmp_path, agents, crash_loop=crash_loop, alerts=alerts).start() as d:
        d.wait_event("agent_crash_loop", agent="crasher", count=3, timeout_s=30)
        ran = len(record.read_text().splitlines())
        wait_until(lambda: len(record.read_text().splitlines()) >= ran + 2, 15,
                   message="the healthy agent stopped running")
        assert not d.find("breaker_tripped")
        assert d.call("breaker-status")["state"] == "closed"
        assert len(d.find("run_started", agent="crasher")) >= 9
        assert len(d.find("alert", kind="crash_loop")) == 1
        crasher = next(a for a in d.call("status")["agents"] if a["agent"] == "crasher")
        assert crasher["state"] in ("failed", "backoff", "running", "idle")


def test_derived_defaults_are_what_docs_say():
    """The headroom constants docs/agents.md states are the ones the code uses."""
    from supervisor.breaker.defaults import DUPLICATE_HEADROOM, LAUNCH_HEADROOM, OUTPUT_HEADROOM

    docs = (ROOT / "docs/agents.md").read_text()
    for headroom in (LAUNCH_HEADROOM, DUPLICATE_HEADROOM, OUTPUT_HEADROOM):
        assert f"plus {headroom}" in docs
    assert yaml.safe_load("a: 1")  # yaml stays importable for the harness


def test_start_now_refused_by_the_launch_limit_is_an_error_naming_the_setting(tmp_path):
    """A start-now past an explicit launch limit is refused with an error naming the limit
    and the setting to raise, and `watchkeeper start-now` exits non-zero."""
    agents = {"quick": {"jobs": [{"id": "main", "command": py("pass"),
                                  "schedule": {"every_s": 3600}}],
                        "limits": {"launches": {"max_runs": 1, "window_s": 3600}}}}
    with DaemonProc(tmp_path, agents).start() as d:
        assert d.call("start-now", agent="quick")["result"] == "started"
        d.wait_event("run_finished", agent="quick")
        refused = wk("--config", str(d.config_path), "start-now", "quick")
        assert refused.returncode != 0
        assert "refused: launches limit" in refused.stderr
        trip = d.wait_event("breaker_tripped", agent="quick")
        assert trip["setting"].startswith("limits.launches.max_runs in agents.d/quick.yaml")


class _NoScheduler:
    """The simulation fires the healthy agent itself, on the simulated clock."""

    def set_agent(self, spec) -> None:
        pass

    def remove_agent(self, name: str) -> None:
        pass


def test_crash_looping_always_agent_for_a_simulated_hour_beside_a_healthy_one(tmp_path):
    """Over a simulated hour (an injected clock, real child processes) a crash-looping
    `always` agent with default settings never halts the pipeline, raises one alert, and the
    healthy agent beside it runs every one of its firings."""
    import os
    import selectors

    from supervisor.breaker.breaker import Breaker
    from supervisor.core.feature import Features, Services
    from supervisor.core.firing import Fire
    from supervisor.core.timers import Timers
    from supervisor.features.output_gate import OutputGate
    from supervisor.runs.pipeline import Pipeline
    from supervisor.storage.store import Store

    (tmp_path / "agents.d").mkdir()
    (tmp_path / "watchkeeper.yaml").write_text(f"state_dir: {tmp_path / 'state'}\n")
    (tmp_path / "agents.d/crasher.yaml").write_text(
        'jobs: [{id: main, command: ["false"], schedule: {always: true}}]\n')
    (tmp_path / "agents.d/healthy.yaml").write_text(
        'jobs: [{id: main, command: ["true"], schedule: {every_s: 60}}]\n')
    config = load_config(tmp_path / "watchkeeper.yaml")
    (tmp_path / "state").mkdir()
    clock = [0.0]
    watched: dict = {}

    gate = OutputGate()
    features = Features([gate])  # what the pipeline calls: the gate's hooks
    store, timers = Store(tmp_path / "state.db"), Timers(clock=lambda: clock[0])
    pipeline = Pipeline(
        settings=config.settings, state_dir=tmp_path / "state", socket_path=tmp_path / "s",
        store=store, timers=timers, scheduler=_NoScheduler(), cgroups=None,
        watch_fd=watched.__setitem__, unwatch_fd=lambda fd: watched.pop(fd, None),
        features=features)
    daemon = Services(state_dir=tmp_path / "state", store=store, timers=timers,
                      selector=selectors.DefaultSelector(), pipeline=pipeline,
                      scheduler=pipeline.scheduler, cgroups=None, features=features,
                      current_config=lambda: config, current_state=lambda: None,
                      uptime_s=lambda: clock[0])
    gate.start(daemon)
    gate.use_breaker(Breaker(merged_breaker_settings(config), clock=lambda: clock[0],
                             wall_clock=lambda: 1e9 + clock[0], persist=gate.persist_snapshot))
    try:
        pipeline.set_agents(config.agents)
        healthy_fired, next_healthy = 0, 0.0
        while clock[0] < 3600:
            for run in list(pipeline.runs.values()):
                _, status = os.waitpid(run.pid, 0)  # `true` and `false` exit at once
                for fd, on_output in list(watched.items()):
                    on_output(fd)
                pipeline.child_exited(run.pid, status)
            due_in = daemon.timers.time_until_next()
            clock[0] = min(next_healthy, clock[0] + due_in if due_in is not None else 3600)
            if next_healthy <= clock[0] < 3600:
                pipeline.fire(Fire("healthy", "main", "every", 1e9 + clock[0]))
                healthy_fired, next_healthy = healthy_fired + 1, next_healthy + 60
            daemon.timers.run_due()
        runs = {agent: [r for r in daemon.store.recent_runs(agent, 10_000)]
                for agent in ("crasher", "healthy")}
        crash_alerts = daemon.store.db.execute(
            "SELECT COUNT(*) FROM alert_outbox WHERE kind='crash_loop'").fetchone()[0]
    finally:
        gate.alerter.close(timeout_s=1)
        daemon.store.close()
    assert gate.breaker.trips_total == 0 and not pipeline.halted
    assert healthy_fired == 60
    assert [r.outcome for r in runs["healthy"]] == ["succeeded"] * 60
    assert len(runs["crasher"]) >= 10 and pipeline.agents["crasher"].cooldowns >= 2
    assert crash_alerts == 1
