"""APScheduler's trigger classes, imported without what trigger arithmetic never uses.

The daemon keeps APScheduler for its triggers only (cron fields, time zones, DST); the
loop's timer heap does the waiting. Importing `apscheduler.triggers.cron` the ordinary way
costs ~9 MiB and ~40 ms, nearly all of it unused here:
- `apscheduler/__init__.py` reads its version through importlib.metadata (email, zipfile,
  csv, pathlib...): the package's modules are imported under a bare package object instead;
- `apscheduler.util` does `from asyncio import iscoroutinefunction` (asyncio, ssl,
  concurrent...), used by executors, never by triggers: it gets a stand-in that imports
  asyncio if it is ever called.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types


@functools.cache
def trigger_classes() -> tuple[type, type]:
    """(CronTrigger, IntervalTrigger)."""
    with _package_without_init("apscheduler"), _asyncio_held_back():
        cron = importlib.import_module("apscheduler.triggers.cron")
        interval = importlib.import_module("apscheduler.triggers.interval")
    return cron.CronTrigger, interval.IntervalTrigger


class _package_without_init:
    """Makes `import package.sub` skip package/__init__.py when the package is not
    imported yet (a bare module with the package's __path__ stands in for it)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        if self.name in sys.modules:
            return
        spec = importlib.util.find_spec(self.name)  # finds; does not execute
        if spec is None or spec.submodule_search_locations is None:
            return  # not installed: the import below reports it
        package = types.ModuleType(self.name, "(imported without its __init__)")
        package.__spec__ = spec
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[self.name] = package

    def __exit__(self, *exc) -> None:
        pass  # the bare package stays: its submodules are bound to it


class _asyncio_held_back:
    """`from asyncio import iscoroutinefunction` without importing asyncio: while inside,
    sys.modules["asyncio"] is a module offering only that name, which imports the real
    asyncio on its first call."""

    def __enter__(self) -> None:
        self.previous = sys.modules.get("asyncio")  # None, the real one, or cli/deferred.py's
        self.stand_in = None
        if type(self.previous) is types.ModuleType:
            return  # the real asyncio is loaded already: nothing to save
        stand_in = types.ModuleType("asyncio", "(held back while importing triggers)")
        stand_in.iscoroutinefunction = _iscoroutinefunction
        sys.modules["asyncio"] = stand_in
        self.stand_in = stand_in

    def __exit__(self, *exc) -> None:
        if self.stand_in is not None and sys.modules.get("asyncio") is self.stand_in:
            if self.previous is None:
                del sys.modules["asyncio"]
            else:
                sys.modules["asyncio"] = self.previous


def _iscoroutinefunction(func) -> bool:
    # Called after the import, when sys.modules holds the real asyncio or cli/deferred.py's.
    return importlib.import_module("asyncio").iscoroutinefunction(func)
