"""The memory steward's store: versions, batches, limits, history, revert, durability."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import pytest

from supervisor.memory.settings import check_schema
from supervisor.memory.store import (
    ADMIN_AGENT,
    HistoryOp,
    MalformedUpdate,
    MemoryStore,
    Op,
    Reason,
    StewardSettings,
    Update,
    allowed,
    merge_patch,
    parse_update,
    schema_error,
)

ROOT = Path(__file__).resolve().parent.parent


def upd(op: str, key: str, value: object = msgspec.UNSET, *, ns: str = "writer",
        agent: str = "writer", run_id: str = "run-1", **extra: object) -> Update:
    return Update(op=Op(op), namespace=ns, key=key, value=value, agent=agent, run_id=run_id,
                  **extra)


@pytest.fixture
def store(tmp_path: Path) -> MemoryStore:
    with MemoryStore(tmp_path) as opened:
        yield opened


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- versions and ops -----------------------------------------------------------------------------

def test_put_creates_version_one_and_each_write_increments(store: MemoryStore) -> None:
    """Each applied write to a key bumps its version by one, starting at 1."""
    results = store.apply_batch([upd("put", "k", 1), upd("put", "k", 2), upd("put", "k", 3)])
    assert [r.version for r in results] == [1, 2, 3]
    assert store.get("writer", "k").value == 3


def test_expect_version_conflict_reports_current_version(store: MemoryStore) -> None:
    """A stale expect_version is rejected with the current version so the agent can re-read."""
    store.apply_batch([upd("put", "k", "a"), upd("put", "k", "b")])
    [result] = store.apply_batch([upd("put", "k", "c", expect_version=1)])
    assert (result.reason, result.current_version) == (Reason.VERSION_CONFLICT, 2)
    assert store.get("writer", "k").value == "b"


def test_expect_version_zero_means_must_not_exist(store: MemoryStore) -> None:
    """expect_version=0 creates a missing key and refuses an existing one."""
    first, second = store.apply_batch([upd("put", "k", 1, expect_version=0),
                                       upd("put", "k", 2, expect_version=0)])
    assert first.ok and second.reason is Reason.VERSION_CONFLICT


def test_delete_then_recreate_never_reuses_a_version(store: MemoryStore) -> None:
    """A re-created key continues the version counter, so an old expect_version cannot match."""
    store.apply_batch([upd("put", "k", 1), upd("delete", "k")])
    assert store.get("writer", "k") is None
    [recreated] = store.apply_batch([upd("put", "k", 2, expect_version=0)])
    assert recreated.version == 3


def test_merge_follows_rfc7386(store: MemoryStore) -> None:
    """Merge patches objects recursively and a null member removes that member."""
    store.apply_batch([upd("put", "cfg", {"a": 1, "nested": {"x": 1, "y": 2}, "gone": True})])
    store.apply_batch([upd("merge", "cfg", {"nested": {"y": None, "z": 3}, "gone": None})])
    assert store.get("writer", "cfg").value == {"a": 1, "nested": {"x": 1, "z": 3}}


def test_merge_patch_replaces_non_objects() -> None:
    """A non-object patch replaces the target, and an object patch replaces a non-object target."""
    assert merge_patch({"a": 1}, [1, 2]) == [1, 2]
    assert merge_patch([1, 2], {"a": None, "b": 1}) == {"b": 1}


def test_append_creates_the_list_then_appends_one_element(store: MemoryStore) -> None:
    """Append starts a list on a missing key and adds each value as one element."""
    store.apply_batch([upd("append", "log", "first"), upd("append", "log", ["second"])])
    assert store.get("writer", "log").value == ["first", ["second"]]


def test_append_to_a_non_list_is_malformed(store: MemoryStore) -> None:
    """Appending to a value that is not a list is rejected and leaves the value alone."""
    store.apply_batch([upd("put", "obj", {"a": 1})])
    [result] = store.apply_batch([upd("append", "obj", 2)])
    assert result.reason is Reason.MALFORMED and "list" in result.detail


def test_list_returns_live_entries_under_a_literal_prefix(store: MemoryStore) -> None:
    """list() matches the prefix literally (no wildcards) and omits deleted keys."""
    store.apply_batch([upd("put", "notes/a", 1), upd("put", "notes/b", 2),
                       upd("put", "notes%c", 3), upd("put", "other", 4),
                       upd("delete", "notes/b")])
    assert [e.key for e in store.list("writer", "notes/")] == ["notes/a"]


# -- batches and limits ---------------------------------------------------------------------------

def test_rejected_update_does_not_abort_its_batch(store: MemoryStore) -> None:
    """In one batch, the updates around a rejected one are still applied."""
    results = store.apply_batch([upd("put", "a", 1), upd("put", "b", 1, expect_version=5),
                                 upd("put", "c", 1)])
    assert [r.ok for r in results] == [True, False, True]
    assert [e.key for e in store.list("writer")] == ["a", "c"]


def test_value_over_the_size_cap_is_too_large(tmp_path: Path) -> None:
    """A value whose encoded JSON exceeds max_value_bytes is rejected as too_large."""
    with MemoryStore(tmp_path, StewardSettings(max_value_bytes=100)) as small:
        ok, big = small.apply_batch([upd("put", "k", "x" * 90), upd("put", "k", "x" * 99)])
    assert ok.ok and big.reason is Reason.TOO_LARGE


def test_append_that_grows_past_the_cap_is_too_large(tmp_path: Path) -> None:
    """The cap applies to the resulting value, so an append cannot grow a list without bound."""
    with MemoryStore(tmp_path, StewardSettings(max_value_bytes=30)) as small:
        results = small.apply_batch([upd("append", "log", "x" * 10) for _ in range(3)])
    assert [r.reason for r in results] == [None, None, Reason.TOO_LARGE]


def test_schema_rejects_a_nonconforming_value(tmp_path: Path) -> None:
    """A namespace with a schema refuses values that break it and names the failing path."""
    schema = {"type": "object", "required": ["title"],
              "properties": {"title": {"type": "string", "maxLength": 10}}}
    settings = StewardSettings(schemas={"seo*": schema})
    with MemoryStore(tmp_path, settings) as typed:
        results = typed.apply_batch([
            upd("put", "a", {"title": "short"}, ns="seo"),
            upd("put", "b", {"title": "far too long a title"}, ns="seo"),
            upd("put", "c", {"slug": "x"}, ns="seo"),
            upd("put", "d", {"anything": 1}, ns="notes")],
            grants={"writer": ["seo", "notes"]})
    assert [r.reason for r in results] == [None, Reason.SCHEMA, Reason.SCHEMA, None]
    assert "$.title" in results[1].detail and "title" in results[2].detail


def test_schema_subset_checks_items_enum_and_closed_objects() -> None:
    """The subset validator checks items, maxItems, enum, integer and additionalProperties."""
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                             "state": {"enum": ["draft", "done"]}, "n": {"type": "integer"}}}
    assert schema_error({"tags": ["a"], "state": "done", "n": 2.0}, schema) is None
    assert "$.tags[1]" in schema_error({"tags": ["a", 1]}, schema)
    assert "maxItems" in schema_error({"tags": ["a", "b", "c"]}, schema)
    assert "not one of" in schema_error({"state": "late"}, schema)
    assert "integer" in schema_error({"n": True}, schema)
    assert "'extra' is not allowed" in schema_error({"extra": 1}, schema)


def test_settings_refuse_unsupported_schema_keywords() -> None:
    """A schema keyword outside the subset is a config error that lists the supported ones."""
    with pytest.raises(ValueError, match="unsupported keyword.*pattern.*supported"):
        check_schema({"type": "string", "pattern": "^a"}, where="steward.schemas['seo']")


def test_settings_defaults() -> None:
    """The steward section's defaults: 256 KiB values, 30 days of history, 1 day of retry keys."""
    defaults = StewardSettings()
    assert msgspec.structs.asdict(defaults) == {
        "db_file": "memory.sqlite3", "max_value_bytes": 262144, "schemas": {},
        "history_retention_s": 2592000.0, "idempotency_ttl_s": 86400.0, "busy_timeout_ms": 5000}


