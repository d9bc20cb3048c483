"""What every Python demo agent shares: start-up, the exit codes, the scenario switch."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from textgen import Meter, backend_from_env

from supervisor.sdk import Agent, OutputDenied

EXIT_DENIED = 5  # the same code `watchkeeper emit` uses: the breaker said stop

Main = Callable[[Agent, Meter, list[str]], int]


def scenario() -> str:
    """WATCHKEEPER_SCENARIO, set on the daemon and so on every run: `3am`, `research-down`."""
    return os.environ.get("WATCHKEEPER_SCENARIO", "")


def demo_url(path: str) -> str:
    """A URL on the demo's local web (demo/server.py): its port is WATCHKEEPER_DEMO_PORT,
    default 8765, the one setting the server and the daemon's alert URL read too."""
    return f"http://127.0.0.1:{os.environ.get('WATCHKEEPER_DEMO_PORT') or 8765}{path}"


def say(agent: Agent, message: str) -> None:
    print(f"{agent.name}: {message}", flush=True)


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "untitled"


def run(main: Main) -> None:
    """Start heartbeating, run `main`, and exit with its code, or with 5 when the output
    gate denies an output or a budget: a denied agent stops instead of retrying."""
    agent = Agent()
    agent.start_heartbeat()
    meter = Meter(backend_from_env(), agent.report_usage)
    try:
        code = main(agent, meter, sys.argv[1:])
    except OutputDenied as exc:
        print(f"{agent.name}: stopping, the output gate said no: {exc}", file=sys.stderr,
              flush=True)
        code = EXIT_DENIED
    finally:
        agent.close()
    sys.exit(code)
