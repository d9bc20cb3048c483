"""Hybrid retrieval: the packaged embedding model, entry vectors, fusion, neighbours, --explain."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from harness import DaemonProc, py, wk
from support import require, wait_until

from supervisor.memory.context import ContextRetriever, Fts5Backend, query_terms
from supervisor.memory.embeddings import MAX_TEXT_CHARS, load_embedder
from supervisor.memory.semantic_index import SemanticIndex, SemanticIndexer
from supervisor.memory.settings import StewardSettings
from supervisor.memory.store import MemoryStore, Op, Update

ROOT = Path(__file__).resolve().parent.parent
GRANTS = {"t": ["*"]}
EMBEDDER, WHY_NOT = load_embedder()

# A question and the entry that answers it, sharing no content word (the example).
PARAPHRASE = "What kind of car does Evan drive?"
ANSWER = {"speaker": "Evan", "text": "I just picked up my new Prius from the dealership."}
OTHERS = [
    {"speaker": "Evan", "text": "My sister painted a sunset over the lake last weekend."},
    {"speaker": "Maya", "text": "The bakery on the corner sells the best rye bread."},
    {"speaker": "Maya", "text": "I started a pottery class on Thursdays."},
    {"speaker": "Evan", "text": "Our dog chewed through another tennis ball."},
]


def needs_model() -> None:
    require(EMBEDDER is not None, f"semantic extra: {WHY_NOT}")


def put_all(store: MemoryStore, ns: str, values: dict[str, object]) -> None:
    results = store.apply_batch([Update(op=Op.PUT, namespace=ns, key=key, value=value,
                                        agent="t", run_id="r") for key, value in values.items()],
                                grants=GRANTS)
    assert all(r.ok for r in results)


@pytest.fixture
def chat(tmp_path: Path):
    """A conversation in memory, embedded by the steward's indexer, and both retrievers."""
    needs_model()
    with MemoryStore(tmp_path) as store:
        turns = {f"s01/t{i:03d}": value for i, value in enumerate([*OTHERS[:2], ANSWER,
                                                                     *OTHERS[2:]], 1)}
        put_all(store, "chat", turns)
        embedder, _ = load_embedder()  # its own token counts: they grow with what it embeds
        index = SemanticIndex(embedder)
        indexer = SemanticIndexer.open(store.path, StewardSettings(), index)
        indexer.start()
        indexer.embed_pending()
        backend = Fts5Backend.open(store.path)
        yield store, indexer, ContextRetriever(backend), ContextRetriever(backend, index)
        backend.close()
        indexer.close()


def test_paraphrase_without_shared_word_is_found_only_by_hybrid_search(chat) -> None:
    """A question sharing no content word with its answer finds it with the model, not without."""
    _, _, lexical, hybrid = chat
    content = set(query_terms(PARAPHRASE)) - {"evan"}
    assert not content & set(query_terms(ANSWER["text"]))  # truly no shared content word
    top = hybrid.search("What kind of car do they drive?", k=1)
    assert [h.key for h in top] == ["s01/t003"] and top[0].semantic_rank == 1
    assert lexical.search("What kind of car do they drive?", k=1) == []


def test_explain_names_the_ranking(chat) -> None:
    """explain() says hybrid with the model when vectors exist, lexical and why when not."""
    _, _, lexical, hybrid = chat
    assert hybrid.explain()["retrieval"] == "hybrid"
    assert lexical.explain()["retrieval"] == "lexical"
    assert "off" in lexical.explain()["semantic"]


def test_a_changed_entry_is_embedded_again(chat) -> None:
    """After an update, the entry's old vector is gone and the next pass embeds the new text."""
    store, indexer, _, hybrid = chat
    put_all(store, "chat", {"s01/t003": {"speaker": "Evan", "text": "I sold my bicycle."}})
    stored = sqlite3.connect(store.path).execute(
        "select count(*) from entry_vectors").fetchone()[0]
    assert stored == len(OTHERS)  # the trigger dropped the stale vector in the write
    indexer.mark_dirty()
    assert indexer.embed_pending() == 1
    assert "s01/t003" not in [h.key for h in hybrid.search("What car do they drive?", k=1)]


def test_feedback_moves_the_query_vector_toward_the_best_hits(chat) -> None:
    """Pseudo-relevance feedback: the expanded vector is unit length and closer to the hits it
    was given; with no known hit, or a zero weight, the query's vector is returned as it was."""
    import numpy as np

    _, indexer, _, _ = chat
    index = indexer.index
    query = index.query_vector("a new car")
    answer_id = next(i for i, _, _ in index.nearest("Prius dealership", None, 1))
    answer = index.nearest_to(query, None, 10)
    expanded = index.expanded(query, [answer_id], 1.0)
    assert abs(float(np.linalg.norm(expanded)) - 1.0) < 1e-5
    before = dict((i, s) for i, _, s in answer)[answer_id]
    after = dict((i, s) for i, _, s in index.nearest_to(expanded, None, 10))[answer_id]
    assert after > before
    assert index.expanded(query, [10**9], 1.0) is query
    assert index.expanded(query, [answer_id], 0.0) is query


