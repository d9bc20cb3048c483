"""The scheduling baseline: a bare APScheduler 3.11 script running N interval jobs that each
start the same small program watchkeeper's jobs start. supervisord has no scheduler.

    python aps_baseline.py --jobs N --every-s S --script once.sh --fifo markers.fifo

Job defaults are the ones watchkeeper's adapter uses (coalesce, one instance, a 300 s
misfire grace); the executor is APScheduler's default thread pool, and each job runs its
program with subprocess.run, as a script written for the purpose would. Prints one JSON line
{job id: first scheduled time (epoch s)} once started, then runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import threading

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--every-s", type=float, required=True)
    parser.add_argument("--script", required=True)
    parser.add_argument("--fifo", required=True)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    scheduler = BackgroundScheduler(timezone="UTC", job_defaults={
        "coalesce": True, "max_instances": 1, "misfire_grace_time": 300})
    for i in range(args.jobs):
        name = f"j{i:04d}"
        scheduler.add_job(subprocess.run, IntervalTrigger(seconds=args.every_s, timezone="UTC"),
                          args=[["/bin/sh", args.script, name, args.fifo]], id=name)
    scheduler.start()
    print(json.dumps({job.id: job.next_run_time.timestamp() for job in scheduler.get_jobs()}),
          flush=True)
    stop.wait()
    scheduler.shutdown(wait=False)


if __name__ == "__main__":
    main()
