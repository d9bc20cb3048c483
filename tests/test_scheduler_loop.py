"""Cron and interval jobs on the daemon's own loop: no thread, and light imports."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

from harness import DaemonProc, py

# What APScheduler's package would pull in and trigger arithmetic never uses.
# ("asyncio" itself is in sys.modules as cli/deferred.py's stand-in: its type is checked.)
UNUSED_BY_TRIGGERS = ("asyncio.", "_asyncio", "ssl", "email", "multiprocessing", "concurrent",
                      "importlib.metadata", "zipfile", "apscheduler.schedulers",
                      "apscheduler.executors")

PROBE = """
import json, sys
from supervisor.cli.deferred import defer
defer("asyncio")  # as `watchkeeper run` does
from supervisor.config.schema import Job, Schedule
from supervisor.config.load import load_config
from supervisor.scheduling.scheduler import make_trigger
load_config(sys.argv[1])  # validates the cron expression too
cron = make_trigger(Job(id="c", command=["x"], schedule=Schedule(cron="30 2 * * *",
                                                                   timezone="Europe/Berlin")))
every = make_trigger(Job(id="e", command=["x"], schedule=Schedule(every_s=5)))
import datetime as dt
now = dt.datetime(2026, 3, 28, 12, tzinfo=dt.UTC)
print(json.dumps({"modules": sorted(sys.modules), "asyncio": type(sys.modules["asyncio"]).__name__,
                  "cron": cron.get_next_fire_time(None, now).isoformat(),
                  "every": every.get_next_fire_time(None, now) is not None}))
"""


def test_trigger_arithmetic_imports_none_of_apscheduler_extras(tmp_path):
    """Loading a config with a cron job and building cron and interval triggers loads no
    asyncio, ssl, email, multiprocessing, importlib.metadata or APScheduler scheduler, and
    the triggers still compute slots."""
    config = DaemonProc(tmp_path, {"c": {"jobs": [{"id": "m", "command": ["true"],
                                                  "schedule": {"cron": "30 2 * * *"}}]}})
    out = subprocess.run([sys.executable, "-c", PROBE, str(config.config_path)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    result = json.loads(out)
    loaded = [m for m in result["modules"]
              if any(m == u or m.startswith(u.rstrip(".") + ".") for u in UNUSED_BY_TRIGGERS)]
    assert loaded == [] and result["asyncio"] == "DeferredModule"
    # 02:30 does not exist in Berlin that night: the job runs at 01:30 UTC (03:30 CEST).
    assert dt.datetime.fromisoformat(result["cron"]) == dt.datetime(2026, 3, 29, 1, 30,
                                                                    tzinfo=dt.UTC)
    assert result["every"]


def test_cron_job_fires_from_the_loop_with_no_other_thread(tmp_path):
    """A six-field cron job fires every second while the daemon runs a single thread."""
    spec = {"jobs": [{"id": "tick", "command": py("pass"),
                      "schedule": {"cron": "* * * * * *"}}]}
    with DaemonProc(tmp_path, {"ticker": spec}).start() as d:
        d.wait_event("run_finished", agent="ticker", count=2, timeout_s=20)
        threads = os.listdir(f"/proc/{d.proc.pid}/task")
        assert len(threads) == 1, threads


def test_alarm_rings_at_its_deadline_and_is_silenced(tmp_path):
    """The loop's alarm fd turns readable once its monotonic deadline passes, not before,
    and reading it makes it quiet again."""
    import selectors
    import time

    from support import wait_until

    from supervisor.core.alarm import Alarm

    alarm = Alarm()
    selector = selectors.DefaultSelector()
    try:
        assert alarm.fd >= 0  # Linux: timerfd exists on every kernel this runs on
        selector.register(alarm.fd, selectors.EVENT_READ)
        alarm.ring_at(time.monotonic() + 3600)
        assert selector.select(0) == []
        alarm.ring_at(time.monotonic() + 0.05)  # replaces the hour
        wait_until(lambda: selector.select(0.5), timeout_s=10)
        alarm.silence()
        assert selector.select(0) == []
    finally:
        selector.close()
        alarm.close()
