"""The package's folders are layers: no import cycle between them, no import upward.

Read from the code's own imports (ast over supervisor/), including imports inside functions:
a lazy import is still a dependency, only paid later. Imports under `if TYPE_CHECKING:` are
left out: they never run, and a seam's contract may name the types of the layers above that
implement it. A room is a subpackage (`supervisor/breaker/`) or a module left at the top
(`supervisor/sdk.py`).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "supervisor"

# Lowest first. A room may import rooms on its own line or above it in this table (lower
# layers), never one below it. Rooms on one line are peers and must not form a cycle.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "wire"),  # the error hierarchy; JSON for the agents' side
    ("core",),           # states, firings, cron fields, timers, ranges, safe files
    ("kernel",),         # processes, cgroups, PSI, namespaces, users, peers, authz
    ("systemd",),        # sd_notify, journald, the service's notifications
    ("log",),            # logging setup and the console renderer
    ("breaker",),        # the circuit breaker's logic and settings
    ("storage",),        # the daemon's own SQLite records, storage settings
    ("alerts",),         # alerts, their sinks, outbox and sender
    ("health",),         # heartbeat files and the memory guard
    ("memory",),         # the agents' shared memory store and retrieval
    ("config",),         # the schema (it imports the sections above), loading, docs
    ("scheduling",),     # schedules as firings on the loop's timers
    ("runs",),           # the pipeline, runs, agents' records, task locks
    ("control",),        # the control socket: protocol, server, handlers, client
    ("sdk",),            # the agent SDK (over control/client.py)
    ("features",),       # optional features plugged into the loop and the socket
    ("pg",),             # the PostgreSQL cluster, itself a feature over the others
    ("daemon",),         # the loop that owns all state, and the features it starts
    ("cli",),            # the `watchkeeper` command
    ("entry",),          # bin/watchkeeper's entry point
]

# (importing module, imported module) -> why this upward import is acceptable. Keep empty
# unless there is no better place; every entry must say why.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def run_time_nodes(tree: ast.AST):
    """Every node, except the bodies of `if TYPE_CHECKING:` (their else branch is kept)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if is_type_checking(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every supervisor module `name` imports at run time, wherever the import statement is."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in run_time_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "supervisor"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "supervisor":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return out


def room(module: str) -> str | None:
    """The room of a module: its subpackage, or itself at the top; None for the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def edges() -> list[tuple[str, str]]:
    mods = modules()
    known = set(mods)
    return sorted((src, dst) for src, path in mods.items()
                  for dst in imports_of(src, path, known) if dst in known)


def layer_of() -> dict[str, int]:
    return {r: i for i, rooms in enumerate(LAYERS) for r in rooms}


def test_every_room_has_a_layer():
    """Every subpackage and top-level module of supervisor/ is placed in the layer table."""
    rooms = {room(m) for m in modules()} - {None}
    assert sorted(rooms - set(layer_of())) == [], "add new rooms to LAYERS"
    assert sorted(set(layer_of()) - rooms) == [], "LAYERS names a room that is gone"


def test_no_room_imports_a_room_above_it():
    """No module imports a module of a higher layer, lazily or not, unless allowed with a
    reason."""
    layer = layer_of()
    upward = [f"{src} -> {dst}" for src, dst in edges()
              if room(src) and room(dst) and layer[room(dst)] > layer[room(src)]
              and (src, dst) not in ALLOWED_UPWARD]
    assert upward == [], "upward imports (move the code down, or the import up):\n" + "\n".join(upward)


def test_no_import_cycle_between_rooms():
    """The rooms' import graph has no cycle (peers on one layer included)."""
    graph: dict[str, set[str]] = {}
    for src, dst in edges():
        if room(src) and room(dst) and room(src) != room(dst):
            graph.setdefault(room(src), set()).add(room(dst))
    cycles = []

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, path + [nxt], done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], done)
    assert cycles == [], "import cycles between rooms:\n" + "\n".join(cycles)


def test_subpackage_inits_import_nothing():
    """Each subpackage's __init__.py is empty or a docstring: importing supervisor.sdk or an
    agent verb through a package must not load anything more."""
    busy = []
    for init in sorted(ROOT.rglob("__init__.py")):
        body = ast.parse(init.read_text()).body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]
        if init.parent == ROOT:  # supervisor/__init__.py: __version__ only
            body = [n for n in body if not (isinstance(n, ast.Assign)
                                            and [t.id for t in n.targets] == ["__version__"])]
        if body:
            busy.append(str(init.relative_to(ROOT.parent)))
    assert busy == [], f"__init__.py files that do more than a docstring: {busy}"
