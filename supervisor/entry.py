"""The `watchkeeper` executable: agents' verbs first, everything else through cli/main.py.

A bash agent runs `watchkeeper heartbeat`, `lock`, `emit`... several times per run, so
those verbs must cost little more than starting Python: cli.agent.run_agent_verb serves
them without argparse, YAML or any daemon module. Any other command, or an agent verb
it cannot parse, goes to the full parser in cli/main.py.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .cli.agent import run_agent_verb

    code = run_agent_verb(argv)
    if code is not None:
        return code
    from .cli.main import main as full_main

    return full_main(argv)


if __name__ == "__main__":
    sys.exit(main())
