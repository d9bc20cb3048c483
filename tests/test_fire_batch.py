"""Firings due in the same loop turn: every run is spawned first, then announced."""

from __future__ import annotations

import os
import time

from supervisor.config.load import load_config
from supervisor.core.feature import Feature, Features
from supervisor.core.firing import Fire
from supervisor.core.timers import Timers
from supervisor.runs.pipeline import Pipeline
from supervisor.scheduling.scheduler import Scheduler
from supervisor.storage.store import Store


class _FirstAnnouncement(Feature):
    """Counts the runs already spawned when the first run is announced."""

    def __init__(self) -> None:
        self.pipeline: Pipeline | None = None
        self.spawned: list[int] = []

    def run_started(self, run) -> None:
        if not self.spawned:
            self.spawned.append(len(self.pipeline.runs))


def _pipeline(tmp_path, agents: dict[str, list[str]],
              features: tuple[Feature, ...] = ()) -> tuple[Pipeline, dict]:
    """A pipeline of real interval agents (one command each), as the daemon builds it."""
    (tmp_path / "agents.d").mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "watchkeeper.yaml").write_text(f"state_dir: {tmp_path / 'state'}\n")
    for name, argv in agents.items():
        (tmp_path / f"agents.d/{name}.yaml").write_text(
            f"jobs: [{{id: tick, command: {argv!r}, schedule: {{every_s: 3600}}}}]\n")
    config = load_config(tmp_path / "watchkeeper.yaml")
    watched: dict = {}
    timers = Timers()
    pipeline = Pipeline(
        settings=config.settings, state_dir=tmp_path / "state", socket_path=tmp_path / "s",
        store=Store(tmp_path / "state.db"), timers=timers,
        scheduler=Scheduler(lambda fire: None, time.time, timers), cgroups=None,
        watch_fd=watched.__setitem__, unwatch_fd=lambda fd: watched.pop(fd, None),
        features=Features(features))
    pipeline.set_agents(config.agents)
    return pipeline, watched


def _reap_all(pipeline: Pipeline, watched: dict) -> None:
    """What the loop does for each child: read its output to the end, then reap it."""
    for run in list(pipeline.runs.values()):
        _, status = os.waitpid(run.pid, 0)
        for fd, on_output in list(watched.items()):
            on_output(fd)
        pipeline.child_exited(run.pid, status)


def test_a_batch_spawns_every_run_before_announcing_any(tmp_path):
    """Twenty firings handed over in one batch all start; when the first run is announced
    every one of them is already spawned, and each run ends up recorded with its pid."""
    names = [f"a{i:02d}" for i in range(20)]
    first = _FirstAnnouncement()
    pipeline, watched = _pipeline(tmp_path, {n: ["true"] for n in names}, (first,))
    first.pipeline = pipeline
    try:
        pipeline.fire_batch([Fire(n, "tick", "every", time.time()) for n in names])
        assert first.spawned == [20]
        assert len(watched) == 40  # stdout and stderr of each run
        _reap_all(pipeline, watched)
        runs = {n: pipeline.store.recent_runs(n) for n in names}
    finally:
        pipeline.store.close()
    assert all(len(r) == 1 and r[0].pid and r[0].outcome == "succeeded"
               for r in runs.values()), runs


def test_an_exec_failure_in_a_batch_fails_that_run_only(tmp_path):
    """A command that cannot be executed, in the middle of a batch, is recorded as that
    run's spawn failure; the firings before and after it start and succeed."""
    agents = {"before": ["true"], "broken": [str(tmp_path / "no-such-program")],
              "after": ["true"]}
    pipeline, watched = _pipeline(tmp_path, agents)
    try:
        pipeline.fire_batch([Fire(n, "tick", "every", time.time()) for n in agents])
        assert sorted(run.agent for run in pipeline.runs.values()) == ["after", "before"]
        _reap_all(pipeline, watched)
        outcomes = {n: [r.outcome for r in pipeline.store.recent_runs(n)] for n in agents}
    finally:
        pipeline.store.close()
    assert outcomes == {"before": ["succeeded"], "broken": ["spawn_failed"],
                        "after": ["succeeded"]}


def test_a_second_firing_of_an_agent_in_a_batch_meets_its_first_run(tmp_path):
    """Two jobs of one agent due in the same batch: the first starts, the second finds it
    running and is skipped (overlap: skip), as two firings one after the other are."""
    pipeline, watched = _pipeline(tmp_path, {})
    (tmp_path / "agents.d/twice.yaml").write_text(
        "jobs: [{id: a, command: [sleep, '30'], schedule: {every_s: 3600}},\n"
        "       {id: b, command: [sleep, '30'], schedule: {every_s: 3600}}]\n")
    pipeline.set_agents(load_config(tmp_path / "watchkeeper.yaml").agents)
    try:
        pipeline.fire_batch([Fire("twice", "a", "every", time.time()),
                             Fire("twice", "b", "every", time.time())])
        assert [run.job.id for run in pipeline.runs.values()] == ["a"]
        for run in list(pipeline.runs.values()):
            os.kill(run.pid, 9)
        _reap_all(pipeline, watched)
        jobs = [r.job for r in pipeline.store.recent_runs("twice")]
    finally:
        pipeline.store.close()
    assert jobs == ["a"]
