"""Lazy context retrieval: give a run the few memory entries its task needs, not all of them.

Re-injecting the whole shared memory at every start was the biggest token bill; pulling relevant
entries on demand cuts it. The lexical ranking sits behind `RetrievalBackend`; the shipped one
is SQLite FTS5 with BM25 over the index the store keeps in sync (see `memory.sqlite.DDL`). With
the `[semantic]` extra, a `SemanticIndex` (memory/semantic_index.py) adds a ranking by meaning and
`fuse` merges the two; `speaker_boost` and `session_boost` then re-rank for conversations. The
token budget is what the caller sets: `pack` fills it greedily in rank order, bringing each
hit's neighbours along. Nothing is downloaded or served at run time.

Token estimate (stable, documented, model-independent): an entry is rendered by `render()` as
"## {namespace}/{key}\\n{compact JSON value}\\n" and costs ceil(len(text) / 4) tokens, counting
Python characters. Four characters per token is the usual English/JSON average for BPE
tokenizers; it is an estimate for budgeting, and full injection is measured with the same rule.
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import msgspec
import structlog

from supervisor.memory.embeddings import MODEL_ID
from supervisor.memory.settings import StewardSettings
from supervisor.memory.sqlite import connect

if TYPE_CHECKING:
    from supervisor.memory.semantic_index import SemanticIndex

log = structlog.get_logger("watchkeeper.context")

CHARS_PER_TOKEN = 4
TOKEN_RULE = "ceil(characters / 4) of each rendered entry"
MAX_QUERY_TERMS = 48
DEFAULT_K = 8  # hits when the caller gives neither k nor a budget
CANDIDATE_FACTOR = 4  # with a budget and k, rank this many times k so smaller entries can fill it
# With a budget and no k, rank one candidate per TYPICAL_ENTRY_TOKENS of budget first (ranking
# fewer keeps search fast), within these bounds; if they run out before the budget is full,
# rank four times as many and pack again.
TYPICAL_ENTRY_TOKENS = 20
MIN_BUDGET_CANDIDATES = 32
MAX_BUDGET_CANDIDATES = 1000

# Words that carry no topic: dropping them keeps the OR query small and the ranking on content.
STOPWORDS = frozenset("""
a about above after again all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has
have having he her here hers him his how i if in into is it its itself just me more most my
need needs no nor not now of off on once only or other our out over own please same she should
so some such than that the their them then there these they this those through to too under
until up very was we were what when where which while who whom why will with would you your
""".split())

_WORD = re.compile(r"\w+")
# "When did ...?" is answered by the turn that says when, relative to its own date ("last
# week", "yesterday"): such entries get TEMPORAL_BOOST for those questions. Absolute dates are
# left out on purpose, since entries often carry their own timestamp in every value.
WHEN_QUESTION = re.compile(
    r"^\W*(when|what (year|month|date|day|time)|which (year|month|day)|how long ago)\b", re.I)
RELATIVE_TIME = re.compile(
    r"\b(yesterday|today|tonight|tomorrow|ago|last|next|this (week|month|year|weekend)|"
    r"weekend|recently|lately|(mon|tues|wednes|thurs|fri|satur|sun)day)\b", re.I)
TEMPORAL_BOOST = 0.5


class Hit(msgspec.Struct, kw_only=True, frozen=True):
    """One retrieved entry: its rendered text, its token estimate, and why it ranked.

    `score` is the negated FTS5 bm25 when search is lexical only, and the fused score (`fuse`)
    when it is hybrid; higher is more relevant either way. The ranks are 1-based places in each
    ranking (None: not in that ranking's candidates or a neighbour).
    """

    namespace: str
    key: str
    version: int
    score: float
    text: str
    tokens: int
    lexical_rank: int | None = None
    semantic_rank: int | None = None
    neighbour_of: str | None = None  # "namespace/key" of the hit this entry sits beside


class Candidate(NamedTuple):
    namespace: str
    key: str
    version: int
    value_json: str
    score: float
    entry_id: int | None = None


class Ranked(NamedTuple):
    candidate: Candidate
    score: float
    lexical_rank: int | None
    semantic_rank: int | None


class RetrievalBackend(Protocol):
    """Ranks live entries for a bag of query terms; the best first."""

    def candidates(self, terms: Sequence[str], namespaces: Sequence[str] | None,
                   limit: int) -> list[Candidate]: ...


def render(namespace: str, key: str, value_json: str) -> str:
    """The text an agent receives for one entry (also what the token estimate counts)."""
    return f"## {namespace}/{key}\n{value_json}\n"


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def total_tokens(hits: Iterable[Hit]) -> int:
    return sum(hit.tokens for hit in hits)


def query_terms(text: str) -> list[str]:
    """Lower-cased content words of `text`, deduplicated in order, at most MAX_QUERY_TERMS."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(text.lower()):
        if len(word) > 1 and word not in STOPWORDS:
            seen.setdefault(word, None)
    return list(seen)[:MAX_QUERY_TERMS]


def fts_query(terms: Sequence[str]) -> str:
    """An FTS5 MATCH expression that ORs the terms, each quoted as a string.

    Terms come from `\\w+`, so they hold no double quote; quoting makes NEAR, AND, OR, NOT, '*'
    and column filters plain words, so no user text can raise an FTS5 syntax error.
    """
    return " OR ".join(f'"{term}"' for term in terms)


class Fts5Backend:
    """BM25 over the store's `entries_fts` table; a match in the key weighs twice the others.

    The namespace is indexed too: tasks name the kind of entry they need ("the research
    notes", "the analytics report"), and entries rarely repeat their namespace in their text.
    """

    NAMESPACE_WEIGHT = 3.0
    KEY_WEIGHT = 2.0
    BODY_WEIGHT = 1.0

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @classmethod
    def open(cls, db_path: Path, settings: StewardSettings | None = None) -> Fts5Backend:
        """A backend on its own read-only connection (WAL lets it read beside the writer)."""
        return cls(connect(Path(db_path), settings or StewardSettings(), readonly=True))

    def close(self) -> None:
        self._conn.close()

    def candidates(self, terms: Sequence[str], namespaces: Sequence[str] | None,
                   limit: int) -> list[Candidate]:
        if not terms:
            return []
        rank = f"bm25(entries_fts, {self.NAMESPACE_WEIGHT}, {self.KEY_WEIGHT}, {self.BODY_WEIGHT})"
        if namespaces:
            # Filter through the entries table first: bm25 is then computed only for rows in
            # scope (p50 23 ms vs 39 ms at 100k entries, bench/steward_store.py).
            scope = " or ".join("e.namespace glob ?" for _ in namespaces)
            sql = (f"select e.namespace, e.key, e.version, e.value, {rank} as rank, e.id "
                   f"from entries_fts join entries e on e.id = entries_fts.rowid "
                   f"where entries_fts match ? and ({scope}) "
                   f"order by rank, e.namespace, e.key limit ?")
            params = (fts_query(terms), *namespaces, limit)
        else:
            # Rank and cut inside the FTS table, then join only the top rows (p50 33 ms vs
            # 66 ms when every match is joined first). Tombstones are never in the index.
            sql = (f"select e.namespace, e.key, e.version, e.value, top.rank, e.id from ("
                   f"select rowid, {rank} as rank from entries_fts where entries_fts match ? "
                   f"order by rank limit ?) as top join entries e on e.id = top.rowid "
                   f"order by top.rank, e.namespace, e.key")
            params = (fts_query(terms), limit)
        rows = self._conn.execute(sql, params).fetchall()
        return [Candidate(ns, key, version, value, -rank, entry_id)
                for ns, key, version, value, rank, entry_id in rows]

    def neighbours(self, cand: Candidate) -> list[Candidate]:
        """The live entries just before and after `cand` among its siblings.

        Siblings share the namespace and the key's parent path ("s03/t012" and "s03/t013",
        not "s04/t001"); a key without a parent ("sourdough") has none, since flat keys are
        usually unrelated topics.
        """
        parent, slash, _ = cand.key.rpartition("/")
        if not slash:
            return []
        low, high = parent + "/", parent + "/\U0010ffff"
        columns = "select id, namespace, key, version, value from entries where namespace = ? "
        before = self._conn.execute(
            columns + "and key < ? and key >= ? and value is not null order by key desc limit 1",
            (cand.namespace, cand.key, low)).fetchone()
        after = self._conn.execute(
            columns + "and key > ? and key < ? and value is not null order by key limit 1",
            (cand.namespace, cand.key, high)).fetchone()
        return [Candidate(row[1], row[2], row[3], row[4], 0.0, row[0])
                for row in (before, after) if row]

    def by_ids(self, wanted: Sequence[tuple[int, int]]) -> list[Candidate]:
        """The live entries among (id, version) pairs, in the given order; changed ones drop."""
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        rows = {row[0]: row for row in self._conn.execute(
            f"select id, namespace, key, version, value from entries "
            f"where id in ({marks}) and value is not null", [i for i, _ in wanted])}
        return [Candidate(row[1], row[2], row[3], row[4], 0.0, row[0])
                for entry_id, version in wanted
                if (row := rows.get(entry_id)) is not None and row[3] == version]


class ContextRetriever:
    """Turns a task description into the best entries that fit a token budget.

    With a `SemanticIndex` it is hybrid: the FTS5 ranking and the embedding ranking are fused
    (`fuse`), so an entry that shares no word with the query, only meaning, ranks beside exact
    matches. Without one, the FTS5 ranking alone, and `explain()` says why.
    """

    # Chosen on the LoCoMo dev split only, leave-one-conversation-out (bench/lazy_context.py
    # --cross-validate): the setting best on all three dev conversations. The static embedding
    # model is the weaker signal: it adds at most 0.9 to a lexical score scaled to at most 1.
    SEMANTIC_WEIGHT = 0.9
    NEIGHBOUR_FACTOR = 0.7  # a neighbour ranks at this share of its hit's score...
    PREVIOUS_NEIGHBOUR_FACTOR: float | None = 0.55  # ...the entry before it at this share
    TEMPORAL_BOOST = TEMPORAL_BOOST
    # Session-level evidence: a candidate gains a share of its session's strength.
    SESSION_WEIGHT = 0.4
    SESSION_DEPTH = 3
    # An entry said by someone the query names ranks this share higher.
    SPEAKER_BOOST = 1.0
    # Pseudo-relevance feedback: the query vector moves toward its best FEEDBACK_DEPTH hits.
    # Off: on dev it won one fold of three and lost the others.
    FEEDBACK_WEIGHT = 0.0
    FEEDBACK_DEPTH = 3

    def __init__(self, backend: RetrievalBackend, semantic: SemanticIndex | None = None,
                 semantic_off: str = "no semantic index configured") -> None:
        self.backend = backend
        self.semantic = semantic
        self.semantic_off = semantic_off

    def explain(self) -> dict:
        """How search ranks right now, for `search --explain`."""
        if self.semantic is None:
            return {"retrieval": "lexical", "ranking": "SQLite FTS5 BM25 (porter stemming)",
                    "semantic": f"off: {self.semantic_off}", "reranking": self._reranking(),
                    "token_estimate": TOKEN_RULE}
        return {"retrieval": "hybrid",
                "ranking": f"FTS5 BM25 (scaled to the best) + {self.SEMANTIC_WEIGHT} x "
                           f"{MODEL_ID} cosine (min-max scaled)",
                "semantic": f"on: {len(self.semantic)} entry vectors",
                "reranking": self._reranking(), "token_estimate": TOKEN_RULE}

    def _reranking(self) -> str:
        return (f"x {1 + self.SPEAKER_BOOST:g} if the query names the entry's speaker; "
                f"+ {self.SESSION_WEIGHT:g} x its session's strength (turns with a speaker); "
                f"x {1 + self.TEMPORAL_BOOST:g} for a relative time in a 'when' question; "
                f"neighbours at {self.NEIGHBOUR_FACTOR:g} (after) and "
                f"{self._previous_factor():g} (before) of their hit")

    def _previous_factor(self) -> float:
        return (self.NEIGHBOUR_FACTOR if self.PREVIOUS_NEIGHBOUR_FACTOR is None
                else self.PREVIOUS_NEIGHBOUR_FACTOR)

    def search(self, query: str, k: int | None = None, token_budget: int | None = None,
               namespaces: Sequence[str] | None = None,
               speakers: Sequence[str] | None = None) -> list[Hit]:
        """The best entries, best first, that fit `token_budget`; at most `k` when k is given.

        The budget is the knob: with a budget and no k, entries are packed until no ranked
        candidate fits what remains. k caps the count only when the caller sets it; with
        neither, DEFAULT_K hits. Packing is greedy in rank order: an entry that does not fit the
        remaining budget is skipped and a smaller, lower-ranked one may take its place.
        `namespaces` are globs; `speakers` keeps only entries whose value is an object with a
        "speaker" member equal to one of them (any case), neighbours included.
        """
        limit = candidate_limit(k, token_budget)
        cap = k if k is not None else (DEFAULT_K if token_budget is None else math.inf)
        # Neighbours only fill a budget: without one, the caller asked for the k best.
        neighbours = getattr(self.backend, "neighbours", None) if token_budget else None
        said_by = speaker_filter(speakers)
        if said_by is not None and neighbours is not None:
            def neighbours(cand, _all=neighbours):
                return [near for near in _all(cand) if said_by(near)]
        while True:
            ranked = self.rank(query, namespaces, limit)
            seen = len(ranked)
            if said_by is not None:
                ranked = [r for r in ranked if said_by(r.candidate)]
            hits = pack(ranked, cap, token_budget, neighbours, self.NEIGHBOUR_FACTOR,
                        self.PREVIOUS_NEIGHBOUR_FACTOR)
            if not self._may_fill_more(hits, seen, limit, cap, token_budget):
                break
            limit = min(limit * 4, MAX_BUDGET_CANDIDATES)
        log.debug("context_searched", candidates=len(ranked), hits=len(hits),
                  tokens=total_tokens(hits), token_budget=token_budget)
        return hits

    @staticmethod
    def _may_fill_more(hits: list[Hit], seen: int, limit: int, cap: float,
                       token_budget: int | None) -> bool:
        """Whether ranking more candidates could bring the hits within one entry of the budget."""
        if token_budget is None or len(hits) >= cap or limit >= MAX_BUDGET_CANDIDATES:
            return False
        if seen < limit:  # every match was ranked already
            return False
        largest = max((hit.tokens for hit in hits), default=0)
        return total_tokens(hits) < token_budget - largest

    def rank(self, query: str, namespaces: Sequence[str] | None, limit: int) -> list[Ranked]:
        """Candidates best first: lexical alone or fused with the semantic ranking; for a
        "when" question, entries that say when (RELATIVE_TIME) move up."""
        ranked = self._rank(query, namespaces, limit)
        if not WHEN_QUESTION.search(query):
            return ranked
        boosted = [r._replace(score=r.score * (1 + self.TEMPORAL_BOOST))
                   if RELATIVE_TIME.search(r.candidate.value_json) else r for r in ranked]
        boosted.sort(key=lambda r: -r.score)
        return boosted

    def _rank(self, query: str, namespaces: Sequence[str] | None, limit: int) -> list[Ranked]:
        lexical = self.backend.candidates(query_terms(query), namespaces, limit)
        if self.semantic is None:
            ranked = [Ranked(c, c.score, place, None) for place, c in enumerate(lexical, 1)]
        else:
            vector = self.semantic.query_vector(query)
            ranked = self._fused(lexical, vector, namespaces, limit)
            if self.FEEDBACK_WEIGHT > 0 and ranked:
                top = [r.candidate.entry_id for r in ranked[:self.FEEDBACK_DEPTH]
                       if r.candidate.entry_id is not None]
                vector = self.semantic.expanded(vector, top, self.FEEDBACK_WEIGHT)
                ranked = self._fused(lexical, vector, namespaces, limit)
        ranked = speaker_boost(ranked, query, self.SPEAKER_BOOST)
        return session_boost(ranked, self.SESSION_WEIGHT, self.SESSION_DEPTH)

    def _fused(self, lexical: Sequence[Candidate], vector, namespaces: Sequence[str] | None,
               limit: int) -> list[Ranked]:
        near = self.semantic.nearest_to(vector, namespaces, limit)
        cosine = {entry_id: score for entry_id, _, score in near}
        semantic = [c._replace(score=cosine[c.entry_id]) for c in
                    self.backend.by_ids([(entry_id, version) for entry_id, version, _ in near])]
        return fuse(lexical, semantic, self.SEMANTIC_WEIGHT)


def speaker_boost(ranked: list[Ranked], query: str, boost: float) -> list[Ranked]:
    """Candidates whose "speaker" the query names (a word of it, any case) scaled by 1 + boost.

    "What does Melanie do to destress?" is most often answered by what Melanie said; her name
    is one word among many to BM25 and a frequent, so light, token to the embedding.
    """
    if boost <= 0 or not ranked:
        return ranked
    words = {word.casefold() for word in _WORD.findall(query)}
    boosted = []
    for r in ranked:
        speaker = speaker_of(r.candidate)
        named = speaker is not None and all(
            part in words for part in _WORD.findall(speaker.casefold()))
        boosted.append(r._replace(score=r.score * (1 + boost)) if named else r)
    boosted.sort(key=lambda r: (-r.score, r.candidate.namespace, r.candidate.key))
    return boosted


def session_boost(ranked: list[Ranked], weight: float, depth: int) -> list[Ranked]:
    """Candidates re-ranked with a share of their session's strength, best first.

    A session is what `session_of` says; its strength is the sum of its `depth` best
    scores, scaled so the strongest session has the best candidate's score. A turn in a
    session that talks about the question's topic beats an equally scored turn that matched
    one word alone. Entries outside any session keep their score.
    """
    if weight <= 0 or not ranked:
        return ranked
    sessions = [session_of(r.candidate) for r in ranked]
    per_session: dict[tuple[str, str], list[float]] = {}
    for r, session in zip(ranked, sessions, strict=True):
        if session is not None:
            per_session.setdefault(session, []).append(r.score)
    if not per_session:
        return ranked
    strength = {s: sum(sorted(scores, reverse=True)[:depth])
                for s, scores in per_session.items()}
    strongest = max(strength.values())
    if strongest <= 0:
        return ranked
    scale = weight * max(r.score for r in ranked) / strongest
    boosted = []
    for r, session in zip(ranked, sessions, strict=True):
        extra = strength[session] * scale if session is not None else 0.0
        boosted.append(r._replace(score=r.score + extra))
    boosted.sort(key=lambda r: (-r.score, r.candidate.namespace, r.candidate.key))
    return boosted


def fuse(lexical: Sequence[Candidate], semantic: Sequence[Candidate],
         semantic_weight: float) -> list[Ranked]:
    """Both rankings in one, best first: bm25 / the best bm25, plus weight x min-max cosine.

    Scores rather than reciprocal ranks: on the LoCoMo dev split, rank fusion flattened the
    gap between a strong lexical hit and the next (recall at 500 tokens fell from 70 % to 66 %
    even with the semantic weight at zero); scaled scores keep it. A candidate's `score` is its
    bm25 (lexical) or its cosine (semantic).
    """
    slots: dict[tuple[str, str], list] = {}
    best_bm25 = lexical[0].score if lexical and lexical[0].score > 0 else 1.0
    for place, cand in enumerate(lexical, 1):
        slots[(cand.namespace, cand.key)] = [cand, cand.score / best_bm25, place, None]
    if semantic:
        high, low = max(c.score for c in semantic), min(c.score for c in semantic)
        spread = high - low if high > low else 1.0
        for place, cand in enumerate(semantic, 1):
            slot = slots.setdefault((cand.namespace, cand.key), [cand, 0.0, None, None])
            slot[1] += semantic_weight * (cand.score - low) / spread
            slot[3] = place
    fused = [Ranked(cand, score, lex, sem) for cand, score, lex, sem in slots.values()]
    fused.sort(key=lambda r: (-r.score, r.candidate.namespace, r.candidate.key))
    return fused


def pack(ranked: Iterable[Ranked], cap: float, token_budget: int | None,
         neighbours: Callable[[Candidate], list[Candidate]] | None = None,
         neighbour_factor: float = 0.0,
         previous_factor: float | None = None) -> list[Hit]:
    """Greedy in rank order: take each candidate that fits what remains of the budget.

    With `neighbours`, each hit taken puts the entries beside it (the turn before and after, in
    a conversation) in line at `neighbour_factor` times its score: an answer is often in the
    reply to the turn that matched, which shares no word with the question. A neighbour taken
    brings its own neighbours at a further share, so a large budget widens the passage around
    a strong hit (LoCoMo dev: +3 points of recall at 2,000 tokens over one turn each side).
    """
    hits: list[Hit] = []
    taken: set[tuple[str, str]] = set()
    remaining = token_budget if token_budget is not None else math.inf
    queue: list[tuple[float, int, Ranked, str | None]] = []  # (-score, order, ranked, of)
    order = itertools.count()
    for r in ranked:
        heapq.heappush(queue, (-r.score, next(order), r, None))
    while queue:
        _, _, r, of = heapq.heappop(queue)
        cand = r.candidate
        if (cand.namespace, cand.key) in taken:
            continue
        text = render(cand.namespace, cand.key, cand.value_json)
        tokens = estimate_tokens(text)
        if tokens > remaining:
            continue
        taken.add((cand.namespace, cand.key))
        hits.append(Hit(namespace=cand.namespace, key=cand.key, version=cand.version,
                        score=r.score, text=text, tokens=tokens, lexical_rank=r.lexical_rank,
                        semantic_rank=r.semantic_rank, neighbour_of=of))
        remaining -= tokens
        if len(hits) >= cap or remaining <= 0:
            break
        if neighbours is not None:
            for near in neighbours(cand):
                if (near.namespace, near.key) not in taken:
                    share = (previous_factor if previous_factor is not None
                             and near.key < cand.key else neighbour_factor)
                    heapq.heappush(queue, (-r.score * share, next(order),
                                           Ranked(near, r.score * share, None, None),
                                           f"{cand.namespace}/{cand.key}"))
    return hits


def speaker_filter(speakers: Sequence[str] | None) -> Callable[[Candidate], bool] | None:
    """A test for "said by one of these speakers", or None when there is no filter."""
    if speakers is None:
        return None
    wanted = {name.casefold() for name in speakers}

    def said_by(cand: Candidate) -> bool:
        speaker = speaker_of(cand)
        return speaker is not None and speaker.casefold() in wanted
    return said_by


class _Spoken(msgspec.Struct):
    speaker: str | None = None


def speaker_of(cand: Candidate) -> str | None:
    """The "speaker" member of an entry whose value is an object, if it is a non-empty string."""
    if not cand.value_json.startswith("{"):
        return None
    try:
        speaker = msgspec.json.decode(cand.value_json, type=_Spoken).speaker
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return speaker or None


def session_of(cand: Candidate) -> tuple[str, str] | None:
    """The conversation session a turn belongs to: its namespace and its key's parent path
    ("s03" of "s03/t012"), for an entry that has a speaker; otherwise None.

    Only turns: an agent's own notes share parent paths too ("drafts/2026-11/..."), and
    lifting every note of a busy folder above a better single match cost the pipeline's own
    questions a third of their recall at 500 tokens."""
    parent, slash, _ = cand.key.rpartition("/")
    if not slash or speaker_of(cand) is None:
        return None
    return cand.namespace, parent


def candidate_limit(k: int | None, token_budget: int | None) -> int:
    """How many ranked candidates to fetch for a search with this k and budget."""
    if token_budget is None:
        return k if k is not None else DEFAULT_K
    if k is not None:
        return k * CANDIDATE_FACTOR
    by_budget = max(token_budget, 0) // TYPICAL_ENTRY_TOKENS
    return max(MIN_BUDGET_CANDIDATES, min(MAX_BUDGET_CANDIDATES, by_budget))


def render_hits(hits: Iterable[Hit]) -> str:
    """The context block to hand to an agent, in rank order."""
    return "".join(hit.text for hit in hits)
