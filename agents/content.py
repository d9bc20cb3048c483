"""content: drafts one article per run from the research notes, through the output gate.

    content.py draft

The article's context is retrieved, not injected: `agent.search()` returns the few notes
relevant to the topic within CONTENT_CONTEXT_TOKENS, and the run prints how many tokens that
was against handing it every note. The task lock `article-<slug>` makes sure two runs never
write the same article; `drafts/<slug>` is written with expect_version=0 for the same reason.

Degraded mode (research stale or failing, WATCHKEEPER_DEGRADED=1): content keeps writing from
the notes already stored, says so, marks the draft `degraded`, and when no topic is left it
writes one roundup a day from stored notes.

WATCHKEEPER_SCENARIO=3am brings back the seed's bad retry logic once the first article is out:
a publish check that can never succeed, retried at once with a fresh variation each time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time

from common import run, say, scenario
from textgen import Meter, Prompt, estimate_tokens

from supervisor.errors import LockBusy
from supervisor.sdk import MemoryConflict

CONTEXT_TOKENS = int(os.environ.get("CONTENT_CONTEXT_TOKENS", "700"))


def rendered_tokens(entries: list[dict]) -> int:
    """What injecting every entry would cost, rendered and estimated as the daemon does."""
    return sum(estimate_tokens(f"## notes/{e['key']}\n" + json.dumps(
        e["value"], separators=(",", ":"), ensure_ascii=False) + "\n") for e in entries)


def next_topic(notes: list[dict], drafted: set[str]) -> dict | None:
    """The oldest note without an article."""
    waiting = [n for n in notes if n["key"] not in drafted]
    return min(waiting, key=lambda n: n["updated_at"]) if waiting else None


def roundup_topic(notes: list[dict]) -> dict:
    day = dt.date.today().isoformat()
    titles = [n["value"]["title"] for n in sorted(notes, key=lambda n: n["key"])]
    return {"key": f"roundup-{day}", "value": {"title": f"Roundup: {', '.join(titles[:3])}",
                                               "url": ""}}


def write_article(agent, meter: Meter, topic: dict, notes: list[dict], degraded: bool) -> int:
    slug, title = topic["key"], topic["value"]["title"]
    try:
        lock = agent.lock(f"article-{slug}")
    except LockBusy as exc:
        say(agent, f"{slug}: another run holds its lock ({exc}); leaving it")
        return 0
    with lock:
        context = agent.search(title, k=6, token_budget=CONTEXT_TOKENS, namespaces=["notes"])
        body = meter.generate(Prompt("article", f"Write a short article about {title}.",
                                     subject=title, context=context.text, max_tokens=700))
        if degraded:
            body += "\n\n(Written from stored notes while research was unavailable.)"
        if scenario() == "3am" and len(agent.memory.list("drafts")) >= 1:
            return publish_with_bad_retry(agent, slug, title, body)
        agent.emit("article", title, content=body)
        draft = {"title": title, "body": body, "url": topic["value"].get("url", ""),
                 "sources": [h["key"] for h in context.hits], "degraded": degraded,
                 "context_tokens": context.tokens, "every_note_tokens": rendered_tokens(notes),
                 "model": meter.backend.model, "drafted_at": time.time()}
        try:
            agent.memory.put("drafts", slug, draft, expect_version=0)
        except MemoryConflict:
            say(agent, f"{slug}: already drafted by another run; keeping that one")
            return 0
    say(agent, f"drafted '{title}' ({len(body.split())} words) from {len(context.hits)} notes; "
               f"lazy context {context.tokens} tokens instead of {draft['every_note_tokens']} "
               f"for every note{' [degraded: from stored notes]' if degraded else ''}")
    return 0


def publish_with_bad_retry(agent, slug: str, title: str, body: str) -> int:
    """The 3am bug, kept behind its switch: the confirmation looks the draft up by its title
    instead of its slug, never finds it, and retries at once: no backoff, no attempt limit.
    The circuit breaker is what ends this loop (OutputDenied, exit 5)."""
    attempt = 0
    while agent.memory.get("drafts", title) is None:
        attempt += 1
        agent.emit("article", f"{title} (take {attempt})", content=f"{body}\n\nTake {attempt}.")
        say(agent, f"3am: publish of {slug} not confirmed; retrying at once (attempt {attempt})")
    return 0


def main(agent, meter: Meter, argv: list[str]) -> int:
    degraded = not agent.upstream_ok("research")
    if degraded:
        last = agent.upstream_last_output("research", "notes")
        seen = (f"its last output: '{last['summary']}' at "
                f"{dt.datetime.fromtimestamp(last['time']):%H:%M:%S}") if last else \
            "no output from it on record"
        say(agent, f"degraded: research is stale or failing ({seen}); writing from stored "
                   "notes only")
    notes = agent.memory.list("notes")
    drafted = {e["key"] for e in agent.memory.list("drafts")}
    topic = next_topic(notes, drafted)
    if topic is None and degraded and notes:
        topic = roundup_topic(notes)
        if topic["key"] in drafted:
            topic = None
    if topic is None and scenario() == "3am" and notes and drafted:
        # The seed's bug struck on republishing as well: the scenario trips the breaker
        # even when every topic already has its article (a demo started again later).
        topic = max(notes, key=lambda n: n["updated_at"])
    if topic is None:
        say(agent, f"every note has its article ({len(drafted)} drafts); nothing to write")
        return 0
    return write_article(agent, meter, topic, notes, degraded)


if __name__ == "__main__":
    run(main)
