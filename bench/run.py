"""Benchmarks of watchkeeper side by side with supervisord (and APScheduler for scheduling).

    python bench/run.py [--quick] [--rounds N]

Creates its virtual environments under bench/.venv-* when missing (watchkeeper from this
repository, supervisor==4.3.0, and the harness's own), then runs every workload under both
daemons in the same run, alternating, over several rounds. The full run writes
bench/RESULTS.md; --quick (a few minutes, for CI: one short round, then every other script
in bench/ with --quick, each well under a minute) writes bench/RESULTS-quick.md.
Figures are printed, never asserted: the exit status is non-zero only when a measurement
could not be taken at all (a daemon did not start, a program never ran, a script failed).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import venvs  # noqa: E402  (standard library only: runs before any venv)
from harness.machine import machine_line  # noqa: E402  (standard library only)

OTHER_SCRIPTS = ["orphan_kill.py", "lazy_context.py", "steward_store.py", "steward_socket.py",
                 "breaker_latency.py", "alert_latency.py", "postgres_vs_sqlite.py",
                 "cluster_failover.py", "agent_cost.py", "cron_cost.py", "memguard_idle.py",
                 "memguard_pressure.py", "hostile_files.py"]
OTHER_TIMEOUT_S = 600


@dataclass(frozen=True)
class Plan:
    command: str
    rounds: int
    settle_s: float        # after every program runs, before memory is read
    cpu_window_s: float
    kills: int             # restart measurements per round
    deaf: int              # programs ignoring SIGTERM in the stop workload
    grandchildren: int     # programs leaving a grandchild in the stop workload
    jobs: int
    every_s: float
    sched_window_s: float
    grace_s: float = 3.0
    output: str = "RESULTS.md"

    @classmethod
    def full(cls, rounds: int) -> Plan:
        return cls("python bench/run.py" + (f" --rounds {rounds}" if rounds != 3 else ""),
                   rounds, settle_s=5, cpu_window_s=60, kills=10, deaf=5, grandchildren=5,
                   jobs=1000, every_s=5, sched_window_s=30)

    @classmethod
    def quick(cls, rounds: int) -> Plan:
        return cls("python bench/run.py --quick" + (f" --rounds {rounds}" if rounds != 1 else ""),
                   rounds, settle_s=2, cpu_window_s=10, kills=5, deaf=2, grandchildren=2,
                   jobs=200, every_s=5, sched_window_s=5, output="RESULTS-quick.md")


def names(n: int) -> list[str]:
    return [f"p{i:02d}" for i in range(n)]


def supervision_round(plan: Plan, kind, python: Path) -> dict[str, float | None]:
    """Every supervision workload once under one daemon."""
    from harness.workloads import Session

    figures: dict[str, float | None] = {}
    samples: list[float] = []
    with Session(kind, python, "sleeper.sh", names(5)) as s:
        figures["start5"] = s.start_until_running()
        time.sleep(plan.settle_s)
        figures["rss5"], figures["uss5"] = s.memory_mib()
        figures["cpu_idle"] = s.cpu_s(plan.cpu_window_s)
        samples = s.restart_latencies_ms(plan.kills)
        stop = s.stop()
        figures["stop5"], left = stop["all_gone_s"], stop["left_behind"]
    if kind.label == "watchkeeper":
        # The same five programs beside 12 cron jobs (due once a year): the footprint once
        # APScheduler and its imports are loaded, which supervisord has no counterpart of.
        cron = [{"name": f"cron{i:02d}", "job": {"id": "main", "command": ["/bin/true"],
                                                 "schedule": {"cron": f"{i} 3 1 1 *"}}}
                for i in range(12)]
        with Session(kind, python, "sleeper.sh", names(5), extra_jobs=cron) as s:
            s.start_until_running()
            time.sleep(plan.settle_s)
            figures["rss5_cron"], figures["uss5_cron"] = s.memory_mib()
    with Session(kind, python, "sleeper.sh", names(50)) as s:
        figures["start50"] = s.start_until_running()
        time.sleep(plan.settle_s)
        figures["rss50"], figures["uss50"] = s.memory_mib()
        stop = s.stop()
        figures["stop50"], left = stop["all_gone_s"], left + stop["left_behind"]
    with Session(kind, python, "ignores_term.sh", names(plan.deaf)) as s:
        s.start_until_running()
        time.sleep(1.5)  # past supervisord's startsecs: every program counts as running
        stop = s.stop()
        figures["stop_deaf"], left = stop["all_gone_s"], left + stop["left_behind"]
    gc_names = names(plan.grandchildren)
    with Session(kind, python, "with_grandchild.sh", gc_names,
                 also_report=[f"{n}-grandchild" for n in gc_names]) as s:
        s.start_until_running()
        time.sleep(1.5)
        stop = s.stop()
        figures["stop_gc"], figures["left_gc"] = stop["daemon_exit_s"], stop["left_behind"]
    figures["left_other"] = left
    figures["restart_median"] = sorted(samples)[len(samples) // 2] if samples else None
    figures["restart_max"] = max(samples) if samples else None
    figures["_restart_samples"] = samples  # type: ignore[assignment]
    return figures


def print_figures(label: str, figures: dict) -> None:
    shown = ", ".join(f"{k}={v:.3g}" for k, v in figures.items()
                      if isinstance(v, float | int) and not k.startswith("_"))
    print(f"  {label:<19} {shown}", flush=True)


def run_others(python: Path, bench_dir: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Run the other benchmark scripts that exist, with --quick; (sections, failures)."""
    sections, failures = [], []
    for name in OTHER_SCRIPTS:
        path = bench_dir / name
        if not path.exists():
            continue
        print(f"running bench/{name} --quick {machine_line()}", flush=True)
        try:
            out = subprocess.run([str(python), str(path), "--quick"], cwd=bench_dir.parent,
                                 capture_output=True, text=True, timeout=OTHER_TIMEOUT_S,
                                 stdin=subprocess.DEVNULL)
            text, code = out.stdout + out.stderr, out.returncode
        except subprocess.TimeoutExpired as exc:
            text, code = f"{exc.stdout or ''}\ntimed out after {OTHER_TIMEOUT_S} s", -1
        # Scripts that do not print the machine beside each figure get it once more here.
        text = f"{text.rstrip()}\n(after bench/{name}: {machine_line()})\n"
        print(text.rstrip(), flush=True)
        if code != 0:
            failures.append(f"bench/{name} --quick exited with {code}")
            text += f"\n(exit status {code})"
        sections.append((f"bench/{name} --quick", text))
    return sections, failures


