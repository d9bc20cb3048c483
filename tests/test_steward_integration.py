"""The memory steward end to end: real agent processes writing through a real daemon's socket."""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path

from harness import DaemonProc, py, wk
from support import wait_until

ROOT = Path(__file__).resolve().parent.parent
# Agents run in tmp_path; they must import this tree's supervisor package, not an installed one.
AGENT_ENV = {"PYTHONPATH": str(ROOT)}
WRITERS = [f"w{i}" for i in range(5)]
ROUNDS = 200
KEYS = 3


def agent(code: str, *, writes: list[str] | None = None, env: dict | None = None,
          jobs: dict[str, str] | None = None) -> dict:
    jobs = jobs or {"main": code}
    spec: dict = {"jobs": [{"id": name, "command": py(src), "schedule": {"every_s": 3600},
                            "env": env or {}} for name, src in jobs.items()]}
    if writes is not None:
        spec["memory_write"] = writes
    return spec


def run_once(d: DaemonProc, name: str, job: str | None = None, timeout_s: float = 30) -> dict:
    """Start one run now and wait for it to succeed."""
    started = d.call("start-now", agent=name, **({"job": job} if job else {}))
    assert started["result"] == "started", started
    ev = d.wait_event("run_finished", run_id=started["run_id"], timeout_s=timeout_s)
    assert ev["outcome"] == "succeeded", d.find("agent_output", run_id=started["run_id"])
    return ev


def stdout_of(d: DaemonProc, name: str) -> list[str]:
    return [e["line"] for e in d.find("agent_output", agent=name, stream="stdout")]


def merge_patch(target, patch):
    """RFC 7386, written out again here so the replay does not trust the code under test."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, member in patch.items():
        if member is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), member)
    return result


# -- concurrency -----------------------------------------------------------------------------------

HAMMER = """
import json, os, random, sys, time
from pathlib import Path
from supervisor.sdk import Agent, MemoryConflict
a = Agent()
logs = Path(os.environ["LOG_DIR"])
deadline = time.monotonic() + 30
while not (logs / "go").exists():  # all five writers start together
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.005)
rng = random.Random(a.name)
with (logs / f"{a.name}.jsonl").open("w") as out:
    for i in range(int(os.environ["ROUNDS"])):
        key = f"k{rng.randrange(int(os.environ['KEYS']))}"
        op = rng.choice(["put", "merge"])
        if op == "put":
            value = {"by": a.name, "i": i, "nested": {"n": i}}
        else:
            value = {a.name: i, "last": a.name, "nested": {a.name: i, "n": None}}
        expect = None
        if rng.random() < 0.5:
            entry = a.memory.entry("shared", key)
            expect = entry["version"] if entry else 0
        record = {"agent": a.name, "key": key, "op": op, "value": value, "expect": expect}
        try:
            record["version"] = getattr(a.memory, op)("shared", key, value,
                                                      expect_version=expect)
        except MemoryConflict as exc:
            record["conflict"] = exc.current_version
        out.write(json.dumps(record) + "\\n")
