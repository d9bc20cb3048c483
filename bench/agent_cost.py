"""What an agent pays to talk to the daemon: one CLI verb, and `import supervisor.sdk`.

    .venv/bin/python bench/agent_cost.py [--rounds N] [--quick]

Starts a real daemon (this interpreter, this repository) with one agent whose run measures,
from inside the run, each command below over N alternating rounds: wall time from spawn
to exit, and its peak RSS (GNU time's %M, from a separate spawn). Every figure sits beside the floor
measured in the same run (`python -I -S -c pass`) and is printed with the machine's total
memory and load average. Two installs are measured: this interpreter's `watchkeeper`
script (in a `pip install -e` venv the editable finder's .pth imports pathlib and re before
anything of ours runs) and a plain install, modelled by a venv whose .pth only puts this
repository on sys.path (what `pip install .` amounts to at start-up). Byte-code is
compiled first, as an install does. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from harness.machine import machine_line  # noqa: E402  (standard library only)

BIN = Path(sys.executable).parent

TARGET_WALL_X, TARGET_RSS_MIB, TARGET_SDK_MIB = 2.0, 12.0, 3.0

# Runs inside the agent's run: spawns each command ROUNDS times, alternating, and prints
# {label: [[wall_ms, maxrss_kib], ...]} as one JSON line.
MEASURE = r"""
import json, os, sys, tempfile, time
commands = json.loads(os.environ["BENCH_COMMANDS"])
rounds = int(os.environ["BENCH_ROUNDS"])
out = tempfile.mktemp()
figures = {label: [] for label in commands}
for _ in range(rounds):
    for label, argv in commands.items():
        started = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, os.environ)
        _, status, _ = os.wait4(pid, 0)
        wall_ms = (time.perf_counter() - started) * 1000
        # Peak RSS through GNU time, which forks from its own small process: a child
        # spawned from this one inherits this process's high-water mark until it execs.
        pid = os.posix_spawn("/usr/bin/time", ["time", "-f", "%M", "-o", out, *argv],
                             os.environ)
        os.waitpid(pid, 0)
        peak_kib = int(open(out).read().split()[-1])
        figures[label].append([wall_ms, peak_kib, os.waitstatus_to_exitcode(status)])
