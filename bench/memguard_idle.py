"""What the memory guard costs an idle daemon on a simulated 4 GB VPS at 50 % used.

    python bench/memguard_idle.py [--window-s 30] [--rounds 1] [--quick]

The VPS is a memory cgroup limited to 4 GiB in which a filler process holds 2 GiB; the
daemon's guard measures against it (`memory_guard.scope_cgroup`), as shipped otherwise.
In the same run, alternating: watchkeeper with its PSI trigger (the default
`pressure_stall_ms`), watchkeeper with the trigger off (adaptive sampling only, the guard
before the trigger), and supervisord, each with 5 idle programs (bench/harness). For
each: the daemon's wakeups per second (the context switches of all its threads) and its
CPU seconds over the idle window. Every figure is printed with the machine's total memory and
load average. Needs a writable memory cgroup (v1, or v2 with memory delegated) and 2 GiB
of free memory. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import venvs  # noqa: E402  (standard library only: runs before any venv)

VPS_BYTES, USED_BYTES = 4 << 30, 2 << 30
FILLER = ("import sys\nblock = bytearray(int(sys.argv[1]))\n"
          "for i in range(0, len(block), 4096): block[i] = 1\n"
          "print('ready', flush=True)\nsys.stdin.read()")


def machine() -> str:
    total_kib = next(int(line.split()[1]) for line in open("/proc/meminfo")
                     if line.startswith("MemTotal:"))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"[{total_kib / 2**20:.1f} GiB total memory, load {load}]"


def memory_cgroup_parent() -> tuple[Path, str]:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if hierarchy == "0":
            for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                control = mount / rel / "cgroup.subtree_control"
                if control.exists() and "memory" in control.read_text().split():
                    return mount / rel, "v2"
        elif "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / rel, "v1"
    raise SystemExit("no memory cgroup to simulate the VPS in")


class SimulatedVps:
    """A 4 GiB memory cgroup with 2 GiB held by a filler process."""

    def __enter__(self) -> SimulatedVps:
        parent, version = memory_cgroup_parent()
        self.path = parent / f"wk-bench-vps-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        limit = "memory.max" if version == "v2" else "memory.limit_in_bytes"
        (self.path / limit).write_text(str(VPS_BYTES))
        self.filler = subprocess.Popen(
            ["sh", "-c", f'echo $$ > "{self.path}/cgroup.procs" && exec "$0" -c "$1" "$2"',
             sys.executable, FILLER, str(USED_BYTES)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.filler.stdout.readline().strip() != "ready":
            raise SystemExit("the filler did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.filler.kill()
        self.filler.wait()
        deadline = time.monotonic() + 10
        while (self.path / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)  # the kernel empties the cgroup shortly after the kill
        self.path.rmdir()


def thread_switches(pid: int) -> dict[int, int]:
    """Context switches of each of the daemon's threads: a thread of its own (an alert
    sender, the steward, a control server) that polls wakes the machine as well."""
    switches = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue  # the thread ended
        switches[int(task.name)] = sum(
            int(line.split()[1]) for line in text.splitlines()
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
    return switches


def idle_figures(kind, python: Path, window_s: float, guard: dict | None) -> dict[str, float]:
    from harness.workloads import Session

    with Session(kind, python, "sleeper.sh", [f"p{i:02d}" for i in range(5)]) as s:
        if guard is not None:
            main = s.daemon.root / "main.yaml"
            config = json.loads(main.read_text())
            config["memory_guard"] = guard
            main.write_text(json.dumps(config, indent=2) + "\n")
        s.start_until_running()
        time.sleep(3)  # a benchmark: let start-up settle before the idle window
        pid = s.daemon.pid
        before = thread_switches(pid)
        cpu_s = s.cpu_s(window_s)
        after = thread_switches(pid)
        wakeups = sum(n - before.get(tid, 0) for tid, n in after.items())
    return {"wakeups_per_s": wakeups / window_s, "cpu_s": cpu_s, "threads": len(after)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="a 10 s idle window (bench/run.py --quick)")
    args = parser.parse_args()
    if args.quick:
        args.window_s, args.rounds = 10.0, 1
    pythons = venvs.ensure_all(log=lambda msg: print(msg, flush=True))
    if not venvs.in_harness_venv():
        venvs.reexec_in_harness(Path(__file__).resolve(), sys.argv[1:])
    from harness.daemons import Supervisord, Watchkeeper
    from harness.procs import become_subreaper, kill_everything

    become_subreaper()
    wk_py, sv_py = pythons[".venv-watchkeeper"], pythons[".venv-supervisord"]
    try:
        with SimulatedVps() as vps:
            scope = {"scope_cgroup": str(vps.path)}
            variants = [
                ("watchkeeper, PSI trigger (as shipped)", Watchkeeper, wk_py, scope),
                ("watchkeeper, adaptive sampling only", Watchkeeper, wk_py,
                 {**scope, "pressure_stall_ms": 0}),
                ("supervisord", Supervisord, sv_py, None),
            ]
            print(f"simulated VPS: {VPS_BYTES >> 30} GiB cgroup, {USED_BYTES >> 30} GiB used "
                  f"({vps.path}); idle window {args.window_s:g} s {machine()}", flush=True)
            for r in range(1, args.rounds + 1):
                for label, kind, python, guard in variants:
                    figures = idle_figures(kind, python, args.window_s, guard)
                    print(f"  round {r}: {label}: {figures['wakeups_per_s']:.2f} wakeups/s "
                          f"({figures['threads']} threads), "
                          f"CPU {figures['cpu_s']:.3f} s {machine()}", flush=True)
    finally:
        kill_everything()
    print("targets: watchkeeper as shipped <= 0.1 wakeups/s and CPU <= 0.5 x supervisord's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
