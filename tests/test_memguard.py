"""Memory guard: pressure levels, ownership, orphan kills and run stops, scripted and real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import psutil
import pytest
from structlog.testing import capture_logs
from support import require, wait_until

from supervisor.health.memguard import (
    AgentMemorySettings,
    Level,
    MemoryCause,
    MemoryGuard,
    MemoryGuardSettings,
    MemoryPriority,
    StopRun,
    Unrelieved,
    next_level,
)
from supervisor.kernel.lineage import tree_of
from supervisor.kernel.procscan import (
    HostMemorySource,
    LiveRun,
    Owner,
    ProcInfo,
    SystemMemory,
    chrome_role,
    classify,
)

DAEMON = 100
STATE = "/var/lib/wk"
CHROME = "/usr/lib/chromium/chromium"


# ---------------------------------------------------------------------------------------------
# Scripted sources


class ScriptedSource:
    """A memory source whose numbers the test sets: percent used, a process table, PSS."""

    def __init__(self, percent: float = 50.0, table: dict[int, ProcInfo] | None = None) -> None:
        self.percent = percent
        self.table = dict(table or {})
        self.pss: dict[int, float] = {}
        self.cgroups: dict[str, float] = {}
        self.precise_calls = 0

    def system(self) -> SystemMemory:
        return SystemMemory(total_mb=1000.0, available_mb=1000.0 * (1 - self.percent / 100))

    def process_table(self, under_pid=None):
        if under_pid is None:
            return dict(self.table)
        keep = tree_of({p: i.ppid for p, i in self.table.items()}, under_pid)
        return {p: i for p, i in self.table.items() if p in keep}

    def precise_mb(self, pids):
        self.precise_calls += 1
        return sum(self.pss.get(p, self.table[p].rss_mb) for p in pids if p in self.table)

    def cgroup_mb(self, cgroup):
        return self.cgroups.get(cgroup)


class FakeSignaller:
    """Records signals; a process dies on the signals listed in `dies_on`."""

    def __init__(self, source: ScriptedSource, dies_on=(signal.SIGTERM, signal.SIGKILL)):
        self.source = source
        self.dies_on = dies_on
        self.sent: list[tuple[int, int]] = []

    def signal(self, pid, create_time, sig):
        if pid not in self.source.table:
            return False
        self.sent.append((pid, sig))
        if sig in self.dies_on:
            del self.source.table[pid]
        return True

    def alive(self, pid, create_time):
        return pid in self.source.table


def proc(pid, ppid, *args, rss=10.0, run=None, state=None, name=None):
    cmd = tuple(args) or ("sleep", "1000")
    return ProcInfo(pid=pid, ppid=ppid, name=name or os.path.basename(cmd[0])[:15], cmdline=cmd,
                    create_time=1.0, rss_mb=rss, run_id=run, state_dir=state)


def chrome_tree(browser, parent, run, rss=50.0):
    """A browser with a zygote and renderer whose environ Chrome has overwritten."""
    return {
        browser: proc(browser, parent, CHROME, "--headless", run=run, state=run and STATE,
                      rss=rss),
        browser + 1: proc(browser + 1, browser, CHROME, "--type=zygote", rss=rss),
        browser + 2: proc(browser + 2, browser + 1, CHROME, "--type=renderer", rss=rss),
    }


def base_table():
    """Daemon 100; live run "b" (root 200) with Chrome 210; dead run "a"'s Chrome 310 reparented
    to the daemon; a foreign Chrome 410 under init; a foreign marked leftover 510 under init."""
    t = {1: proc(1, 0, "/sbin/init"), DAEMON: proc(DAEMON, 1, "watchkeeper", "run")}
    t[200] = proc(200, DAEMON, "python", "agent_b.py", run="b", state=STATE)
    t.update(chrome_tree(210, 200, "b"))
    t.update(chrome_tree(310, DAEMON, "a"))
    t.update(chrome_tree(410, 1, None))
    t.update(chrome_tree(510, 1, "other-run"))
    t[510] = msgspec.structs.replace(t[510], state_dir="/var/lib/other")
    return t


LIVE_B = {"b": LiveRun("agent-b", 200)}


def settings(**kw):
    return MemoryGuardSettings(**kw)


def make_guard(source, *, live=None, agents=None, **kw):
    agents = agents or {}
    live = LIVE_B if live is None else live
    sig = FakeSignaller(source)
    guard = MemoryGuard(settings(**kw), daemon_pid=DAEMON, state_dir=STATE,
                        live_runs=lambda: live,
                        agent_settings=lambda a: agents.get(a, AgentMemorySettings()),
                        source=source, signaller=sig)
    return guard, sig


# ---------------------------------------------------------------------------------------------
# Settings, levels, intervals


def test_settings_defaults_suit_a_small_vps():
    """The defaults are warn 80 %, act 87 %, clear 75 %, 10 s / 0.25 s intervals planned for
    a 1000 MB/s climb, 2 s grace."""
    s = msgspec.convert({}, MemoryGuardSettings)
    assert (s.warn_percent, s.act_percent, s.clear_percent) == (80, 87, 75)
    assert (s.slow_interval_s, s.fast_interval_s, s.kill_grace_s) == (10, 0.25, 2)
    assert s.fill_rate_mb_s == 1000
    assert s.include_foreign is False


def test_settings_reject_unknown_keys():
    """Unknown keys are rejected naming the key (disordered percents: the loader's relations,
    tests/test_config.py)."""
    with pytest.raises(msgspec.ValidationError, match="act_precent"):
        msgspec.convert({"act_precent": 90}, MemoryGuardSettings)
    assert msgspec.convert({"memory_priority": "low"}, AgentMemorySettings).memory_priority \
        is MemoryPriority.LOW


def test_system_reading_comes_from_the_guards_own_source():
    """system_reading returns the reading of the source the guard was built with."""
    source = ScriptedSource(percent=83.0)
    guard, _ = make_guard(source)
    assert round(guard.system_reading().percent_used, 1) == 83.0
    source.percent = 41.0
    assert round(guard.system_reading().percent_used, 1) == 41.0


def test_levels_hold_until_below_clear():
    """Once critical, the level stays critical down to clear_percent and then drops to normal."""
    s = settings()
    level, seen = Level.NORMAL, []
    for pct in [50, 79, 80, 86, 87, 80, 76, 75, 74.9, 80, 78, 74]:
        level = next_level(level, pct, s)
        seen.append(level)
    N, W, C = Level.NORMAL, Level.WARNING, Level.CRITICAL
    assert seen == [N, N, W, W, C, C, C, C, N, W, W, N]


def test_interval_is_slow_when_plentiful_and_fast_near_threshold():
    """Below warn_percent the next reading comes when a climb at fill_rate_mb_s could first
    reach it (kept between the two intervals); at 82 % it is fast_interval_s away."""
    source = ScriptedSource(50)  # of 1000 MB: 300 MB below warn_percent
    guard, _ = make_guard(source, slow_interval_s=5, fill_rate_mb_s=100)
    guard.tick(1000.0)
    assert guard.next_tick_at == pytest.approx(1003.0)
    source.percent = 10  # 700 MB of headroom: 7 s at 100 MB/s, capped at slow_interval_s
    guard.tick(1003.0)
    assert guard.next_tick_at == pytest.approx(1008.0)
    source.percent = 79.99  # almost no headroom: never below fast_interval_s
    guard.tick(1008.0)
    assert guard.next_tick_at == pytest.approx(1008.25) and guard.level is Level.NORMAL
    source.percent = 82
    guard.tick(1008.25)
    assert guard.next_tick_at == pytest.approx(1008.5) and guard.level is Level.WARNING


def test_a_climb_at_the_planned_rate_is_caught_at_warn_percent():
    """Memory climbing at fill_rate_mb_s from 10 % is read again before it passes
    warn_percent by more than one fast interval's worth of climb."""
    rate = 50.0  # MB/s, of 1000 MB
    source = ScriptedSource(10)
    guard, _ = make_guard(source, slow_interval_s=5, fill_rate_mb_s=rate)
    now, start = 0.0, 0.0
    while guard.level is Level.NORMAL:
        now = guard.next_tick_at
        source.percent = 10 + (now - start) * rate / 10  # MB/s -> percent of 1000 MB
        guard.tick(now)
    assert source.percent < 80 + guard.settings.fast_interval_s * rate / 10 + 1e-9


