"""Lazy context retrieval vs full injection: tokens per run and recall on a labelled memory.

    python bench/lazy_context.py [--quick] [--seed N]

Full injection hands every run the whole shared memory; lazy retrieval hands it
`ContextRetriever.search(task, k, token_budget, namespaces)`. Tokens use the store's documented
estimate (ceil(chars / 4) of each rendered entry) for both. Recall is the fraction of the
entries a question is labelled as needing that the search returned. The query is the task text
exactly as the scheduler would pass it; `namespaces` are the namespaces the agent's role reads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "data")]

import structlog  # noqa: E402
from pipeline_memory import Dataset, Question, generate  # noqa: E402

from supervisor.context import (  # noqa: E402
    ContextRetriever,
    Fts5Backend,
    estimate_tokens,
    render,
    total_tokens,
)
from supervisor.memory_store import MemoryStore, Op, Update  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    k: int
    token_budget: int | None
    scoped: bool  # restrict the search to the namespaces the role reads


CONFIGS = [
    Config("lazy k=8, no budget, all namespaces", 8, None, False),
    Config("lazy k=8, no budget, role namespaces", 8, None, True),
    Config("lazy k=12, 3000-token budget, all namespaces", 12, 3000, False),
    Config("lazy k=12, 3000-token budget, role namespaces", 12, 3000, True),
    Config("lazy k=16, 4000-token budget, role namespaces", 16, 4000, True),
]


def load(store: MemoryStore, data: Dataset, batch_size: int = 500) -> None:
    updates = [Update(op=Op.PUT, namespace=ns, key=key, value=value, agent="bench", run_id="load")
               for ns, key, value in data.entries]
    for start in range(0, len(updates), batch_size):
        results = store.apply_batch(updates[start:start + batch_size], grants={"bench": ["*"]})
        assert all(r.ok for r in results), [r for r in results if not r.ok][:3]


def rendered_tokens(store: MemoryStore) -> dict[str, int]:
    """Estimated tokens of every live entry, by namespace."""
    by_namespace: dict[str, int] = {}
    for ns, key, value in store._conn.execute(
            "select namespace, key, value from entries where value is not null"):
        by_namespace[ns] = by_namespace.get(ns, 0) + estimate_tokens(render(ns, key, value))
    return by_namespace


def evaluate(retriever: ContextRetriever, questions: list[Question], config: Config) -> dict:
    tokens, recalls, latencies_ms = [], [], []
    by_role: dict[str, list[float]] = {}
    for q in questions:
        started = time.monotonic()
        hits = retriever.search(q.task, k=config.k, token_budget=config.token_budget,
                                namespaces=q.namespaces if config.scoped else None)
        latencies_ms.append((time.monotonic() - started) * 1000)
        got = {f"{hit.namespace}/{hit.key}" for hit in hits}
        recalls.append(len(got & set(q.needed)) / len(q.needed))
        by_role.setdefault(q.role, []).append(recalls[-1])
        tokens.append(total_tokens(hits))
    return {"tokens": statistics.mean(tokens), "tokens_max": max(tokens),
            "recall": statistics.mean(recalls),
            "complete": sum(r == 1.0 for r in recalls) / len(recalls),
            "p50_ms": statistics.median(latencies_ms),
            "by_role": {role: statistics.mean(rs) for role, rs in sorted(by_role.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every 4th question only")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    data = generate(args.seed)
    questions = data.questions[::4] if args.quick else data.questions
    with tempfile.TemporaryDirectory() as state_dir, MemoryStore(Path(state_dir)) as store:
        load(store, data)
        by_namespace = rendered_tokens(store)
        full = sum(by_namespace.values())
        backend = Fts5Backend.open(store.path)
        retriever = ContextRetriever(backend)
        print(f"memory: {len(data.entries)} entries, {full} tokens (ceil(chars/4) per rendered "
              f"entry); {len(questions)} labelled questions, seed {args.seed}\n")
        scoped_full = statistics.mean(sum(by_namespace.get(ns, 0) for ns in q.namespaces)
                                      for q in questions)
        print("| strategy | tokens/run (mean) | tokens/run (max) | vs full | recall (mean) "
              "| runs with every needed entry | search p50 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        print(f"| full injection (whole memory) | {full} | {full} | 0% | 100% | 100% | - |")
        print(f"| full injection (role namespaces only) | {scoped_full:.0f} | - | "
              f"-{100 * (1 - scoped_full / full):.1f}% | 100% | 100% | - |")
        results = {config: evaluate(retriever, questions, config) for config in CONFIGS}
        for config, r in results.items():
            print(f"| {config.name} | {r['tokens']:.0f} | {r['tokens_max']} | "
                  f"-{100 * (1 - r['tokens'] / full):.1f}% | {100 * r['recall']:.1f}% | "
                  f"{100 * r['complete']:.1f}% | {r['p50_ms']:.2f} ms |")
        roles = list(next(iter(results.values()))["by_role"])
        print("\nrecall by task (role), same strategies:\n")
        print("| strategy | " + " | ".join(roles) + " |")
        print("|---|" + "---:|" * len(roles))
        for config, r in results.items():
            print(f"| {config.name} | "
                  + " | ".join(f"{100 * r['by_role'][role]:.1f}%" for role in roles) + " |")
        backend.close()


if __name__ == "__main__":
    main()
