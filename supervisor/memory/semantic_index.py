"""Entry vectors: stored beside the entries, kept in memory for search, filled by the steward.

`entry_vectors` holds one vector per live entry (its id and version). Triggers drop a vector in
the same transaction as the write that changes or deletes its entry, so a stored vector is never
stale. The steward acknowledges a write first and embeds afterwards (`embed_pending`, a batch a
loop turn); whatever was written but not yet embedded when the daemon died has no vector and is
embedded at the next start, which looks for live entries without one.
"""

from __future__ import annotations

import fnmatch
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import structlog

from .embeddings import DIMENSIONS, MAX_TEXT_CHARS, MODEL_ID, Embedder, entry_text
from .settings import StewardSettings
from .sqlite import connect

log = structlog.get_logger("watchkeeper.semantic")

EMBED_BATCH = 256  # entries embedded per loop turn: ~10 ms, so the loop stays responsive
# ...and at most this much text a turn (~0.1 s): 256 long entries would hold the loop seconds.
EMBED_BATCH_CHARS = 1 << 18

DDL = """
create table if not exists entry_vectors (
    id integer primary key,     -- entries.id
    version integer not null,   -- entries.version the vector was computed from
    model text not null,
    vector blob not null        -- float32 little-endian, DIMENSIONS wide, unit length
);
create table if not exists token_counts (  -- tokens embedded so far, for SIF weights
    token integer primary key,
    count integer not null
);
create trigger if not exists entry_vectors_stale after update of value on entries begin
    delete from entry_vectors where id = old.id;
end;
create trigger if not exists entry_vectors_gone after delete on entries begin
    delete from entry_vectors where id = old.id;
end;
"""

PENDING = ("select e.id, e.version, e.namespace, e.value from entries e "
           "left join entry_vectors v on v.id = e.id and v.model = ? "
           "where e.value is not null and v.id is null order by e.id limit ?")


def create_vector_table(conn: sqlite3.Connection) -> None:
    """The vector table and its triggers, if missing (idempotent; the writer calls it)."""
    conn.executescript(f"begin immediate; {DDL} commit;")


