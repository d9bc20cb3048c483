"""The `watchkeeper` executable: agents' verbs first, everything else through cli.py.

A bash agent runs `watchkeeper heartbeat`, `lock`, `emit`... several times per run, so
those verbs must cost little more than starting Python: cli_agent.run_agent_verb serves
them without argparse, YAML or any daemon module. Any other command, or an agent verb
it cannot parse, goes to the full parser in cli.py.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .cli_agent import run_agent_verb

    code = run_agent_verb(argv)
    if code is not None:
        return code
    from .cli import main as full_main

    return full_main(argv)


if __name__ == "__main__":
    sys.exit(main())
