"""Benchmark the memory guard: orphan kill latency with real Chromium, and idle CPU cost.

    python bench/orphan_kill.py [--quick]

1. Threshold crossing → orphaned Chrome gone. A stand-in daemon (child subreaper) runs agent A,
   which starts headless Chromium and is SIGKILLed, orphaning its browser, zygotes and
   renderers. The memory reading (of a simulated 4 GB VPS) then crosses act_percent, by a
   climb at a given rate or by a jump, at a known instant; the guard is ticked on its own
   schedule, as the daemon loop would. Measured from the crossing to the last orphan gone.
   Below warn_percent the guard samples as rarely as a climb at fill_rate_mb_s (default
   1000 MB/s) allows, up to slow_interval_s: a climb up to that rate is caught within the
   fast interval; a jump from normal level within slow_interval_s.
2. Idle cost: CPU seconds of N ticks with 5 live agent processes (with and without
   memory_max_mb), extrapolated to one hour; plus the cost of each kind of sample.

The memory reading of part 1 is scripted; bench/memguard_pressure.py measures the same kill
after a real allocation in a memory-limited cgroup, with the real daemon. Prints figures
only, each with the machine's total memory and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.machine import machine_line  # noqa: E402

from supervisor.health.memguard import (  # noqa: E402
    AgentMemorySettings,
    MemoryGuard,
    MemoryGuardSettings,
)
from supervisor.kernel.procscan import HostMemorySource, LiveRun, SystemMemory  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]

DAEMON_HELPER = """
import ctypes, json, os, subprocess, sys, threading, time
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
def reap():
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.02)
threading.Thread(target=reap, daemon=True).start()
for line in sys.stdin:
    req = json.loads(line)
    p = subprocess.Popen(req["argv"], env=dict(os.environ, **req["env"]), start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    child = p.stdout.readline().strip() if req["report_child"] else b"0"
    print(json.dumps({"pid": p.pid, "child": int(child)}), flush=True)
"""

RUN_WITH_CHILD = """
import subprocess, sys, time
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
while True:
    time.sleep(60)
"""


class Daemon:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.proc = subprocess.Popen([sys.executable, "-c", DAEMON_HELPER], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pid = self.proc.pid

    def spawn(self, run_id: str, argv: list[str], report_child: bool = False) -> tuple[int, int]:
        env = {"WATCHKEEPER_RUN_ID": run_id, "WATCHKEEPER_AGENT": f"agent-{run_id}",
               "WATCHKEEPER_STATE_DIR": self.state_dir}
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env,
                                          "report_child": report_child}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return reply["pid"], reply["child"]

    def close(self) -> None:
        for child in psutil.Process(self.pid).children(recursive=True):
            child.kill()
        self.proc.kill()
        self.proc.wait()


class SteppedSource(HostMemorySource):
    """The real source, except that machine-wide memory is set by the benchmark: a 4 GB VPS
    at `percent`, or climbing from `percent` at `climb_mb_s` once `climb_from` is set."""

    total_mb = 4096.0
    percent = 50.0
    climb_mb_s: float | None = None
    climb_from: float | None = None  # monotonic start of the climb

    def used_percent(self, now: float) -> float:
        if self.climb_mb_s is None or self.climb_from is None or now < self.climb_from:
            return self.percent
        climbed = (now - self.climb_from) * self.climb_mb_s / self.total_mb * 100
        return min(99.0, self.percent + climbed)

    def system(self) -> SystemMemory:
        used = self.used_percent(time.monotonic())
        return SystemMemory(total_mb=self.total_mb, available_mb=self.total_mb * (1 - used / 100))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def chrome_tree(browser: int) -> set[int]:
    try:
        return {browser} | {p.pid for p in psutil.Process(browser).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve_page(root: Path) -> str:
    (root / "index.html").write_text("<html><body><h1>bench</h1></body></html>")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/"


def wait_for(cond, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(str(cond))
        time.sleep(0.05)


def orphan_kill_once(tmp: Path, url: str, before_percent: float,
                     climb_mb_s: float | None = None) -> dict[str, float]:
    """Orphan a real Chromium, then cross act_percent: at once (a step) or by climbing at
    `climb_mb_s`; time from the crossing to the last orphan gone."""
    daemon = Daemon(str(tmp / "state"))
    try:
        profile = tmp / f"profile-{time.monotonic_ns()}"
        root, browser = daemon.spawn("a", [sys.executable, "-c", RUN_WITH_CHILD, CHROMIUM,
                                           *CHROME_FLAGS, f"--user-data-dir={profile}", url],
                                     report_child=True)

        def renderer_up():
            return any("--type=renderer" in " ".join(psutil.Process(p).cmdline())
                       for p in chrome_tree(browser) if alive(p))

        wait_for(renderer_up, 30)
        orphans = chrome_tree(browser)
        os.kill(root, signal.SIGKILL)
        wait_for(lambda: psutil.Process(browser).ppid() == daemon.pid, 10)
        settings = MemoryGuardSettings()
        source = SteppedSource()
        source.percent = before_percent
        guard = MemoryGuard(settings, daemon_pid=daemon.pid,
                            state_dir=daemon.state_dir, live_runs=dict,
                            agent_settings=lambda a: AgentMemorySettings(), source=source)
        # Start at a random phase of the guard's schedule, as a real spike would.
        start = time.monotonic() + 0.5 + random.uniform(0, settings.slow_interval_s)
        if climb_mb_s is None:
            crossed = start
        else:
            source.climb_mb_s, source.climb_from = climb_mb_s, start
            to_act_mb = (settings.act_percent - before_percent) / 100 * source.total_mb
            crossed = start + to_act_mb / climb_mb_s
        stepped = False
        first_act = gone = None
        while gone is None:
            now = time.monotonic()
            if climb_mb_s is None and not stepped and now >= start:
                source.percent, stepped = 95.0, True
            if now >= guard.next_tick_at:
                guard.tick(now)
                if now >= crossed and first_act is None and guard.kills_in_flight:
                    first_act = time.monotonic()
            if first_act is not None and not any(alive(p) for p in orphans):
                gone = time.monotonic()
            time.sleep(0.002)  # the benchmark's own polling, not the guard's
        while guard.kills_in_flight:  # let the guard confirm and log
            guard.tick(time.monotonic())
            time.sleep(0.01)
        return {"orphans": len(orphans), "detect_s": first_act - crossed,
                "kill_s": gone - first_act, "total_s": gone - crossed}
    finally:
        daemon.close()


def idle_cost(ticks: int, with_limits: bool, slow_interval_s: float) -> float:
    """CPU seconds per hour of the guard at idle (slow ticks) with 5 live agent processes."""
    agents = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                               env=dict(os.environ, WATCHKEEPER_RUN_ID=f"r{i}"))
              for i in range(5)]
    try:
        live = {f"r{i}": LiveRun(f"agent-{i}", p.pid) for i, p in enumerate(agents)}
        limit = AgentMemorySettings(memory_max_mb=500 if with_limits else None)
        settings = MemoryGuardSettings(slow_interval_s=slow_interval_s)
        guard = MemoryGuard(settings, daemon_pid=os.getpid(), state_dir="/nonexistent",
                            live_runs=lambda: live, agent_settings=lambda a: limit)
        now = 0.0
        start = time.process_time()
        for _ in range(ticks):
            guard.tick(now)
            now = guard.next_tick_at
        cpu_s = time.process_time() - start
        return cpu_s / now * 3600  # `now` is the simulated time those ticks cover
    finally:
        for p in agents:
            p.kill()
            p.wait()


def sample_costs(n: int) -> dict[str, float]:
    source = HostMemorySource()
    me = os.getpid()
    costs = {}
    for name, fn in [("system_ms", source.system),
                     ("process_table_all_ms", source.process_table),
                     ("process_table_own_tree_ms", lambda: source.process_table(under_pid=me)),
                     ("pss_one_process_ms", lambda: source.precise_mb([me]))]:
        start = time.process_time()
        for _ in range(n):
            fn()
        costs[name] = (time.process_time() - start) / n * 1000
    costs["processes_on_host"] = len(psutil.pids())
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))
    reps, ticks = (1, 100) if args.quick else (3, 720)

    print(f"sample cost (CPU ms per call) {machine_line()}:")
    for key, value in sample_costs(20 if args.quick else 100).items():
        print(f"  {key:28s} {value:8.3f}")
    print(f"\nidle guard cost, 5 agents, {ticks} ticks extrapolated to one hour (CPU s/hour)"
          f" {machine_line()}:")
    for slow_s in (1.0, 5.0):
        for limits in (False, True):
            cost = idle_cost(ticks, limits, slow_s)
            print(f"  slow_interval_s={slow_s:<4} memory_max_mb {'set  ' if limits else 'unset'}"
                  f" {cost:8.3f}")

    if not os.access(CHROMIUM, os.X_OK):
        print(f"\n{CHROMIUM} missing: orphan kill latency not measured")
        return
    with tempfile.TemporaryDirectory(prefix="wk-bench-") as tmp_name:
        tmp = Path(tmp_name)
        site = tmp / "site"
        site.mkdir()
        url = serve_page(site)
        print("\nthreshold crossed → orphaned Chromium gone (seconds), on a simulated "
              "4 GB VPS, default guard settings:")
        for label, before, climb in [("step from 82 % (warning)", 82.0, None),
                                     ("climb from 50 % at 1000 MB/s", 50.0, 1000.0),
                                     ("climb from 50 % at 200 MB/s", 50.0, 200.0),
                                     ("step from 50 % (normal)", 50.0, None)]:
            for _ in range(reps):
                r = orphan_kill_once(tmp, url, before, climb)
                print(f"  {label:28s} orphans={r['orphans']:2d} detect={r['detect_s']:.3f}"
                      f" kill={r['kill_s']:.3f} total={r['total_s']:.3f} {machine_line()}")


if __name__ == "__main__":
    main()
