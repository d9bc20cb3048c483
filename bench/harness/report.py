"""Figures gathered over rounds, and the Markdown report made of them."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import psutil

WK, SV, APS = "watchkeeper", "supervisord", "APScheduler script"


class Results:
    """values[daemon][key] = one figure per round; samples[daemon][key] = pooled samples."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.loads: list[float] = []  # 1-minute load average before each workload

    def add(self, daemon: str, figures: dict[str, float | None]) -> None:
        for key, value in figures.items():
            if value is not None:
                self.values[daemon][key].append(value)

    def median(self, daemon: str, key: str) -> float | None:
        values = self.values[daemon].get(key)
        return statistics.median(values) if values else None


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    digits: int = 2
    target: str = ""
    meets: object = None  # (wk median, sv median) -> bool | None


def _rows(plan) -> list[Row]:
    grace = plan.grace_s
    return [
        Row("rss5", f"daemon RSS, {5} programs", "MiB", 1, "≤ supervisord",
            lambda w, s: w <= s),
        Row("uss5", "daemon USS, 5 programs", "MiB", 1),
        Row("rss5_cron", "daemon RSS, 5 programs and 12 cron jobs (APScheduler loaded; "
            "no supervisord counterpart)", "MiB", 1),
        Row("uss5_cron", "daemon USS, 5 programs and 12 cron jobs", "MiB", 1),
        Row("rss50", "daemon RSS, 50 programs", "MiB", 1, "≤ supervisord",
            lambda w, s: w <= s),
        Row("uss50", "daemon USS, 50 programs", "MiB", 1),
        Row("cpu_idle", f"daemon CPU over {plan.cpu_window_s:g} s idle, 5 programs", "s", 3,
            "≤ 0.5 × supervisord", lambda w, s: w <= 0.5 * s),
        Row("restart_median", "restart after SIGKILL, median", "ms", 1, "≤ 50 ms",
            lambda w, s: w <= 50),
        Row("restart_max", "restart after SIGKILL, max", "ms", 1, "≤ 50 ms",
            lambda w, s: w <= 50),
        Row("start5", "start until 5 programs run", "s", 3),
        Row("start50", "start until 50 programs run", "s", 3, "≤ 0.2 s",
            lambda w, s: w <= 0.2),
        Row("stop5", "stop, 5 programs: until all gone", "s", 3, f"≤ {grace + 0.2:g} s",
            lambda w, s: w <= grace + 0.2),
        Row("stop50", "stop, 50 programs: until all gone", "s", 3, f"≤ {grace + 0.2:g} s",
            lambda w, s: w <= grace + 0.2),
        Row("stop_deaf", f"stop, {plan.deaf} programs ignoring SIGTERM: until all gone", "s", 3,
            f"≤ {grace + 0.2:g} s", lambda w, s: w <= grace + 0.2),
        Row("stop_gc", f"stop, {plan.grandchildren} programs with a grandchild in its own "
            "session: daemon exit", "s", 3, f"≤ {grace + 0.2:g} s",
            lambda w, s: w <= grace + 0.2),
        Row("left_gc", f"grandchildren left behind (of {plan.grandchildren})", "", 0, "0",
            lambda w, s: w == 0),
        Row("left_other", "processes left behind by the other stops", "", 0, "0",
            lambda w, s: w == 0),
    ]


SCHED_ROWS = [
    Row("p50_ms", "lateness p50", "ms", 1),
    Row("p99_ms", "lateness p99", "ms", 1),
    Row("max_ms", "lateness max", "ms", 1),
    Row("due", "firings due in the window", "", 0),
    Row("missed", "firings missed", "", 0),
    Row("ready_s", "start until ready (watchkeeper: daemon running; script: jobs added)",
        "s", 2),
    Row("cpu_pct", "scheduler CPU during the window", "%", 1),
    Row("rss_mib", "scheduler RSS at the end", "MiB", 1),
    Row("warnings", "warnings logged", "", 0),
    Row("skipped", "firings skipped (logged)", "", 0),
]


