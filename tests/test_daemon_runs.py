"""The daemon core with real child processes: schedules, overlap, timeouts, leftovers, stop."""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import psutil
import pytest
from harness import DaemonProc, py
from support import wait_until


def every(seconds: float, code: str, **job) -> dict:
    return {"jobs": [{"id": "main", "command": py(code), "schedule": {"every_s": seconds},
                      **job}]}


def always(code: str, **job) -> dict:
    return {"jobs": [{"id": "main", "command": py(code), "schedule": {"always": True}, **job}]}


def runs_in_db(d: DaemonProc, agent: str) -> list[sqlite3.Row]:
    db = sqlite3.connect(d.state_dir / "state.db")
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM runs WHERE agent=? ORDER BY started", (agent,)).fetchall()
    finally:
        db.close()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_interval_schedule_fires_repeatedly(tmp_path):
    """An every_s job runs again and again, each run recorded with exit code 0."""
    with DaemonProc(tmp_path, {"tick": every(0.5, "print('hello')")}).start() as d:
        d.wait_event("run_finished", agent="tick", outcome="succeeded", count=3)
        out = d.find("agent_output", agent="tick")
        assert out and out[0]["line"] == "hello" and out[0]["stream"] == "stdout"
    rows = [r for r in runs_in_db(d, "tick") if r["ended"]]
    assert len(rows) >= 3 and all(r["exit_code"] == 0 for r in rows)


def test_cron_schedule_with_seconds_fires(tmp_path):
    """A six-field cron expression (seconds first) fires within seconds."""
    spec = {"jobs": [{"id": "c", "command": py("pass"),
                      "schedule": {"cron": "*/2 * * * * *", "timezone": "Europe/Berlin"}}]}
    with DaemonProc(tmp_path, {"cron": spec}).start() as d:
        d.wait_event("run_finished", agent="cron", count=2, timeout_s=10)
        firsts = d.find("run_started", agent="cron")
        assert all(e["trigger"] == "cron" for e in firsts)


def test_overlap_skip_drops_firings_while_running(tmp_path):
    """With overlap skip, firings during a long run are skipped, never a second instance."""
    spec = every(0.3, "import time; time.sleep(2)", overlap="skip")
    with DaemonProc(tmp_path, {"slow": spec}).start() as d:
        d.wait_event("firing_skipped", agent="slow", reason="already running", count=2)
        assert len(d.find("run_started", agent="slow")) == 1


def test_overlap_queue_runs_one_waiting_firing_after(tmp_path):
    """With overlap queue, one waiting firing starts as soon as the current run ends."""
    spec = every(0.3, "import time; time.sleep(1.5)", overlap="queue")
    with DaemonProc(tmp_path, {"q": spec}).start() as d:
        d.wait_event("firing_queued", agent="q")
        first = d.wait_event("run_finished", agent="q")
        second = d.wait_event("run_started", agent="q", count=2)
        assert second["run_id"] != first["run_id"]
        order = [e["event"] for e in d.events if e.get("agent") == "q"
                 and e.get("event") in ("run_started", "run_finished")]
        assert order[:3] == ["run_started", "run_finished", "run_started"]


def test_overlap_replace_stops_current_run(tmp_path):
    """With overlap replace, a new firing stops the running one (reason replaced)."""
    spec = every(1.0, "import time; time.sleep(30)", overlap="replace")
    with DaemonProc(tmp_path, {"r": spec}).start() as d:
        ev = d.wait_event("run_finished", agent="r", timeout_s=10)
        assert ev["stop_reason"] == "replaced" and ev["outcome"] == "stopped"
        d.wait_event("run_started", agent="r", count=2)


def test_timeout_escalates_to_sigkill_for_a_child_ignoring_sigterm(tmp_path):
    """A run past its timeout gets SIGTERM, then SIGKILL; the record says SIGKILL."""
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    spec = every(30, code, timeout_s=0.5, stop_grace_s=0.5)
    with DaemonProc(tmp_path, {"stubborn": spec}).start() as d:
        d.call("start-now", agent="stubborn")
        ev = d.wait_event("run_finished", agent="stubborn", timeout_s=10)
        assert ev["outcome"] == "timed_out"
        assert ev["stop_signal"] == "SIGKILL"
    row = runs_in_db(d, "stubborn")[0]
    assert row["signal"] == signal.SIGKILL and row["stop_reason"] == "timeout"


def test_timeout_sigterm_suffices_for_a_polite_child(tmp_path):
    """A run that exits on SIGTERM is recorded with stop_signal SIGTERM."""
    spec = every(30, "import time; time.sleep(60)", timeout_s=0.3)
    with DaemonProc(tmp_path, {"polite": spec}).start() as d:
        d.call("start-now", agent="polite")
        ev = d.wait_event("run_finished", agent="polite")
        assert ev["outcome"] == "timed_out" and ev["stop_signal"] == "SIGTERM"


STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(300)")

ORPHAN_MAKER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],
                         start_new_session=True)
