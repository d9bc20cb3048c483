"""Memory store throughput and search latency.

    python bench/steward_store.py [--quick]

1. Durable updates/s: the same stream of merges applied one update per transaction versus in
   batches of N (group commit, as the daemon does per loop turn). Every commit is fsynced
   (WAL + synchronous=FULL), so this measures the disk's fsync rate as much as the code.
2. Search latency over a large memory (100k entries; 20k with --quick): p50/p99 of
   `ContextRetriever.search` for the labelled tasks of bench/data/pipeline_memory.py.
Prints figures only; absolute times depend on the machine and its disk.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "data")]

import structlog  # noqa: E402
from pipeline_memory import generate  # noqa: E402

from supervisor.memory.context import ContextRetriever, Fts5Backend  # noqa: E402
from supervisor.memory.store import MemoryStore, Op, Update  # noqa: E402

GRANTS = {"bench": ["*"]}


def merges(count: int) -> list[Update]:
    return [Update(op=Op.MERGE, namespace="bench", key=f"counter-{i % 50}",
                   value={"n": i, "note": f"update {i} from the throughput benchmark"},
                   agent="bench", run_id="throughput") for i in range(count)]


def updates_per_s(state_dir: Path, batch_size: int, count: int) -> float:
    with MemoryStore(state_dir) as store:
        stream = merges(count)
        started = time.monotonic()
        for start in range(0, count, batch_size):
            store.apply_batch(stream[start:start + batch_size], grants=GRANTS)
        return count / (time.monotonic() - started)


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def build_large(store: MemoryStore, entries: int) -> list:
    """Copies of the labelled memory under distinct team prefixes until `entries` exist."""
    questions, written, seed = [], 0, 0
    while written < entries:
        data = generate(seed)
        questions = questions or data.questions
        batch = [Update(op=Op.PUT, namespace=ns if seed == 0 else f"team{seed}-{ns}", key=key,
                        value=value, agent="bench", run_id="load")
                 for ns, key, value in data.entries][: entries - written]
        for start in range(0, len(batch), 2000):
            store.apply_batch(batch[start:start + 2000], grants=GRANTS)
        written += len(batch)
        seed += 1
    return questions


def search_latency(state_dir: Path, entries: int) -> None:
    with MemoryStore(state_dir) as store:
        started = time.monotonic()
        questions = build_large(store, entries)
        load_s = time.monotonic() - started
        size_mb = store.path.stat().st_size / 2**20
        retriever = ContextRetriever(Fts5Backend.open(store.path))
        print(f"\nsearch over {entries} entries (loaded in {load_s:.1f} s, db {size_mb:.0f} MiB), "
              f"{len(questions)} queries, k=12, token_budget=3000:\n")
        print("| scope | p50 | p99 | max |")
        print("|---|---:|---:|---:|")
        for label, scoped in (("all namespaces", False), ("role namespaces", True)):
            samples = []
            for q in questions * 2:
                t0 = time.monotonic()
                retriever.search(q.task, k=12, token_budget=3000,
                                 namespaces=q.namespaces if scoped else None)
                samples.append((time.monotonic() - t0) * 1000)
            print(f"| {label} | {statistics.median(samples):.2f} ms | "
                  f"{percentile(samples, 0.99):.2f} ms | {max(samples):.2f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, under 30 s")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    count = 300 if args.quick else 2000
    print(f"durable merges, {count} updates, WAL + synchronous=FULL:\n")
    print("| updates per transaction | updates/s | speed-up |")
    print("|---:|---:|---:|")
    baseline = None
    for batch_size in (1, 10, 100):
        with tempfile.TemporaryDirectory() as state_dir:
            rate = updates_per_s(Path(state_dir), batch_size, count)
        baseline = baseline or rate
        print(f"| {batch_size} | {rate:,.0f} | {rate / baseline:.1f}x |")
    with tempfile.TemporaryDirectory() as state_dir:
        search_latency(Path(state_dir), 20_000 if args.quick else 100_000)


if __name__ == "__main__":
    main()
