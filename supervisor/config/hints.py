"""Hints for a configuration value of the wrong type: the valid forms, with an example.

`schedule: always` gets `Expected object, got str` from the validator; a person needs
"write `schedule: {always: true}`" and the other forms beside it.
"""

from __future__ import annotations

import re

# A section's valid forms, as a person writes them in YAML.
EXAMPLES = {
    "Schedule": ["{every_s: 60}", '{cron: "*/15 * * * *", timezone: Europe/Berlin}',
                 "{after: [research]}", "{always: true}"],
    "Retries": ["{max_attempts: 3, backoff_s: 30}"],
}


def object_hint(struct: type | None, value) -> str:
    """' (valid forms: ...; `always` alone is a word, write {always: true})' or ''."""
    if struct is None:
        return ""
    fields = getattr(struct, "__struct_fields__", ())
    forms = EXAMPLES.get(struct.__name__) or ["{" + ", ".join(f"{f}: ..." for f in fields) + "}"]
    hint = f" (valid forms: {', '.join(forms)}"
    if isinstance(value, str) and value in fields:
        annotation = struct.__annotations__.get(value)
        example = "true" if annotation in (bool, "bool") else "..."
        hint += f"; `{value}` alone is a word: write {{{value}: {example}}}"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        numeric = [f for f in fields if f.endswith("_s") or f.startswith("max_")]
        if numeric:
            hint += f"; a bare number needs its key, e.g. {{{numeric[0]}: {value}}}"
    return hint + ")"


def value_at(data, path: str):
    """The value at a msgspec path like `jobs[0].schedule` in the parsed YAML, or None."""
    current = data
    for part in re.findall(r"[^.\[\]]+", path):
        if isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        elif isinstance(current, dict) and part in current:
            current = current[part]
        else:
            return None
    return current
