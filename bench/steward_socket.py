"""The memory steward through the daemon's socket: durable updates/s, ack latency, search latency.

    python bench/steward_socket.py [--quick]

1. Five writer processes, each a real agent run of a real daemon, send merges over the control
   socket as fast as the daemon acknowledges them. An acknowledgement means the update's
   transaction is committed with WAL + synchronous=FULL (fsynced), so this is durable
   throughput. The daemon commits everything that arrived in one loop turn together (group
   commit); how much arrives per turn depends on how many requests each writer keeps in flight:
   1 (an SDK agent waiting for each answer) or a pipelined window of 16 or 64.
   Latency is per update, from the writer's send to the writer's receipt of the answer; the
   daemon's CPU time per update is steadier than updates/s on a machine shared with others.
2. `search` through the socket over a memory of 100k entries (20k with --quick): round trip
   p50/p99 as an agent sees it, and the daemon's own time for the query.
Prints figures only; absolute numbers depend on the machine, its disk and what else runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent / "data")]

import psutil  # noqa: E402
import structlog  # noqa: E402
from live_daemon import LiveDaemon, wait_for  # noqa: E402
from steward_store import build_large, percentile  # noqa: E402

from supervisor.control.client import ControlClient  # noqa: E402
from supervisor.memory.store import MemoryStore  # noqa: E402

WRITERS = 5
WINDOWS = (1, 16, 64)

WRITER = r"""
import json, os, socket, sys, time
from pathlib import Path
bench, mode = Path(os.environ["BENCH_DIR"]), os.environ["MODE"]
count, window = int(os.environ["COUNT"]), int(os.environ["WINDOW"])
me = os.environ["WATCHKEEPER_AGENT"]
head = {"cmd": "memory", "run_id": os.environ["WATCHKEEPER_RUN_ID"],
        "token": os.environ["WATCHKEEPER_RUN_TOKEN"]}
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(os.environ["WATCHKEEPER_SOCKET"])
(bench / f"ready-{mode}-{me}").touch()
while not (bench / f"go-{mode}").exists():
    time.sleep(0.001)
sent_at, latencies, failed, buf = {}, [], 0, b""

def frame(i):
    sent_at[i] = time.monotonic()
    args = {"op": "merge", "namespace": "bench", "key": f"{me}-{i % 50}",
            "value": {"n": i, "note": f"update {i} from {me}"}}
    return json.dumps({**head, "id": i, "args": args}).encode() + b"\n"

started = time.monotonic()
sock.sendall(b"".join(frame(i) for i in range(min(window, count))))
next_id = min(window, count)
done = 0
while done < count:
    chunk = sock.recv(1 << 20)
    if not chunk:
        sys.exit("the daemon hung up")
    *lines, buf = (buf + chunk).split(b"\n")
    now, more = time.monotonic(), []
    for line in lines:
        reply = json.loads(line)
        latencies.append(now - sent_at.pop(reply["id"]))
        failed += not reply["ok"]
        done += 1
        if next_id < count:
            more.append(frame(next_id))
            next_id += 1
    if more:
        sock.sendall(b"".join(more))
