"""Loading the YAML configuration into the schema of config/schema.py, with errors for people.

Every problem is reported as `file:line: field.path: what is wrong (what would be valid)`,
and every problem in every file is collected before ConfigError is raised, so that
`watchkeeper check-config` shows them all at once.

One mechanism validates values: the schema. Every range, enum and shape (job ids, identifiers,
non-empty lists) is declared on the fields (config/schema.py, core/ranges.py) and msgspec rejects
what breaks it. This loader adds only what a schema cannot express, each under "checks a
schema cannot express" below: relations between fields (`_check_relations`, `_check_job`,
`_check_schedule`), facts of the host (users, groups, time zones, the agents directory),
references between files (depends_on, after: and its cycles, breaker overrides), a cron
expression's grammar, and NUL bytes in what reaches exec().
"""

from __future__ import annotations

import dataclasses
import grp
import math
import os
import re
import urllib.parse
from pathlib import Path

import msgspec
import yaml

from ..core.ranges import IDENTIFIER_PATTERN
from ..core.safefile import read_capped
from ..errors import ConfigError
from ..kernel.identity import name_problems, uid_range_problems, user_problems
from ..memory.settings import check_schema
from .env import expand_values
from .hints import value_at
from .schema import AgentSpec, Job, Settings
from .yamlguard import YamlTooComplex, check_events, check_expansion

NAME_RE = re.compile(IDENTIFIER_PATTERN)  # an agent named by its file name, as a job id
CONFIG_ENV = "WATCHKEEPER_CONFIG"
# The field named by problems of a whole file (bad YAML, empty, not a mapping), so that every
# issue reads `file:line: field: problem`.
DOCUMENT = "(document)"
# A configuration file larger than this is refused unread; real ones are a few KiB. With
# the total below, this bounds a reload's parsing (the loop waits for it) to about a second.
MAX_CONFIG_FILE_BYTES = 256 * 1024
MAX_CONFIG_TOTAL_BYTES = 1 << 20  # the main file and every agent file together
MAX_AGENT_FILES = 1000
# exec takes C strings, which end at the first NUL: no path, argument or variable can hold one.
NUL = "contains a NUL byte"


@dataclasses.dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Config:
    """A fully validated configuration: the main settings and every agent by name."""

    path: Path
    settings: Settings
    agents: dict[str, AgentSpec]
    agent_files: dict[str, Path]

    @property
    def state_dir(self) -> Path:
        return Path(self.settings.state_dir)

    @property
    def socket_path(self) -> Path:
        return Path(self.settings.control_socket or self.state_dir / "control.sock")


# libyaml's parser when PyYAML was built with it: 10x faster, which is start-up time with
# many agent files.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse(text: str):
    """Compose once, then build the data from that node tree: (node, data).

    Bounded before anything grows: the event stream is checked for depth and aliases, and
    the composed tree for its size with aliases expanded (billion laughs), since building
    the data and indexing its lines walk every expanded node."""
    check_events(yaml.parse(text, Loader=_LOADER))
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        check_expansion(node)
        data = loader.construct_document(node) if node is not None else None
        return node, data
    finally:
        loader.dispose()


