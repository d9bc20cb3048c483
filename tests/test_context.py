"""Lazy context retrieval: FTS5 ranking, token budgets, and query sanitising."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.memory.context import (
    Candidate,
    ContextRetriever,
    Fts5Backend,
    Ranked,
    estimate_tokens,
    fts_query,
    pack,
    query_terms,
    render,
    session_boost,
    speaker_boost,
    total_tokens,
)
from supervisor.memory.store import MemoryStore, Op, Update

GRANTS = {"t": ["*"]}


def put(store: MemoryStore, ns: str, key: str, value: object) -> None:
    [result] = store.apply_batch([Update(op=Op.PUT, namespace=ns, key=key, value=value,
                                         agent="t", run_id="r")], grants=GRANTS)
    assert result.ok


@pytest.fixture
def store(tmp_path: Path) -> MemoryStore:
    with MemoryStore(tmp_path) as opened:
        put(opened, "research", "solar-batteries/note-1",
            {"title": "Lithium iron phosphate cycles", "text": "LFP home batteries last 6000 cycles."})
        put(opened, "research", "solar-batteries/note-2",
            {"title": "Inverter sizing", "text": "Size the hybrid inverter to peak household load."})
        put(opened, "research", "sourdough/note-1",
            {"title": "Starter hydration", "text": "A 100% hydration starter peaks in 6 hours."})
        put(opened, "seo", "sourdough", {"slug": "sourdough-starter", "keywords": ["starter"]})
        put(opened, "analytics", "sourdough/2024-05-01", {"views": 1200, "note": "starter post"})
        yield opened


@pytest.fixture
def retriever(store: MemoryStore) -> ContextRetriever:
    backend = Fts5Backend.open(store.path)
    yield ContextRetriever(backend)
    backend.close()


def test_best_match_ranks_first(retriever: ContextRetriever) -> None:
    """The entry sharing the most query terms ranks first."""
    hits = retriever.search("how many cycles do LFP batteries last?")
    assert hits[0].key == "solar-batteries/note-1"
    assert hits[0].score > 0


def test_key_words_count_towards_relevance(retriever: ContextRetriever) -> None:
    """Words of the key (split on / and -) match, so an entry can be found by its name."""
    keys = {hit.key for hit in retriever.search("solar batteries")}
    assert keys == {"solar-batteries/note-1", "solar-batteries/note-2"}


def test_stemming_matches_word_forms(retriever: ContextRetriever) -> None:
    """The porter tokenizer matches plural and inflected forms of a query word."""
    assert retriever.search("inverters")[0].key == "solar-batteries/note-2"


def test_k_limits_the_number_of_hits(retriever: ContextRetriever) -> None:
    """search returns at most k hits, best first."""
    hits = retriever.search("starter sourdough batteries inverter", k=2)
    assert len(hits) == 2 and hits[0].score >= hits[1].score


def test_hits_fit_the_token_budget(retriever: ContextRetriever) -> None:
    """The hits' estimated tokens never exceed the budget."""
    unbounded = retriever.search("starter sourdough hydration", k=8)
    budget = unbounded[0].tokens + 1
    hits = retriever.search("starter sourdough hydration", k=8, token_budget=budget)
    assert hits and total_tokens(hits) <= budget


def test_budget_skips_an_oversized_hit_for_a_smaller_one(store: MemoryStore,
                                                        retriever: ContextRetriever) -> None:
    """A better-ranked entry too big for the remaining budget gives way to a smaller one."""
    put(store, "research", "kombucha/big", {"text": "kombucha scoby " * 200})
    put(store, "research", "kombucha/small", {"text": "kombucha"})
    hits = retriever.search("kombucha scoby", token_budget=40)
    assert [hit.key for hit in hits] == ["kombucha/small"]


def test_zero_budget_returns_nothing(retriever: ContextRetriever) -> None:
    """A budget of zero tokens fits no entry."""
    assert retriever.search("starter", token_budget=0) == []


def test_token_estimate_is_ceil_chars_over_four_of_the_rendered_entry(
        retriever: ContextRetriever, store: MemoryStore) -> None:
    """Each hit's tokens are ceil(len(render(entry)) / 4) and its text is that rendering."""
    [hit] = retriever.search("hydration starter peaks", k=1)
    value_json = msgspec.json.encode(store.get("research", hit.key).value).decode()
    assert hit.text == render("research", hit.key, value_json)
    assert hit.tokens == math.ceil(len(hit.text) / 4) == estimate_tokens(hit.text)