def test_non_json_value_is_malformed_and_spares_the_batch(store: MemoryStore) -> None:
    """A value that cannot be encoded as JSON is rejected without aborting the batch."""
    bad, good = store.apply_batch([upd("put", "k", object()), upd("put", "j", 1)])
    assert bad.reason is Reason.MALFORMED and good.ok


def test_settings_refuse_unknown_fields() -> None:
    """An unknown key in the steward section is an error, not silently ignored."""
    with pytest.raises(msgspec.ValidationError, match="max_value_byte"):
        msgspec.convert({"max_value_byte": 1}, StewardSettings)


def test_deeply_nested_value_is_malformed(store: MemoryStore) -> None:
    """A value nested beyond MAX_NESTING is rejected instead of exhausting the stack."""
    value: object = 1
    for _ in range(200):
        value = [value]
    [result] = store.apply_batch([upd("put", "deep", value)])
    assert result.reason is Reason.MALFORMED


# -- permissions and parsing ----------------------------------------------------------------------

def test_allowed_matches_fnmatch_globs_case_sensitively() -> None:
    """allowed() accepts a namespace matching any glob and nothing else."""
    assert allowed(["pipeline/*", "writer"], "pipeline/drafts")
    assert allowed(["pipeline/*", "writer"], "writer")
    assert not allowed(["pipeline/*"], "Pipeline/drafts")
    assert not allowed([], "writer")


