"""Fuzzing with Hypothesis: the YAML loader, the control-socket protocol against a real daemon,
and the heartbeat and lock files agents write.

Example counts come from the environment so CI and a long local run use the same tests:
WATCHKEEPER_FUZZ_CONFIGS (10,000), WATCHKEEPER_FUZZ_FRAMES (2,000), WATCHKEEPER_FUZZ_FILES (2,000),
WATCHKEEPER_FUZZ_RUNS (12: configs that load are run by a real daemon).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import yaml
from config_walk import MAIN as CONFIG_MAIN
from config_walk import SETTINGS as NUMERIC_SETTINGS
from config_walk import in_range, place
from harness import DaemonProc
from hostile import AGENT_ENV, rss_mb
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import wait_until

from supervisor import __version__
from supervisor.config.load import load_config
from supervisor.control.protocol import MAX_FRAME_BYTES
from supervisor.errors import ConfigError
from supervisor.health.heartbeat import (
    HeartbeatSettings,
    Verdict,
    heartbeat_verdict,
    load_heartbeat,
    stale_response,
)
from supervisor.runs.locks import break_stale, read_owner
from supervisor.scheduling.scheduler import make_trigger

pytestmark = pytest.mark.slow


def _examples(var: str, default: int) -> int:
    return int(os.environ.get(var, default))


FUZZ = dict(deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                   HealthCheck.data_too_large, HealthCheck.large_base_example,
                                   HealthCheck.filter_too_much])

# -- generators ---------------------------------------------------------------------------------

WEIRD = ["*/5 * * * *", "61 * * * *", "* * * * * * *", "0 0 31 2 *", "@daily", "*/0 * * * *",
         "* * * * 8", "* * * * 1-7/0", "UTC", "Europe/Berlin", "Mars/Olympus", "Europe", "",
         "skip", "queue", "replace", "keep", "stop", "restart", "low", "{python}", "a\x00b",
         "../etc", "~", "/", "yes", "1e400", "-0", ".nan"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.sampled_from(WEIRD))
anything = st.one_of(scalars, st.lists(scalars, max_size=2),
                     st.dictionaries(st.sampled_from(["a", "id", "every_s", "x"]), scalars,
                                     max_size=2))
durations = st.one_of(st.floats(min_value=0.01, max_value=1e4), st.integers(0, 10**6), anything)


def mutated(base: dict, values: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """`base` with a few fields replaced by near-valid or wrong values, deleted, or joined by
    unknown keys: most examples are one or two mistakes away from a valid file."""
    keys = sorted(set(base) | set(values))

    @st.composite
    def build(draw):
        doc = dict(base)
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.sampled_from(keys))
            action = draw(st.sampled_from(["set", "set", "wrong", "drop", "unknown"]))
            if action == "set" and key in values:
                doc[key] = draw(values[key])
            elif action == "wrong":
                doc[key] = draw(anything)
            elif action == "drop":
                doc.pop(key, None)
            else:
                doc[draw(st.sampled_from(["colour", "timeout", "every", "jobz", "Agent"]))] = \
                    draw(anything)
        return doc
    return build()


schedules = st.one_of(
    mutated({"cron": "*/5 * * * *"}, {"cron": st.sampled_from(WEIRD) | st.text(max_size=20),
                                      "timezone": st.sampled_from(WEIRD) | st.text(max_size=10),
                                      "every_s": durations}),
    mutated({"every_s": 60}, {"every_s": durations, "after": st.lists(st.text(max_size=6))}),
    mutated({"after": ["a"]}, {"after": st.lists(st.sampled_from(["a", "b", "zz", ""]))}),
    mutated({"always": True}, {"always": anything}),
)
retries = mutated({"max_attempts": 2, "backoff_s": 1},
                  {"max_attempts": st.integers(-5, 10**20), "jitter": durations,
                   "backoff_s": durations, "backoff_max_s": durations})
jobs = mutated({"id": "main", "command": ["true"], "schedule": {"every_s": 60}}, {
    "id": st.sampled_from(["main", "Main", "-x", "a" * 70, "ok_1"]) | st.text(max_size=8),
    "command": st.one_of(st.lists(st.text(max_size=8), max_size=3), st.text(max_size=12)),
    "shell": st.booleans(), "schedule": schedules, "timeout_s": durations,
    "stop_grace_s": durations, "jitter_s": durations, "misfire_grace_s": durations,
    "retries": retries, "overlap": st.sampled_from(WEIRD), "catch_up": anything,
    "env": st.dictionaries(st.text(max_size=5), scalars, max_size=2), "leftovers": anything,
})
agents = mutated({"jobs": [{"id": "main", "command": ["true"], "schedule": {"every_s": 60}}]}, {
    "jobs": st.lists(jobs, max_size=3), "agent": st.sampled_from(["a", "b", "Bad Name", ""]),
    "depends_on": st.lists(st.sampled_from(["a", "b", "ghost"]), max_size=2),
    "heartbeat": mutated({"interval_s": 5}, {"interval_s": durations,
                                             "stale_multiple": durations,
                                             "on_stale": st.sampled_from(WEIRD)}),
    "memory_max_mb": durations, "memory_priority": st.sampled_from(WEIRD),
    "memory_write": st.lists(st.text(max_size=5), max_size=2),
    "limits": mutated({"outputs": {"max_outputs": 3, "window_s": 60}},
                      {"outputs": anything, "spend": anything}),
})
mains = mutated({}, {
    "state_dir": st.sampled_from(["state", "~/x", "a\x00b", "/"]) | st.text(max_size=10),
    "tick_s": durations, "stop_grace_s": durations, "log_level": st.sampled_from(WEIRD),
    "cgroups": st.sampled_from(["auto", "on", "off", "maybe"]), "socket_group": anything,
    "locks": mutated({}, {"stale_after_s": durations, "check_interval_s": durations}),
    "crash_loop": mutated({}, {"failures": st.integers(-3, 10), "cooldown_s": durations}),
    "breaker": mutated({}, {"agents": st.dictionaries(st.sampled_from(["a", "b", "x"]),
                                                       anything, max_size=2)}),
    "steward": mutated({}, {"db_file": st.sampled_from(["m.db", "a/b", ""]),
                            "max_value_bytes": st.integers(-5, 10**6)}),
    "agents_dir": st.sampled_from(["agents.d", "missing", "agents.d/a.yaml"]),
})


@st.composite
def yaml_text(draw, docs: st.SearchStrategy) -> str:
    """A document dumped as YAML, sometimes broken: truncated, a stray character, or not a
    mapping at all."""
    doc = draw(docs)
    text = yaml.safe_dump(doc, allow_unicode=True)
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "insert", "toplevel",
                                   "duplicate", "garbage"]))
    if damage == "truncate":
        text = text[:draw(st.integers(0, len(text)))]
    elif damage == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(list(":[]{}-\t'\"&*!|>%@`#,?\n"))) + text[at:]
    elif damage == "toplevel":
        text = yaml.safe_dump(draw(scalars | st.lists(scalars, max_size=2)))
    elif damage == "duplicate" and text.strip():
        first = text.splitlines(keepends=True)[0]
        text = first + text
    elif damage == "garbage":
        text = draw(st.text(max_size=40))
    return text


# -- the YAML loader ---------------------------------------------------------------------------

def _check_issue(issue, files: dict[str, str]) -> None:
    assert issue.file in files, f"issue names no file of ours: {issue}"
    lines = len(files[issue.file].splitlines()) + 1  # YAML breaks lines at \r and \x85 too
    assert isinstance(issue.line, int) and 1 <= issue.line <= lines, f"bad line: {issue}"
    assert isinstance(issue.field, str) and issue.field, f"issue names no field: {issue}"
    assert issue.message, f"issue says nothing: {issue}"


@settings(max_examples=_examples("WATCHKEEPER_FUZZ_CONFIGS", 10_000), **FUZZ)
@given(main=yaml_text(mains), agent_files=st.lists(yaml_text(agents), min_size=0, max_size=3))
@example(main="state_dir: state\n", agent_files=["jobs:\n- id: m\n  command: [x]\n"
                                                  "  schedule: {every_s: .inf}\n"])
@example(main="state_dir: \"a\\0b\"\n", agent_files=[])
@example(main="tick_s: .nan\n", agent_files=[])
@example(main="tick_s: 1\n", agent_files=["jobs: [{id: m, command: [x], jitter_s: 1e300, "
                                           "schedule: {every_s: 1}}]\n"])
@example(main="tick_s: 1\n", agent_files=["jobs: [{id: m, command: [x], schedule: "
                                           "{cron: '* * * * 1/0'}}]\n"])
def test_config_loader_accepts_or_explains(tmp_path_factory, main, agent_files):
    """Any main file and agent files either load into a config whose triggers build, or raise
    ConfigError whose every issue names a file, a line and a field."""
    files = _write_config(tmp_path_factory, main, agent_files)
    try:
        config = load_config(next(iter(files)))
    except ConfigError as exc:
        assert exc.issues
        for issue in exc.issues:
            _check_issue(issue, files)
        return
    now = datetime.datetime.now(datetime.UTC)
    for spec in config.agents.values():
        for job in spec.jobs:
            trigger = make_trigger(job)  # an accepted job must be schedulable
            if trigger is not None:
                trigger.get_next_fire_time(None, now)


def _harmless(agent: dict) -> dict:
    """The generated agent with each well-formed command replaced by a sleep: the settings
    are under test here, and a random string must not run as a program."""
    jobs = agent.get("jobs")
    if not isinstance(jobs, list):
        return agent
    safe = []
    for job in jobs:
        if isinstance(job, dict) and isinstance(job.get("command"), list) and \
                all(isinstance(arg, str) for arg in job["command"]):
            job = {**job, "command": ["sleep", "30"]}
        elif isinstance(job, dict) and isinstance(job.get("command"), str):
            job = {**job, "command": "sleep 30"}
        safe.append(job)
    return {**agent, "jobs": safe}


# Numeric settings the run fuzz sets: any value in the schema's range must run. Not a port or
# a database, which other tests on this machine use.
RUNNABLE = [s for s in NUMERIC_SETTINGS if s.meta is not None and not s.in_list
            and s.keys[0] not in ("metrics", "storage")]


def _in_range(setting) -> st.SearchStrategy:
    low, high = in_range(setting)
    inside = st.integers(low, high) if setting.is_int else st.floats(low, high)
    return st.sampled_from([low, high]) | inside


ranged = st.lists(st.sampled_from(RUNNABLE), min_size=1, max_size=4, unique_by=lambda s: s.name).flatmap(
    lambda chosen: st.tuples(*[st.tuples(st.just(s), _in_range(s)) for s in chosen]))
BASE_AGENT = {"jobs": [{"id": "main", "command": ["true"], "schedule": {"every_s": 60}}]}


def _set_ranged(main: dict, agent: dict, values) -> None:
    """Set each drawn numeric value where the generated documents leave room for it (a
    section the mutation made a scalar cannot hold it)."""
    for setting, value in values:
        try:
            place(main if setting.file == CONFIG_MAIN else agent, setting, value)
        except (TypeError, KeyError, IndexError):
            continue


@settings(max_examples=_examples("WATCHKEEPER_FUZZ_RUNS", 12), **FUZZ)
@given(main=st.just({}) | mains, agent_docs=st.lists(st.just(BASE_AGENT) | agents, min_size=1,
                                                      max_size=2), values=ranged)
@example(main={"tick_s": 0.01, "stop_grace_s": 0}, values=(),
         agent_docs=[{"jobs": [{"id": "main", "command": ["true"],
                                "schedule": {"always": True}}]}])
@example(main={"locks": {"check_interval_s": 315360000}, "crash_loop": {"failures": 1}},
         values=(), agent_docs=[{"jobs": [{"id": "main", "command": ["true"], "timeout_s": 0,
                                           "schedule": {"every_s": 0.01}}]}])
def test_config_that_loads_runs_or_explains(tmp_path_factory, main, agent_docs, values):
    """A generated config that loads starts a daemon that answers `status` and exits 0 on
    SIGTERM, or one the daemon refuses at start with a message and no traceback; a config
    that does not load names file, line and field in every issue."""
    root = tmp_path_factory.mktemp("fuzzrun")
    main, agent_docs = copy.deepcopy(main), copy.deepcopy(agent_docs)
    _set_ranged(main, agent_docs[0], values)
    settings = {**main, "state_dir": str(root / "state")}  # never a path outside the test
    # Agent `a` is the one breaker.agents.a (config_walk) names.
    d = DaemonProc(root, {"ab"[i]: _harmless(doc) for i, doc in enumerate(agent_docs)},
                   **settings)
    try:
        load_config(d.config_path)
    except ConfigError as exc:
        files = {str(p): p.read_text() for p in [d.config_path, *d.agents_dir.glob("*.yaml")]}
        for issue in exc.issues:
            _check_issue(issue, files)
        return
    with d.start(wait_ready=False, extra_env={"HOME": str(root)}):
        wait_until(lambda: d.find("daemon_state", new="running") or d.proc.poll() is not None,
                   timeout_s=30, message=f"the daemon neither ran nor exited: {d.tail()}")
        if d.find("daemon_state", new="running"):
            assert d.call("status") is not None
            assert d.stop() == 0, d.tail()
        else:
            assert d.proc.wait() != 0 and d.tail(), "refused without a word"
        assert not any("Traceback" in line for line in d.tail(200)), d.tail(200)


_ROOT: list[Path] = []


def _write_config(factory, main: str, agent_files: list[str]) -> dict[str, str]:
    """Write the example into one directory reused by every example (a directory per
    example costs more than the example); agent files it does not have are removed."""
    if not _ROOT:
        _ROOT.append(factory.mktemp("fuzzconfig"))
        (_ROOT[0] / "agents.d").mkdir()
    root = _ROOT[0]
    files = {str(root / "watchkeeper.yaml"): main}
    files.update({str(root / "agents.d" / f"{'ab'[i % 2]}{i}.yaml"): text
                  for i, text in enumerate(agent_files)})
    for old in (root / "agents.d").iterdir():
        if str(old) not in files:
            old.unlink()
    for path, text in files.items():
        Path(path).write_text(text)
    return files


# -- the control socket --------------------------------------------------------------------------

COMMANDS = ["ping", "status", "runs", "locks", "start-now", "pause", "resume", "reload",
            "breaker-status", "breaker-reset", "outputs", "memory", "memory-get", "memory-list",
            "memory-history", "search", "memory-revert", "memory-export", "memory-import",
            "heartbeat", "lock", "unlock", "emit", "usage", "nosuch", ""]
HUGE = b"x" * (MAX_FRAME_BYTES + 10)


def _request(cmd, args, extra) -> bytes:
    return json.dumps({"cmd": cmd, "args": args, "id": 1, **extra}).encode()


frames = st.one_of(
    st.binary(max_size=64),
    st.builds(_request, st.sampled_from(COMMANDS),
              st.dictionaries(st.sampled_from(["agent", "task", "limit", "query", "k", "reason",
                                               "namespace", "key", "op", "value", "data",
                                               "seq", "kind", "tokens", "job"]),
                              anything, max_size=4),
              st.fixed_dictionaries({}, optional={"run_id": anything, "token": anything,
                                                  "id": anything, "extra": anything})),
    st.builds(lambda f, n: f[:n], st.builds(_request, st.sampled_from(COMMANDS),
                                            st.just({}), st.just({})), st.integers(0, 30)),
    st.sampled_from([b'{"cmd": 5}', b'{"cmd": "ping", "args": []}', b"[]", b"null",
                     b'{"cmd": "ping", "id": {"a": 1}}', b'{"cmd": "status", "args": null}',
                     b'{"cmd": "runs", "args": {"limit": 1e309}}', b"\xff\xfe" * 10,
                     b'{"cmd": "memory-list", "args": {"namespace": "' + b"[" * 3000 + b'"}}',
                     b'{"cmd": "runs", "args": {"limit": ' + b"[" * 1000 + b"]" * 1000 + b"}}",
                     b'{"cmd": "ping", "args": {"a": ' + b"{\"a\": " * 1000 + b"1" +
                     b"}" * 1002, b'{"cmd": "runs", "id": 1, "args": {"limit": 1' + b"0" * 30 +
                     b"}}", b'{"cmd": "lock", "args": {"task": "task\\n"}}',
                     b'{"cmd": "memory-revert", "args": {"seq": 9223372036854775808}}',
                     b"[" * 100_000, HUGE]),
)
conversations = st.lists(st.tuples(st.integers(0, 2), frames, st.booleans()), min_size=1,
                         max_size=8)


class Conn:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.sent = bytearray()
        self.huge = False
        self.received: list[dict] = []
        self.unread = b""

    def send(self, data: bytes) -> None:
        self.sent += data
        self.huge |= len(data) > MAX_FRAME_BYTES
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            assert self.huge, "the daemon closed a connection that sent no oversized frame"

    def expected_replies(self) -> int:
        return sum(1 for frame in bytes(self.sent).split(b"\n")[:-1] if frame.strip())

    def replies(self) -> list[dict]:
        """Every reply so far on this connection, waiting for one per frame sent."""
        out, buf, want = self.received, self.unread, self.expected_replies()
        while len(out) < want:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                chunk = b""
            if not chunk:
                assert self.huge, f"connection closed after {len(out)} of {want} replies"
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                out.append(json.loads(line))
        self.unread = buf
        return out


def test_control_socket_survives_hostile_frames(tmp_path):
    """Random bytes, truncated, huge and ill-typed frames, interleaved on several connections,
    each get an error reply; the daemon keeps answering ping and its RSS stays bounded."""
    agent = {"jobs": [{"id": "main", "command": ["true"], "schedule": {"every_s": 3600}}]}
    with DaemonProc(tmp_path, {"noop": agent}).start(extra_env=AGENT_ENV) as d:
        pid = d.proc.pid
        rss: list[float] = []
        examples = _examples("WATCHKEEPER_FUZZ_FRAMES", 2_000)

        @settings(max_examples=examples, **FUZZ)
        @given(conversation=conversations)
        def converse(conversation):
            conns = [Conn(d.socket_path) for _ in range(3)]
            try:
                for index, frame, terminated in conversation:
                    conns[index].send(frame + (b"\n" if terminated else b""))
                for conn in conns:
                    for reply in conn.replies():
                        assert set(reply) >= {"id", "ok"}, reply
                        if reply["ok"] is False:
                            assert isinstance(reply["error"], str) and reply["error"]
                            assert "internal error" not in reply["error"], reply
                for conn in conns:  # the request after a rejected one is answered
                    if not conn.huge and conn.sent.endswith(b"\n"):
                        conn.send(_request("ping", {}, {"id": "after"}) + b"\n")
                        assert conn.replies()[-1] == {"id": "after", "ok": True,
                                                       "result": {"pid": pid,
                                                                  "version": __version__}}
            finally:
                for conn in conns:
                    conn.sock.close()
            assert d.call("ping")["pid"] == pid
            assert d.proc.poll() is None
            rss.append(rss_mb(pid))

        converse()
        warm = rss[min(len(rss) - 1, len(rss) // 5)]
        print(f"\ncontrol fuzz: {len(rss)} conversations, RSS {rss[0]:.1f} MB first, "
              f"{warm:.1f} MB after warm-up, {rss[-1]:.1f} MB last, {max(rss):.1f} MB peak")
        assert rss[-1] < warm + 25, f"RSS grew from {warm:.1f} to {rss[-1]:.1f} MB"
        assert d.find("control_handler_crashed") == [], d.find("control_handler_crashed")
        assert d.find("loop_callback_failed") == []
        assert d.proc.poll() is None


def test_oversized_frame_closes_only_its_connection(tmp_path):
    """A frame larger than the limit gets an error and its connection closed; another
    connection opened before it is still served."""
    with DaemonProc(tmp_path, {}).start(extra_env=AGENT_ENV) as d:
        bystander = Conn(d.socket_path)
        hog = Conn(d.socket_path)
        hog.sock.sendall(b"{" * (MAX_FRAME_BYTES + 1))  # all read before the close: no RST
        reply = json.loads(hog.sock.recv(65536).split(b"\n")[0])
        assert reply["ok"] is False and "too large" in reply["error"]
        assert hog.sock.recv(65536) == b""
        bystander.send(_request("ping", {}, {}) + b"\n")
        assert bystander.replies()[0]["ok"] is True


# -- heartbeat and lock files ---------------------------------------------------------------------

file_contents = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
    st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(
        st.sampled_from(["ts", "pid", "run_id", "host", "started", "agent"]), anything,
        max_size=5)),
    st.sampled_from([b"[" * 100_000, b'{"ts": ' + b"[" * 100_000, b"nan", b"-inf", b"1e999",
                     b"0", b"-5", b"2026-13-45T99:00:00", b"x" * 10_000, b"\x00" * 50,
                     b'{"pid": 1, "host": "h", "started": "nan"}',
                     b'{"pid": "1", "host": null, "started": 1e400}']),
)


@settings(max_examples=_examples("WATCHKEEPER_FUZZ_FILES", 2_000), **FUZZ)
@given(content=file_contents)
@example(content=b"[" * 100_000)
def test_garbage_heartbeat_is_never_a_crash(tmp_path_factory, content):
    """Whatever bytes a heartbeat file holds, reading and judging it never raises, and a
    beat that does not parse is treated as not fresh."""
    path = _scratch(tmp_path_factory) / "agent.heartbeat"
    path.write_bytes(content)
    reading = load_heartbeat(path)
    hb_settings = HeartbeatSettings(interval_s=1, on_stale="kill")
    verdict = heartbeat_verdict(reading, hb_settings, time.time(), started_at=time.time() - 100)
    if reading.heartbeat is None:
        assert verdict is Verdict.GARBAGE
        assert stale_response(verdict, hb_settings) == "kill"


@settings(max_examples=_examples("WATCHKEEPER_FUZZ_FILES", 2_000), **FUZZ)
@given(content=file_contents)
@example(content=b"[" * 100_000)
def test_garbage_lock_file_ages_out_never_a_crash(tmp_path_factory, content):
    """Whatever bytes a lock file holds, reading its owner never raises and the stale
    breaker removes it once it is older than the staleness limit."""
    state = _scratch(tmp_path_factory)
    tasks = state / "tasks"
    tasks.mkdir(exist_ok=True)
    path = tasks / "fuzz.lock"
    path.write_bytes(content)
    owner = read_owner(path)
    assert owner is None or isinstance(owner.pid, int)
    mtime = path.stat().st_mtime
    broken = break_stale(state, stale_after_s=60, now=mtime)
    if owner is None:
        assert not broken, "a young lock without a readable owner was broken"
    broken += break_stale(state, stale_after_s=60, now=mtime + 61)
    assert not path.exists() and [b.task_id for b in broken] == ["fuzz"]


def _scratch(factory) -> Path:
    path = factory.getbasetemp() / "fuzzfiles"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path
