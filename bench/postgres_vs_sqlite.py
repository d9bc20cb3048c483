"""Shared state on PostgreSQL versus the embedded SQLite, on this machine.

    python bench/postgres_vs_sqlite.py [--quick] [--dsn DSN]

1. Steward throughput: durable memory updates per second, one update per transaction and
   in batches of 50 (the daemon commits each loop turn's updates as one batch). SQLite:
   WAL + synchronous=FULL; PostgreSQL: one transaction under the steward advisory lock,
   synchronous_commit=on. Both fsync every commit.
2. Task-claim latency: take and release one task lock (SQLite backend: lock file + flock;
   PostgreSQL: a leased row), and claim one scheduled firing (PostgreSQL only; on SQLite a
   single host needs no claim). p50 and p99 in milliseconds.
Runs in a throw-away schema (dropped afterwards) and a temporary directory. Prints figures
only; they depend on the disk, the server's settings and the network (here: localhost).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import structlog  # noqa: E402

from supervisor.memory.store import MemoryStore, Op, Update  # noqa: E402
from supervisor.pg.claims import claim  # noqa: E402
from supervisor.pg.db import Database  # noqa: E402
from supervisor.pg.leases import acquire_lock, release_locks  # noqa: E402
from supervisor.pg.memory import PgMemoryStore  # noqa: E402
from supervisor.pg.migrations import migrate  # noqa: E402
from supervisor.runs import locks  # noqa: E402
from supervisor.storage.settings import StorageSettings  # noqa: E402

GRANTS = {"bench": ["*"]}
DEFAULT_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"


def merges(count: int) -> list[Update]:
    return [Update(op=Op.MERGE, namespace="bench", key=f"counter-{i % 50}",
                   value={"n": i, "note": f"update {i} from the throughput benchmark"},
                   agent="bench", run_id="throughput") for i in range(count)]


def updates_per_s(store, batch_size: int, count: int) -> float:
    stream = merges(count)
    started = time.monotonic()
    for start in range(0, count, batch_size):
        store.apply_batch(stream[start:start + batch_size], grants=GRANTS)
    return count / (time.monotonic() - started)


def latencies_ms(action, count: int) -> tuple[float, float]:
    samples = []
    for i in range(count):
        started = time.perf_counter()
        action(i)
        samples.append((time.perf_counter() - started) * 1000)
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer updates and claims (<60 s)")
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    try:
        psycopg.connect(args.dsn, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        print(f"PostgreSQL not reachable ({args.dsn}): {str(exc).strip()}; not measured")
        return 0
    single, batched, claims = (300, 5000, 500) if args.quick else (2000, 50000, 5000)
    schema = f"wk_bench_{secrets.token_hex(4)}"
    db = Database(StorageSettings(backend="postgresql", dsn=args.dsn, schema=schema,
                                  host_name="bench"))
    try:
        migrate(db)
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp), db, single, batched, claims)
    finally:
        db.close()
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f'drop schema if exists "{schema}" cascade')
    return 0


def run(tmp: Path, db: Database, single: int, batched: int, claims: int) -> None:
    print("steward throughput (durable updates/s)")
    print(f"{'':24}{'SQLite':>12}{'PostgreSQL':>14}")
    with MemoryStore(tmp) as lite:
        pg = PgMemoryStore(db)
        for batch, count in ((1, single), (50, batched)):
            a = updates_per_s(lite, batch, count)
            b = updates_per_s(pg, batch, count)
            print(f"{f'batch of {batch} ({count})':24}{a:>12,.0f}{b:>14,.0f}")
    print()
    print(f"task-claim latency, ms (p50 / p99 over {claims})")
    (tmp / "tasks").mkdir()

    def file_lock(i: int) -> None:
        locks.acquire(tmp, f"task-{i % 10}", agent="bench", run_id="r").release()

    def row_lock(i: int) -> None:
        acquire_lock(db, 30.0, f"task-{i % 10}", host="bench", agent="bench", run_id="r", pid=1)
        release_locks(db, "bench", run_id="r", task_id=f"task-{i % 10}")

    lite_lock = latencies_ms(file_lock, claims)
    pg_lock = latencies_ms(row_lock, claims)
    pg_claim = latencies_ms(lambda i: claim(db, "bench", "bench", "job", float(i)), claims)
    print(f"{'':24}{'SQLite backend':>16}{'PostgreSQL':>16}")
    print(f"{'take + release a lock':24}{_pair(lite_lock):>16}{_pair(pg_lock):>16}")
    print(f"{'claim a firing':24}{'(not needed)':>16}{_pair(pg_claim):>16}")


def _pair(p50_p99: tuple[float, float]) -> str:
    return f"{p50_p99[0]:.2f} / {p50_p99[1]:.2f}"


if __name__ == "__main__":
    sys.exit(main())
