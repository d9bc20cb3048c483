"""The feature seam (core/feature.py) in a real daemon: a Feature subclass added to the daemon's
features (through a sitecustomize that wraps features.features_for) is called by the loop
and the pipeline, and a hook that raises is logged while supervision goes on."""

from __future__ import annotations

import os
from pathlib import Path

from harness import DaemonProc, py
from support import wait_until

ROOT = Path(__file__).resolve().parent.parent

EXTRA_FEATURE = """\
import os

import supervisor.daemon.features as features
from supervisor.core.feature import Feature

_features_for = features.features_for


class RecordRuns(Feature):
    \"\"\"Overrides one hook: each finished run is appended to a file.\"\"\"

    name = "record_runs"

    def run_finished(self, run, record):
        with open(os.environ["SEAM_RUNS_FILE"], "a") as out:
            out.write(f"{run.run_id} {run.pid} {record.outcome}\\n")


class FailingTick(Feature):
    \"\"\"Overrides one hook, which always raises.\"\"\"

    name = "failing_tick"

    def tick(self, now_mono):
        raise RuntimeError("tick failed on purpose")


def features_for(config):
    extra = {"record_runs": RecordRuns, "failing_tick": FailingTick}
    return [*_features_for(config), extra[os.environ["SEAM_FEATURE"]]()]


features.features_for = features_for
"""


def _daemon_with(tmp_path: Path, feature: str) -> DaemonProc:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(EXTRA_FEATURE)
    env = {
        # The checkout first: sitecustomize imports `supervisor` before `-m` adds the cwd.
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)]),
        "SEAM_FEATURE": feature,
        "SEAM_RUNS_FILE": str(tmp_path / "runs.txt"),
    }
    agent = {"jobs": [{"id": "main", "command": py("pass"), "schedule": {"every_s": 3600}}]}
    return DaemonProc(tmp_path, {"a": agent}).start(extra_env=env)


def test_a_feature_overriding_one_hook_is_called_by_the_pipeline(tmp_path):
    """A Feature that overrides only run_finished hears about a real child's run, with the
    run id, pid and outcome the daemon logged."""
    runs_file = tmp_path / "runs.txt"
    with _daemon_with(tmp_path, "record_runs") as d:
        run_id = d.call("start-now", agent="a")["run_id"]
        finished = d.wait_event("run_finished", run_id=run_id)
        started = d.find("run_started", run_id=run_id)[0]
        wait_until(lambda: runs_file.exists() and runs_file.read_text().strip(),
                   timeout_s=10, message="the feature's run_finished hook was not called")
        assert runs_file.read_text().split() == [run_id, str(started["pid"]),
                                                 finished["outcome"]]
        assert finished["outcome"] == "succeeded"


def test_a_raising_hook_is_logged_and_the_loop_goes_on(tmp_path):
    """A Feature whose tick hook raises is logged on every tick, and the daemon still runs
    agents and answers requests."""
    with _daemon_with(tmp_path, "failing_tick") as d:
        assert d.wait_event("tick_hook_failed", hook="FailingTick.tick")["level"] == "error"
        run_id = d.call("start-now", agent="a")["run_id"]
        assert d.wait_event("run_finished", run_id=run_id)["outcome"] == "succeeded"
        d.wait_event("tick_hook_failed", hook="FailingTick.tick", count=3)
        assert d.call("status")["daemon"]["state"] == "running"
        assert d.proc.poll() is None