class SemanticIndex:
    """Every stored vector in one matrix, for brute-force cosine search (6,000 x 256 = 6 MB)."""

    def __init__(self, embedder: Embedder) -> None:
        import numpy as np

        self._np = np
        self.embedder = embedder
        self._rows: dict[int, int] = {}  # entry id -> row of the matrix
        self._ids = np.zeros(0, dtype=np.int64)
        self._versions = np.zeros(0, dtype=np.int64)
        self._namespaces: list[str] = []
        self._matrix = np.zeros((0, DIMENSIONS), dtype=np.float32)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def load(self, conn: sqlite3.Connection) -> None:
        """Read every stored vector of this model (at start)."""
        rows = conn.execute(
            "select v.id, v.version, e.namespace, v.vector from entry_vectors v "
            "join entries e on e.id = v.id where v.model = ?", (MODEL_ID,)).fetchall()
        np = self._np
        vectors = [np.frombuffer(blob, dtype=np.float32) for *_, blob in rows]
        self.add([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                 np.stack(vectors) if vectors else np.zeros((0, DIMENSIONS), np.float32))

    def add(self, ids: Sequence[int], versions: Sequence[int], namespaces: Sequence[str],
            vectors: Any) -> None:
        """Insert or replace the vectors of these entries."""
        for entry_id, version, namespace, vector in zip(ids, versions, namespaces, vectors,
                                                        strict=True):
            row = self._rows.get(entry_id)
            if row is None:
                row = self._append_row()
                self._rows[entry_id] = row
                self._ids[row] = entry_id
                self._namespaces.append(namespace)
            self._versions[row] = version
            self._matrix[row] = vector

    def _append_row(self) -> int:
        np = self._np
        if self._size == len(self._ids):  # grow geometrically, like a list
            capacity = max(64, 2 * self._size)
            self._ids = np.resize(self._ids, capacity)
            self._versions = np.resize(self._versions, capacity)
            grown = np.zeros((capacity, DIMENSIONS), dtype=np.float32)
            grown[:self._size] = self._matrix[:self._size]
            self._matrix = grown
        self._size += 1
        return self._size - 1

    def nearest(self, query: str, namespaces: Sequence[str] | None,
                limit: int) -> list[tuple[int, int, float]]:
        """(entry id, version, cosine) of the `limit` vectors closest to the query's, best first.

        The version lets the caller drop a vector whose entry has changed since (the triggers
        removed it from the table; the matrix forgets it when the entry is embedded again).
        """
        if not self._size or limit <= 0:
            return []
        return self.nearest_to(self.query_vector(query), namespaces, limit)

    def query_vector(self, query: str) -> Any:
        """The query's unit vector (zeros when no token of it is known)."""
        [vector] = self.embedder.embed([query])
        return vector

    def nearest_to(self, vector: Any, namespaces: Sequence[str] | None,
                   limit: int) -> list[tuple[int, int, float]]:
        """Like `nearest`, for a vector already made (a query's, or one expanded from hits)."""
        np = self._np
        if not self._size or limit <= 0 or not vector.any():
            return []
        # einsum, not `@`: BLAS threads on a busy 2-core host made this 4-7 ms instead of 0.5.
        scores = np.einsum("ij,j->i", self._matrix[:self._size], vector)
        if namespaces:
            scores = np.where(self._namespace_mask(namespaces), scores, -np.inf)
        top = min(limit, self._size)
        best = np.argpartition(-scores, top - 1)[:top]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [(int(self._ids[i]), int(self._versions[i]), float(scores[i]))
                for i in best if scores[i] > -np.inf]

    def expanded(self, vector: Any, entry_ids: Sequence[int], weight: float) -> Any:
        """`vector` moved toward the mean of these entries' vectors (pseudo-relevance feedback:
        the best hits carry the words the answer uses, which the question may not), unit length.
        Entries without a vector are left out; with none, `vector` as it is."""
        np = self._np
        rows = [row for entry_id in entry_ids if (row := self._rows.get(entry_id)) is not None]
        if not rows or weight <= 0:
            return vector
        moved = vector + weight * self._matrix[rows].mean(axis=0)
        norm = float(np.linalg.norm(moved))
        return moved / norm if norm > 0 else vector

    def _namespace_mask(self, globs: Sequence[str]) -> Any:
        matching = {ns for ns in set(self._namespaces)
                    if any(fnmatch.fnmatchcase(ns, glob) for glob in globs)}
        return self._np.fromiter((ns in matching for ns in self._namespaces), dtype=bool,
                                 count=self._size)


class SemanticIndexer:
    """Embeds live entries that have no vector yet and stores the vectors (the writer's side).

    It has its own connection to the store's file; only the daemon's loop uses it, between the
    steward's group commits, so the two writers never wait on each other.
    """

    def __init__(self, conn: sqlite3.Connection, index: SemanticIndex) -> None:
        self._conn = conn
        self.index = index
        self.dirty = True  # at start: look for entries written but never embedded
        self.embedded = 0

    @classmethod
    def open(cls, db_path: Path, settings: StewardSettings, index: SemanticIndex) -> SemanticIndexer:
        return cls(connect(Path(db_path), settings), index)

    def close(self) -> None:
        self._conn.close()

    def start(self) -> int:
        """Create the table, load stored vectors, and return how many entries still lack one."""
        create_vector_table(self._conn)
        self.index.load(self._conn)
        self.index.embedder.learned(dict(self._conn.execute("select token, count from "
                                                            "token_counts")))
        missing = self._conn.execute(
            "select count(*) from entries e left join entry_vectors v on v.id = e.id "
            "and v.model = ? where e.value is not null and v.id is null", (MODEL_ID,)).fetchone()
        log.info("semantic_index_loaded", vectors=len(self.index), missing=missing[0])
        return missing[0]

    def mark_dirty(self) -> None:
        """Entries were written: the next `embed_pending` looks for ones without a vector."""
        self.dirty = True

    def embed_pending(self, batch: int = EMBED_BATCH,
                      batch_chars: int = EMBED_BATCH_CHARS) -> int:
        """Embed up to `batch` entries lacking a vector, and no more than about `batch_chars`
        of their text; stays dirty while more may remain."""
        if not self.dirty:
            return 0
        rows, texts, chars = [], [], 0
        cursor = self._conn.execute(PENDING, (MODEL_ID, batch))
        try:
            for *row, value in cursor:
                if chars >= batch_chars:
                    break
                text = entry_text(msgspec.json.decode(value))[:MAX_TEXT_CHARS]
                rows.append(row)
                texts.append(text)
                chars += len(text)
        finally:
            cursor.close()  # a read left open would outlive the write below
        self.dirty = len(rows) == batch or chars >= batch_chars
        if not rows:
            return 0
        embedder = self.index.embedder
        before = embedder.counts.copy()
        vectors = embedder.embed(texts, learn=True)
        grown = (embedder.counts - before).nonzero()[0]
        added = [(int(t), int(embedder.counts[t] - before[t])) for t in grown]
        # Only vectors whose entry is still at that version: the loop is the one writer, so
        # nothing changed between the read above and this transaction.
        self._conn.execute("begin immediate")
        try:
            self._conn.executemany(
                "insert or replace into entry_vectors (id, version, model, vector) "
                "values (?, ?, ?, ?)",
                [(r[0], r[1], MODEL_ID, v.tobytes()) for r, v in zip(rows, vectors, strict=True)])
            self._conn.executemany(
                "insert into token_counts (token, count) values (?, ?) "
                "on conflict (token) do update set count = count + excluded.count", added)
            self._conn.execute("commit")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("rollback")
            raise
        self.index.add([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                       vectors)
        self.embedded += len(rows)
        return len(rows)