ended = time.monotonic()
result = {"started": started, "ended": ended, "latencies": latencies, "failed": failed}
(bench / f"result-{mode}-{me}.json").write_text(json.dumps(result))
"""


def writer_agents(bench_dir: Path, count: int) -> dict[str, dict]:
    jobs = [{"id": f"window{w}", "command": ["{python}", "-c", WRITER],
             "schedule": {"every_s": 86400}, "timeout_s": 600,
             "env": {"BENCH_DIR": str(bench_dir), "MODE": f"window{w}", "WINDOW": str(w),
                     "COUNT": str(count if w > 1 else count // 4)}}
            for w in WINDOWS]
    return {f"writer{i}": {"jobs": jobs, "memory_write": ["bench"]} for i in range(WRITERS)}


def one_mode(daemon: LiveDaemon, bench_dir: Path, window: int) -> dict:
    mode, names = f"window{window}", [f"writer{i}" for i in range(WRITERS)]
    for name in names:
        started = daemon.call("start-now", agent=name, job=mode)
        if started["result"] != "started":
            raise RuntimeError(f"{name} did not start: {started['result']}")
    wait_for(lambda: all((bench_dir / f"ready-{mode}-{n}").exists() for n in names), 30,
             "the writers to connect")
    applied_before = daemon.call("status")["extensions"]["steward"]["applied"]
    cpu_before = sum(psutil.Process(daemon.proc.pid).cpu_times()[:2])
    (bench_dir / f"go-{mode}").touch()
    results = [wait_for(lambda n=n: _result(bench_dir / f"result-{mode}-{n}.json"), 300,
                        f"{n} to finish") for n in names]
    cpu_s = sum(psutil.Process(daemon.proc.pid).cpu_times()[:2]) - cpu_before
    applied = daemon.call("status")["extensions"]["steward"]["applied"] - applied_before
    wait_for(lambda: not any(a["run_id"] for a in daemon.call("status")["agents"]), 30,
             "the writer runs to end")
    latencies = [s for r in results for s in r["latencies"]]
    elapsed_s = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return {"window": window, "updates": len(latencies), "applied": applied,
            "failed": sum(r["failed"] for r in results), "per_s": len(latencies) / elapsed_s,
            "cpu_us": cpu_s / len(latencies) * 1e6,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000, "max_ms": max(latencies) * 1000}


def _result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def throughput(workdir: Path, count: int) -> None:
    bench_dir = workdir / "io"
    bench_dir.mkdir()
    print(f"durable updates through the socket, {WRITERS} writer processes, merges, "
          "WAL + synchronous=FULL:\n")
    print("| in flight per writer | updates | updates/s | ack p50 | ack p99 | ack max | "
          "daemon CPU per update |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with LiveDaemon(workdir / "daemon", writer_agents(bench_dir, count)) as daemon:
        for window in WINDOWS:
            r = one_mode(daemon, bench_dir, window)
            note = "" if r["failed"] == 0 and r["applied"] == r["updates"] else \
                f" ({r['failed']} failed, {r['applied']} applied)"
            print(f"| {window} | {r['updates']:,} | {r['per_s']:,.0f} | {r['p50_ms']:.2f} ms | "
                  f"{r['p99_ms']:.2f} ms | {r['max_ms']:.1f} ms | {r['cpu_us']:.0f} µs{note} |",
                  flush=True)


def search(workdir: Path, entries: int) -> None:
    daemon_dir = workdir / "search"
    (daemon_dir / "state").mkdir(parents=True)
    started = time.monotonic()
    with MemoryStore(daemon_dir / "state") as store:
        questions = build_large(store, entries)
    load_s = time.monotonic() - started
    with LiveDaemon(daemon_dir, {}) as daemon:
        client = ControlClient(daemon.socket_path)
        client.run_id = client.token = None
        print(f"\nsearch through the socket over {entries:,} entries (loaded in {load_s:.1f} s), "
              f"{len(questions)} queries x2, k=12, token_budget=3000:\n")
        print("| scope | round trip p50 | round trip p99 | max | in daemon p50 | in daemon p99 |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, scoped in (("all namespaces", False), ("role namespaces", True)):
            trips, inside = [], []
            for q in questions * 2:
                args = {"query": q.task, "k": 12, "token_budget": 3000}
                if scoped:
                    args["namespaces"] = q.namespaces
                t0 = time.monotonic()
                result = client.call("search", **args)
                trips.append((time.monotonic() - t0) * 1000)
                inside.append(result["elapsed_ms"])
            print(f"| {label} | {statistics.median(trips):.2f} ms | "
                  f"{percentile(trips, 0.99):.2f} ms | {max(trips):.2f} ms | "
                  f"{statistics.median(inside):.2f} ms | {percentile(inside, 0.99):.2f} ms |")
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, under 60 s")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    with tempfile.TemporaryDirectory(prefix="wk-bench-") as tmp:
        throughput(Path(tmp), 4000 if args.quick else 20_000)
        search(Path(tmp), 20_000 if args.quick else 100_000)


if __name__ == "__main__":
    main()
