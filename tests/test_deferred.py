"""The stand-in that keeps asyncio out of the daemon until something uses it."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_structlog_imports_without_loading_asyncio_or_ssl():
    out = run_python("""
        import sys
        from supervisor.cli.deferred import DeferredModule, defer
        assert defer("asyncio")
        import structlog
        structlog.get_logger("x").info("hello")
        print(type(sys.modules["asyncio"]).__name__, "ssl" in sys.modules)
    """)
    assert out.splitlines()[-1] == "DeferredModule False"


def test_first_use_loads_the_real_module_for_every_import_form():
    out = run_python("""
        import sys
        from supervisor.cli.deferred import defer
        defer("asyncio")
        import asyncio
        from asyncio import sleep            # attribute read: loads the real module
        import asyncio.events                # submodule of the deferred package
        async def main():
            await sleep(0)
            return "ran"
        print(asyncio.run(main()), type(sys.modules["asyncio"]).__name__,
              sys.modules["asyncio"].sleep is sleep, asyncio.events.get_event_loop_policy() is not None)
    """)
    assert out == "ran module True True"


def test_defer_leaves_an_imported_module_alone():
    out = run_python("""
        import asyncio, sys
        from supervisor.cli.deferred import defer
        print(defer("asyncio"), sys.modules["asyncio"] is asyncio, defer("no_such_module_x"))
    """)
    assert out == "False True False"