def test_agent_writes_only_its_own_namespace_by_default(store: MemoryStore) -> None:
    """Without a grant an agent may write its own namespace only; a grant widens that."""
    own, other = store.apply_batch([upd("put", "k", 1), upd("put", "k", 1, ns="seo")])
    assert own.ok and other.reason is Reason.FORBIDDEN
    [granted] = store.apply_batch([upd("put", "k", 1, ns="seo")], grants={"writer": ["se?"]})
    assert granted.ok


def test_parse_update_stamps_agent_and_refuses_self_declared_agent() -> None:
    """parse_update takes agent and run_id from the daemon and rejects an agent field in input."""
    update = parse_update(b'{"op":"put","namespace":"n","key":"k","value":null}',
                          agent="writer", run_id="r9")
    assert (update.agent, update.run_id, update.value) == ("writer", "r9", None)
    with pytest.raises(MalformedUpdate, match="agent"):
        parse_update({"op": "put", "namespace": "n", "key": "k", "value": 1, "agent": "root"},
                     agent="writer", run_id="r9")


def test_parse_update_rejects_unknown_op_with_the_valid_ones() -> None:
    """An unknown op is malformed and the message lists the valid ops."""
    with pytest.raises(MalformedUpdate, match="put|merge|append|delete"):
        parse_update('{"op":"upsert","namespace":"n","key":"k"}', agent="a", run_id="r")


def test_put_without_value_is_malformed(store: MemoryStore) -> None:
    """A put that carries no value is rejected as malformed."""
    [result] = store.apply_batch([upd("put", "k")])
    assert result.reason is Reason.MALFORMED


# -- idempotency ----------------------------------------------------------------------------------

def test_retry_with_same_idempotency_key_applies_once(store: MemoryStore) -> None:
    """A retried append with the same idempotency key is replayed, not applied twice."""
    first = store.apply_batch([upd("append", "log", "x", idempotency_key="req-1")])
    retry = store.apply_batch([upd("append", "log", "x", idempotency_key="req-1")])
    assert retry[0].replayed and retry[0].version == first[0].version == 1
    assert store.get("writer", "log").value == ["x"]
    assert len(store.history(key="log")) == 1


def test_idempotency_keys_are_scoped_per_agent(tmp_path: Path) -> None:
    """The same idempotency key from two agents is two distinct requests."""
    with MemoryStore(tmp_path) as shared:
        grants = {"a": ["shared"], "b": ["shared"]}
        results = shared.apply_batch(
            [upd("append", "log", who, ns="shared", agent=who, idempotency_key="same")
             for who in ("a", "b")], grants=grants)
    assert [r.version for r in results] == [1, 2]


def test_prune_drops_old_history_and_idempotency_keys(tmp_path: Path) -> None:
    """prune() removes records older than their retention and keeps recent ones."""
    clock = FakeClock()
    settings = StewardSettings(history_retention_s=100, idempotency_ttl_s=10)
    with MemoryStore(tmp_path, settings, clock=clock) as aging:
        aging.apply_batch([upd("put", "old", 1, idempotency_key="i")])
        clock.now += 50
        aging.apply_batch([upd("put", "new", 1)])
        clock.now += 60
        counts = aging.prune()
        assert (counts.history, counts.idempotency) == (1, 1)
        assert [h.key for h in aging.history()] == ["new"]
        [again] = aging.apply_batch([upd("put", "old", 2, idempotency_key="i")])
    assert not again.replayed and again.version == 2