def test_level_changes_are_logged_once_each():
    """Crossing into warning and back logs one event per change, not one per tick."""
    source = ScriptedSource(82)
    guard, _ = make_guard(source)
    with capture_logs() as logs:
        for t in range(5):
            guard.tick(float(t))
        source.percent = 60
        for t in range(5, 10):
            guard.tick(float(t))
    assert [(e["event"], e["memory_level"], e["log_level"]) for e in logs] == [
        ("memory_level_changed", "warning", "warning"),
        ("memory_level_changed", "normal", "info")]


# ---------------------------------------------------------------------------------------------
# Ownership on scripted tables


def test_classify_scripted_table():
    """Live run trees are RUN, a dead run's reparented Chrome is ORPHAN, strangers are FOREIGN."""
    own = classify(base_table(), daemon_pid=DAEMON, state_dir=STATE, live_runs=LIVE_B)
    assert own[DAEMON].owner is Owner.DAEMON
    assert {own[p] for p in (200, 210, 211, 212)} == {(Owner.RUN, "b")}
    assert {own[p] for p in (310, 311, 312)} == {(Owner.ORPHAN, "a")}
    assert {own[p].owner for p in (1, 410, 411, 412, 510, 511, 512)} == {Owner.FOREIGN}


def test_classify_zygote_inherits_run_through_overwritten_environ():
    """A renderer without markers belongs to the run marked on its browser ancestor."""
    own = classify(base_table(), daemon_pid=DAEMON, state_dir=STATE, live_runs=LIVE_B)
    assert own[212] == (Owner.RUN, "b")