def test_namespace_globs_restrict_the_search(retriever: ContextRetriever) -> None:
    """Only entries in namespaces matching the given globs are returned."""
    hits = retriever.search("sourdough starter", namespaces=["seo", "analyt*"])
    assert {hit.namespace for hit in hits} == {"seo", "analytics"}


def test_index_follows_updates_and_deletes(store: MemoryStore, retriever: ContextRetriever) -> None:
    """After an update or delete, the index finds the new text and forgets the old."""
    put(store, "research", "sourdough/note-1", {"text": "Rye flour speeds fermentation."})
    assert retriever.search("hydration") == []
    assert retriever.search("rye")[0].version == 2
    store.apply_batch([Update(op=Op.DELETE, namespace="research", key="sourdough/note-1",
                              agent="t", run_id="r")], grants=GRANTS)
    assert retriever.search("rye") == []


def test_index_follows_revert_and_import(store: MemoryStore, retriever: ContextRetriever,
                                         tmp_path: Path) -> None:
    """Reverted and imported entries are searchable like any other write."""
    put(store, "research", "sourdough/note-1", {"text": "overwritten"})
    store.revert(seq=store.history(key="sourdough/note-1")[0].seq)
    assert retriever.search("overwritten") == []
    assert retriever.search("hydration")[0].key == "sourdough/note-1"
    (tmp_path / "copy").mkdir()
    with MemoryStore(tmp_path / "copy") as copy:
        copy.import_({"format": "watchkeeper-memory", "format_version": 1, "entries": [
            {"namespace": "n", "key": "k", "value": {"text": "imported kombucha"}, "version": 1,
             "updated_at": 0.0, "updated_by": "t", "run_id": "r"}]})
        assert ContextRetriever(Fts5Backend(copy._conn)).search("kombucha")[0].key == "k"


def test_only_text_leaves_are_indexed(store: MemoryStore, retriever: ContextRetriever) -> None:
    """JSON member names are not indexed, so a common field name does not match every entry."""
    assert retriever.search("title") == []


def test_query_terms_drop_stopwords_punctuation_and_duplicates() -> None:
    """query_terms keeps lower-cased content words once each, in order."""
    assert query_terms("Write the article about Solar, solar BATTERIES!") == [
        "write", "article", "solar", "batteries"]


def test_stopword_only_query_returns_nothing(retriever: ContextRetriever) -> None:
    """A query with no content word returns no hits instead of everything."""
    assert retriever.search("what is the") == []


HOSTILE = ['"', '""', 'a "b', "NEAR(a b)", "a NEAR b", "*", "star*", "(", ")", "((a)",
           "AND", "OR", "NOT", "a AND OR b", "col:term", "key:x", "-x", "^start", "+", "a'b",
           "NEAR/2", "{key body}: x", "\x00", "\u2028", "'; drop table entries; --"]


@pytest.mark.parametrize("query", HOSTILE)
def test_fts_syntax_in_user_text_never_raises(retriever: ContextRetriever, query: str) -> None:
    """Text with FTS5 operators or quotes is searched as plain words, never a syntax error."""
    retriever.search(query, token_budget=100)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_is_a_valid_fts_query(text: str) -> None:
    """For any text, the sanitised query is accepted by FTS5."""
    conn = sqlite3.connect(":memory:")
    conn.execute("create virtual table t using fts5(body, tokenize = 'porter unicode61')")
    conn.execute("insert into t values ('hello world')")
    terms = query_terms(text)
    if terms:
        conn.execute("select * from t where t match ?", (fts_query(terms),)).fetchall()


@pytest.fixture
def many(store: MemoryStore) -> MemoryStore:
    """Forty entries about kombucha, of varied sizes, beside the fixture's few."""
    for i in range(40):
        put(store, "brew", f"kombucha/{i:02d}", {"text": "kombucha batch " + "tea " * (i % 7)})
    return store


def test_budget_without_k_fills_to_within_one_entry(many: MemoryStore,
                                                    retriever: ContextRetriever) -> None:
    """With a budget and no k, hits fill the budget to within the size of one entry."""
    for budget in (60, 150, 300):
        hits = retriever.search("kombucha", token_budget=budget)
        largest = max(hit.tokens for hit in hits)
        assert budget - largest < total_tokens(hits) <= budget
    assert len(hits) > 8  # the old default k=8 no longer caps a budget


def test_k_caps_only_when_given(many: MemoryStore, retriever: ContextRetriever) -> None:
    """k limits the hit count when set; without k or budget the default is 8 hits."""
    assert len(retriever.search("kombucha", k=3, token_budget=10_000)) == 3
    assert len(retriever.search("kombucha", token_budget=10_000)) == 40
    assert len(retriever.search("kombucha")) == 8