def _load_range(loads: list[float]) -> str:
    if not loads:
        return "–"
    return (f"min {min(loads):.2f}, median {statistics.median(loads):.2f}, "
            f"max {max(loads):.2f} (on {os.cpu_count()} cores; other work on the machine "
            "shares them)")


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}"


def table(results: Results, rows: list[Row], a: str, b: str, with_targets: bool) -> list[str]:
    head = f"| measure | {a} | {b} | ratio {a}/{b} |"
    rule = "| --- | ---: | ---: | ---: |"
    if with_targets:
        head += " target for watchkeeper | met |"
        rule += " --- | :---: |"
    out = [head, rule]
    for row in rows:
        wa, wb = results.median(a, row.key), results.median(b, row.key)
        line = (f"| {row.label}{f' ({row.unit})' if row.unit else ''} | {_fmt(wa, row.digits)}"
                f" | {_fmt(wb, row.digits)} | {_ratio(wa, wb)} |")
        if with_targets:
            met = "–"
            if row.meets is not None and wa is not None and wb is not None:
                met = "yes" if row.meets(wa, wb) else "no"
            line += f" {row.target} | {met if row.target else ''} |"
        out.append(line)
    return out


def every_round(results: Results, rows: list[Row], daemons: list[str]) -> list[str]:
    out = ["| measure | " + " | ".join(daemons) + " |", "| --- |" + " --- |" * len(daemons)]
    for row in rows:
        cells = [", ".join(_fmt(v, row.digits) for v in results.values[d].get(row.key, []))
                 or "–" for d in daemons]
        out.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return out


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"CPU": model, "cores": str(os.cpu_count()),
            "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
            "kernel": platform.release(), "OS": _os_name()}


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def _output(argv: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, cwd=cwd,
                              timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions(pythons: dict[str, Path], repo: Path) -> dict[str, str]:
    def dist(python: Path, name: str) -> str:
        return _output([str(python), "-c", "import importlib.metadata as m, sys; "
                        f"sys.stdout.write(m.version({name!r}))"])

    wk = pythons[".venv-watchkeeper"]
    commit = _output(["git", "rev-parse", "--short", "HEAD"], cwd=repo)
    dirty = _output(["git", "status", "--porcelain", "--", "supervisor", "pyproject.toml"],
                    cwd=repo)
    return {
        "python": _output([str(wk), "-c", "import sys; print(sys.version.split()[0])"]),
        "watchkeeper": f"{dist(wk, 'watchkeeper')} (commit {commit}"
                       f"{', with uncommitted changes' if dirty else ''})",
        "supervisord": dist(pythons[".venv-supervisord"], "supervisor"),
        "APScheduler": f"{dist(pythons['.venv-harness'], 'APScheduler')} (script); "
                       f"{dist(wk, 'APScheduler')} (in watchkeeper)",
        "psutil": dist(pythons[".venv-harness"], "psutil"),
    }


def markdown(results: Results, plan, pythons: dict[str, Path], repo: Path,
             extra: list[tuple[str, str]], failures: list[str], elapsed_s: float) -> str:
    rows = _rows(plan)
    restart = results.samples[WK].get("restart_ms", []), results.samples[SV].get("restart_ms", [])
    lines = [
        "# watchkeeper and supervisord, side by side",
        "",
        f"Made by `{plan.command}` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC "
        f"in {elapsed_s / 60:.1f} min: {plan.rounds} round(s), each running every workload "
        "under watchkeeper, then under supervisord (ABAB…). Figures are medians over the "
        "rounds; restart latencies are pooled over all rounds "
        f"({len(restart[0])} and {len(restart[1])} kills). Ratio = watchkeeper / supervisord.",
        "",
        "## Machine and versions",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in {**machine(), **versions(pythons, repo)}.items()],
        f"| load average (1 min) before each workload | {_load_range(results.loads)} |",
        "",
        *(["## Measurements that could not be taken", "",
           *[f"- {f.splitlines()[0]}" for f in failures], ""] if failures else []),
        "## Supervision",
        "",
        *table(results, rows, WK, SV, with_targets=True),
        "",
        "Seen before on these machines (supervisord 4.3.0, medians of 3): RSS with 5 programs "
        "24.7 MiB (USS 14.7), restart after SIGKILL 1012 ms, start until 50 programs 1.41 s, "
        "stop of 5 children ignoring SIGTERM with a 3 s grace 17.9 s, a grandchild in its own "
        "session survives supervisord.",
        "",
        "The machine is shared: other work ran beside the benchmark (see the load average "
        "above), so absolute times carry its noise; both daemons took turns under it.",
        "",
        "## Scheduling",
        "",
        f"{plan.jobs} interval jobs, every {plan.every_s:g} s, all planned at start-up (so "
        f"they fire together), each starting `/bin/sh once.sh`; firings due in a "
        f"{plan.sched_window_s:g} s window. supervisord has no scheduler: the baseline is a "
        "bare APScheduler script (`bench/harness/aps_baseline.py`).",
        "",
        *table(results, SCHED_ROWS, WK, APS, with_targets=False),
        "",
        "## How each figure is taken",
        "",
        *METHOD,
        "",
        "## Every round",
        "",
        *every_round(results, rows + [Row(r.key, "scheduling: " + r.label, r.unit, r.digits)
                                      for r in SCHED_ROWS], [WK, SV, APS]),
        "",
        "Restart after SIGKILL, every kill (ms), in order:",
        "",
        *[f"- {d}: " + ", ".join(f"{v:.1f}" for v in results.samples[d].get("restart_ms", []))
          for d in (WK, SV)],
        "",
    ]
    for title, text in extra:
        lines += [f"## {title}", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(lines)


METHOD = [
    "- Every program is `/bin/sh` running a two-line script: write `NAME PID` to a FIFO, then "
    "`exec sleep 100000` (same pid). The harness reads the FIFO in a thread and stamps each "
    "line on arrival: that is when a program *runs*, at the same cost under both daemons.",
    "- Configuration: both daemons on their defaults, except a 3 s stop grace "
    "(`stop_grace_s: 3` / `stopwaitsecs=3`), `stopasgroup=true killasgroup=true` for "
    "supervisord (watchkeeper signals the process group by default). watchkeeper's "
    "heartbeat checks and memory guard are on (its defaults). supervisord keeps its control "
    "socket, as watchkeeper always has one. watchkeeper is installed editable from the "
    "checkout and byte-compiled first, as pip compiles an installed package (supervisord's).",
    "- Memory: psutil `memory_full_info()` of the daemon process alone, after every program "
    "runs and a settling pause. CPU: seconds the daemon ran (all threads) over an idle "
    "window, from the kernel's exact runtime of each thread (`se.sum_exec_runtime` in "
    "`/proc/PID/task/TID/sched`; a thread that ends inside the window is not counted).",
    "- Restart: SIGKILL the program that has been up longest, time until its replacement "
    "writes its line. A program is killed only after 11 s up, longer than watchkeeper's "
    "`healthy_after_s` (10 s) and supervisord's `startsecs` (1 s), so both treat the exit as "
    "the crash of a healthy program and restart without backoff (a program that dies sooner "
    "backs off under both: watchkeeper 5 s × 2^n, supervisord 1, 2, 3 s then FATAL).",
    "- Start: from spawning the daemon (interpreter start and imports included) until every "
    "program has written its line.",
    "- Stop: SIGTERM to the daemon; each program's exit is seen through a pidfd. *Until all "
    "gone* = the daemon and every program (grandchildren included) have exited; a process "
    "still alive 1 s after the daemon exited counts as left behind (then the harness kills "
    "it). The harness is a child subreaper, so nothing escapes its clean-up.",
    "- Scheduling: see the docstring of `bench/harness/scheduling.py`; the slot of a firing "
    "is the scheduler's own first planned time plus k intervals, its start is when its "
    "program writes its line, so lateness includes starting `/bin/sh`.",
]