def test_classify_reparented_unmarked_process_is_orphan():
    """A zygote whose browser died, reparented to the daemon with no marker, is an orphan."""
    t = base_table()
    del t[210]
    t[211] = msgspec.structs.replace(t[211], ppid=DAEMON)
    own = classify(t, daemon_pid=DAEMON, state_dir=STATE, live_runs=LIVE_B)
    assert own[211] == (Owner.ORPHAN, None) and own[212] == (Owner.ORPHAN, None)


def test_classify_leftover_of_previous_daemon_by_state_dir():
    """A process under init carrying our state dir (a previous daemon's run) is an orphan."""
    t = base_table()
    t.update(chrome_tree(610, 1, "old-run"))
    own = classify(t, daemon_pid=DAEMON, state_dir=STATE + "/", live_runs=LIVE_B)
    assert {own[p] for p in (610, 611, 612)} == {(Owner.ORPHAN, "old-run")}


def test_classify_run_by_root_pid_without_markers():
    """A process below a live run's root pid belongs to that run even without any marker."""
    t = {DAEMON: proc(DAEMON, 1), 700: proc(700, DAEMON), 701: proc(701, 700)}
    own = classify(t, daemon_pid=DAEMON, state_dir=STATE, live_runs={"r": LiveRun("x", 700)})
    assert own[701] == (Owner.RUN, "r")


def test_include_foreign_adopts_only_marked_leftovers_under_init():
    """include_foreign makes another watchkeeper's reparented run an orphan, never plain Chrome."""
    own = classify(base_table(), daemon_pid=DAEMON, state_dir=STATE, live_runs=LIVE_B,
                   include_foreign=True)
    assert {own[p] for p in (510, 511, 512)} == {(Owner.ORPHAN, "other-run")}
    assert {own[p].owner for p in (410, 411, 412)} == {Owner.FOREIGN}