def measure(plan: Plan, pythons: dict[str, Path], bench_dir: Path) -> int:
    """Every workload, every round; a workload that fails is reported and the rest go on."""
    from harness.daemons import Supervisord, Watchkeeper
    from harness.report import APS, SV, WK, Results, markdown
    from harness.scheduling import apscheduler_lateness, watchkeeper_lateness
    from harness.workloads import MeasurementError

    started = time.monotonic()
    results = Results()
    failures: list[str] = []
    wk_py, sv_py, harness_py = (pythons[".venv-watchkeeper"], pythons[".venv-supervisord"],
                                pythons[".venv-harness"])
    for r in range(1, plan.rounds + 1):
        print(f"round {r} of {plan.rounds}", flush=True)
        for kind, python in ((Watchkeeper, wk_py), (Supervisord, sv_py)):
            results.loads.append(os.getloadavg()[0])
            try:
                figures = supervision_round(plan, kind, python)
            except MeasurementError as exc:
                failures.append(f"round {r}, {kind.label}: {exc}")
                print(f"  {kind.label:<19} FAILED: {exc}", flush=True)
                continue
            results.samples[kind.label]["restart_ms"] += figures.pop("_restart_samples")
            results.add(kind.label, figures)
            print_figures(kind.label, figures)
        for label, fn, python in ((WK, watchkeeper_lateness, wk_py),
                                  (APS, apscheduler_lateness, harness_py)):
            results.loads.append(os.getloadavg()[0])
            try:
                figures = fn(python, plan.jobs, plan.every_s, plan.sched_window_s)
            except MeasurementError as exc:
                failures.append(f"round {r}, scheduling, {label}: {exc}")
                print(f"  {label:<19} FAILED: {exc}", flush=True)
                continue
            results.add(label, figures)
            print_figures(f"{label} ({plan.jobs} jobs)", figures)
    for label in (WK, SV):  # restart latency over every kill of every round
        pooled = sorted(results.samples[label]["restart_ms"])
        if pooled:
            results.values[label]["restart_median"] = [pooled[len(pooled) // 2]]
            results.values[label]["restart_max"] = [pooled[-1]]
    results.loads.append(os.getloadavg()[0])
    extra, script_failures = run_others(wk_py, bench_dir)
    failures += script_failures
    text = markdown(results, plan, pythons, bench_dir.parent, extra, failures,
                    time.monotonic() - started)
    out = bench_dir / plan.output
    out.write_text(text)
    print(f"\n{text}\nwritten to {out}", flush=True)
    for failure in failures:
        print(f"error: a measurement could not be taken: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one short round, the other scripts with --quick (a few "
                             "minutes): writes RESULTS-quick.md")
    parser.add_argument("--rounds", type=int, help="rounds (default: 3, or 1 with --quick)")
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    pythons = venvs.ensure_all(log=lambda msg: print(msg, flush=True))
    if not venvs.in_harness_venv():
        venvs.reexec_in_harness(Path(__file__).resolve(), sys.argv[1:])
    plan = Plan.quick(args.rounds or 1) if args.quick else Plan.full(args.rounds or 3)

    from harness.procs import become_subreaper, kill_everything

    become_subreaper()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Started in the background by a non-interactive shell, SIGINT arrives ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return measure(plan, pythons, Path(__file__).resolve().parent)
    except KeyboardInterrupt:
        print("interrupted: stopping everything the benchmark started", file=sys.stderr)
        return 130
    finally:
        kill_everything()


if __name__ == "__main__":
    sys.exit(main())
