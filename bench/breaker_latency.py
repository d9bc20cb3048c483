"""Circuit breaker: from the output that trips it to the last agent process gone.

    python bench/breaker_latency.py [--quick]

A real daemon runs an `emitter` agent and four bystanders, all `always` agents; the polite
bystanders each have a child process (a tool they started), one variant has a bystander that
ignores SIGTERM. The emitter makes its N allowed outputs, waits for the go, reads
`time.monotonic()` and sends the (N+1)th emit, which trips the breaker: the daemon halts the
pipeline and stops every run (SIGTERM, SIGKILL after the grace period). The benchmark watches
every agent process through pidfds and takes the moment the last one exits; CLOCK_MONOTONIC is
the same clock in every process, so the two readings subtract. Then `breaker reset` brings
the agents back for the next trial.

Target: 200 ms plus the SIGTERM grace (only spent when an agent ignores SIGTERM).
Prints figures only; absolute times depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
from live_daemon import LiveDaemon, wait_for  # noqa: E402

N = 5
GRACE_S = 1.0

EMITTER = """
import os, time
from pathlib import Path
from supervisor.sdk import Agent
a = Agent()
ctl = Path(os.environ["CTL"])
for i in range(int(os.environ["N"])):
    a.emit("post", f"post {i} of {a.run_id}")
(ctl / "ready.tmp").write_text(a.run_id)
os.rename(ctl / "ready.tmp", ctl / "ready")
while not (ctl / "go").exists():
    time.sleep(0.001)
t0 = time.monotonic()
(ctl / "t0").write_text(repr(t0))
a.emit("post", "one too many")
time.sleep(3600)
"""

POLITE = """
import subprocess, time
subprocess.Popen(["sleep", "3600"])
time.sleep(3600)
"""

STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(3600)
"""


def agents(ctl: Path, stubborn: bool) -> tuple[dict[str, dict], int]:
    """The agent files, and how many processes they run in all."""
    def always(code: str, **env: str) -> dict:
        return {"jobs": [{"id": "main", "command": ["{python}", "-c", code],
                          "schedule": {"always": True}, "env": env}]}

    specs = {"emitter": always(EMITTER, CTL=str(ctl), N=str(N))}
    specs["emitter"]["limits"] = {"outputs": {"max_outputs": N, "window_s": 3600}}
    polite = 3 if stubborn else 4
    for i in range(polite):
        specs[f"polite{i}"] = always(POLITE)
    if stubborn:
        specs["stubborn"] = always(STUBBORN)
    return specs, 1 + 2 * polite + int(stubborn)


def live_descendants(pid: int) -> list[int]:
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def last_exit(pids: list[int], timeout_s: float) -> float:
    """time.monotonic() at which the last of `pids` exited."""
    poller, fds = select.poll(), {}
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        fds[fd] = pid
        poller.register(fd, select.POLLIN)
    last, deadline = time.monotonic(), time.monotonic() + timeout_s
    try:
        while fds:
            if time.monotonic() > deadline:
                raise TimeoutError(f"still alive after {timeout_s}s: {sorted(fds.values())}")
            for fd, _ in poller.poll(100):
                last = time.monotonic()
                poller.unregister(fd)
                os.close(fd)
                del fds[fd]
    finally:
        for fd in fds:
            os.close(fd)
    return last


def trial(daemon: LiveDaemon, ctl: Path, processes: int) -> float:
    wait_for(lambda: (ctl / "ready").exists(), 30, "the emitter's N outputs")
    pids = wait_for(lambda: (p := live_descendants(daemon.proc.pid)) and len(p) == processes
                    and p, 30, f"{processes} agent processes")
    (ctl / "go").touch()
    gone = last_exit(pids, 30)
    t0 = float((ctl / "t0").read_text())
    for name in ("go", "ready", "t0"):
        (ctl / name).unlink()
    if daemon.call("breaker-status")["state"] != "open":
        raise RuntimeError("the (N+1)th emit did not trip the breaker")
    daemon.call("breaker-reset", reason="benchmark: next trial")
    return (gone - t0) * 1000


def measure(workdir: Path, stubborn: bool, trials: int) -> list[float]:
    ctl = workdir / ("ctl-stubborn" if stubborn else "ctl-polite")
    ctl.mkdir()
    specs, processes = agents(ctl, stubborn)
    root = workdir / ("stubborn" if stubborn else "polite")
    with LiveDaemon(root, specs, stop_grace_s=GRACE_S) as daemon:
        return [trial(daemon, ctl, processes) for _ in range(trials)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials, under 60 s")
    args = parser.parse_args()
    trials = 8 if args.quick else 40
    print(f"(N+1)th emit -> last agent process exited; N={N}, 5 agents, "
          f"stop grace {GRACE_S:g} s, {trials} trials each:\n")
    print("| agents | processes | p50 | p90 | max | max minus grace |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="wk-bench-") as tmp:
        for stubborn in (False, True):
            samples = measure(Path(tmp), stubborn, trials)
            label = "one ignores SIGTERM" if stubborn else "all exit on SIGTERM"
            processes = agents(Path(tmp), stubborn)[1]
            over = f"{max(samples) - GRACE_S * 1000:.0f} ms" if stubborn else "-"
            ordered = sorted(samples)
            print(f"| {label} | {processes} | {statistics.median(samples):.0f} ms | "
                  f"{ordered[int(0.9 * (len(ordered) - 1))]:.0f} ms | {max(samples):.0f} ms | "
                  f"{over} |", flush=True)


if __name__ == "__main__":
    main()
