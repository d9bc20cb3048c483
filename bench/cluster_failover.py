"""Several hosts, one pipeline: failover time and a small chaos run, on this machine.

    python bench/cluster_failover.py [--quick] [--dsn DSN]

1. Failover: three daemons (three state dirs, one schema) run an unpinned `always` agent;
   the host running it is SIGKILLed with its agents, and the time until the agent prints
   from another host is measured. Target: <= lease_s + 1 s (lease_s printed beside it).
2. Chaos: three daemons on a PostgreSQL of the script's own (initdb + pg_ctl, stopped and
   started by the script) run a writer (`always`; acknowledged memory updates, each with a
   unique key) and a 0.5 s interval job, while hosts are SIGKILLed and restarted and the
   database is restarted. Counted: samples with two writer processes alive at once
   (duplicate runs, target 0), and acknowledged updates missing from the database at the
   end (lost, target 0).
Figures are printed, never asserted. A missing PostgreSQL is reported, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import psutil  # noqa: E402
import psycopg  # noqa: E402
import yaml  # noqa: E402

DEFAULT_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
LEASE_S = 3.0
MARK = "wk-bench-cluster-writer"
FOREVER = "import time; print('up', flush=True); time.sleep(3600)"
WRITER = f"""
# {MARK}
import os, time
from supervisor.sdk import Agent, MemoryRejected
agent = Agent()
i = 0
while True:
    key = f"{{os.environ.get('WATCHKEEPER_RUN_ID', 'run')}}-{{i}}"
    try:
        agent.memory.put("writer", key, i, idempotency_key=key)
        print(f"acked {{key}} {{i}}", flush=True)
        i += 1
    except MemoryRejected:
        pass  # retryable: the same key again
    time.sleep(0.05)
