"""Orphaned Chromium renderers gone after real memory pressure crosses act_percent.

    python bench/memguard_pressure.py [--rounds 3] [--quick]

The simulated VPS is a memory cgroup limited to 1 GiB. The real daemon runs inside it,
its guard measuring against it (`memory_guard.scope_cgroup`), as shipped otherwise: the
PSI trigger, the cgroup v1 usage thresholds at warn_percent and act_percent, the adaptive
sampling in between. An agent (`leftovers: keep`) starts real headless Chromium on a local
page and its run is SIGKILLed: the browser, zygotes and renderers are orphans reparented
to the daemon. Then a real allocator inside the cgroup takes 8 MiB steps (each page
written) until the guard's own measure (usage less inactive file cache) is past
act_percent, and holds. Measured per round: from the start of the step that crossed
act_percent to the last renderer exited (pidfds; an upper bound by one step), the guard's
memory readings from the climb's start to its critical level (from its log), and beside
it the floor: SIGTERM to every process of a Chromium of our own until its renderers
exited. Every figure is printed with the machine's total memory and load average; none
is asserted. Needs root (a writable memory cgroup), /usr/bin/chromium and ~1 GiB free.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.machine import machine_line  # noqa: E402
from memguard_idle import memory_cgroup_parent  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGE = ("<html><body><h1>watchkeeper</h1><script>let a=[];for(let i=0;i<1e5;i++)a.push(i)"
        "</script></body></html>")
VPS_BYTES = 1 << 30
ACT_PERCENT = 87.0  # the shipped default (memory_guard.act_percent)
HOLD_PERCENT = ACT_PERCENT + 4  # the allocator stops here: short of the OOM killer
STEP_BYTES = 8 << 20

# The agent's run: starts Chromium, writes its pid to argv[1], then waits to be killed.
RUN_WITH_CHROMIUM = """
import subprocess, sys, time
child = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
open(sys.argv[1], "w").write(str(child.pid))
while True:
    time.sleep(60)
"""

# Climbs in STEP_BYTES steps until the guard's measure passes act, then to hold, and waits.
ALLOCATOR = """
import sys, time
from supervisor.kernel.procscan import cgroup_memory
cgroup, act, hold, step = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
def percent():
    used, limit = cgroup_memory(cgroup)
    return 100 * used / limit
hoard, crossed = [], None
print("start", time.monotonic(), percent(), flush=True)
while percent() < hold:
    t0 = time.monotonic()
    hoard.append(b"\\x01" * step)
    if crossed is None and percent() >= act:
        crossed = t0
        print("crossed", crossed, flush=True)
