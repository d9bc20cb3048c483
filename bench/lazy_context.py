"""Lazy context retrieval on real conversations and on the pipeline memory, beside baselines.

    python bench/lazy_context.py [--locomo PATH] [--budgets 500,1000,2000,4000] [--quick]

LoCoMo dev split (Maharana et al., 2024; read from ../shared/datasets/locomo-dev beside the repo,
or --locomo; never shipped here): each turn is one memory entry, written one update per
transaction through the store the steward uses, then embedded by the steward's indexer; each
question is asked as `search(question, token_budget=B, namespaces=[conversation])`. Evidence
recall is the share of a question's labelled evidence turns among the hits, averaged per
category (1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop; 5 adversarial apart).

Beside watchkeeper (lexical only, and hybrid when the [semantic] extra is installed), in the
same run: a plain SQLite FTS5 BM25 (unicode61, no stemming, no stop words, OR of the question's
words, packed into the same budget) and full context (every turn of the conversation).

The pipeline memory (bench/data/pipeline_memory.py) is asked the hand-written questions of
bench/data/pipeline_questions.py, over all namespaces. Latency: search p50/p99 over 6,000
entries. Tokens everywhere are the store's estimate, ceil(chars / 4) of each rendered entry.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "data")]

import msgspec  # noqa: E402
import structlog  # noqa: E402
from pipeline_memory import generate  # noqa: E402
from pipeline_questions import QUESTIONS  # noqa: E402

from supervisor.memory.context import (  # noqa: E402
    ContextRetriever,
    Fts5Backend,
    estimate_tokens,
    render,
)
from supervisor.memory.embeddings import load_embedder  # noqa: E402
from supervisor.memory.semantic_index import SemanticIndex, SemanticIndexer  # noqa: E402
from supervisor.memory.settings import StewardSettings  # noqa: E402
from supervisor.memory.store import MemoryStore, Op, Update  # noqa: E402

DEFAULT_LOCOMO = ROOT.parent / "shared" / "datasets" / "locomo-dev"
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop",
              5: "adversarial"}
GRANTS = {"bench": ["*"]}
Search = Callable[[str, int, list[str] | None], list[str]]  # -> "namespace/key" of the hits


@dataclass
class Question:
    text: str
    namespace: str | None
    evidence: set[str]
    category: int


@dataclass
class Corpus:
    entries: list[tuple[str, str, object]] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)
    dropped_evidence: int = 0
    repaired_evidence: int = 0


# -- LoCoMo ----------------------------------------------------------------------------------------

_DIA = re.compile(r"^D:?(\d+):0*(\d+)$")


def turn_key(session: int, turn: int) -> str:
    return f"s{session:02d}/t{turn:03d}"


def load_locomo(path: Path) -> Corpus:
    corpus = Corpus()
    for file in sorted(path.glob("*.json")):
        conv = json.loads(file.read_text())
        namespace = f"locomo-{file.stem}"
        keys: set[str] = set()
        for name, turns in conv.items():
            m = re.fullmatch(r"session_(\d+)", name)
            if not m or not isinstance(turns, list):
                continue
            when = conv.get(f"{name}_date_time", "")
            for turn in turns:
                session, number = _DIA.match(turn["dia_id"]).groups()
                value = {"speaker": turn["speaker"], "date": when, "text": turn["text"]}
                if turn.get("blip_caption"):
                    value["image"] = turn["blip_caption"]
                key = turn_key(int(session), int(number))
                keys.add(key)
                corpus.entries.append((namespace, key, value))
        for qa in conv["qa"]:
            evidence = _evidence(qa.get("evidence", []), keys, corpus)
            if evidence:
                corpus.questions.append(Question(qa["question"], namespace,
                                                 {f"{namespace}/{k}" for k in evidence},
                                                 qa["category"]))
    return corpus


def _evidence(ids: list[str], keys: set[str], corpus: Corpus) -> set[str]:
    """Evidence turn keys, with the release's malformed ids repaired where unambiguous."""
    found = set()
    for raw in ids:
        for part in re.split(r"[;,]\s*", raw.strip()):
            m = _DIA.match(part.strip())
            key = turn_key(int(m[1]), int(m[2])) if m else None
            if key in keys:
                corpus.repaired_evidence += part.strip() != raw or ":0" in part or "D:" in part
                found.add(key)
            else:
                corpus.dropped_evidence += 1
    return found


# -- the pipeline memory ---------------------------------------------------------------------------

def load_pipeline(seed: int = 7) -> Corpus:
    data = generate(seed)
    corpus = Corpus(entries=list(data.entries))
    names = [f"{ns}/{key}" for ns, key, _ in data.entries]
    for text, prefixes in QUESTIONS:
        needed = {n for n in names if any(n.startswith(p) for p in prefixes)}
        if not needed:
            raise SystemExit(f"pipeline_questions: no entry matches {prefixes} ({text!r})")
        corpus.questions.append(Question(text, None, needed, 0))
    return corpus


