"""`python -m supervisor.cli`: the same as `supervisor.cli.main` (main.py)."""

import sys

from .main import main

sys.exit(main())