"""


def test_concurrent_writers_equal_a_serial_replay_of_the_history(tmp_path):
    """Five agent processes racing put/merge on three keys leave exactly the state a serial
    replay of the applied history gives, and every conflict is reported, none lost."""
    env = {"LOG_DIR": str(tmp_path), "ROUNDS": str(ROUNDS), "KEYS": str(KEYS)}
    agents = {name: agent(HAMMER, writes=["shared"], env=env) for name in WRITERS}
    with DaemonProc(tmp_path, agents).start(extra_env=AGENT_ENV) as d:
        for name in WRITERS:
            assert d.call("start-now", agent=name)["result"] == "started"
        (tmp_path / "go").touch()
        d.wait_event("run_finished", outcome="succeeded", count=len(WRITERS), timeout_s=90)
        history = sorted(d.call("memory-history", namespace="shared", limit=10000),
                         key=lambda r: r["seq"])
        final = {e["key"]: e for e in d.call("memory-list", namespace="shared")}

    records = [json.loads(line) for name in WRITERS
               for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert len(records) == len(WRITERS) * ROUNDS  # every update got an answer
    acked = {(r["key"], r["version"]): r for r in records if "version" in r}
    conflicts = [r for r in records if "conflict" in r]
    assert len(acked) + len(conflicts) == len(records)  # no version acknowledged twice
    assert conflicts, "five racing writers never conflicted: the test did not race"
    assert all(r["conflict"] != r["expect"] for r in conflicts)
    assert all(r["version"] == r["expect"] + 1 for r in acked.values()
               if r["expect"] is not None)

    assert {(h["key"], h["new_version"]) for h in history} == set(acked)
    state: dict = {}
    for h in history:
        sent = acked[(h["key"], h["new_version"])]
        assert h["agent"] == sent["agent"] and h["op"] == sent["op"]
        assert h["old_version"] == (state[h["key"]][0] if h["key"] in state else None)
        old = state.get(h["key"], (None, None))[1]
        value = sent["value"] if sent["op"] == "put" else merge_patch(old, sent["value"])
        assert h["new_value"] == value
        state[h["key"]] = (h["new_version"], value)
    assert {k: (e["version"], e["value"]) for k, e in final.items()} == state


# -- crash safety ----------------------------------------------------------------------------------

STREAMER = """
import os
from supervisor.sdk import Agent
a = Agent()
acks = os.open(os.environ["ACK_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
i = 0
while True:
    key = f"{a.run_id}-{i}"
    a.memory.put("stream", key, {"i": i, "pad": "solar " * 40})
    os.write(acks, (key + "\\n").encode())  # only once the daemon said it is durable
    os.fsync(acks)
    i += 1
"""


def test_acknowledged_updates_survive_kill_9_of_the_daemon(tmp_path):
    """After SIGKILL of the daemon mid-stream (three times), every update an agent saw
    acknowledged is in memory and the database passes its integrity checks."""
    ack_log = tmp_path / "acks.log"
    agents = {"streamer": agent(STREAMER, writes=["stream"], env={"ACK_LOG": str(ack_log)})}

    def acked() -> list[str]:
        return ack_log.read_text().splitlines() if ack_log.exists() else []

    for _ in range(3):
        d = DaemonProc(tmp_path, agents).start(extra_env=AGENT_ENV)
        wanted = len(acked()) + 300
        d.call("start-now", agent="streamer")
        wait_until(lambda n=wanted, d=d: len(acked()) >= n or d.find("run_finished"), 60)
        assert len(acked()) >= wanted, f"the stream stopped: {d.tail(8)}"
        d.kill()

    keys = acked()
    with DaemonProc(tmp_path, agents).start(extra_env=AGENT_ENV) as d:
        stored = {e["key"]: e["value"] for e in d.call("memory-list", namespace="stream")}
        db = sqlite3.connect(d.state_dir / "memory.sqlite3")
        try:
            assert db.execute("pragma integrity_check").fetchall() == [("ok",)]
        finally:
            db.close()
    missing = [k for k in keys if k not in stored]
    assert not missing, f"{len(missing)} acknowledged updates lost, e.g. {missing[:3]}"
    assert all(stored[k]["i"] == int(k.rsplit("-", 1)[1]) for k in keys)
    db = sqlite3.connect(d.state_dir / "memory.sqlite3")
    try:  # the full-text index was written in the same transactions as the entries
        db.execute("insert into entries_fts (entries_fts) values ('integrity-check')")
    finally:
        db.close()


# -- bad input -----------------------------------------------------------------------------------

PROBER = """
import json, os, time
from pathlib import Path
from supervisor.sdk import Agent
a = Agent()
deep = "leaf"
for _ in range(70):
    deep = [deep]
attempts = {
    "unknown op": {"op": "frobnicate", "namespace": "probe", "key": "k", "value": 1},
    "no key": {"op": "put", "namespace": "probe", "value": 1},
    "no value": {"op": "put", "namespace": "probe", "key": "k"},
    "claims another agent": {"op": "put", "namespace": "probe", "key": "k", "value": 1,
                             "agent": "admin"},
    "oversized": {"op": "put", "namespace": "probe", "key": "k", "value": "x" * 5000},
    "too deep": {"op": "put", "namespace": "probe", "key": "k", "value": deep},
    "forbidden": {"op": "put", "namespace": "content", "key": "k", "value": 1},
    "good": {"op": "put", "namespace": "probe", "key": "k", "value": {"fine": True}},
}
replies = {name: a.client.call_raw("memory", args) for name, args in attempts.items()}
print(json.dumps(replies), flush=True)
done = Path(os.environ["DONE"])
deadline = time.monotonic() + 30
while not done.exists() and time.monotonic() < deadline:  # stay alive for the token test
    time.sleep(0.01)
"""


def raw_exchange(path: Path, *frames: bytes) -> list[dict]:
    """Send frames on one connection and read one reply per frame."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        buf, replies = b"", []
        for frame in frames:
            sock.sendall(frame)
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return replies
                buf += chunk
            line, _, buf = buf.partition(b"\n")
            replies.append(json.loads(line))
        return replies


def oversized_frame(path: Path) -> dict:
    """Send 2 MiB without a newline; the daemon answers once and hangs up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        try:
            sock.sendall(b'{"cmd": "ping", "pad": "' + b"x" * (2 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass  # it hung up before reading it all, as it should
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an error reply: {reply!r}"
            reply += chunk
        try:  # and the connection is closed: EOF, or a reset for the bytes it never read
            assert sock.recv(65536) == b""
        except ConnectionResetError:
            pass
        return json.loads(reply)


def reason(reply: dict) -> str:
    return (reply.get("result") or {}).get("reason") or reply["error"].split(":")[0]


def test_bad_submissions_get_errors_while_the_daemon_keeps_serving(tmp_path):
    """Malformed, oversized and unauthorised submissions each get an error reply, the good one
    is applied, and the daemon answers throughout."""
    done = tmp_path / "done"
    agents = {"prober": agent(PROBER, writes=["probe"], env={"DONE": str(done)}),
              "content": agent("pass")}
    d = DaemonProc(tmp_path, agents, steward={"max_value_bytes": 1024})
    with d.start(extra_env=AGENT_ENV):
        started = d.call("start-now", agent="prober")
        line = d.wait_event("agent_output", agent="prober", stream="stdout", timeout_s=20)
        replies = json.loads(line["line"])
        assert {name: reason(r) for name, r in replies.items() if not r["ok"]} == {
            "unknown op": "malformed update", "no key": "malformed update",
            "no value": "malformed", "claims another agent": "malformed update",
            "oversized": "too_large", "too deep": "malformed", "forbidden": "forbidden"}
        assert replies["good"]["ok"] and replies["good"]["result"]["version"] == 1

        # Outside any run, or with a run's token stolen from its environment: refused.
        pid = next(a["pid"] for a in d.call("status")["agents"] if a["agent"] == "prober")
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        stolen = {"cmd": "memory", "run_id": started["run_id"],
                  "token": environ["WATCHKEEPER_RUN_TOKEN"],
                  "args": {"op": "put", "namespace": "probe", "key": "k", "value": "stolen"}}
        anonymous = {**stolen, "run_id": None, "token": None}
        refused = raw_exchange(d.socket_path, b"this is not json\n",
                               json.dumps(anonymous).encode() + b"\n",
                               json.dumps(stolen).encode() + b"\n",
                               b'{"cmd": "ping"}\n')
        assert refused[0]["error"].startswith("malformed JSON")
        assert refused[1]["error"].startswith("not a live run")
        assert refused[2]["error"].startswith("permission denied: the calling process")
        assert refused[3]["ok"]  # the same connection still works

        assert oversized_frame(d.socket_path)["error"].startswith("frame too large")
        done.touch()
        d.wait_event("run_finished", run_id=started["run_id"])
        assert d.call("ping")["pid"] == d.proc.pid
        assert d.call("memory-get", namespace="probe", key="k")["value"] == {"fine": True}
        assert len(d.call("memory-history", namespace="probe")) == 1


IDEMPOTENT = """
import json
from supervisor.sdk import Agent
a = Agent()
def append(item, key, **extra):
    args = {"op": "append", "namespace": "idem", "key": "published", "value": item,
            "idempotency_key": key, **extra}
    reply = a.client.call_raw("memory", args)
    return reply["result"]
first = append({"id": 42}, "publish-42")
retry = append({"id": 42}, "publish-42")
# A rejection is not remembered: the corrected retry under the same key applies.
conflict = append({"id": 43}, "publish-43", expect_version=99)
fixed = append({"id": 43}, "publish-43", expect_version=first["version"])
print(json.dumps([first, retry, conflict, fixed]), flush=True)
"""

RETRY_NEXT_RUN = """
import json
from supervisor.sdk import Agent
a = Agent()
reply = a.client.call_raw("memory", {"op": "append", "namespace": "idem", "key": "published",
                                     "value": {"id": 42}, "idempotency_key": "publish-42"})
print(json.dumps(reply["result"]), flush=True)
"""


def test_idempotency_key_retry_applies_once(tmp_path):
    """An append retried under the same idempotency key, in the same run or the next one, is
    applied once and the retries get the first result back."""
    agents = {"idem": agent("", jobs={"first": IDEMPOTENT, "retry": RETRY_NEXT_RUN})}
    with DaemonProc(tmp_path, agents).start(extra_env=AGENT_ENV) as d:
        run_once(d, "idem", "first")
        first, retry, conflict, fixed = json.loads(stdout_of(d, "idem")[0])
        assert first == {"status": "applied", "namespace": "idem", "key": "published",
                         "version": 1}
        assert retry == {**first, "replayed": True}
        assert conflict["reason"] == "version_conflict" and fixed["version"] == 2
        run_once(d, "idem", "retry")
        assert json.loads(stdout_of(d, "idem")[1]) == {**first, "replayed": True}
        assert d.call("memory-get", namespace="idem", key="published")["value"] == [
            {"id": 42}, {"id": 43}]
        assert len(d.call("memory-history", namespace="idem")) == 2


# -- administration through the CLI ----------------------------------------------------------------

GOOD_FIRST = """
from supervisor.sdk import Agent
m = Agent().memory
m.put("notes", "a", {"fact": "panels last 25 years"})
m.put("notes", "b", 1)
"""

ROGUE = """
from supervisor.sdk import Agent
m = Agent().memory
m.put("notes", "a", "SPAM")
m.put("notes", "c", "SPAM")
m.put("notes", "d", "SPAM")
"""

GOOD_SECOND = """
from supervisor.sdk import Agent
m = Agent().memory
m.put("notes", "b", 2)
m.put("notes", "d", "fixed by hand")
"""


def test_revert_by_agent_undoes_its_writes_but_not_later_work(tmp_path):
    """`watchkeeper memory revert --agent X` restores what X overwrote and removes what it
    created, but leaves a key someone fixed since and reports it as a conflict."""
    agents = {"good": agent("", writes=["notes"], jobs={"first": GOOD_FIRST,
                                                        "second": GOOD_SECOND}),
              "rogue": agent(ROGUE, writes=["notes"])}
    with DaemonProc(tmp_path, agents).start(extra_env=AGENT_ENV) as d:
        run_once(d, "good", "first")
        run_once(d, "rogue")
        run_once(d, "good", "second")
        cli = wk("--config", str(d.config_path), "memory", "revert", "--agent", "rogue")
        assert cli.returncode == 0, cli.stderr
        results = {r["key"]: r for r in json.loads(cli.stdout)}
        assert results["a"]["status"] == results["c"]["status"] == "applied"
        assert results["d"]["reason"] == "version_conflict"
        values = {e["key"]: e["value"] for e in d.call("memory-list", namespace="notes")}
        assert values == {"a": {"fact": "panels last 25 years"}, "b": 2, "d": "fixed by hand"}
        reverts = d.call("memory-history", namespace="notes", agent="watchkeeper-admin")
        assert sorted(r["key"] for r in reverts) == ["a", "c"]


WRITER = """
from supervisor.sdk import Agent
m = Agent().memory
m.put("notes", "solar", {"fact": "panels last 25 years", "tags": ["energy", "roof"]})
m.merge("notes", "solar", {"source": "installer survey"})
m.put("notes", "grüße", "Unicode keys and values: 太陽光")
m.append("notes", "published", {"id": 1, "score": 0.75})
m.put("notes", "gone", True)
m.delete("notes", "gone")
"""


def test_export_import_round_trip_through_the_cli(tmp_path):
    """An export from one daemon imported into an empty one reproduces every entry, with its
    version and metadata, and the imported text is searchable."""
    agents = {"writer": agent(WRITER, writes=["notes"])}
    dump = tmp_path / "memory.json"
    with DaemonProc(tmp_path / "one", agents).start(extra_env=AGENT_ENV) as d:
        run_once(d, "writer")
        exported = wk("--config", str(d.config_path), "memory", "export")
        assert exported.returncode == 0, exported.stderr
        dump.write_text(exported.stdout)
    original = json.loads(dump.read_text())
    assert [e["key"] for e in original["entries"]] == ["grüße", "published", "solar"]

    with DaemonProc(tmp_path / "two", agents).start(extra_env=AGENT_ENV) as d2:
        imported = wk("--config", str(d2.config_path), "memory", "import", str(dump))
        assert imported.returncode == 0, imported.stderr
        assert json.loads(imported.stdout)["imported"] == 3
        again = json.loads(wk("--config", str(d2.config_path), "memory", "export").stdout)
        hits = d2.call("search", query="installer survey")["hits"]
    assert again["entries"] == original["entries"]
    assert [h["key"] for h in hits][:1] == ["solar"]