# -- systems ---------------------------------------------------------------------------------------

def write_each(store: MemoryStore, entries: list[tuple[str, str, object]]) -> None:
    """One update per transaction, as the steward commits a lone write."""
    for ns, key, value in entries:
        [result] = store.apply_batch([Update(op=Op.PUT, namespace=ns, key=key, value=value,
                                             agent="bench", run_id="load")], grants=GRANTS)
        assert result.ok, result


def write_batches(store: MemoryStore, entries: list[tuple[str, str, object]]) -> None:
    for start in range(0, len(entries), 500):
        results = store.apply_batch(
            [Update(op=Op.PUT, namespace=ns, key=key, value=value, agent="bench", run_id="load")
             for ns, key, value in entries[start:start + 500]], grants=GRANTS)
        assert all(r.ok for r in results)


class Watchkeeper:
    """The store, its FTS5 backend, and (with the extra) the steward's semantic indexer."""

    def __init__(self, state_dir: Path, entries, *, one_by_one: bool) -> None:
        self.store = MemoryStore(state_dir)
        started = time.monotonic()
        (write_each if one_by_one else write_batches)(self.store, entries)
        self.write_s = time.monotonic() - started
        self.backend = Fts5Backend.open(self.store.path)
        embedder, self.semantic_note = load_embedder()
        self.index = self.indexer = None
        self.embed_s = 0.0
        if embedder is not None:
            self.index = SemanticIndex(embedder)
            self.indexer = SemanticIndexer.open(self.store.path, StewardSettings(), self.index)
            started = time.monotonic()
            self.indexer.start()
            while self.indexer.embed_pending():
                pass
            self.embed_s = time.monotonic() - started
        self.lexical = ContextRetriever(self.backend, semantic_off="bench: lexical run")
        self.hybrid = ContextRetriever(self.backend, self.index) if self.index else None

    def search(self, retriever: ContextRetriever) -> Search:
        def run(question: str, budget: int, namespaces: list[str] | None) -> list[str]:
            return [f"{h.namespace}/{h.key}"
                    for h in retriever.search(question, token_budget=budget,
                                              namespaces=namespaces)]
        return run

    def close(self) -> None:
        if self.indexer:
            self.indexer.close()
        self.backend.close()
        self.store.close()


class PlainBm25:
    """SQLite FTS5 with its default tokenizer and bm25(), the words of the question ORed."""

    def __init__(self, entries) -> None:
        self.conn = sqlite3.connect(":memory:")
        self.conn.execute("create virtual table t using fts5(name unindexed, ns unindexed, body)")
        self.conn.executemany("insert into t values (?, ?, ?)", [
            (f"{ns}/{key}", ns, " ".join(str(v) for v in _leaves(value)))
            for ns, key, value in entries])
        self.rendered = {f"{ns}/{key}": estimate_tokens(render(ns, key, _json(value)))
                         for ns, key, value in entries}

    def search(self, question: str, budget: int, namespaces: list[str] | None) -> list[str]:
        words = re.findall(r"\w+", question.lower())
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in dict.fromkeys(words))
        scope, params = ("and ns = ?", [namespaces[0]]) if namespaces else ("", [])
        rows = self.conn.execute(f"select name from t where t match ? {scope} order by bm25(t)",
                                 [match, *params])
        hits, left = [], budget
        for (name,) in rows:
            if self.rendered[name] <= left:
                hits.append(name)
                left -= self.rendered[name]
            if left <= 0:
                break
        return hits


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _json(value) -> str:
    return msgspec.json.encode(value).decode()


# -- evaluation ------------------------------------------------------------------------------------

def evaluate(search: Search, corpus: Corpus, budget: int, tokens_of: dict[str, int]) -> dict:
    by_category: dict[int, list[float]] = {}
    tokens = []
    for q in corpus.questions:
        hits = search(q.text, budget, [q.namespace] if q.namespace else None)
        by_category.setdefault(q.category, []).append(len(q.evidence & set(hits)) /
                                                      len(q.evidence))
        tokens.append(sum(tokens_of[h] for h in hits))
    main = [r for c, rs in by_category.items() if c in (0, 1, 2, 3, 4) for r in rs]
    return {"recall": statistics.mean(main), "tokens": statistics.mean(tokens),
            "by_category": {c: statistics.mean(rs) for c, rs in sorted(by_category.items())}}