open(os.environ['PIDFILE'], 'w').write(str(child.pid))
print('spawned', child.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("leftovers", ["stop", "keep"])
def test_orphaned_grandchild_in_own_session(tmp_path, leftovers):
    """A grandchild in its own session, orphaned by a SIGKILLed agent, is attributed to its
    run and stopped; with leftovers: keep it is left running."""
    pidfile = tmp_path / "grandchild.pid"
    spec = every(60, ORPHAN_MAKER, env={"PIDFILE": str(pidfile)}, leftovers=leftovers)
    with DaemonProc(tmp_path, {"leaky": spec}).start() as d:
        started = d.call("start-now", agent="leaky")
        d.wait_event("agent_output", agent="leaky")
        grandchild = int(pidfile.read_text())
        agent_pid = d.call("status")["agents"][0]["pid"]
        os.kill(agent_pid, signal.SIGKILL)
        ev = d.wait_event("run_finished", agent="leaky")
        assert ev["run_id"] == started["run_id"]
        if leftovers == "stop":
            d.wait_event("run_leftovers_stopping", run_id=ev["run_id"])
            wait_until(lambda: not alive(grandchild), 10, message="grandchild still alive")
        else:
            assert alive(grandchild)
            assert psutil.Process(grandchild).ppid() == d.proc.pid  # reparented: subreaper
    # The daemon's stop reaches kept leftovers too.
    wait_until(lambda: not alive(grandchild), 10)


def test_no_descendant_survives_daemon_stop(tmp_path):
    """After SIGTERM no process started by the daemon, nor any descendant, is alive."""
    pidfile = tmp_path / "grandchild.pid"
    agents = {
        "leaky": always(ORPHAN_MAKER, env={"PIDFILE": str(pidfile)}),
        "stubborn": always(STUBBORN),
    }
    d = DaemonProc(tmp_path, agents, stop_grace_s=1).start()
    d.wait_event("agent_output", agent="leaky")
    d.wait_event("agent_output", agent="stubborn", line="ready")
    tree = psutil.Process(d.proc.pid).children(recursive=True)
    assert len(tree) >= 3
    assert d.stop() == 0
    wait_until(lambda: not any(alive(p.pid) for p in tree), 5,
               message=f"survivors: {[p.pid for p in tree if alive(p.pid)]}")
    d.wait_event("daemon_stopped", exit_code=0)


def test_second_stop_signal_skips_to_sigkill(tmp_path):
    """A second SIGTERM during the grace period kills at once and says so."""
    agents = {"stubborn": always(STUBBORN)}
    d = DaemonProc(tmp_path, agents, stop_grace_s=60).start()
    d.wait_event("agent_output", agent="stubborn", line="ready")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    d.wait_event("daemon_stopping")
    d.signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert time.monotonic() - t0 < 30
    d.wait_event("daemon_stop_forced")


def test_crash_loop_puts_agent_in_failed_state_with_cooldown(tmp_path):
    """K consecutive failures put an always agent in `failed`, then it retries later."""
    spec = always("import sys; sys.exit(3)",
                  retries={"backoff_s": 0.05, "backoff_max_s": 0.1, "jitter": 0})
    settings = {"crash_loop": {"failures": 3, "cooldown_s": 1, "cooldown_max_s": 5}}
    with DaemonProc(tmp_path, {"crashy": spec}, **settings).start() as d:
        d.wait_event("agent_crash_loop", agent="crashy", timeout_s=10)
        status = d.call("status")["agents"][0]
        assert status["state"] == "failed" and status["last_exit"] == "exit 3"
        d.wait_event("agent_state", agent="crashy", old="failed", new="idle", timeout_s=5)
        d.wait_event("agent_crash_loop", agent="crashy", count=2, timeout_s=10)
        second = d.find("agent_crash_loop", agent="crashy")[1]
        assert second["cooldown_s"] == 2.0  # doubled


def test_retries_with_backoff_then_give_up(tmp_path):
    """A failing scheduled run is retried max_attempts times, then waits for its next firing."""
    spec = every(60, "import sys; sys.exit(1)",
                 retries={"max_attempts": 2, "backoff_s": 0.05, "jitter": 0})
    with DaemonProc(tmp_path, {"flaky": spec}).start() as d:
        d.call("start-now", agent="flaky")
        d.wait_event("run_finished", agent="flaky", count=3)
        d.wait_event("agent_state", agent="flaky", new="idle")
        attempts = [e["attempt"] for e in d.find("run_started", agent="flaky")]
        assert attempts == [0, 1, 2]


def test_always_agent_restarts_at_once_after_healthy_run(tmp_path):
    """An always agent that exits after a healthy run is restarted without backoff."""
    spec = always("import time; time.sleep(0.3)")
    spec["healthy_after_s"] = 0.2
    with DaemonProc(tmp_path, {"svc": spec}).start() as d:
        d.wait_event("run_started", agent="svc", count=3, timeout_s=10)
        assert not d.find("agent_state", agent="svc", new="backoff")


def test_after_schedule_runs_downstream_on_success(tmp_path):
    """A job with `after: [up]` runs when a run of `up` succeeds."""
    agents = {"up": every(60, "print('up')"),
              "down": {"jobs": [{"id": "d", "command": py("pass"),
                                 "schedule": {"after": ["up"]}}]}}
    with DaemonProc(tmp_path, agents).start() as d:
        d.call("start-now", agent="up")
        ev = d.wait_event("run_started", agent="down")
        assert ev["trigger"] == "after:up"


def test_catch_up_runs_once_for_missed_firings(tmp_path):
    """A catch_up job whose firings were missed while the daemon was down runs once at start."""
    spec = {"jobs": [{"id": "daily", "command": py("pass"), "catch_up": True,
                      "schedule": {"cron": "0 3 * * *"}}]}
    d = DaemonProc(tmp_path, {"nightly": spec})
    d.state_dir.mkdir(parents=True)
    from supervisor.storage.store import Store
    store = Store(d.state_dir / "state.db")
    store.record_fire("nightly", "daily", time.time() - 3 * 86400)  # three slots missed
    store.close()
    with d.start():
        d.wait_event("run_finished", agent="nightly")
        assert len(d.find("catch_up_firing", agent="nightly")) == 1
        assert len(d.find("run_started", agent="nightly")) == 1


def test_flooding_child_does_not_grow_daemon_memory(tmp_path):
    """A child writing 100 MB without newlines leaves the daemon's memory bounded."""
    code = "import sys; [sys.stdout.write('x' * 1048576) for _ in range(100)]"
    with DaemonProc(tmp_path, {"flood": every(60, code)}).start() as d:
        before = psutil.Process(d.proc.pid).memory_info().rss
        d.call("start-now", agent="flood")
        d.wait_event("run_finished", agent="flood", timeout_s=60)
        after = psutil.Process(d.proc.pid).memory_info().rss
        line = d.find("agent_output", agent="flood")[0]["line"]
        assert line.endswith("…[truncated]") and len(line) < 10000
        assert after - before < 30 * 1024 * 1024


def test_output_flood_is_rate_limited_with_a_summary(tmp_path):
    """Lines past log_lines_per_s are not logged one by one but summarised."""
    code = "import time\nfor i in range(3000): print(i)\ntime.sleep(1.2)\nprint('end')"
    with DaemonProc(tmp_path, {"chatty": every(60, code)}, log_lines_per_s=100).start() as d:
        d.call("start-now", agent="chatty")
        d.wait_event("run_finished", agent="chatty", timeout_s=20)
        ev = d.wait_event("agent_output_suppressed", agent="chatty")
        assert ev["lines"] == 2900
        assert len(d.find("agent_output", agent="chatty")) == 101


def _cgroup_v2_writable() -> bool:
    from supervisor.kernel.cgroups import V2_MOUNTS

    return os.geteuid() == 0 and any(os.access(m / "cgroup.procs", os.W_OK) for m in V2_MOUNTS
                                     if (m / "cgroup.controllers").exists())


def _cgroup_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return f.read().splitlines()[-1]
    except OSError:
        return ""


def test_runs_get_their_own_cgroup_and_leftovers_die_with_it(tmp_path):
    """With cgroups on, each run lives in STATE's runs/<run_id> cgroup, and a grandchild that
    ignores SIGTERM in a session of its own is killed through cgroup.kill."""
    from support import require

    require(_cgroup_v2_writable(), "needs root and a writable cgroup v2 hierarchy")
    pidfile = tmp_path / "grandchild.pid"
    # The grandchild writes the pid file itself, once it ignores SIGTERM.
    code = ("import os, subprocess, sys, time\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import os, signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "open(os.environ[\"PIDFILE\"], \"w\").write(str(os.getpid())); time.sleep(300)'], "
            "start_new_session=True)\n"
            "time.sleep(300)\n")
    spec = every(60, code, env={"PIDFILE": str(pidfile)}, stop_grace_s=0.5)
    with DaemonProc(tmp_path, {"cg": spec}, cgroups="on").start() as d:
        cgroup_base = d.find("daemon_started")[0]["cgroups"]
        assert cgroup_base
        run_id = d.call("start-now", agent="cg")["run_id"]
        pid = d.call("status")["agents"][0]["pid"]
        # The daemon moves the child right after the fork, so the child's first instructions
        # may still run in the daemon's own cgroup: look from outside, with a deadline.
        wait_until(lambda: _cgroup_of(pid).endswith(f"/runs/{run_id}"), 10,
                   message=f"run {pid} never in runs/{run_id}")
        grandchild = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), 10))
        os.kill(d.call("status")["agents"][0]["pid"], signal.SIGKILL)
        d.wait_event("run_leftovers_killed", run_id=run_id, timeout_s=15)
        wait_until(lambda: not alive(grandchild), 10, message="grandchild survived")
    assert not os.path.exists(cgroup_base)