class _Document:
    """One YAML file: its data and the line of every field path in it."""

    def __init__(self, path: Path, issues: list[ConfigIssue]) -> None:
        self.path = path
        self.lines: dict[str, int] = {}
        self.data = None
        try:
            # Size-capped and never blocking: a FIFO, /dev/zero or a 50 MB file is refused
            # before parsing (they wedged reload or ran the daemon out of memory).
            raw = read_capped(path, MAX_CONFIG_FILE_BYTES)
        except OSError as exc:
            issues.append(ConfigIssue(str(path), None, "", f"cannot read: {exc.strerror or exc}"))
            return
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            # Raised past ConfigError, this left a reloading daemon stuck in `reloading`.
            issues.append(ConfigIssue(str(path), raw.count(b"\n", 0, exc.start) + 1, DOCUMENT,
                                      f"byte {raw[exc.start]:#04x} is not UTF-8 (YAML files "
                                      "are UTF-8 text)"))
            return
        try:
            node, self.data = _parse(text)
        except YamlTooComplex as exc:
            issues.append(ConfigIssue(str(path), exc.line, DOCUMENT, str(exc)))
            return
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark else 1
            problem = getattr(exc, "problem", None) or str(exc)
            issues.append(ConfigIssue(str(path), line, DOCUMENT, f"invalid YAML: {problem}"))
            return
        if node is not None:
            self._index(node, "", issues)

    def _index(self, node, path: str, issues: list[ConfigIssue]) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = str(key_node.value)
                child = f"{path}.{key}" if path else key
                if key in seen:
                    issues.append(ConfigIssue(str(self.path), key_node.start_mark.line + 1, child,
                                              "duplicate key (the later one would silently win)"))
                seen.add(key)
                self.lines[child] = key_node.start_mark.line + 1
                self._index(value_node, child, issues)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._index(item, f"{path}[{index}]", issues)

    def line_of(self, field: str) -> int | None:
        """Line of `field`, or of its closest enclosing field that the file has."""
        while field:
            if field in self.lines:
                return self.lines[field]
            # `[...]` is msgspec's name for a mapping's key (breaker.agents[...].outputs)
            parent = re.sub(r"(\.[^.\[]*|\[\d+\]|\[\.\.\.\])$", "", field)
            if parent == field:
                break  # a top-level field the file does not have, e.g. a missing `jobs`
            field = parent
        return self.lines.get("", 1)

    def issue(self, field: str, message: str, line_of: str | None = None) -> ConfigIssue:
        """The issue of `field`, on the line of `line_of` when given (a mapping's key that is
        reported as the mapping's problem)."""
        return ConfigIssue(str(self.path), self.line_of(line_of or field), field, message)