def report(title: str, corpus: Corpus, systems: dict[str, Search], budgets: list[int],
           categories: list[int]) -> None:
    tokens_of = {f"{ns}/{key}": estimate_tokens(render(ns, key, _json(value)))
                 for ns, key, value in corpus.entries}
    full = statistics.mean(
        sum(t for name, t in tokens_of.items() if q.namespace is None or
            name.startswith(q.namespace + "/")) for q in corpus.questions)
    print(f"\n### {title}\n")
    cols = " | ".join(CATEGORIES.get(c, "every question") for c in categories)
    main = "recall (cat. 1-4)" if categories != [0] else "recall"
    print(f"| system | budget | tokens (mean) | {main} | {cols} |")
    print("|---|---:|---:|---:|" + "---:|" * len(categories))
    print(f"| full context | - | {full:,.0f} | 100.0% | " + " | ".join(["100.0%"] * len(categories))
          + " |")
    for name, search in systems.items():
        for budget in budgets:
            r = evaluate(search, corpus, budget, tokens_of)
            cells = " | ".join(f"{100 * r['by_category'].get(c, float('nan')):.1f}%"
                               for c in categories)
            print(f"| {name} | {budget:,} | {r['tokens']:,.0f} | {100 * r['recall']:.1f}% | "
                  f"{cells} |")


# -- leave-one-conversation-out -------------------------------------------------------------------

# The ranking settings tried; each held-out score comes from the setting chosen on the others.
GRID = {"SEMANTIC_WEIGHT": [0.6, 0.9], "SESSION_WEIGHT": [0.0, 0.2, 0.4],
        "SPEAKER_BOOST": [0.0, 0.5, 1.0], "FEEDBACK_WEIGHT": [0.0, 0.5],
        "PREVIOUS_NEIGHBOUR_FACTOR": [None, 0.55]}
CV_BUDGETS = (1000, 2000)  # the objective: mean recall (cat. 1-4) at these budgets


def recall_per_question(search: Search, corpus: Corpus, budget: int) -> list[float | None]:
    """Each question's evidence recall; None for categories outside 1-4."""
    return [len(q.evidence & set(search(q.text, budget, [q.namespace]))) / len(q.evidence)
            if q.category in (1, 2, 3, 4) else None for q in corpus.questions]


def cross_validate(wk: Watchkeeper, corpus: Corpus, grid: dict[str, list[float]]) -> None:
    """Choose the ranking settings on two conversations, score the third, rotate.

    Every setting of the grid is scored once per question; a fold then picks the setting with
    the best objective on its two training conversations and reports it on the held-out one.
    """
    import itertools as it

    names = list(grid)
    settings = [dict(zip(names, values, strict=True)) for values in it.product(*grid.values())]
    scores: list[dict[int, list[float | None]]] = []
    started = time.monotonic()
    for setting in settings:
        retriever = ContextRetriever(wk.backend, wk.index)
        for name, value in setting.items():
            setattr(retriever, name, value)
        scores.append({b: recall_per_question(wk.search(retriever), corpus, b)
                       for b in CV_BUDGETS})
    convs = sorted({q.namespace for q in corpus.questions})

    def objective(i: int, keep: Callable[[str], bool], budget: int | None = None) -> float:
        cells = [r for b in ([budget] if budget else CV_BUDGETS)
                 for q, r in zip(corpus.questions, scores[i][b], strict=True)
                 if r is not None and keep(q.namespace)]
        return statistics.mean(cells)

    print(f"\n### leave-one-conversation-out over {len(settings)} settings "
          f"({time.monotonic() - started:.0f} s), objective: mean recall at "
          f"{' and '.join(map(str, CV_BUDGETS))} tokens\n")
    print("| held out | chosen on the other two | " +
          " | ".join(f"held-out recall at {b:,}" for b in CV_BUDGETS) + " |")
    print("|---|---|" + "---:|" * len(CV_BUDGETS))
    held: dict[int, list[float]] = {b: [] for b in CV_BUDGETS}
    for out in convs:
        best = max(range(len(settings)), key=lambda i: objective(i, lambda ns, out=out: ns != out))
        cells = []
        for b in CV_BUDGETS:
            held[b].append(objective(best, lambda ns, out=out: ns == out, b))
            cells.append(f"{100 * held[b][-1]:.1f}%")
        print(f"| {out} | {_setting(settings[best])} | " + " | ".join(cells) + " |")
    best = max(range(len(settings)), key=lambda i: objective(i, lambda ns: True))
    print("| **mean of held-out** | | " +
          " | ".join(f"**{100 * statistics.mean(held[b]):.1f}%**" for b in CV_BUDGETS) + " |")
    print(f"| all three (dev, not held out) | {_setting(settings[best])} | " +
          " | ".join(f"{100 * objective(best, lambda ns: True, b):.1f}%" for b in CV_BUDGETS)
          + " |")
    shipped = next((i for i, s in enumerate(settings) if all(
        getattr(ContextRetriever, n) == v for n, v in s.items())), None)
    if shipped is not None:
        print(f"| shipped defaults on all three | {_setting(settings[shipped])} | " +
              " | ".join(f"{100 * objective(shipped, lambda ns: True, b):.1f}%"
                         for b in CV_BUDGETS) + " |")


