import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import STRICT  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In strict mode (CI) no skip may hide: a skipped test is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"strict mode forbids skips: {reason}"


@pytest.fixture
def schema(request):
    """A fresh PostgreSQL schema for one test, dropped after it; skips without a server."""
    from pg_harness import PG_MISSING, drop_schema, new_schema, pg_available
    from support import require

    require(pg_available, PG_MISSING)
    name = new_schema(request.node.name[5:20].lower())
    yield name
    drop_schema(name)