_MSGSPEC_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_KEY_PATH = re.compile(r"^(?P<msg>.*?) - at `key` in `\$(?P<path>[^`]*)`$", re.S)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]+)`")


def _convert(doc: _Document, data, struct: type, prefix: str, issues: list[ConfigIssue]):
    """msgspec.convert with its error turned into a ConfigIssue naming file, line and field."""
    try:
        return msgspec.convert(data, struct)
    except msgspec.ValidationError as exc:
        match = _KEY_PATH.match(str(exc)) or _MSGSPEC_PATH.match(str(exc))
        message, schema_sub = match["msg"], (match["path"] or "").lstrip(".")
        sub = _name_mapping_keys(struct, data, schema_sub)
        if match.re is _KEY_PATH:
            message = f"a key of this mapping is not a string ({message})"
        field = ".".join(p for p in (prefix, sub) if p).replace(".[", "[")
        unknown = _UNKNOWN.match(message)
        if unknown:
            field = f"{field}.{unknown['key']}" if field else unknown["key"]
            target = _struct_at(struct, schema_sub)
            valid = ", ".join(target.__struct_fields__) if target else "see docs/configuration.md"
            message = f"unknown key (valid keys here: {valid})"
        elif message.startswith("Invalid enum value"):
            message += _enum_hint(struct, schema_sub)
        elif message.startswith("Expected `int` ") or message.startswith("Expected `float` "):
            from ..core.ranges import range_message

            message = range_message(message, _hint_at(struct, schema_sub), value_at(data, sub))
        elif message.startswith("Expected `array` of length"):
            from ..core.ranges import length_message

            message = length_message(message, value_at(data, sub))
        elif message.startswith("Expected `str` matching regex"):
            from ..core.ranges import shape_message

            message = shape_message(_hint_at(struct, schema_sub), value_at(data, sub)) or message
        elif message.startswith("Expected `object`"):
            from .hints import object_hint

            message += object_hint(_struct_at(struct, schema_sub), value_at(data, sub))
        issues.append(doc.issue(field or DOCUMENT, message))
        return None


def _name_mapping_keys(struct: type, data, sub: str) -> str:
    """msgspec names a mapping's key `[...]` in its path (`breaker.agents[...].outputs`): put
    back the key whose value fails, so the issue names the agent and its line."""
    named, schema_path, rest = "", "", sub
    while "[...]" in rest:
        head, _, rest = rest.partition("[...]")
        named, schema_path = named + head, schema_path + head + "[...]"
        mapping, value_type = value_at(data, named), _struct_at(struct, schema_path)
        bad = next((key for key, value in mapping.items()
                    if isinstance(key, str) and re.fullmatch(r"[^.\[\]]+", key)
                    and _invalid(value, value_type)), None) \
            if isinstance(mapping, dict) and value_type is not None else None
        if bad is None:
            return f"{named}[...]{rest}"
        named += f".{bad}"
    return named + rest


def _hint_at(struct: type, sub: str):
    """The type hint, ranges included, of the field at msgspec path `sub` (a list element's
    is its list's), or None."""
    import typing

    path = re.sub(r"\[\d+\]$", "", sub)
    parent, _, name = path.rpartition(".")
    owner = _struct_at(struct, parent) if parent else struct
    return typing.get_type_hints(owner, include_extras=True).get(name) if owner else None


def _invalid(value, struct: type) -> bool:
    try:
        msgspec.convert(value, struct)
    except msgspec.ValidationError:
        return True
    return False


def _enum_hint(struct: type, sub: str) -> str:
    """' (valid: a, b, c)' for the enum-typed field at msgspec path `sub`."""
    import enum
    import typing

    parent, _, name = sub.rpartition(".")
    owner = _struct_at(struct, parent) if parent else struct
    hint = typing.get_type_hints(owner).get(name.split("[")[0]) if owner else None
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, enum.Enum):
            return f" (valid: {', '.join(str(m.value) for m in candidate)})"
    return ""


def _struct_at(struct: type, sub: str) -> type | None:
    """The Struct type found by following a msgspec path like `schedule` or `jobs[0].retries`."""
    import typing

    current = struct
    for part in re.findall(r"[^.\[\]]+", sub):
        if part.isdigit():
            continue
        hints = typing.get_type_hints(current)
        hint = hints.get(part)
        args = [hint, *typing.get_args(hint)] if hint is not None else []
        found = None
        for candidate in args:
            for inner in [candidate, *typing.get_args(candidate)]:
                if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
                    found = inner
        if found is None:
            return None
        current = found
    return current


def _check_numbers(doc: _Document, struct, at: str, issues: list[ConfigIssue]) -> None:
    """Every float in a free-form value (steward.schemas, typed Any) is finite: `.nan`
    compares false with everything. Typed numeric settings need no such walk: each has a
    bounded range in the schema (core/ranges.py), which `.inf` and `.nan` fail."""
    stack = [(struct, at)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, msgspec.Struct):
            stack.extend((getattr(node, f), f"{path}.{f}" if path else f)
                         for f in node.__struct_fields__)
        elif isinstance(node, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node))
        elif isinstance(node, dict):
            stack.extend((v, f"{path}.{k}") for k, v in node.items() if isinstance(k, str))
        elif isinstance(node, float) and not math.isfinite(node):
            issues.append(doc.issue(path, f"{node} is not a finite number"))


# -- checks a schema cannot express ---------------------------------------------------------


def _check_relations(doc: _Document, settings: Settings, issues: list[ConfigIssue]) -> None:
    """The main file's relations between fields, which no per-field constraint can state."""
    mem = settings.memory_guard
    if not mem.clear_percent <= mem.warn_percent <= mem.act_percent:
        issues.append(doc.issue("memory_guard", "memory percents must satisfy 0 <= clear_percent <= "
                                f"warn_percent <= act_percent <= 100, got clear="
                                f"{mem.clear_percent:g} warn={mem.warn_percent:g} "
                                f"act={mem.act_percent:g}"))
    if not mem.fast_interval_s <= mem.slow_interval_s:
        issues.append(doc.issue("memory_guard", "memory intervals must satisfy 0 < fast_interval_s <= "
                                f"slow_interval_s, got fast={mem.fast_interval_s:g} "
                                f"slow={mem.slow_interval_s:g}"))
    if settings.storage.backend == "postgresql" and not settings.storage.dsn:
        issues.append(doc.issue("storage.dsn", "required with backend postgresql "
                                "(e.g. postgresql://watchkeeper@localhost/watchkeeper)",
                                line_of="storage"))
    for glob, schema in settings.steward.schemas.items():
        try:
            check_schema(schema, where=f"steward.schemas[{glob!r}]")
        except ValueError as exc:
            issues.append(doc.issue(f"steward.schemas.{glob}", str(exc)))
    hooks = [(f"alerts.webhooks[{i}]", hook) for i, hook in enumerate(settings.alerts.webhooks)]
    if settings.alerts.escalation is not None:
        hooks += [(f"alerts.escalation.webhooks[{i}]", hook)
                  for i, hook in enumerate(settings.alerts.escalation.webhooks)]
    for at, hook in hooks:
        parts = urllib.parse.urlsplit(hook.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # Never echo the URL: its path is the webhook's secret.
            issues.append(doc.issue(f"{at}.url", "must be an http:// or https:// URL with a "
                                    f"host; got scheme {parts.scheme or '(none)'!r}"))


def _check_job(doc: _Document, job: Job, at: str, issues: list[ConfigIssue]) -> None:
    if isinstance(job.command, str) and not job.shell:
        issues.append(doc.issue(f"{at}.command", "a string command needs `shell: true`; "
                                "give an argv list instead, e.g. [python3, agent.py]"))
    _check_schedule(doc, job, f"{at}.schedule", issues)
    _check_spawn_inputs(doc, job, at, issues)


def _check_spawn_inputs(doc: _Document, job: Job, at: str, issues: list[ConfigIssue]) -> None:
    """What exec cannot be given is refused here: a NUL ends a C string, and the variable
    name ends at the first '='. Before, such a job loaded and every run of it raised
    "embedded null byte" at spawn. Messages name keys, never values: env holds secrets."""
    argv = [job.command] if isinstance(job.command, str) else job.command
    for index, arg in enumerate(argv):
        if "\0" in arg:
            where = f"{at}.command" if isinstance(job.command, str) else f"{at}.command[{index}]"
            issues.append(doc.issue(where, f"{NUL} (an argument cannot hold one)"))
    if job.cwd is not None and "\0" in job.cwd:
        issues.append(doc.issue(f"{at}.cwd", f"{NUL} (not a valid path)"))
    for key, value in job.env.items():
        problem = ("is empty" if not key else NUL if "\0" in key
                   else "contains '='" if "=" in key else None)
        if problem:
            issues.append(doc.issue(f"{at}.env", f"key {key!r} {problem} (a variable name is "
                                    "a non-empty string without '=' or NUL)", f"{at}.env.{key}"))
        elif "\0" in value:
            issues.append(doc.issue(f"{at}.env.{key}", f"the value {NUL} (an environment "
                                    "value cannot hold one)"))


def _check_schedule(doc: _Document, job: Job, at: str, issues: list[ConfigIssue]) -> None:
    sched = job.schedule
    chosen = [k for k, v in (("cron", sched.cron), ("every_s", sched.every_s),
                             ("after", sched.after), ("always", sched.always or None))
              if v is not None]
    if len(chosen) != 1:
        got = ", ".join(chosen) or "none"
        issues.append(doc.issue(at, f"exactly one of cron, every_s, after, always is needed "
                                f"(got: {got})"))
        return
    if sched.timezone != "UTC" and not _known_time_zone(sched.timezone):
        issues.append(doc.issue(f"{at}.timezone", f"{sched.timezone!r} is not a known time zone "
                                "(an IANA name such as UTC or Europe/Berlin)"))
        return
    if sched.cron is not None:
        from ..core.cron import cron_fields
        from ..core.trigger_imports import trigger_classes  # not apscheduler's package: ~9 MiB

        CronTrigger = trigger_classes()[0]  # noqa: N806 - a class

        try:
            if len(sched.cron.split()) not in (5, 6):
                raise ValueError(f"{len(sched.cron.split())} fields")
            CronTrigger(**cron_fields(sched.cron), timezone=sched.timezone)
        except ValueError as exc:
            issues.append(doc.issue(f"{at}.cron", f"{sched.cron!r} is not a valid cron "
                                    f"expression ({exc}; five fields: minute hour day month "
                                    "weekday, or six with seconds first)"))


def _agent_files(agents_dir: Path, doc: _Document, issues: list[ConfigIssue]) -> list[Path]:
    """The agent files to load, within the count and total-size budget."""
    files = sorted(agents_dir.glob("*.yaml")) + sorted(agents_dir.glob("*.yml"))
    if len(files) > MAX_AGENT_FILES:
        issues.append(doc.issue("agents_dir", f"{agents_dir} holds {len(files)} agent files; "
                                f"at most {MAX_AGENT_FILES} are read"))
        return []
    total = 0
    for path in files:
        try:
            total += os.lstat(path).st_size
        except OSError:
            continue  # reported when the file is read
    if total > MAX_CONFIG_TOTAL_BYTES:
        issues.append(doc.issue("agents_dir", f"the agent files in {agents_dir} hold {total} "
                                f"bytes; at most {MAX_CONFIG_TOTAL_BYTES} together"))
        return []
    return files


def _load_agent(path: Path, issues: list[ConfigIssue]) -> AgentSpec | None:
    doc = _Document(path, issues)
    if doc.data is None:
        if not any(i.file == str(path) for i in issues):
            issues.append(ConfigIssue(str(path), 1, DOCUMENT,
                                      "the file is empty (an agent needs jobs)"))
        return None
    if not isinstance(doc.data, dict):
        issues.append(doc.issue(DOCUMENT, "the file must be a mapping (agent:, jobs:, ...)"))
        return None
    raw = dict(doc.data)
    raw_jobs = raw.pop("jobs", None)
    spec = _convert(doc, raw, AgentSpec, "", issues)
    jobs: list[Job] = []
    if not isinstance(raw_jobs, list) or not raw_jobs:
        issues.append(doc.issue("jobs", "an agent needs a list of at least one job"))
    else:
        for index, raw_job in enumerate(raw_jobs):
            job = _convert(doc, raw_job, Job, f"jobs[{index}]", issues)
            if job is not None:
                _check_job(doc, job, f"jobs[{index}]", issues)
                jobs.append(job)
    if spec is None:
        return None
    _check_numbers(doc, spec, "", issues)
    for index, job in enumerate(jobs):
        _check_numbers(doc, job, f"jobs[{index}]", issues)
    name = spec.agent or path.stem
    if not NAME_RE.fullmatch(name):
        issues.append(doc.issue("agent", f"{name!r} is not a valid agent name "
                                "(lowercase letters, digits, '-' and '_', at most 64)"))
    for problem in name_problems(name):
        issues.append(doc.issue("agent", problem))
    for problem in user_problems(spec.user):
        issues.append(doc.issue("user", problem))
    ids = [j.id for j in jobs]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        issues.append(doc.issue("jobs", f"job id {dup!r} appears more than once"))
    return msgspec.structs.replace(spec, agent=name, jobs=jobs)


def _check_references(agents: dict[str, AgentSpec], files: dict[str, Path],
                      issues: list[ConfigIssue]) -> None:
    for name, spec in agents.items():
        doc = _Document(files[name], [])
        for index, dep in enumerate(spec.depends_on):
            if dep not in agents:
                issues.append(doc.issue(f"depends_on[{index}]", f"unknown agent {dep!r} "
                                        f"(known: {', '.join(sorted(agents))})"))
        for j, job in enumerate(spec.jobs):
            for index, up in enumerate(job.schedule.after or []):
                if up not in agents:
                    issues.append(doc.issue(f"jobs[{j}].schedule.after[{index}]",
                                            f"unknown agent {up!r} (known: "
                                            f"{', '.join(sorted(agents))})"))
    _check_after_cycles(agents, files, issues)


def _after_edges(spec: AgentSpec) -> list[tuple[int, int, str]]:
    return [(j, index, up) for j, job in enumerate(spec.jobs)
            for index, up in enumerate(job.schedule.after or [])]


def _check_after_cycles(agents: dict[str, AgentSpec], files: dict[str, Path],
                        issues: list[ConfigIssue]) -> None:
    """A job `after:` its own agent, or agents after each other in a ring, would fire each
    other for ever (one such job ran 127 times in 6 s)."""
    graph = {name: {up for _, _, up in _after_edges(spec) if up in agents}
             for name, spec in agents.items()}
    reported: set[frozenset[str]] = set()
    for name, spec in sorted(agents.items()):
        for j, index, up in _after_edges(spec):
            ring = _path_back(graph, up, name)
            if ring is None or frozenset(ring) in reported:
                continue
            reported.add(frozenset(ring))
            cycle = " -> ".join([name, *ring]) if up != name else f"{name} -> {name}"
            issues.append(_Document(files[name], []).issue(
                f"jobs[{j}].schedule.after[{index}]",
                f"`after:` cycle {cycle} (each run would fire the next for ever); "
                "an agent cannot run after itself or after an agent that runs after it"))


def _path_back(graph: dict[str, set[str]], start: str, target: str) -> list[str] | None:
    """The agents from `start` back to `target` along `after:` edges, or None."""
    parents: dict[str, str | None] = {start: None}
    stack = [start]
    while stack:
        node = stack.pop()
        if node == target:
            path = []
            while node is not None:
                path.append(node)
                node = parents[node]
            return list(reversed(path))
        for up in graph.get(node, ()):
            if up not in parents:
                parents[up] = node
                stack.append(up)
    return None


def _check_accounts(doc: _Document, settings: Settings, issues: list[ConfigIssue]) -> None:
    """A group that does not exist passed check-config, then `run` died with a KeyError."""
    group = settings.socket_group
    if group:
        try:
            grp.getgrnam(group)
        except (KeyError, ValueError):  # ValueError: a NUL byte in the name
            issues.append(doc.issue("socket_group", f"no group named {group!r} on this host "
                                    "(create it, or leave socket_group unset)"))


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return str(path)
    try:
        return str((base / path).resolve())
    except (RuntimeError, OSError):  # a symlink loop: reported where the path is used
        return os.path.normpath(base / path)


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or "/etc/watchkeeper/watchkeeper.yaml")


def load_config(path: Path | str | None = None) -> Config:
    """Read and validate the main file and every agent file; raise ConfigError listing all."""
    path = Path(path) if path else default_config_path()
    issues: list[ConfigIssue] = []
    doc = _Document(path, issues)
    if issues:
        raise ConfigError(issues)
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError([doc.issue(DOCUMENT, "the file must be a mapping of settings")])
    data = expand_values(data, os.environ, lambda field, why: issues.append(doc.issue(field, why)))
    if issues:  # checked as written, a bad reference would add a second, misleading error
        raise ConfigError(issues)
    settings = _convert(doc, data, Settings, "", issues)
    if settings is None:
        # Keep going with the defaults, so the agent files' errors are reported too.
        agents_dir = data.get("agents_dir")
        usable = isinstance(agents_dir, str) and "\0" not in agents_dir
        settings = Settings(agents_dir=agents_dir) if usable else Settings()
    else:
        _check_numbers(doc, settings, "", issues)
        _check_relations(doc, settings, issues)
        for problem in user_problems(settings.agent_user):
            issues.append(doc.issue("agent_user", problem))
        paths_ok = True
        for field in ("state_dir", "agents_dir", "working_dir", "control_socket"):
            if "\0" in (getattr(settings, field) or ""):
                issues.append(doc.issue(field, f"{NUL} (not a valid path)"))
                paths_ok = False
        if not paths_ok:
            raise ConfigError(issues)
        _check_accounts(doc, settings, issues)
    base = path.resolve().parent
    settings = msgspec.structs.replace(
        settings,
        state_dir=_resolve(base, settings.state_dir),
        agents_dir=_resolve(base, settings.agents_dir),
        working_dir=_resolve(base, settings.working_dir) or str(base),
        control_socket=_resolve(base, settings.control_socket),
    )
    agents: dict[str, AgentSpec] = {}
    files: dict[str, Path] = {}
    agents_dir = Path(settings.agents_dir)
    if not agents_dir.is_dir():
        issues.append(doc.issue("agents_dir", f"{agents_dir} is not a directory"))
    else:
        for agent_file in _agent_files(agents_dir, doc, issues):
            spec = _load_agent(agent_file, issues)
            if spec is None:
                continue
            if spec.name in agents:
                issues.append(ConfigIssue(str(agent_file), 1, "agent",
                                          f"agent {spec.name!r} is also defined in "
                                          f"{files[spec.name]}"))
                continue
            agents[spec.name] = spec
            files[spec.name] = agent_file
        _check_references(agents, files, issues)
        for problem in uid_range_problems(settings.agent_uid_range, len(agents)):
            issues.append(doc.issue("agent_uid_range", problem))
        try:
            settings.breaker.check_agents(agents)
        except ValueError as exc:
            issues.append(doc.issue("breaker.agents", str(exc)))
    if issues:
        raise ConfigError(issues)
    return Config(path=path, settings=settings, agents=agents, agent_files=files)


def _known_time_zone(name: str) -> bool:
    import zoneinfo  # only for a zone other than UTC: the tz database costs ~1 MiB of RSS

    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True
