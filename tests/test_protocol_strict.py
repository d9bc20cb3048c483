"""Every command's arguments are checked against its struct: a wrong argument is an error
reply naming the field, and the connection goes on serving."""

from __future__ import annotations

import json
import socket

import pytest
from harness import DaemonProc

from supervisor.config.load import NAME_RE
from supervisor.control.commands import ARGS
from supervisor.runs.locks import validate_task_id

BAD_ARGS = [
    ("runs", {"limit": 10**30}, "args.limit"),
    ("runs", {"limit": [1]}, "args.limit"),
    ("runs", {"agent": {"a": 1}}, "args.agent"),
    ("memory-history", {"namespace": ["x"]}, "args.namespace"),
    ("memory-history", {"limit": 2**70}, "args.limit"),
    ("start-now", {"agent": 5}, "args.agent"),
    ("pause", {"agent": [1, 2]}, "args.agent"),
    ("resume", {"agent": {"x": {}}}, "args.agent"),
    ("memory-revert", {"seq": 2**63}, "args.seq"),
    ("memory-revert", {"seq": "1"}, "args.seq"),
    ("memory-get", {"namespace": "n"}, "args.key"),
    ("ping", {"surprise": 1}, "args.surprise"),
]


class Raw:
    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.buf = b""

    def ask(self, frame: bytes) -> dict:
        self.sock.sendall(frame + b"\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "the daemon closed the connection"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    agent = {"jobs": [{"id": "main", "command": ["true"], "schedule": {"every_s": 3600}}]}
    with DaemonProc(tmp_path_factory.mktemp("strict"), {"a": agent}).start() as d:
        yield d


def test_wrong_argument_types_are_errors_naming_the_field(daemon):
    """Big ints, lists and dicts where scalars belong get an error naming the field, and the
    next request on the same connection is answered."""
    conn = Raw(daemon.socket_path)
    for cmd, args, field in BAD_ARGS:
        reply = conn.ask(json.dumps({"id": cmd, "cmd": cmd, "args": args}).encode())
        assert reply["ok"] is False and reply["id"] == cmd, reply
        assert reply["field"] == field and field in reply["error"], reply
        assert "internal error" not in reply["error"]
        assert conn.ask(b'{"id": 2, "cmd": "ping"}')["ok"] is True
    assert daemon.find("control_handler_crashed") == []


def test_deep_nesting_is_an_error_and_the_connection_lives(daemon):
    """1,000 levels of nesting in args are answered with an error; the next request works."""
    conn = Raw(daemon.socket_path)
    deep = b'{"id": 1, "cmd": "ping", "args": {"a": ' + b"[" * 1000 + b"]" * 1000 + b"}}"
    reply = conn.ask(deep)
    assert reply["ok"] is False and "nested too deeply" in reply["error"]
    assert conn.ask(b'{"id": 2, "cmd": "status"}')["ok"] is True


def test_ids_are_matched_to_the_end_of_the_string():
    """A trailing newline does not pass an id check (`$` would have let it through)."""
    with pytest.raises(ValueError):
        validate_task_id("task\n")
    assert NAME_RE.fullmatch("agent\n") is None
    assert validate_task_id("task") == "task"


def test_every_command_has_an_argument_struct():
    """Every built-in command of the control table has its struct (the debug ones excepted)."""
    from supervisor.control.handlers import CORE
    from supervisor.features.health import Health
    from supervisor.features.output_gate import OutputGate
    from supervisor.features.steward import Steward

    tables = [CORE, *(feature().commands() for feature in (Health, OutputGate, Steward))]
    commands = set().union(*(t.names() for t in tables)) - {"memory"}
    assert commands <= set(ARGS), sorted(commands - set(ARGS))