PUNCTUATION_ONLY = ["?", "...", "!!!", "'", "''", '"""', "-", "--", "*", "(*)", "&&", "||",
                    ":", ";", "^", "NEAR", "NEAR()", "AND OR NOT", '"AND"', "\"'\"", "%", "_"]


@pytest.mark.parametrize("query", PUNCTUATION_ONLY)
def test_punctuation_or_operator_only_query_returns_a_list(retriever: ContextRetriever,
                                                           query: str) -> None:
    """A query of only punctuation, quotes or FTS5 operators returns a list, never raises."""
    assert isinstance(retriever.search(query, token_budget=500), list)


# -- re-ranking: sessions, speakers, the turn before -----------------------------------------------

def ranked(*rows: tuple[str, float, str]) -> list[Ranked]:
    """Ranked candidates from (key, score, value JSON), in the order given."""
    return [Ranked(Candidate("chat", key, 1, value, score), score, place, None)
            for place, (key, score, value) in enumerate(rows, 1)]


def test_session_boost_lifts_a_turn_whose_session_matches_too() -> None:
    """Of two equally scored turns, the one whose session holds other good matches ranks first;
    flat keys keep their score, and a zero weight changes nothing."""
    turn = '{"speaker":"Evan","text":"x"}'
    rows = ranked(("s01/t001", 1.0, turn), ("s02/t005", 1.0, turn),
                  ("s02/t006", 0.8, turn), ("flat", 0.9, turn))
    boosted = session_boost(rows, 0.5, 3)
    assert [r.candidate.key for r in boosted][:2] == ["s02/t005", "s02/t006"]
    assert next(r.score for r in boosted if r.candidate.key == "flat") == 0.9
    assert session_boost(rows, 0.0, 3) is rows


def test_session_boost_leaves_notes_without_a_speaker_alone() -> None:
    """Notes sharing a folder are not a conversation: three middling drafts in one folder
    do not lift each other above the best single note, and keep their scores."""
    note = '{"title":"t","text":"x"}'
    rows = ranked(("other/best", 1.0, note), ("drafts/a", 0.95, note),
                  ("drafts/b", 0.9, note), ("drafts/c", 0.9, note),
                  ("s01/t001", 0.5, '{"speaker":"Evan","text":"x"}'))
    boosted = session_boost(rows, 0.4, 3)
    assert [(r.candidate.key, r.score) for r in boosted[:4]] == [
        ("other/best", 1.0), ("drafts/a", 0.95), ("drafts/b", 0.9), ("drafts/c", 0.9)]
    assert boosted[4].score > 0.5  # the one turn still counts its own session


def test_speaker_boost_lifts_entries_said_by_someone_the_query_names() -> None:
    """An entry whose "speaker" the query names (any case) outranks an equal one by another;
    values that are not objects, or have no speaker, are left as they are."""
    rows = ranked(("s01/t001", 1.0, '{"speaker":"Evan","text":"x"}'),
                  ("s01/t002", 1.0, '{"speaker":"Maya Lin","text":"x"}'),
                  ("s01/t003", 1.0, '"a plain string"'), ("s01/t004", 1.0, '{"text":"x"}'))
    boosted = speaker_boost(rows, "what did maya lin bake?", 0.5)
    assert boosted[0].candidate.key == "s01/t002" and boosted[0].score == 1.5
    assert [r.score for r in boosted[1:]] == [1.0, 1.0, 1.0]
    assert speaker_boost(rows, "what did Maya bake?", 0.5)[0].score == 1.0  # whole name only


def test_the_turn_before_a_hit_can_rank_below_the_turn_after() -> None:
    """With a smaller share for the previous entry, the reply to a hit is packed before the
    turn that led to it."""
    hit = ranked(("s01/t002", 1.0, '"hit"'))
    around = {"s01/t002": [Candidate("chat", "s01/t001", 1, '"before"', 0.0),
                           Candidate("chat", "s01/t003", 1, '"after"', 0.0)]}
    hits = pack(hit, math.inf, 1000, lambda c: around.get(c.key, []), 0.7, 0.5)
    assert [(h.key, h.score) for h in hits] == [("s01/t002", 1.0), ("s01/t003", 0.7),
                                                ("s01/t001", 0.5)]
    same = pack(hit, math.inf, 1000, lambda c: around.get(c.key, []), 0.7)
    assert [h.score for h in same] == [1.0, 0.7, 0.7]
