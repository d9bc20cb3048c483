"""Bounds on a YAML document, checked before the data is built.

A billion-laughs file (aliases of aliases) is small but expands to billions of nodes: it
blocked a reloading daemon for 38 s and then left it stuck. Deep nesting (`[[[[...`)
overflows recursive walkers. Both are caught here, cheaply: the event stream gives the depth
and the alias count without building anything, and the composed node graph is walked
iteratively with a budget on the nodes seen with every alias expanded.
"""

from __future__ import annotations

import yaml

MAX_DEPTH = 64               # nesting of mappings and sequences
MAX_ALIASES = 1000           # `*name` references in one document
MAX_EXPANDED_NODES = 50_000  # nodes with every alias expanded; real files have hundreds


class YamlTooComplex(ValueError):
    """A document over one of the bounds; `line` is where it went over (1-based)."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


def check_events(events) -> None:
    """Depth and alias count from the parser's events, before composing."""
    depth = aliases = 0
    for event in events:
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise YamlTooComplex(f"nested deeper than {MAX_DEPTH} levels (refused)",
                                     _line(event))
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise YamlTooComplex(f"more than {MAX_ALIASES} aliases (refused)", _line(event))


def check_expansion(root) -> None:
    """Raise if the node graph, aliases expanded, has more than MAX_EXPANDED_NODES nodes."""
    if root is None:
        return
    stack, seen = [root], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_EXPANDED_NODES:
            raise YamlTooComplex(f"has more than {MAX_EXPANDED_NODES} values with its aliases "
                                 "expanded (refused: a configuration is not that big; "
                                 "aliases of aliases are a 'billion laughs')", _line(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.append(key)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _line(item) -> int | None:
    mark = getattr(item, "start_mark", None)
    return mark.line + 1 if mark is not None else None