def test_classify_survives_a_parent_cycle():
    """A table with a ppid cycle (a pid reused mid-scan) classifies without looping."""
    t = {5: proc(5, 6), 6: proc(6, 5)}
    assert set(classify(t, daemon_pid=DAEMON, state_dir=STATE, live_runs={})) == {5, 6}


@pytest.mark.parametrize("cmd, role", [
    ((CHROME, "--type=renderer", "--lang=en"), "renderer"),
    ((CHROME + " --type=gpu-process --x",), "gpu-process"),
    ((CHROME, "--headless", "http://x/"), "browser"),
    (("/usr/lib/chromium/chrome_crashpad_handler", "--monitor-self"), "crashpad-handler"),
    (("/opt/headless_shell", "--type=zygote"), "zygote"),
    (("python", "chromium_notes.txt"), None),
])
def test_chrome_role(cmd, role):
    """Chrome roles come from --type; no --type is the browser; other programs are not Chrome."""
    info = ProcInfo(pid=1, ppid=0, name=os.path.basename(cmd[0])[:15], cmdline=cmd)
    assert chrome_role(info, ("chrome", "chromium", "headless_shell")) == role


# ---------------------------------------------------------------------------------------------
# Decisions with scripted sources


def test_below_act_nothing_is_killed():
    """At 86 % (warning) no orphan is signalled and no action is returned."""
    source = ScriptedSource(86, base_table())
    guard, sig = make_guard(source)
    assert guard.tick(0.0) == [] and sig.sent == []


def test_over_act_kills_only_orphaned_chrome_and_logs_each():
    """Over act_percent the dead run's Chrome gets SIGTERM, one log event per process freed."""
    source = ScriptedSource(90, base_table())
    guard, sig = make_guard(source)
    with capture_logs() as logs:
        assert guard.tick(0.0) == []
        guard.tick(guard.next_tick_at)
    assert sorted(sig.sent) == [(310, signal.SIGTERM), (311, signal.SIGTERM),
                                (312, signal.SIGTERM)]
    killed = [e for e in logs if e["event"] == "orphan_killed"]
    assert sorted(e["pid"] for e in killed) == [310, 311, 312]
    assert killed[0]["rss_freed_mb"] == 50.0 and killed[0]["reason"] == "memory_pressure"
    assert killed[0]["cmdline"].startswith(CHROME) and killed[0]["signal"] == "SIGTERM"


def test_sigterm_then_sigkill_after_grace_without_blocking():
    """An orphan ignoring SIGTERM gets SIGKILL on the first tick after kill_grace_s."""
    source = ScriptedSource(90, base_table())
    guard, sig = make_guard(source, kill_grace_s=2.0)
    sig.dies_on = (signal.SIGKILL,)
    guard.tick(0.0)
    assert guard.next_tick_at == 0.25 and guard.kills_in_flight == 3
    guard.tick(1.9)
    assert signal.SIGKILL not in {s for _, s in sig.sent}
    with capture_logs() as logs:
        guard.tick(2.0)
        guard.tick(2.25)
    assert sorted(p for p, s in sig.sent if s == signal.SIGKILL) == [310, 311, 312]
    assert {e["signal"] for e in logs if e["event"] == "orphan_killed"} == {"SIGKILL"}