# -- history and revert ---------------------------------------------------------------------------

def test_history_records_old_and_new_values_and_filters(store: MemoryStore) -> None:
    """history() is newest first, carries old/new values and filters by agent and run."""
    store.apply_batch([upd("put", "k", 1, run_id="r1"), upd("merge", "k", 2, run_id="r2")])
    latest, first = store.history(namespace="writer", key="k")
    assert (latest.op, latest.old_value, latest.new_value) == (HistoryOp.MERGE, 1, 2)
    assert (first.old_version, first.new_version) == (None, 1)
    assert [h.run_id for h in store.history(run_id="r1")] == ["r1"]
    assert store.history(agent="nobody") == []


def test_revert_run_restores_values_from_before_the_run(store: MemoryStore) -> None:
    """Reverting a run writes back each key's value from before its first write in that run."""
    store.apply_batch([upd("put", "a", "good", run_id="r1")])
    store.apply_batch([upd("put", "a", "bad", run_id="r2"), upd("put", "a", "worse", run_id="r2"),
                       upd("put", "b", "new", run_id="r2")])
    results = store.revert(run_id="r2")
    assert all(r.ok for r in results)
    assert store.get("writer", "a").value == "good"
    assert store.get("writer", "b") is None
    reverts = store.history(agent=ADMIN_AGENT)
    assert {h.op for h in reverts} == {HistoryOp.REVERT} and len(reverts) == 2


def test_revert_by_seq_undoes_one_record(store: MemoryStore) -> None:
    """Reverting one history record restores that key's previous value."""
    store.apply_batch([upd("put", "k", 1), upd("put", "k", 2)])
    newest = store.history(key="k")[0]
    [result] = store.revert(seq=newest.seq)
    assert result.ok and store.get("writer", "k").value == 1


def test_revert_refuses_to_clobber_later_writes_unless_forced(store: MemoryStore) -> None:
    """A key changed by another agent after the reverted writes is kept unless force is set."""
    grants = {"writer": ["shared"], "other": ["shared"]}
    store.apply_batch([upd("put", "k", "orig", ns="shared", run_id="r1")], grants=grants)
    store.apply_batch([upd("put", "k", "mine", ns="shared", run_id="r2")], grants=grants)
    store.apply_batch([upd("put", "k", "theirs", ns="shared", agent="other", run_id="r3")],
                      grants=grants)
    [refused] = store.revert(run_id="r2")
    assert (refused.reason, refused.current_version) == (Reason.VERSION_CONFLICT, 3)
    assert store.get("shared", "k").value == "theirs"
    [forced] = store.revert(run_id="r2", force=True)
    assert forced.ok and store.get("shared", "k").value == "orig"


# -- export / import ------------------------------------------------------------------------------

def test_export_import_round_trip(tmp_path: Path) -> None:
    """Importing an export into an empty store reproduces every entry with its version."""
    (tmp_path / "a").mkdir()
    with MemoryStore(tmp_path / "a") as source:
        source.apply_batch([upd("put", "k", {"x": [1, "two", None]}), upd("merge", "k", {"y": 1}),
                            upd("append", "log", "é ✓"), upd("put", "gone", 1),
                            upd("delete", "gone")])
        exported = msgspec.json.decode(msgspec.json.encode(source.export()))
    (tmp_path / "b").mkdir()
    with MemoryStore(tmp_path / "b") as target:
        assert target.import_(exported) == 2
        again = target.export()
    assert again["entries"] == exported["entries"]
    assert [e["version"] for e in again["entries"]] == [2, 1]


def test_import_over_existing_key_never_lowers_its_version(store: MemoryStore) -> None:
    """Importing onto an existing key bumps past its current version and records history."""
    for _ in range(3):
        store.apply_batch([upd("put", "k", "local")])
    doc = {"format": "watchkeeper-memory", "format_version": 1, "entries": [
        {"namespace": "writer", "key": "k", "value": "imported", "version": 1,
         "updated_at": 1.0, "updated_by": "writer", "run_id": "old"}]}
    store.import_(doc)
    entry = store.get("writer", "k")
    assert (entry.value, entry.version) == ("imported", 4)
    assert store.history(key="k")[0].op is HistoryOp.IMPORT


