"""What cron jobs cost the daemon now that they wait on its own loop (no scheduler thread).

    python bench/cron_cost.py [--rounds N] [--jobs 1000] [--every-s 5] [--window-s 30]
    python bench/cron_cost.py --quick    (one round, 200 jobs, 2 s apart, a 4 s window)

In the same run, alternating, over N rounds (bench/harness, its venvs under bench/.venv-*):
- daemon RSS with 5 programs and the seed's 12 cron jobs, beside supervisord's RSS with the
  same 5 programs (supervisord has no cron: its figure is the target);
- scheduling lateness of 12 interval jobs, and of --jobs interval jobs due at once, under
  watchkeeper and under a bare APScheduler script (bench/harness/aps_baseline.py).
Every figure is printed with the machine's total memory and load average. Figures are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import venvs  # noqa: E402  (standard library only: runs before any venv)

SEED_CRON = [f"{i} 3 1 1 *" for i in range(12)]  # 12 jobs, due once a year: idle footprint


def machine() -> str:
    total_kib = next(int(line.split()[1]) for line in open("/proc/meminfo")
                     if line.startswith("MemTotal:"))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"[{total_kib / 2**20:.1f} GiB total memory, load {load}]"


def memory_round(wk_py: Path, sv_py: Path, settle_s: float) -> dict[str, float]:
    from harness.daemons import Supervisord, Watchkeeper
    from harness.workloads import Session

    cron = [{"name": f"cron{i:02d}", "job": {"id": "main", "command": ["/bin/true"],
                                             "schedule": {"cron": expr}}}
            for i, expr in enumerate(SEED_CRON)]
    names = [f"p{i:02d}" for i in range(5)]
    figures = {}
    with Session(Watchkeeper, wk_py, "sleeper.sh", names, extra_jobs=cron) as s:
        s.start_until_running()
        time.sleep(settle_s)  # a benchmark: let start-up garbage settle before reading RSS
        figures["watchkeeper RSS, 5 programs + 12 cron jobs (MiB)"] = s.memory_mib()[0]
    with Session(Supervisord, sv_py, "sleeper.sh", names) as s:
        s.start_until_running()
        time.sleep(settle_s)
        figures["supervisord RSS, 5 programs (MiB)"] = s.memory_mib()[0]
    return figures


def lateness_round(wk_py: Path, aps_py: Path, jobs: int, every_s: float,
                   window_s: float) -> dict[str, float | None]:
    from harness.scheduling import apscheduler_lateness, watchkeeper_lateness

    figures: dict[str, float | None] = {}
    for label, fn, python in (("watchkeeper", watchkeeper_lateness, wk_py),
                              ("bare APScheduler", apscheduler_lateness, aps_py)):
        result = fn(python, jobs, every_s, window_s)
        for key in ("p50_ms", "p99_ms", "missed", "rss_mib"):
            figures[f"{label}, {jobs} jobs: {key}"] = result.get(key)
        print(f"  {label}, {jobs} jobs: p50 {result.get('p50_ms')} ms, p99 "
              f"{result.get('p99_ms')} ms, missed {result.get('missed')}, RSS "
              f"{result.get('rss_mib')} MiB {machine()}", flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--every-s", type=float, default=5.0)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true",
                        help="one short round, well under a minute (bench/run.py --quick)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.jobs, args.every_s, args.window_s, args.settle_s = 1, 200, 2.0, 4.0, 1.0
    pythons = venvs.ensure_all(log=lambda msg: print(msg, flush=True))
    if not venvs.in_harness_venv():
        venvs.reexec_in_harness(Path(__file__).resolve(), sys.argv[1:])
    from harness.procs import become_subreaper, kill_everything

    become_subreaper()
    wk_py, sv_py, aps_py = (pythons[".venv-watchkeeper"], pythons[".venv-supervisord"],
                            pythons[".venv-harness"])
    collected: dict[str, list[float]] = {}
    try:
        for r in range(1, args.rounds + 1):
            print(f"round {r} of {args.rounds} {machine()}", flush=True)
            figures = memory_round(wk_py, sv_py, args.settle_s)
            for key, value in figures.items():
                print(f"  {key}: {value:.1f} {machine()}", flush=True)
            for jobs in (12, args.jobs):
                figures.update(lateness_round(wk_py, aps_py, jobs, args.every_s,
                                              args.window_s))
            for key, value in figures.items():
                if value is not None:
                    collected.setdefault(key, []).append(value)
    finally:
        kill_everything()
    print(f"\nmedians over {args.rounds} rounds {machine()}")
    for key, values in collected.items():
        print(f"  {key}: {statistics.median(values):.1f}")
    print("targets: watchkeeper RSS with 12 cron jobs <= supervisord's; 12 jobs p99 <= 10 ms; "
          f"{args.jobs} jobs p99 no worse than bare APScheduler")
    return 0


if __name__ == "__main__":
    sys.exit(main())