"""


class Host:
    """One watchkeeper daemon with its own state dir; its JSON log events are kept."""

    def __init__(self, root: Path, name: str, storage: dict, agents: dict) -> None:
        self.name = name
        self.root = root / name
        (self.root / "agents.d").mkdir(parents=True, exist_ok=True)
        self.config = self.root / "watchkeeper.yaml"
        self.config.write_text(yaml.safe_dump({
            "state_dir": str(self.root / "state"), "stop_grace_s": 2, "tick_s": 0.2,
            "breaker": {"launches": {"max_runs": 100000}},
            "storage": {**storage, "host_name": name}}))
        for agent, spec in agents.items():
            (self.root / "agents.d" / f"{agent}.yaml").write_text(yaml.safe_dump(spec))
        self.events: list[dict] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "--config", str(self.config), "run",
             "--log-format", "json"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=env)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc) -> None:
        for raw in proc.stderr:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            event["_mono"] = time.monotonic()
            self.events.append(event)

    def find(self, event: str, **match) -> list[dict]:
        return [e for e in list(self.events) if e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())]

    def kill_tree(self) -> None:
        tree = [self.proc.pid] + [p.pid for p in
                                  psutil.Process(self.proc.pid).children(recursive=True)]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill_tree()


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def storage(dsn: str, schema: str) -> dict:
    return {"backend": "postgresql", "dsn": dsn, "schema": schema, "leader_lease_s": 2.0,
            "lease_s": LEASE_S, "poll_s": 0.25}


def drop(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'drop schema if exists "{schema}" cascade')


# -- 1. failover -------------------------------------------------------------------------------
def failover(dsn: str, trials: int) -> list[float]:
    schema = f"wkb_failover_{secrets.token_hex(4)}"
    agents = {"single": {"jobs": [{"id": "main", "command": [sys.executable, "-c", FOREVER],
                                   "schedule": {"always": True}}]}}
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        hosts = [Host(Path(tmp), f"h{i}", storage(dsn, schema), agents) for i in (1, 2, 3)]
        for h in hosts:
            h.start()
        try:
            for _ in range(trials):
                if not wait_for(lambda: _running_host(hosts) is not None, 20):
                    raise RuntimeError("the always agent did not start")
                victim = _running_host(hosts)
                seen = {h.name: len(h.find("agent_output", agent="single")) for h in hosts}
                killed_at = time.monotonic()
                victim.kill_tree()
                others = [h for h in hosts if h is not victim]
                if not wait_for(lambda others=others, seen=seen: any(
                        len(h.find("agent_output", agent="single")) > seen[h.name]
                        for h in others), 30):
                    raise RuntimeError("the always agent did not move")
                moved = min(e["_mono"] for h in others
                            for e in h.find("agent_output", agent="single")[seen[h.name]:])
                samples.append(moved - killed_at)
                victim.start()  # the host comes back, empty-handed, for the next trial
                wait_for(lambda v=victim: v.find("cluster_joined"), 20)
        finally:
            for h in hosts:
                h.stop()
            drop(dsn, schema)
    return samples


def _running_host(hosts: list[Host]) -> Host | None:
    for h in hosts:
        if h.proc.poll() is None and any("time.sleep(3600)" in _cmdline(p)
                                         for p in psutil.Process(h.proc.pid).children()):
            return h
    return None


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # gone between the listing and the read
        return ""


# -- 2. chaos ------------------------------------------------------------------------------------
def chaos(duration_s: float) -> dict:
    import pg_instance

    server = pg_instance.OwnPostgres().init()
    schema = "wkb_chaos"
    agents = {"writer": {"jobs": [{"id": "w", "command": [sys.executable, "-c", WRITER],
                                   "schedule": {"always": True}}]},
              "tick": {"jobs": [{"id": "t", "command": [sys.executable, "-c", "pass"],
                                 "schedule": {"every_s": 0.5}}]}}
    rng = random.Random(18)
    kills = restarts = 0
    samples = doubled = 0
    with tempfile.TemporaryDirectory() as tmp:
        hosts = [Host(Path(tmp), f"h{i}", storage(server.dsn, schema), agents)
                 for i in (1, 2, 3)]
        for h in hosts:
            h.start()
        try:
            end = time.monotonic() + duration_s
            next_fault = time.monotonic() + 4.0
            while time.monotonic() < end:
                writers = sum(1 for p in psutil.process_iter(["cmdline"])
                              if MARK in " ".join(p.info["cmdline"] or ()))
                samples += 1
                doubled += writers > 1
                if time.monotonic() >= next_fault:
                    if rng.random() < 0.6:
                        victim = rng.choice(hosts)
                        victim.kill_tree()
                        victim.start()
                        kills += 1
                    else:
                        server.stop()
                        time.sleep(rng.uniform(1.0, 5.0))
                        server.start()
                        restarts += 1
                    next_fault = time.monotonic() + rng.uniform(3.0, 6.0)
                time.sleep(0.1)
            acked = {}
            for h in hosts:
                for e in h.find("agent_output", agent="writer"):
                    if e.get("line", "").startswith("acked "):
                        _, key, value = e["line"].split()
                        acked[key] = int(value)
        finally:
            for h in hosts:
                h.stop()
        with psycopg.connect(server.dsn) as conn:
            conn.execute(f"set search_path = {schema}")
            stored = dict(conn.execute("select key, value::int from entries where "
                                       "namespace = 'writer'").fetchall())
            claims = conn.execute("select count(*) from firing_claims").fetchone()[0]
        server.destroy()
    ticks = sum(len(h.find("run_started", agent="tick")) for h in hosts)
    lost = sum(1 for k, v in acked.items() if stored.get(k) != v)
    return {"duration_s": duration_s, "host_kills": kills, "db_restarts": restarts,
            "samples": samples, "samples_with_two_writers": doubled, "acked": len(acked),
            "lost_acked": lost, "tick_runs": ticks, "tick_claims": claims}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 failovers, 30 s of chaos")
    parser.add_argument("--dsn", default=os.environ.get("WATCHKEEPER_TEST_PG_DSN", DEFAULT_DSN))
    args = parser.parse_args()
    try:
        psycopg.connect(args.dsn, connect_timeout=3).close()
    except psycopg.Error as exc:
        print(f"PostgreSQL not reachable ({args.dsn}): {str(exc).strip()}; not measured")
        return 0
    trials, chaos_s = (2, 30.0) if args.quick else (5, 120.0)
    samples = failover(args.dsn, trials)
    print(f"failover after SIGKILL of the host running an `always` job ({trials} trials, "
          f"lease_s {LEASE_S:g}, poll_s 0.25)")
    print(f"  median {statistics.median(samples):.2f} s, max {max(samples):.2f} s "
          f"(target <= lease_s + 1 = {LEASE_S + 1:.1f} s); samples: "
          + ", ".join(f"{s:.2f}" for s in samples))
    import pg_instance

    if not pg_instance.available:
        print(f"chaos run: not measured ({pg_instance.MISSING})")
        return 0
    figures = chaos(chaos_s)
    print(f"chaos run: {figures['duration_s']:.0f} s, {figures['host_kills']} host SIGKILLs "
          f"(with their agents, then restarted), {figures['db_restarts']} database restarts")
    print(f"  duplicate runs of the `always` writer: {figures['samples_with_two_writers']} of "
          f"{figures['samples']} samples with two alive (target 0)")
    print(f"  lost acknowledged updates: {figures['lost_acked']} of {figures['acked']} "
          "(target 0)")
    print(f"  interval job: {figures['tick_runs']} runs for {figures['tick_claims']} claimed "
          "slots (runs <= slots: no slot ran twice)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