def test_escalates_to_largest_low_priority_run_then_alerts_once():
    """With no orphans left, the largest low-priority run is stopped, then one alert follows."""
    t = base_table()
    t[220] = proc(220, DAEMON, "python", "small.py", run="c", state=STATE, rss=5)
    source = ScriptedSource(95, t)
    live = {"b": LiveRun("agent-b", 200), "c": LiveRun("agent-c", 220), "n": LiveRun("n", 1)}
    agents = {"agent-b": AgentMemorySettings(memory_priority=MemoryPriority.LOW),
              "agent-c": AgentMemorySettings(memory_priority=MemoryPriority.LOW)}
    guard, _ = make_guard(source, live=live, agents=agents, stop_wait_s=10)
    guard.tick(0.0)  # orphans of "a"; memory is read again once they are gone
    actions = guard.tick(0.25)
    assert actions == [StopRun(run_id="b", agent="agent-b", reason=MemoryCause.MEMORY_PRESSURE,
                               memory_mb=160.0)]
    assert guard.tick(0.75) == []  # waiting for the daemon to stop "b"
    del live["b"]  # the daemon stopped run "b" and its whole tree
    for pid in (200, 210, 211, 212):
        del source.table[pid]
    assert [a.run_id for a in guard.tick(1.0)] == ["c"]
    del live["c"]
    first = guard.tick(1.25)
    assert len(first) == 1 and isinstance(first[0], Unrelieved)
    assert all(guard.tick(1.5 + i) == [] for i in range(10))


def test_between_clear_and_act_does_not_escalate():
    """At 80 % after a critical episode the level stays critical but nothing more is stopped."""
    source = ScriptedSource(95, base_table())
    agents = {"agent-b": AgentMemorySettings(memory_priority=MemoryPriority.LOW)}
    guard, sig = make_guard(source, agents=agents)
    guard.tick(0.0)
    source.percent = 80
    assert [guard.tick(t) for t in (1.0, 2.0, 3.0)] == [[], [], []]
    assert guard.level is Level.CRITICAL


def test_memory_max_uses_pss_only_when_rss_exceeds():
    """A run under its limit by RSS costs no PSS reading; one over by RSS but not PSS is kept."""
    source = ScriptedSource(30, base_table())
    agents = {"agent-b": AgentMemorySettings(memory_max_mb=1000)}
    guard, _ = make_guard(source, agents=agents)
    assert guard.tick(0.0) == [] and source.precise_calls == 0
    agents["agent-b"] = AgentMemorySettings(memory_max_mb=100)
    source.pss = {210: 20, 211: 20, 212: 20}
    assert guard.tick(10.0) == [] and source.precise_calls == 1


def test_memory_max_exceeded_stops_run_with_reason_memory():
    """A run whose tree PSS exceeds memory_max_mb gets a StopRun with reason memory, once."""
    source = ScriptedSource(30, base_table())
    agents = {"agent-b": AgentMemorySettings(memory_max_mb=100)}
    guard, _ = make_guard(source, agents=agents)
    with capture_logs() as logs:
        actions = guard.tick(0.0)
    assert actions == [StopRun(run_id="b", agent="agent-b", reason=MemoryCause.MEMORY,
                               memory_mb=160.0, limit_mb=100)]
    assert logs[0]["event"] == "run_stop_requested" and logs[0]["reason"] == "memory"
    assert guard.tick(10.0) == []


def test_memory_max_reads_run_cgroup_when_given():
    """A run with a cgroup is measured by the cgroup's usage, not its process tree."""
    source = ScriptedSource(30, base_table())
    source.cgroups["/cg/b"] = 500.0
    agents = {"agent-b": AgentMemorySettings(memory_max_mb=400)}
    guard, _ = make_guard(source, live={"b": LiveRun("agent-b", 200, "/cg/b")}, agents=agents)
    assert [(a.reason, a.memory_mb) for a in guard.tick(0.0)] == [(MemoryCause.MEMORY, 500.0)]


def test_run_checks_follow_their_own_interval():
    """Per-run limit checks happen at most every run_check_interval_s even at fast ticks."""
    source = ScriptedSource(82, base_table())
    agents = {"agent-b": AgentMemorySettings(memory_max_mb=1)}
    live = dict(LIVE_B)
    guard, _ = make_guard(source, live=live, agents=agents, run_check_interval_s=5)
    guard.tick(0.0)
    live["b2"] = LiveRun("agent-b", 200)
    assert guard.tick(0.25) == [] and [a.run_id for a in guard.tick(5.0)] == ["b2"]


# ---------------------------------------------------------------------------------------------
# Real processes

