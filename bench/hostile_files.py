"""`ping` latency of a daemon whose state dir is full of planted files, beside a clean one.

    python bench/hostile_files.py [--quick]

Two real daemons run side by side in the same run, each with ten upstream/downstream agent
pairs and a lock check every 0.2 s: one with a clean state dir (the baseline), one with a
FIFO, a symlink, a socket, a directory and a /dev/zero link at every upstream heartbeat and
as task locks, plus a planted `tasks/.breaker` link. Before the safe opens, the first FIFO
blocked the loop in open() and `ping` never answered. Target: the hostile daemon's p99 within
100 ms. Prints figures only; they depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.machine import machine_line  # noqa: E402  (standard library only)
from live_daemon import LiveDaemon  # noqa: E402

KINDS = ["fifo", "symlink", "socket", "directory", "devzero"]
SLEEPER = {"jobs": [{"id": "main", "command": ["sleep", "60"], "schedule": {"every_s": 3600}}]}


def agents() -> dict[str, dict]:
    specs = {}
    for i in range(10):
        specs[f"up{i}"] = SLEEPER
        specs[f"down{i}"] = {**SLEEPER, "depends_on": [f"up{i}"]}
    return specs


def plant(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(path.parent / "elsewhere")
    elif kind == "devzero":
        path.symlink_to("/dev/zero")
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    else:
        path.mkdir()


def prepare(root: Path, hostile: bool) -> LiveDaemon:
    daemon = LiveDaemon(root, agents(), locks={"check_interval_s": 0.2})
    for sub in ("status", "tasks"):
        (daemon.state_dir / sub).mkdir(parents=True, exist_ok=True)
    if hostile:
        for i in range(10):
            kind = KINDS[i % len(KINDS)]
            plant(daemon.state_dir / "status" / f"up{i}.heartbeat", kind)
            plant(daemon.state_dir / "tasks" / f"planted{i}.lock", kind)
        (daemon.state_dir / "tasks" / ".breaker").symlink_to(root / "breaker-target")
    return daemon


def ping_ms(daemon: LiveDaemon, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.monotonic()
        daemon.call("ping")
        samples.append((time.monotonic() - started) * 1000)
        time.sleep(0.01)
    return samples


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"p50 {statistics.median(ordered):6.2f} ms  p99 {p99:6.2f} ms  "
            f"max {ordered[-1]:6.2f} ms  ({len(ordered)} pings)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    count = 100 if parser.parse_args().quick else 1000
    with tempfile.TemporaryDirectory(prefix="wk-hostile-") as tmp:
        clean = prepare(Path(tmp) / "clean", hostile=False)
        hostile = prepare(Path(tmp) / "hostile", hostile=True)
        with clean, hostile:
            time.sleep(1.0)  # a few ticks: the planted files have been met
            results = {"clean (baseline)": [], "hostile": []}
            for _ in range(4):  # alternate, so both see the same machine
                results["clean (baseline)"] += ping_ms(clean, count // 4)
                results["hostile"] += ping_ms(hostile, count // 4)
            refused = len(hostile.events("heartbeat_file_refused")) + \
                len(hostile.events("lock_file_refused"))
        print("ping latency with planted files in the state dir (target: p99 < 100 ms)")
        for name, samples in results.items():
            print(f"  {name:17s} {summary(samples)} {machine_line()}")
        print(f"  planted files refused by the hostile daemon: {refused} log events "
              f"{machine_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
