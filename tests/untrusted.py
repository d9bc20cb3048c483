"""A probe agent for the untrusted-agent suites: stdlib only (it may run as another uid with
the system Python), it executes the code in $PROBE and prints each finding as one JSON line
on stdout, which the daemon logs as an `agent_output` event."""

from __future__ import annotations

import json

from harness import DaemonProc
from support import wait_until

PROBE = r'''
import json, os, signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a misbehaving agent does not stop politely
DAEMON = os.getppid()

def call(cmd, args=None, run_id=None, token=None):
    """One raw frame on the socket; the run's own credentials unless others are given."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.environ["WATCHKEEPER_SOCKET"])
    req = {"id": 1, "cmd": cmd, "args": args or {},
           "run_id": run_id or os.environ["WATCHKEEPER_RUN_ID"],
           "token": token or os.environ["WATCHKEEPER_RUN_TOKEN"]}
    s.sendall(json.dumps(req).encode() + b"\n")
    reply = json.loads(s.makefile().readline())
    s.close()
    return reply

def attempt(fn):
    """'ok' or 'denied:<errno>' for a file-system or kernel action."""
    try:
        fn()
        return "ok"
    except OSError as exc:
        return f"denied:{exc.errno}"

def report(tag, data):
    print(json.dumps({"tag": tag, "data": data}), flush=True)

def detached(fn):
    """Run fn in a grandchild that setsid+double-forked and was re-parented to the daemon."""
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            deadline = time.monotonic() + 20
            while os.getppid() != DAEMON and time.monotonic() < deadline:
                time.sleep(0.01)
            fn()
            os._exit(0)
        os._exit(0)
    os.waitpid(middle, 0)

def reexec(code, **env):
    """Become a fresh process running `code` with `env` added (what /proc/PID/environ shows)."""
    os.execve(sys.executable, [sys.executable, "-c", os.environ["PROBE_MAIN"]],
              {**os.environ, **env, "PROBE": code})

def idle(seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)

exec(os.environ["PROBE"])
'''

# Every admin verb, with arguments that would succeed for an operator.
ADMIN_VERBS = [("start-now", {"agent": "beta"}), ("pause", {"agent": "beta"}),
               ("resume", {"agent": "beta"}), ("reload", {}),
               ("breaker-reset", {"reason": "agent says so"}),
               ("memory-revert", {"agent": "beta"}), ("memory-export", {}),
               ("memory-import", {"data": {"version": 1, "entries": []}}), ("stop", {})]


def probe_job(code: str, python: str = "{python}", **extra) -> dict:
    env = {"PROBE": code, "PROBE_MAIN": PROBE, **extra.pop("env", {})}
    return {"id": "main", "command": [python, "-c", PROBE], "env": env,
            "schedule": {"every_s": 3600}, "stop_grace_s": 30, **extra}


def reports(d: DaemonProc, agent: str, tag: str) -> list:
    """The data of every report tagged `tag` that `agent`'s runs printed so far."""
    out = []
    for event in d.find("agent_output", agent=agent, stream="stdout"):
        try:
            line = json.loads(event["line"])
        except (ValueError, KeyError):
            continue
        if isinstance(line, dict) and line.get("tag") == tag:
            out.append(line["data"])
    return out


def report_of(d: DaemonProc, agent: str, tag: str, timeout_s: float = 30.0):
    """The first report tagged `tag` by `agent`, waiting for it."""
    found = wait_until(lambda: reports(d, agent, tag), timeout_s,
                       message=f"{agent} never reported {tag!r}; log tail: {d.tail()}")
    return found[0]