def test_neighbours_of_a_hit_fill_the_remaining_budget(tmp_path: Path) -> None:
    """With a budget, the turns beside a hit (and theirs) come in, marked, within its session."""
    with MemoryStore(tmp_path) as store:
        put_all(store, "chat", {
            "s01/t001": {"text": "Did you finally pick a name for the puppy?"},
            "s01/t002": {"text": "We went with Biscuit."},
            "s01/t003": {"text": "Cute! Mine still chews the couch."},
            "s02/t001": {"text": "Unrelated: the train was late."}})
        backend = Fts5Backend.open(store.path)
        hits = ContextRetriever(backend).search("puppy name", token_budget=200)
        backend.close()
    assert [(h.key, h.neighbour_of) for h in hits] == [
        ("s01/t001", None), ("s01/t002", "chat/s01/t001"), ("s01/t003", "chat/s01/t002")]


# -- through the daemon ----------------------------------------------------------------------------

WRITER = f"""
from supervisor.sdk import Agent
m = Agent().memory
for i, value in enumerate({[*OTHERS[:2], ANSWER, *OTHERS[2:]]!r}, 1):
    m.put("chat", f"s01/t{{i:03d}}", value)
"""

HIDE_EXTRA = "import sys\nsys.modules['wordllama'] = None  # as if the extra were not installed\n"


def writer_daemon(root: Path) -> DaemonProc:
    spec = {"jobs": [{"id": "main", "command": py(WRITER), "schedule": {"every_s": 3600}}],
            "memory_write": ["chat"]}
    return DaemonProc(root, {"writer": spec})


def run_writer(d: DaemonProc) -> None:
    started = d.call("start-now", agent="writer")
    ev = d.wait_event("run_finished", run_id=started["run_id"], timeout_s=30)
    assert ev["outcome"] == "succeeded", d.tail()


def vectors(d: DaemonProc) -> int:
    with sqlite3.connect(d.state_dir / "memory.sqlite3") as conn:
        try:
            return conn.execute("select count(*) from entry_vectors").fetchone()[0]
        except sqlite3.OperationalError:  # no table yet
            return 0


def test_embeddings_are_recomputed_at_start_after_sigkill(tmp_path: Path) -> None:
    """Entries committed but not yet embedded when the daemon is SIGKILLed get their vectors
    after the next start, and the paraphrase then finds its entry."""
    needs_model()
    env = {"PYTHONPATH": str(ROOT)}
    turns = [*OTHERS[:2], ANSWER, *OTHERS[2:]]
    many = [{"speaker": "Maya", "text": f"Filler remark number {i} about the weather."}
            for i in range(1000)]
    doc = {"format": "watchkeeper-memory", "format_version": 1, "entries": [
        {"namespace": "chat", "key": f"s{1 + i // 1000:02d}/t{i % 1000:03d}", "value": value,
         "version": 1, "updated_at": 0.0, "updated_by": "t", "run_id": "r"}
        for i, value in enumerate([*turns, *many])]}
    # A slow tick: the import is acknowledged at once, then 256 entries are embedded per loop
    # turn, so the kill lands with most of the 1,005 entries committed and not embedded.
    slow = DaemonProc(tmp_path / "d", {}, tick_s=2).start(extra_env=env)
    with slow:
        assert slow.call("memory-import", data=doc) == {"imported": 1005, "history": 0}
        slow.kill()
        slow.proc.wait(timeout=10)
        assert vectors(slow) < 1005
    with DaemonProc(tmp_path / "d", {}).start(extra_env=env) as d:
        wait_until(lambda: vectors(d) == 1005, timeout_s=60)
        hits = d.call("search", query="What kind of car do they drive?", k=1,
                      namespaces=["chat"])["hits"]
    assert [h["key"] for h in hits] == ["s01/t002"]


