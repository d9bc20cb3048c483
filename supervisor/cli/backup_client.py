"""The CLI side of `memory export` and `memory import`: pages over the control socket.

A whole store in one frame was cut off (replies over 8 MiB) or refused (requests over
1 MiB); here export follows the daemon's `next` cursor and import sends pages small enough
for one frame. Only json is imported: agents import the CLI too (memory/backup.py is the
daemon's side).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator

EXPORT_FORMAT = "watchkeeper-memory"
IMPORT_PAGE_BYTES = 512 * 1024  # well under the 1 MiB request frame, with its envelope

Call = Callable[..., dict]


class BadExportFile(ValueError):
    """An import file that is not an export document; the message says why."""


def export_document(call: Call) -> dict:
    """The whole store, entries then history, as one export document."""
    doc: dict = {"format": EXPORT_FORMAT, "format_version": 2, "exported_at": None,
                 "entries": [], "history": []}
    for part in ("entries", "history"):
        after = 0
        while True:
            page = call("memory-export", part=part, after=after)
            doc["exported_at"] = doc["exported_at"] or page["exported_at"]
            doc[part].extend(page[part])
            if page["next"] is None:
                break
            after = page["next"]
    doc["entries"].sort(key=lambda e: (e["namespace"], e["key"]))  # pages come in id order
    return doc


def read_export_file(path: str) -> dict:
    """The parsed import file; BadExportFile for malformed JSON, deep nesting or a
    document that is not an export."""
    try:
        if path == "-":  # `watchkeeper memory export | watchkeeper memory import -`
            doc = json.load(sys.stdin.buffer)
        else:
            with open(path, "rb") as f:
                doc = json.load(f)
    except OSError as exc:
        raise BadExportFile(f"{path}: cannot read: {exc.strerror}") from None
    except RecursionError:
        raise BadExportFile(f"{path}: nested too deeply to be an export document") from None
    except ValueError as exc:
        raise BadExportFile(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise BadExportFile(f"{path}: not a {EXPORT_FORMAT} export (an object with "
                            f"\"format\": \"{EXPORT_FORMAT}\" expected)")
    for part in ("entries", "history"):
        if not isinstance(doc.get(part, []), list):
            raise BadExportFile(f"{path}: `{part}` must be a list")
    return doc


def import_document(call: Call, doc: dict) -> dict:
    """Send history first (restored verbatim), then the entries; totals of both."""
    totals = {"imported": 0, "history": 0}
    history = doc.get("history") or []
    head = {"format": doc.get("format"), "format_version": doc.get("format_version")}
    for chunk in _pages(history):
        totals["history"] += call("memory-import", data={**head, "history": chunk})["history"]
    for chunk in _pages(doc.get("entries") or []):
        result = call("memory-import", data={**head, "entries": chunk},
                      restored_history=bool(history))
        totals["imported"] += result["imported"]
    return totals


def _pages(items: list) -> Iterator[list]:
    page: list = []
    size = 0
    for item in items:
        item_size = len(json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode())
        if page and size + item_size > IMPORT_PAGE_BYTES:
            yield page
            page, size = [], 0
        page.append(item)
        size += item_size
    if page:
        yield page
