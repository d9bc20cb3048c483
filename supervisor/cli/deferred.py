"""Modules imported by a dependency but used only on paths the daemon never takes.

structlog imports asyncio at start-up for its async logging methods; asyncio imports ssl.
The daemon logs synchronously and never runs an event loop, yet the two would cost ~10 MiB
of RSS, more than everything else the daemon loads. `defer("asyncio")` puts a stand-in in
sys.modules: `import asyncio` binds the stand-in, and the first attribute anyone reads
from it imports the real module, which then replaces the stand-in in sys.modules. Code that
uses asyncio works as before; it pays the import when it first uses it.

importlib.util.LazyLoader is the standard tool for this, but on Python 3.11 a second
`import asyncio` reads `asyncio.__spec__`, which makes a LazyLoader module load at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

_lock = threading.RLock()


class DeferredModule(types.ModuleType):
    """Stands in for a module until one of its attributes is read."""

    def __getattr__(self, attr: str):
        # Only called for names the stand-in lacks, which are all of the real module's.
        return getattr(_load(self), attr)


def _load(stand_in: DeferredModule) -> types.ModuleType:
    name = stand_in.__name__
    with _lock:
        current = sys.modules.get(name)
        if current is not stand_in and current is not None:
            return current
        sys.modules.pop(name, None)
        return importlib.import_module(name)


def defer(name: str) -> bool:
    """Install a stand-in for the top-level module `name` unless it is already imported;
    True when a stand-in was installed."""
    with _lock:
        if name in sys.modules or "." in name:
            return False
        spec = importlib.util.find_spec(name)
        if spec is None:
            return False
        stand_in = DeferredModule(name)
        stand_in.__spec__ = spec  # `import name` checks spec._initializing, nothing more
        sys.modules[name] = stand_in
        return True
