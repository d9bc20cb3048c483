"""`memory export | memory import` round-trips any store the steward accepted, in pages,
and an import is checked exactly like a put."""

from __future__ import annotations

import json
import subprocess
import sys

from harness import DaemonProc, wk
from hostile import query

from supervisor.memory.store import MemoryStore, Op, Update
from supervisor.memory.writes import MAX_NAME_CHARS

BIG_VALUE_CHARS = 250_000  # under the default max_value_bytes (256 KiB)
GRANTS = {"filler": ["*"], "writer": ["*"]}
BIG_ENTRIES = 220  # 220 x 250 kB = 55 MB of values, as much again in history: a 110 MB store


def _fill(state_dir) -> None:
    state_dir.mkdir(parents=True)
    with MemoryStore(state_dir) as store:
        for start in range(0, BIG_ENTRIES, 20):
            store.apply_batch([Update(op=Op.PUT, namespace=f"ns{i % 4}", key=f"k{i}",
                                      value=f"{i:06d}" + "é" * (BIG_VALUE_CHARS // 2 - 3),
                                      agent="filler", run_id=f"run-{i}")
                               for i in range(start, start + 20)], GRANTS)
        small = [Update(op=Op.PUT, namespace="notes", key="nested", value={"a": [1, {"b": None}]},
                        agent="writer", run_id="r1"),
                 Update(op=Op.MERGE, namespace="notes", key="nested", value={"c": 2},
                        agent="writer", run_id="r2"),
                 Update(op=Op.APPEND, namespace="notes", key="log", value="first",
                        agent="writer", run_id="r2"),
                 Update(op=Op.PUT, namespace="notes", key="gone", value=True, agent="writer",
                        run_id="r3"),
                 Update(op=Op.DELETE, namespace="notes", key="gone", agent="writer",
                        run_id="r3")]
        for update in small:
            assert store.apply_batch([update], GRANTS)[0].ok


ENTRIES_SQL = ("select namespace, key, value, version, updated_at, updated_by, run_id "
               "from entries order by namespace, key")
HISTORY_SQL = "select * from history order by seq"


def test_export_import_of_a_100_mb_store_is_identical(tmp_path):
    """A ~100 MB store exported by the CLI and piped into `memory import -` of a fresh
    state dir has identical entries (versions, metadata) and identical history."""
    one, two = DaemonProc(tmp_path / "one", {}), DaemonProc(tmp_path / "two", {})
    _fill(one.state_dir)
    db_one, db_two = one.state_dir / "memory.sqlite3", two.state_dir / "memory.sqlite3"
    with one.start(), two.start():
        exporter = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "--config", str(one.config_path),
             "memory", "export"], stdout=subprocess.PIPE)
        importer = subprocess.run(
            [sys.executable, "-m", "supervisor.cli", "--config", str(two.config_path),
             "memory", "import", "-"], stdin=exporter.stdout, capture_output=True, timeout=300)
        exporter.stdout.close()
        assert exporter.wait(60) == 0
        assert importer.returncode == 0, importer.stderr
        assert json.loads(importer.stdout) == {"imported": BIG_ENTRIES + 2,
                                               "history": BIG_ENTRIES + 5}
    entries = query(db_one, ENTRIES_SQL)
    assert len(entries) == BIG_ENTRIES + 3  # with the tombstone, which is not exported
    assert query(db_two, ENTRIES_SQL) == [e for e in entries if e[2] is not None]
    assert query(db_two, HISTORY_SQL) == query(db_one, HISTORY_SQL)


BAD_ENTRIES = [
    ({"namespace": "", "key": "k"}, "namespace must be a non-empty string"),
    ({"namespace": "n", "key": "a\x01b"}, "control characters"),
    ({"namespace": "n", "key": "k" * (MAX_NAME_CHARS + 1)}, f"at most {MAX_NAME_CHARS}"),
    ({"namespace": "n", "key": "k", "version": -1}, "out of range"),
    ({"namespace": "n", "key": "k", "version": 2**63}, "out of range"),
    ({"namespace": "n", "key": "k", "value": "x" * 300_000}, "max_value_bytes"),
]


def test_import_checks_every_entry_like_a_put(tmp_path):
    """Empty or control-character names, 100 KB keys, negative or 2**63 versions and
    oversized values are refused naming the entry; nothing of the page is written."""
    good = {"namespace": "n", "key": "ok", "value": 1, "version": 1, "updated_at": 1.0,
            "updated_by": "a", "run_id": "r"}
    with DaemonProc(tmp_path, {}).start() as d:
        client = d.client()
        try:
            for override, message in BAD_ENTRIES:
                data = {"format": "watchkeeper-memory", "format_version": 2,
                        "entries": [good, {**good, **override}]}
                reply = client.call_raw("memory-import", {"data": data})
                assert reply["ok"] is False and message in reply["error"], (override, reply)
                assert "entries[1]" in reply["error"]
                assert "internal error" not in reply["error"]
            assert d.call("memory-get", namespace="n", key="ok") is None
        finally:
            client.close()


def test_import_file_that_is_not_json_is_a_clear_error(tmp_path):
    """Malformed JSON or 2,000 levels of nesting in the import file: a message, no traceback."""
    with DaemonProc(tmp_path, {}).start() as d:
        for name, text in (("broken.json", '{"format": '), ("deep.json", "[" * 2000 + "]" * 2000)):
            path = tmp_path / name
            path.write_text(text)
            result = wk("--config", str(d.config_path), "memory", "import", str(path))
            assert result.returncode == 2 and str(path) in result.stderr, result.stderr
            assert "Traceback" not in result.stderr


def test_memory_list_of_a_10_mb_namespace_is_answered_whole(tmp_path):
    """A reply far over the old 8 MiB cut-off (a 10 MB namespace) reaches the client whole."""
    d = DaemonProc(tmp_path, {})
    d.state_dir.mkdir(parents=True)
    with MemoryStore(d.state_dir) as store:
        store.apply_batch([Update(op=Op.PUT, namespace="big", key=f"k{i:02d}",
                                  value="x" * BIG_VALUE_CHARS, agent="filler", run_id="r")
                           for i in range(44)], GRANTS)
    with d.start():
        entries = d.call("memory-list", namespace="big")
    assert [e["key"] for e in entries] == [f"k{i:02d}" for i in range(44)]
    assert all(len(e["value"]) == BIG_VALUE_CHARS for e in entries)
