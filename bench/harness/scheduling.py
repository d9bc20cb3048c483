"""Scheduling lateness of many interval jobs: watchkeeper against a bare APScheduler script.

Neither tells when a firing was due, so the slots are taken from each scheduler's own
first planned time per job (watchkeeper: `status --json` next_run; the baseline: the job's
next_run_time after start), and an interval job is due at first + k * every_s. A firing's
start is when its program reports on the marker FIFO; lateness = start - slot, so it
includes the spawn of the program (a few ms of /bin/sh) under both schedulers.
A report is matched to the latest slot not after it (50 ms of earliness tolerated): a
firing later than a whole interval would be counted against the next slot, and its own
slot as missed, so missed firings are reported beside the percentiles.
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from .daemons import Watchkeeper
from .procs import TAG, TAG_ENV, Markers, kill_everything, write_scripts
from .workloads import MIB, MeasurementError

EARLY_S = 0.05
READY_TIMEOUT_S = 180.0


def lateness(marks, anchors: dict[str, float], every_s: float, window: tuple[float, float]):
    """(lateness in ms of every firing due in the window, firings due, firings seen)."""
    start, end = window
    seen: dict[tuple[str, int], float] = {}
    for m in marks:
        anchor = anchors.get(m.name)
        if anchor is None:
            continue
        k = math.floor((m.wall - anchor + EARLY_S) / every_s)
        slot = anchor + k * every_s
        if start <= slot <= end and (m.name, k) not in seen:
            seen[(m.name, k)] = (m.wall - slot) * 1000
    due = 0
    for anchor in anchors.values():
        first = math.ceil((start - anchor) / every_s)
        last = math.floor((end - anchor) / every_s)
        due += max(0, last - first + 1)
    return sorted(seen.values()), due, len(seen)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))
    return values[index]


def _measure(markers: Markers, pid: int, anchors: dict[str, float], every_s: float,
             window_s: float) -> dict[str, float | None]:
    """Watch one scheduler for window_s; figures of the firings due in that window."""
    proc = psutil.Process(pid)
    cpu0 = sum(proc.cpu_times()[:2])
    start = time.time() + 0.1
    # Slots due in the window, then one more interval for the last of them to start.
    time.sleep(window_s + every_s)
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    rss = proc.memory_info().rss / MIB
    late, due, seen = lateness(list(markers.marks), anchors, every_s,
                               (start, start + window_s))
    return {"p50_ms": percentile(late, 50), "p99_ms": percentile(late, 99),
            "max_ms": late[-1] if late else None, "due": float(due), "seen": float(seen),
            "missed": float(due - seen), "cpu_pct": cpu / (window_s + every_s) * 100, "rss_mib": rss}


def watchkeeper_lateness(python: Path, jobs: int, every_s: float,
                         window_s: float) -> dict[str, float | None]:
    with tempfile.TemporaryDirectory(prefix="wk-bench-sched-") as tmp:
        root = Path(tmp)
        once = write_scripts(root / "programs")["once.sh"]
        markers = Markers(root / "markers.fifo")
        daemon = Watchkeeper(root, python)
        try:
            names = [f"j{i:04d}" for i in range(jobs)]
            daemon.configure([], jobs=[{"name": n, "job": {
                "id": "tick", "command": ["/bin/sh", str(once), n, str(markers.path)],
                "schedule": {"every_s": every_s}}} for n in names])
            t0 = daemon.start()
            while not daemon.ready():
                if daemon.exited() or time.monotonic() - t0 > READY_TIMEOUT_S:
                    raise MeasurementError(f"watchkeeper with {jobs} jobs did not come up "
                                           f"within {READY_TIMEOUT_S:.0f} s\n{daemon.log_tail()}")
                time.sleep(0.02)
            ready_s = time.monotonic() - t0
            status = daemon.status(timeout_s=60)
            anchors = {a["agent"]: a["next_run"] for a in status["agents"]
                       if a.get("next_run") is not None}
            if len(anchors) != jobs:
                raise MeasurementError(f"watchkeeper plans {len(anchors)} of {jobs} jobs")
            figures = _measure(markers, daemon.pid, anchors, every_s, window_s)
            figures["ready_s"] = ready_s
        finally:
            daemon.kill()
            kill_everything()
            markers.close()
        figures.update(_log_counts(daemon.log_path))  # once it wrote its last line
        return figures


def _log_counts(log_path: Path) -> dict[str, float]:
    """How many warnings and errors the daemon logged, and how many firings it skipped."""
    levels: collections.Counter = collections.Counter()
    skipped = 0
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        levels[event.get("level", "")] += 1
        skipped += event.get("event") == "firing_skipped"
    return {"warnings": float(levels["warning"]), "errors": float(levels["error"]),
            "skipped": float(skipped)}


def apscheduler_lateness(python: Path, jobs: int, every_s: float,
                         window_s: float) -> dict[str, float | None]:
    with tempfile.TemporaryDirectory(prefix="wk-bench-aps-") as tmp:
        root = Path(tmp)
        once = write_scripts(root / "programs")["once.sh"]
        markers = Markers(root / "markers.fifo")
        env = dict(os.environ, **{TAG_ENV: TAG})
        t0 = time.monotonic()
        proc = subprocess.Popen([str(python), str(Path(__file__).with_name("aps_baseline.py")),
                                 "--jobs", str(jobs), "--every-s", str(every_s),
                                 "--script", str(once), "--fifo", str(markers.path)],
                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                                text=True, start_new_session=True)
        try:
            line = proc.stdout.readline()
            if not line:
                raise MeasurementError("the APScheduler baseline did not start")
            ready_s = time.monotonic() - t0
            figures = _measure(markers, proc.pid, json.loads(line), every_s, window_s)
            figures["ready_s"] = ready_s
            return figures
        finally:
            proc.kill()
            proc.wait()
            kill_everything()
            markers.close()