os.unlink(out)
print("BENCH " + json.dumps(figures), flush=True)
"""


def plain_install(tmp: Path) -> Path:
    """A venv with this repository on sys.path through a plain .pth, and the same script
    pip installs (bin/watchkeeper, its first line rewritten to the venv's python): start-up
    as after `pip install .`."""
    venv = tmp / "plain-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "watchkeeper-repo.pth").write_text(f"{ROOT}\n")
    script = venv / "bin" / "watchkeeper"
    body = (ROOT / "bin" / "watchkeeper").read_text().split("\n", 1)[1]
    script.write_text(f"#!{venv / 'bin' / 'python3'}\n{body}")
    script.chmod(0o755)
    return venv / "bin"


def commands(plain_bin: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "floor: python -I -S -c pass": [py, "-I", "-S", "-c", "pass"],
        "python -c pass (editable venv, site)": [py, "-c", "pass"],
        "python -c 'import supervisor.sdk' (editable venv)": [py, "-c", "import supervisor.sdk"],
        "watchkeeper heartbeat (editable venv)": [str(BIN / "watchkeeper"), "heartbeat"],
        "watchkeeper usage (editable venv)": [str(BIN / "watchkeeper"), "usage", "--tokens", "1"],
        "plain: python -c pass": [str(plain_bin / "python3"), "-c", "pass"],
        "plain: python -c 'import supervisor.sdk'": [str(plain_bin / "python3"), "-c",
                                                     "import supervisor.sdk"],
        "plain: watchkeeper heartbeat": [str(plain_bin / "watchkeeper"), "heartbeat"],
        "plain: watchkeeper lock": [str(plain_bin / "watchkeeper"), "lock", "bench-task"],
        "plain: watchkeeper unlock": [str(plain_bin / "watchkeeper"), "unlock", "bench-task"],
        "plain: watchkeeper memory put": [str(plain_bin / "watchkeeper"), "memory", "put",
                                          "bench", "k", '{"n": 1}'],
        "before (full parser): python -m supervisor.cli heartbeat": [
            py, "-m", "supervisor.cli", "heartbeat"],
    }


def run_in_daemon(tmp: Path, cmds: dict[str, list[str]], rounds: int) -> dict:
    state = tmp / "state"
    (tmp / "agents.d").mkdir()
    (tmp / "watchkeeper.yaml").write_text(json.dumps({"state_dir": str(state)}))
    agent = {"jobs": [{"id": "measure", "command": [sys.executable, "-c", MEASURE],
                       "schedule": {"every_s": 3600}, "timeout_s": 900,
                       "env": {"BENCH_COMMANDS": json.dumps(cmds),
                               "BENCH_ROUNDS": str(rounds)}}],
             "memory_write": ["bench"], "limits": {"outputs": {"max_outputs": 10000,
                                                               "window_s": 60}}}
    (tmp / "agents.d" / "bench.yaml").write_text(json.dumps(agent))
    log = open(tmp / "daemon.log", "w+")
    daemon = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "--config",
                               str(tmp / "watchkeeper.yaml"), "run", "--log-format", "json"],
                              stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        start_now(state / "control.sock", daemon)
        deadline = time.monotonic() + float(os.environ.get("BENCH_DEADLINE_S", 900))
        while time.monotonic() < deadline:
            for line in (tmp / "daemon.log").read_text().splitlines():
                if "BENCH " in line:
                    event = json.loads(line)
                    return json.loads(event["line"].split("BENCH ", 1)[1])
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited: {(tmp / 'daemon.log').read_text()}")
            time.sleep(0.2)  # a benchmark driver, not a test: polling a log file
        raise SystemExit("no figures in time: " + (tmp / "daemon.log").read_text()[-3000:])
    finally:
        daemon.terminate()
        daemon.wait(30)


def start_now(socket_path: Path, daemon: subprocess.Popen) -> None:
    sys.path.insert(0, str(ROOT))
    from supervisor.control.client import ControlClient
    from supervisor.errors import DaemonNotRunning

    deadline = time.monotonic() + 60
    while daemon.poll() is None and time.monotonic() < deadline:
        try:
            ControlClient(socket_path).call("start-now", agent="bench")
            return
        except DaemonNotRunning:
            time.sleep(0.1)  # not listening yet
    raise SystemExit("the daemon did not answer on its socket")


def report(figures: dict, rounds: int) -> None:
    def med(label: str, index: int) -> float:
        return statistics.median(f[index] for f in figures[label])

    floor_ms, floor_kib = med("floor: python -I -S -c pass", 0), med(
        "floor: python -I -S -c pass", 1)
    print(f"{rounds} rounds; medians {machine_line()}")
    print(f"{'command':58} {'wall ms':>8} {'x floor':>8} {'peak MiB':>9} {'exit':>5}")
    for label in figures:
        wall, kib = med(label, 0), med(label, 1)
        codes = sorted({f[2] for f in figures[label]})
        print(f"{label:58} {wall:8.1f} {wall / floor_ms:8.2f} {kib / 1024:9.1f} "
              f"{','.join(map(str, codes)):>5} {machine_line()}")
    for prefix, base in (("", "python -c pass (editable venv, site)"),
                         ("plain: ", "plain: python -c pass")):
        sdk = [k for k in figures if k.startswith(prefix) and "import supervisor.sdk" in k][0]
        extra = (med(sdk, 1) - med(base, 1)) / 1024
        print(f"{sdk}: +{extra:.1f} MiB over `{base}` (target <= +{TARGET_SDK_MIB:.0f} MiB) "
              f"{machine_line()}")
    call = "plain: watchkeeper heartbeat"
    print(f"{call}: {med(call, 0) / floor_ms:.2f}x the floor's wall time (target <= "
          f"{TARGET_WALL_X:.0f}x), {med(call, 1) / 1024:.1f} MiB peak (target <= "
          f"{TARGET_RSS_MIB:.0f} MiB); floor {floor_ms:.1f} ms, {floor_kib / 1024:.1f} MiB "
          f"{machine_line()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 rounds (bench/run.py --quick)")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 3
    if not os.access("/usr/bin/time", os.X_OK):
        raise SystemExit("bench/agent_cost.py needs GNU time at /usr/bin/time for peak RSS")
    compileall.compile_dir(str(ROOT / "supervisor"), quiet=1)
    with tempfile.TemporaryDirectory(prefix="wk-agent-cost-") as tmp:
        plain_bin = plain_install(Path(tmp))
        figures = run_in_daemon(Path(tmp), commands(plain_bin), args.rounds)
    report(figures, args.rounds)


if __name__ == "__main__":
    main()