def _setting(setting: dict[str, object]) -> str:
    return ", ".join(f"{name.lower()} {value:g}" if isinstance(value, float)
                     else f"{name.lower()} {value}" for name, value in setting.items())


def latency(state_dir: Path, questions: list[str], size: int, rounds: int) -> None:
    """Search p50/p99 over `size` entries (pipeline memories of several seeds), budget 2,000."""
    entries: list[tuple[str, str, object]] = []
    seed = 7
    while len(entries) < size:
        entries += [(ns, f"s{seed}/{key}", value) for ns, key, value in generate(seed).entries]
        seed += 1
    wk = Watchkeeper(state_dir, entries[:size], one_by_one=False)
    plain = PlainBm25(entries[:size])
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n### search latency, {size:,} entries, token_budget=2000, all namespaces "
          f"(load average {load}, {os.cpu_count()} CPUs)\n")
    print("| system | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|")
    systems = {"plain FTS5 BM25 (baseline)": plain.search,
               "watchkeeper lexical": wk.search(wk.lexical)}
    if wk.hybrid:
        systems["watchkeeper hybrid"] = wk.search(wk.hybrid)
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(rounds):  # rounds interleave the systems: a burst of load hits all alike
        for name, search in systems.items():
            for q in questions:
                started = time.monotonic()
                search(q, 2000, None)
                times[name].append((time.monotonic() - started) * 1000)
    for name, taken in times.items():
        taken.sort()
        print(f"| {name} | {statistics.median(taken):.2f} | "
              f"{taken[int(0.99 * (len(taken) - 1))]:.2f} | {taken[-1]:.2f} |")
    wk.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO,
                        help=f"LoCoMo dev folder (default {DEFAULT_LOCOMO})")
    parser.add_argument("--budgets", help="token budgets (default 500,1000,2000,4000; "
                                              "--quick: 1000,2000)")
    parser.add_argument("--quick", action="store_true", help="two budgets, one latency pass")
    parser.add_argument("--cross-validate", action="store_true",
                        help="LoCoMo dev only: choose the ranking settings (GRID) on two "
                             "conversations, score the third, rotate")
    args = parser.parse_args()
    budgets = [int(b) for b in (args.budgets or ("1000,2000" if args.quick else
                                                 "500,1000,2000,4000")).split(",")]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    _, semantic_note = load_embedder()
    print(f"semantic model: {semantic_note}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.locomo.is_dir() and any(args.locomo.glob("*.json")):
            corpus = load_locomo(args.locomo)
            (tmp_path / "locomo").mkdir()
            wk = Watchkeeper(tmp_path / "locomo", corpus.entries, one_by_one=True)
            print(f"LoCoMo dev ({args.locomo}): {len(corpus.entries)} turns written one per "
                  f"transaction in {wk.write_s:.1f} s, embedded in {wk.embed_s:.1f} s; "
                  f"{len(corpus.questions)} questions; evidence ids repaired "
                  f"{corpus.repaired_evidence}, dropped {corpus.dropped_evidence}")
            systems = {"plain FTS5 BM25": PlainBm25(corpus.entries).search,
                       "watchkeeper lexical": wk.search(wk.lexical)}
            if wk.hybrid:
                systems["watchkeeper hybrid"] = wk.search(wk.hybrid)
            if args.cross_validate:
                if not wk.hybrid:
                    raise SystemExit("--cross-validate needs the [semantic] extra")
                cross_validate(wk, corpus, GRID)
                wk.close()
                return
            report("LoCoMo dev: evidence recall by category", corpus, systems, budgets,
                   [1, 2, 3, 4, 5])
            wk.close()
        else:
            print(f"LoCoMo dev: not found at {args.locomo} (pass --locomo PATH); skipped")
        corpus = load_pipeline()
        (tmp_path / "pipeline").mkdir()
        wk = Watchkeeper(tmp_path / "pipeline", corpus.entries, one_by_one=False)
        systems = {"plain FTS5 BM25": PlainBm25(corpus.entries).search,
                   "watchkeeper lexical": wk.search(wk.lexical)}
        if wk.hybrid:
            systems["watchkeeper hybrid"] = wk.search(wk.hybrid)
        report(f"pipeline memory ({len(corpus.entries):,} entries), {len(corpus.questions)} "
               f"hand-written questions, all namespaces", corpus, systems, budgets, [0])
        wk.close()
        (tmp_path / "latency").mkdir()
        latency(tmp_path / "latency", [q.text for q in corpus.questions], 6000,
                rounds=2 if args.quick else 10)


if __name__ == "__main__":
    main()