def test_search_explain_without_the_extra_says_lexical_only(tmp_path: Path) -> None:
    """Without the semantic extra the daemon still searches, and `search --explain` says it is
    lexical only and why."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_EXTRA)
    env = {"PYTHONPATH": f"{hide}:{ROOT}"}
    with writer_daemon(tmp_path / "d").start(extra_env=env) as d:
        run_writer(d)
        out = wk("--config", str(d.config_path), "search", "Prius dealership", "--explain",
                 env=env)
        as_json = wk("--config", str(d.config_path), "--json", "search", "Prius", "--explain",
                     env=env)
        assert vectors(d) == 0
    assert out.returncode == 0, out.stderr
    assert "retrieval: lexical" in out.stdout
    assert "semantic extra is not installed" in out.stdout
    assert "chat/s01/t003" in out.stdout and "lexical #1" in out.stdout
    assert json.loads(as_json.stdout)["explain"]["retrieval"] == "lexical"


def test_bad_search_arguments_get_a_clear_error(tmp_path: Path) -> None:
    """A search with a malformed k, budget or namespaces is refused with what is valid."""
    with writer_daemon(tmp_path / "d").start(extra_env={"PYTHONPATH": str(ROOT)}) as d:
        client = d.client()
        try:
            for bad in ({"k": 0}, {"k": True}, {"token_budget": -1}, {"token_budget": "9"},
                        {"namespaces": "chat"}, {"namespaces": [1]}, {"explain": "yes"},
                    {"speakers": "Evan"}):
                reply = client.call_raw("search", {"query": "x", **bad})
                assert reply["ok"] is False and "search:" in reply["error"], (bad, reply)
        finally:
            client.close()


def test_when_question_ranks_the_turn_that_says_when_first(tmp_path: Path) -> None:
    """For a "when" question, an entry with a relative time ("last week") outranks an equally
    matching one without; other questions keep plain relevance order."""
    with MemoryStore(tmp_path) as store:
        put_all(store, "chat", {
            "s01/t001": {"text": "Ana loved Rome."},
            "s01/t002": {"text": "Ana went to Rome last week with her brother and cousins."}})
        backend = Fts5Backend.open(store.path)
        retriever = ContextRetriever(backend)
        when = retriever.search("When did Ana go to Rome?", k=2)
        plain = retriever.search("Ana Rome", k=2)
        backend.close()
    assert [h.key for h in when] == ["s01/t002", "s01/t001"]
    assert [h.key for h in plain] == ["s01/t001", "s01/t002"]


def test_token_counts_are_stored_and_restored_at_start(chat, tmp_path: Path) -> None:
    """The token counts behind the rarity weights are stored with the vectors and reloaded by
    the next indexer, so a restart weighs query words as before."""
    store, indexer, _, _ = chat
    needs_model()
    seen = indexer.index.embedder.total
    assert seen > 0
    embedder, _ = load_embedder()
    again = SemanticIndexer.open(store.path, StewardSettings(), SemanticIndex(embedder))
    assert again.start() == 0  # nothing left to embed
    again.close()
    assert embedder.total == seen and (embedder.counts == indexer.index.embedder.counts).all()


def test_speaker_filter_keeps_only_that_speakers_entries(tmp_path: Path) -> None:
    """With `speakers`, every hit (neighbours too) was said by one of them, in any case."""
    with MemoryStore(tmp_path) as store:
        put_all(store, "chat", {
            "s01/t001": {"speaker": "Maya", "text": "I adopted a puppy called Biscuit."},
            "s01/t002": {"speaker": "Evan", "text": "A puppy! Mine is a grumpy old cat."},
            "s01/t003": {"speaker": "Maya", "text": "Biscuit already chewed my puppy books."}})
        backend = Fts5Backend.open(store.path)
        retriever = ContextRetriever(backend)
        maya = retriever.search("puppy", token_budget=500, speakers=["maya"])
        everyone = retriever.search("puppy", token_budget=500)
        backend.close()
    assert sorted(h.key for h in maya) == ["s01/t001", "s01/t003"]
    assert len(everyone) == 3


def test_model_loads_only_once_memory_has_an_entry(tmp_path: Path) -> None:
    """A daemon with an empty memory searches lexically without loading the model; after the
    first write it loads it and search becomes hybrid."""
    needs_model()

    def explain(d: DaemonProc) -> dict:
        return d.call("search", query="anything", explain=True)["explain"]

    with writer_daemon(tmp_path / "d").start(extra_env={"PYTHONPATH": str(ROOT)}) as d:
        before = explain(d)
        run_writer(d)
        wait_until(lambda: explain(d)["retrieval"] == "hybrid", timeout_s=20)
    assert before["retrieval"] == "lexical" and before["semantic"].startswith("off: waiting")


def test_long_entries_are_embedded_a_bounded_amount_of_text_per_turn(tmp_path: Path) -> None:
    """A loop turn embeds long entries only up to its text budget, each cut to MAX_TEXT_CHARS,
    so a start with megabytes of unembedded memory never holds the loop for seconds."""
    needs_model()
    with MemoryStore(tmp_path) as store:
        put_all(store, "big", {f"k{i}": "word " * 20_000 for i in range(4)})  # 100 KB each
        embedder, _ = load_embedder()
        indexer = SemanticIndexer.open(store.path, StewardSettings(), SemanticIndex(embedder))
        try:
            assert indexer.start() == 4
            budget = 2 * MAX_TEXT_CHARS
            assert [indexer.embed_pending(batch_chars=budget) for _ in range(3)] == [2, 2, 0]
            assert len(indexer.index) == 4
        finally:
            indexer.close()