DAEMON_HELPER = textwrap.dedent("""
    # A stand-in daemon: a child subreaper that spawns runs on request and reaps everything.
    import ctypes, json, os, subprocess, sys, threading, time
    PR_SET_CHILD_SUBREAPER = 36
    assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0

    def reap():
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.02)

    threading.Thread(target=reap, daemon=True).start()
    for line in sys.stdin:
        req = json.loads(line)
        env = dict(os.environ, **req["env"])
        out = open(req["out"], "w") if req["out"] else None
        p = subprocess.Popen(req["argv"], env=env, start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=out)
        print(json.dumps({"pid": p.pid}), flush=True)
""")

# A run that starts a child of its own (the future orphan), reports it, then waits forever.
RUN_WITH_CHILD = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen(sys.argv[1:])
    print(child.pid, flush=True)
    while True:
        time.sleep(60)
""")


class FakeDaemon:
    """Drives DAEMON_HELPER: `spawn` starts a run as the helper's child, in its own session."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = str(state_dir)
        self.proc = subprocess.Popen([sys.executable, "-c", DAEMON_HELPER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid

    def spawn(self, run_id: str, agent: str, argv: list[str], out: Path | None = None) -> int:
        env = {"WATCHKEEPER_RUN_ID": run_id, "WATCHKEEPER_AGENT": agent,
               "WATCHKEEPER_STATE_DIR": self.state_dir}
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "out": out and str(out)}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["pid"]

    def close(self) -> None:
        for child in psutil.Process(self.pid).children(recursive=True):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass  # Chrome's helpers exit by themselves once the browser is gone
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def fake_daemon(tmp_path):
    daemon = FakeDaemon(tmp_path / "state")
    yield daemon
    daemon.close()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def drive(guard: MemoryGuard, until, timeout_s: float = 15.0) -> list:
    """Tick the guard on its own schedule, as the daemon loop would, until `until(actions)`."""
    actions = []

    def step():
        now = time.monotonic()
        if now >= guard.next_tick_at:
            actions.extend(guard.tick(now))
        return until(actions)

    wait_until(step, timeout_s, interval_s=0.01)
    return actions


def real_guard(daemon_pid, state_dir, live, agents=None, **kw):
    agents = agents or {}
    return MemoryGuard(settings(**kw), daemon_pid=daemon_pid, state_dir=str(state_dir),
                       live_runs=lambda: live,
                       agent_settings=lambda a: agents.get(a, AgentMemorySettings()))


ALWAYS_ACT = {"clear_percent": 0, "warn_percent": 0, "act_percent": 0}


def first_line(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def test_real_orphan_is_killed_and_live_run_survives(fake_daemon, tmp_path):
    """A real grandchild orphaned by its run's death is killed; a live run's grandchild lives."""
    fake_renderer = [sys.executable, "-c", "import time; time.sleep(600)", "--type=renderer"]
    outs = {}
    for run in ("a", "b"):
        out = tmp_path / f"{run}.out"
        root = fake_daemon.spawn(run, f"agent-{run}",
                                 [sys.executable, "-c", RUN_WITH_CHILD, *fake_renderer], out)
        outs[run] = (root, int(wait_until(partial(first_line, out), 10)))
    (root_a, orphan), (root_b, survivor) = outs["a"], outs["b"]
    os.kill(root_a, signal.SIGKILL)
    wait_until(lambda: psutil.Process(orphan).ppid() == fake_daemon.pid, 10,
               message="orphan reparented to the subreaper")
    guard = real_guard(fake_daemon.pid, fake_daemon.state_dir,
                       {"b": LiveRun("agent-b", root_b)}, chrome_names=("python",),
                       **ALWAYS_ACT)
    with capture_logs() as logs:
        drive(guard, lambda _: gone(orphan) and guard.kills_in_flight == 0)
    assert not gone(survivor) and not gone(root_b)
    killed = [e for e in logs if e["event"] == "orphan_killed"]
    assert [(e["pid"], e["run_id"]) for e in killed] == [(orphan, "a")]


PAGE = "<html><body><h1>watchkeeper</h1><script>let a=[];for(let i=0;i<1e5;i++)a.push(i)" \
       "</script></body></html>"

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def page_url(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(PAGE)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def chrome_pids_of(user_data_dir: Path) -> set[int]:
    """Chrome processes whose command line names this profile (crashpad names no profile)."""
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if str(user_data_dir) in cmd and p.status() != psutil.STATUS_ZOMBIE:
            found.add(p.pid)
    return found


def start_chrome_run(daemon: FakeDaemon, tmp_path: Path, run: str, url: str):
    profile = tmp_path / f"profile-{run}"
    out = tmp_path / f"{run}.out"
    argv = ["/usr/bin/chromium", *CHROME_FLAGS, f"--user-data-dir={profile}", url]
    root = daemon.spawn(run, f"agent-{run}", [sys.executable, "-c", RUN_WITH_CHILD, *argv], out)
    browser = int(wait_until(partial(first_line, out), 10))

    def has_renderer():
        return any("--type=renderer" in " ".join(psutil.Process(p).cmdline())
                   for p in chrome_pids_of(profile) if not gone(p))

    wait_until(has_renderer, 30, message=f"chrome of run {run} has a renderer")
    return root, browser, profile


def test_real_chromium_orphans_killed_live_run_chrome_spared(fake_daemon, tmp_path, page_url):
    """After agent A dies, every orphaned Chrome process of A is killed and none of live B's."""
    require(os.access("/usr/bin/chromium", os.X_OK), "chromium not installed at /usr/bin/chromium")
    root_a, browser_a, profile_a = start_chrome_run(fake_daemon, tmp_path, "a", page_url)
    root_b, browser_b, profile_b = start_chrome_run(fake_daemon, tmp_path, "b", page_url)
    os.kill(root_a, signal.SIGKILL)
    wait_until(lambda: psutil.Process(browser_a).ppid() == fake_daemon.pid, 10)
    chrome_a, chrome_b = chrome_pids_of(profile_a), chrome_pids_of(profile_b)
    assert len(chrome_a) >= 3 and len(chrome_b) >= 3
    guard = real_guard(fake_daemon.pid, fake_daemon.state_dir,
                       {"b": LiveRun("agent-b", root_b)}, **ALWAYS_ACT)
    with capture_logs() as logs:
        actions = drive(guard, lambda _: all(gone(p) for p in chrome_a)
                        and guard.kills_in_flight == 0)
    assert not any(gone(p) for p in chrome_b), "a live run's Chrome was killed"
    killed = {e["pid"] for e in logs if e["event"] == "orphan_killed"}
    assert browser_a in killed and killed.isdisjoint(chrome_b)
    assert {e["run_id"] for e in logs if e["event"] == "orphan_killed"} == {"a"}
    assert all(isinstance(a, Unrelieved) for a in actions)  # nothing low-priority left to stop


HOG = textwrap.dedent("""
    # Allocates step_mb every 20 ms (touching each page) until max_mb, then waits to be stopped.
    import sys, time
    step_mb, max_mb = int(sys.argv[1]), int(sys.argv[2])
    sys.stdin.readline()
    hoard = []
    while len(hoard) * step_mb < max_mb:
        hoard.append(b"x" * (step_mb << 20))
        time.sleep(0.02)
    while True:
        time.sleep(60)
""")


def start_hog(run_id: str, step_mb: int, max_mb: int, state_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, WATCHKEEPER_RUN_ID=run_id, WATCHKEEPER_AGENT=f"agent-{run_id}",
               WATCHKEEPER_STATE_DIR=str(state_dir))
    return subprocess.Popen([sys.executable, "-c", HOG, str(step_mb), str(max_mb)], env=env,
                            stdin=subprocess.PIPE, text=True, start_new_session=True)


def test_real_memory_hog_over_its_max_gets_stop_action(tmp_path):
    """A real process growing past its agent's memory_max_mb yields StopRun reason memory."""
    hog = start_hog("hog", 10, 400, tmp_path)
    calm = start_hog("calm", 1, 5, tmp_path)
    try:
        for p in (hog, calm):
            p.stdin.write("go\n")
            p.stdin.flush()
        live = {"hog": LiveRun("agent-hog", hog.pid), "calm": LiveRun("agent-calm", calm.pid)}
        agents = {"agent-hog": AgentMemorySettings(memory_max_mb=120),
                  "agent-calm": AgentMemorySettings(memory_max_mb=120)}
        guard = real_guard(os.getpid(), tmp_path, live, agents, run_check_interval_s=0.1)
        actions = drive(guard, lambda acts: any(isinstance(a, StopRun) for a in acts))
    finally:
        hog.kill()
        calm.kill()
        hog.wait()
        calm.wait()
    [stop] = actions
    assert (stop.run_id, stop.reason, stop.limit_mb) == ("hog", MemoryCause.MEMORY, 120)
    assert 120 < stop.memory_mb < 400



def own_memory_cgroup() -> tuple[Path, str] | None:
    """Our memory cgroup directory and its version, where we may create child cgroups."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if hierarchy == "0":
            for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                control = mount / rel / "cgroup.subtree_control"
                if control.exists() and "memory" in control.read_text().split():
                    return mount / rel, "v2"
        elif "memory" in controllers.split(","):
            path = Path("/sys/fs/cgroup/memory") / rel
            if path.is_dir():
                return path, "v1"
    return None


@pytest.fixture
def small_cgroup():
    """A child memory cgroup limited to 256 MB, removed afterwards."""
    found = own_memory_cgroup()
    require(found is not None and os.access(found[0], os.W_OK),
            "no writable memory cgroup (need cgroup v1 memory or v2 with memory delegated)")
    parent, version = found
    path = parent / f"wk-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
        limit_file = "memory.max" if version == "v2" else "memory.limit_in_bytes"
        (path / limit_file).write_text(str(256 << 20))
    except OSError as err:
        require(False, f"cannot create a limited memory cgroup under {parent}: {err}")
    yield path, version
    wait_until(lambda: not (path / "cgroup.procs").read_text().strip(), 10)
    path.rmdir()


def oom_kills(path: Path, version: str) -> int:
    text = (path / ("memory.events" if version == "v2" else "memory.oom_control")).read_text()
    counts = dict(line.split() for line in text.splitlines())
    return int(counts.get("oom_kill", 0))


def test_real_pressure_in_cgroup_stops_low_priority_run_before_oom(small_cgroup, tmp_path):
    """A low-priority run filling a 256 MB cgroup is asked to stop before the OOM killer acts."""
    path, version = small_cgroup
    hog = start_hog("hog", 1, 1000, tmp_path)  # ~50 MB/s: the limit is ~5 s away
    try:
        (path / "cgroup.procs").write_text(str(hog.pid))
        hog.stdin.write("go\n")
        hog.stdin.flush()
        live = {"hog": LiveRun("agent-hog", hog.pid, str(path))}
        agents = {"agent-hog": AgentMemorySettings(memory_priority=MemoryPriority.LOW)}
        guard = real_guard(os.getpid(), tmp_path, live, agents, scope_cgroup=str(path),
                           clear_percent=50, warn_percent=60, slow_interval_s=0.5,
                           fast_interval_s=0.05)
        actions = drive(guard, lambda acts: acts, timeout_s=30)
        assert hog.poll() is None, "the OOM killer was faster than the guard"
        usage = HostMemorySource(str(path)).system().percent_used
    finally:
        hog.terminate()
        hog.wait()
    [stop] = actions
    assert (stop.run_id, stop.reason) == ("hog", MemoryCause.MEMORY_PRESSURE)
    assert 87 <= usage < 100 and 0.87 * 256 <= stop.memory_mb <= 256
    assert oom_kills(path, version) == 0