print("holding", time.monotonic(), percent(), flush=True)
sys.stdin.read()
"""


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve_page(root: Path) -> str:
    (root / "index.html").write_text(PAGE)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/"


def wait_for(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
    return value


def chrome_processes(profile: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(profile) in " ".join(proc.info["cmdline"] or ()) and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def renderers(profile: Path) -> list[psutil.Process]:
    return [p for p in chrome_processes(profile) if "--type=renderer" in p.info["cmdline"]]


def wait_exited(pids: list[int], timeout_s: float = 30) -> float:
    """Wait until every pid has exited (pidfds: an exited zombie counts); the instant the
    last one did, monotonic."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    last = time.monotonic()
    deadline = last + timeout_s
    try:
        while fds:
            ready, _, _ = select.select(list(fds), [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise SystemExit(f"renderers {sorted(fds.values())} still alive after {timeout_s} s")
            last = time.monotonic()
            for fd in ready:
                del fds[fd]
                os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)
    return last


def floor_ms(tmp: Path, url: str) -> float:
    """SIGTERM to every process of a Chromium of our own, until its renderers exited."""
    profile = tmp / f"floor-{uuid.uuid4().hex[:6]}"
    browser = subprocess.Popen([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        targets = wait_for(lambda: renderers(profile), 60, "the floor's renderer")
        procs = chrome_processes(profile)
        t0 = time.monotonic()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        gone = wait_exited([p.pid for p in targets])
        return (gone - t0) * 1000
    finally:
        browser.kill()
        browser.wait()
        for proc in chrome_processes(profile):
            proc.kill()


class VpsDaemon:
    """The real daemon inside the simulated VPS's cgroup, with one Chromium agent."""

    def __init__(self, tmp: Path, cgroup: Path, url: str) -> None:
        self.root, self.cgroup = tmp, cgroup
        self.profile = tmp / "profile"
        self.pid_file = tmp / "browser.pid"
        self.log_path = tmp / "daemon.log"
        agents = tmp / "agents.d"
        agents.mkdir()
        main = {"state_dir": "./state", "agents_dir": "agents.d", "stop_grace_s": 3,
                "memory_guard": {"scope_cgroup": str(cgroup)}}
        (tmp / "main.yaml").write_text(json.dumps(main))
        command = [sys.executable, "-c", RUN_WITH_CHROMIUM, str(self.pid_file), CHROMIUM,
                   *CHROME_FLAGS, f"--user-data-dir={self.profile}", url]
        job = {"id": "main", "command": command, "schedule": {"every_s": 3600},
               "leftovers": "keep"}
        (agents / "browser.yaml").write_text(json.dumps({"jobs": [job]}))
        self.wk = [str(Path(sys.executable).parent / "watchkeeper"), "--config",
                   str(tmp / "main.yaml")]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh",
                 *self.wk, "run", "--log-format", "json"],
                cwd=tmp, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if f'"{name}"' in line:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == name:
                    found.append(event)
        return found

    def orphan_chromium(self) -> list[psutil.Process]:
        """Start the agent, wait for its renderer, SIGKILL the run: the orphans' renderers."""
        wait_for(lambda: self.events("daemon_started"), 30, "the daemon to start")
        subprocess.run([*self.wk, "start-now", "browser"], check=True, capture_output=True)
        wait_for(lambda: renderers(self.profile), 60, "Chromium's renderer")
        browser = int(wait_for(lambda: self.pid_file.exists() and self.pid_file.read_text(),
                               10, "the browser pid"))
        run_root = psutil.Process(browser).ppid()
        os.kill(run_root, signal.SIGKILL)
        wait_for(lambda: psutil.Process(browser).ppid() == self.proc.pid, 10,
                 "the browser reparented to the daemon")
        wait_for(lambda: self.events("run_finished"), 10, "the run to end")
        return renderers(self.profile)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for proc in chrome_processes(self.profile):
            proc.kill()


def pressure_round(tmp: Path, cgroup: Path, url: str) -> dict:
    daemon = VpsDaemon(tmp, cgroup, url)
    allocator = None
    try:
        targets = daemon.orphan_chromium()
        allocator = subprocess.Popen(
            ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh",
             sys.executable, "-c", ALLOCATOR, str(cgroup), str(ACT_PERCENT),
             str(HOLD_PERCENT), str(STEP_BYTES)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        start = allocator.stdout.readline().split()
        crossed = allocator.stdout.readline().split()
        if crossed[:1] != ["crossed"]:
            raise SystemExit(f"the allocator never crossed act_percent: {start} {crossed}")
        gone = wait_exited([p.pid for p in targets])
        wait_for(lambda: daemon.events("orphan_killed"), 10, "orphan_killed in the log")
        critical = next(e for e in daemon.events("memory_level_changed")
                        if e["memory_level"] == "critical")
        notified = daemon.events("memory_pressure_notified")
        at_climb = notified[0]["samples"] - 1 if notified else critical["samples"]
        wall_minus_mono = time.time() - time.monotonic()
        timeline = [
            f"{(datetime.fromisoformat(e['timestamp']).timestamp() - wall_minus_mono - float(crossed[1])) * 1000:+.0f} ms "
            f"{e['event']} {e.get('memory_level', '')} {e.get('percent_used', '')} {e.get('path', '')} samples={e.get('samples')}"
            for e in sorted(notified + daemon.events("memory_level_changed"),
                            key=lambda e: e["timestamp"])]
        return {"timeline": timeline,"latency_ms": (gone - float(crossed[1])) * 1000,
                "renderers": len(targets), "start_percent": float(start[2]),
                "readings": critical["samples"] - at_climb,
                "kernel_wakeups": sum(1 for e in notified
                                      if e["samples"] <= critical["samples"]),
                "readings_total": critical["samples"]}
    finally:
        if allocator is not None:
            allocator.kill()
            allocator.wait()
        daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round (bench/run.py --quick)")
    parser.add_argument("--verbose", action="store_true",
                        help="the guard's wakeups and level changes, from the crossing")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    if not os.access(CHROMIUM, os.X_OK):
        raise SystemExit(f"{CHROMIUM} is needed")
    parent, version = memory_cgroup_parent()
    cgroup = parent / f"wk-bench-pressure-{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    try:
        (cgroup / ("memory.max" if version == "v2" else "memory.limit_in_bytes")).write_text(
            str(VPS_BYTES))
        with tempfile.TemporaryDirectory(prefix="wk-pressure-") as tmp_name:
            tmp = Path(tmp_name)
            site = tmp / "site"
            site.mkdir()
            url = serve_page(site)
            print(f"simulated VPS: {VPS_BYTES >> 20} MiB memory cgroup ({version}, {cgroup}); "
                  f"act_percent {ACT_PERCENT:g}, allocator steps of {STEP_BYTES >> 20} MiB "
                  f"{machine_line()}", flush=True)
            for r in range(1, args.rounds + 1):
                round_dir = tmp / f"round{r}"
                round_dir.mkdir()
                f = pressure_round(round_dir, cgroup, url)
                print(f"  round {r}: act_percent crossed -> {f['renderers']} orphaned renderers "
                      f"gone in {f['latency_ms']:.0f} ms (climb from "
                      f"{f['start_percent']:.0f} %); guard readings during the climb "
                      f"{f['readings']} ({f['kernel_wakeups']} woken by the kernel, "
                      f"{f['readings_total']} since start) {machine_line()}", flush=True)
                if args.verbose:
                    print("\n".join(f"      {line}" for line in f["timeline"]))
                print(f"  round {r}: floor, SIGTERM to a Chromium of our own until its renderers "
                      f"exited: {floor_ms(round_dir, url):.0f} ms {machine_line()}", flush=True)
    finally:
        wait_for(lambda: not (cgroup / "cgroup.procs").read_text().strip(), 20,
                 "the VPS cgroup to empty")
        cgroup.rmdir()
    print("target: orphaned renderers gone <= 1000 ms after real pressure crosses act_percent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
