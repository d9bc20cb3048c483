"""Environment references in the main configuration file's string values.

`${NAME}` is the variable's value and `${NAME:-default}` its value or, when it is unset or
empty, the default (as in a shell); `$${` is a literal `${`. The failure this serves: the
demo's port was written in several files, so a second demo on the same host could not move
it. Only the main file expands: agent files hold commands and environments that bash
expands itself at run time (`${WATCHKEEPER_RUN_ID}`), and expanding them at load time from
the daemon's environment would change what those programs run.

The environment is the process that loads the file: the daemon (its unit's `Environment=`),
or `check-config` in the operator's shell.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

# One reference, or the escape: `$${`, `${NAME}`, `${NAME:-default}`, else a bare `${`.
_TOKEN = re.compile(r"\$\$\{|\$\{(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\})?")
VALID_FORMS = "${NAME}, ${NAME:-default} or $${ for a literal ${"
# Main-file values are paths, URLs and DSNs; a value repeating a large variable thousands of
# times would otherwise grow without bound while the loop waits for a reload.
MAX_EXPANDED_CHARS = 64 * 1024


class EnvReferenceError(ValueError):
    """A reference that cannot expand: unset without a default, or not a valid form."""


def expand_string(text: str, environ: Mapping[str, str]) -> str:
    """`text` with every reference replaced; EnvReferenceError names the first bad one."""
    if "$" not in text:
        return text
    added = [0]  # characters the references added so far

    def replace(match: re.Match) -> str:
        value = _value_of(match, text, environ)
        added[0] += len(value)
        if len(text) + added[0] > MAX_EXPANDED_CHARS:
            raise EnvReferenceError(f"expands to more than {MAX_EXPANDED_CHARS} characters")
        return value

    return _TOKEN.sub(replace, text)


def _value_of(match: re.Match, text: str, environ: Mapping[str, str]) -> str:
    token, name, default = match.group(0), match.group("name"), match.group("default")
    if token == "$${":
        return "${"
    if name is None:
        raise EnvReferenceError(f"{text[:200]!r} has a `${{` that is not a reference (valid: "
                                f"{VALID_FORMS}; NAME is letters, digits and _)")
    value = environ.get(name)
    if value or (value is not None and default is None):
        return value
    if default is not None:
        return default
    raise EnvReferenceError(f"the environment variable {name} is not set (set it, or "
                            f"write ${{{name}:-default}} to give a default)")


def expand_values(data, environ: Mapping[str, str], report: Callable[[str, str], None],
                  path: str = ""):
    """A copy of the parsed YAML `data` with references expanded in string values (never in
    keys); `report(field_path, message)` receives each bad reference, which is kept as is
    (load_config reports them all and goes no further: such a value is not what was meant)."""
    if isinstance(data, dict):
        return {key: expand_values(value, environ, report, f"{path}.{key}" if path else str(key))
                for key, value in data.items()}
    if isinstance(data, list):
        return [expand_values(item, environ, report, f"{path}[{i}]")
                for i, item in enumerate(data)]
    if isinstance(data, str):
        try:
            return expand_string(data, environ)
        except EnvReferenceError as exc:
            report(path, str(exc))
    return data