def test_import_refuses_a_foreign_document(store: MemoryStore) -> None:
    """import_ rejects data that is not a watchkeeper memory export, saying what it expected."""
    with pytest.raises(msgspec.ValidationError, match="watchkeeper-memory"):
        store.import_({"format": "other", "format_version": 1, "entries": []})


# -- real processes: crash safety and concurrency -------------------------------------------------

def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


CRASH_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from supervisor.memory.store import MemoryStore, Op, Update
    store = MemoryStore(Path(sys.argv[1]))
    i = 0
    while True:
        batch = [Update(op=Op.PUT, namespace="crash", key=f"k{i + j}", agent="crash", run_id="r",
                        value={"i": i + j, "pad": "x" * 300}) for j in range(3)]
        batch.append(Update(op=Op.APPEND, namespace="crash", key="log", value=i, agent="crash",
                            run_id="r"))
        assert all(r.ok for r in store.apply_batch(batch))
        print("ack", i, flush=True)  # acknowledged only after apply_batch returned (committed)
        i += 3
""")


def test_every_acknowledged_update_survives_sigkill(tmp_path: Path) -> None:
    """After SIGKILL mid-stream, every acked update is in the reopened db and it passes integrity_check."""
    script = tmp_path / "crash_child.py"
    script.write_text(CRASH_CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                             text=True, env=_child_env())
    acked: list[int] = []
    deadline = time.monotonic() + 30
    try:
        while len(acked) < 150 and time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line, f"child exited early with {child.wait()}"
            if line.startswith("ack "):  # other lines are log output
                acked.append(int(line.split()[1]))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    acked.extend(int(line.split()[1]) for line in child.stdout.read().splitlines()
                 if line.startswith("ack "))
    assert len(acked) >= 150
    with MemoryStore(tmp_path) as reopened:
        assert reopened.integrity_check() == "ok"
        for i in acked:
            for j in range(3):
                assert reopened.get("crash", f"k{i + j}").value["i"] == i + j
        log = reopened.get("crash", "log").value
    assert log[: len(acked)] == acked


MERGE_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from supervisor.memory.store import MemoryStore, Op, Update
    store, me, rounds = MemoryStore(Path(sys.argv[1])), sys.argv[2], int(sys.argv[3])
    for n in range(1, rounds + 1):
        batch = [Update(op=Op.MERGE, namespace="shared", key=f"k{key}", agent=me, run_id="r",
                        value={me: n, me + "_twin": n}) for key in range(3)]
        assert all(r.ok for r in store.apply_batch(batch, grants={me: ["shared"]}))
""")


def test_concurrent_writer_processes_never_show_readers_a_torn_state(tmp_path: Path) -> None:
    """Readers beside several merging processes always see whole batches, and no merge is lost."""
    writers, rounds = 3, 60
    MemoryStore(tmp_path).close()  # create the schema before the race starts
    script = tmp_path / "merge_child.py"
    script.write_text(MERGE_CHILD)
    children = [subprocess.Popen([sys.executable, str(script), str(tmp_path), f"w{n}",
                                  str(rounds)], env=_child_env()) for n in range(writers)]
    reader = MemoryStore(tmp_path).reader()
    snapshots = 0
    try:
        while any(child.poll() is None for child in children) or snapshots == 0:
            entries = reader.list("shared")  # one SELECT: one consistent snapshot
            for entry in entries:
                counts = {k: v for k, v in entry.value.items() if not k.endswith("_twin")}
                assert all(entry.value[f"{k}_twin"] == v for k, v in counts.items())
                assert entry.version == sum(counts.values())  # every merge counted once
            assert len({tuple(sorted(e.value.items())) for e in entries}) <= 1  # keys move together
            snapshots += 1
    finally:
        for child in children:
            child.wait(timeout=60)
    assert [child.returncode for child in children] == [0] * writers
    final = reader.list("shared")
    assert [e.version for e in final] == [writers * rounds] * 3
    assert snapshots > 1
    reader.close()


def test_reader_connection_cannot_write(store: MemoryStore) -> None:
    """A MemoryReader is read-only, so only the steward can change memory."""
    reader = store.reader()
    with pytest.raises(sqlite3.OperationalError):
        reader._conn.execute("delete from entries")
    reader.close()
