"""seo: scores and rewrites the drafts' titles and metadata, then approves them for posting.

    seo.py optimise

For each draft it has not seen at its current version: score the title, rewrite it, write a
meta description and keywords (`seo/<slug>`), and, when the new title scores at least
SEO_APPROVE_SCORE, put the ready-to-post message in `approved/<slug>` for community.

It rate-limits itself with a token bucket kept in the steward (`seo/_bucket`, updated with
expect_version): SEO_PER_MINUTE drafts a minute, bursts of SEO_BURST. A flood of drafts waits
for later runs instead of going out at once; the seed's SEO agent was overwhelmed by one.
"""

from __future__ import annotations

import os
import time

from common import run, say
from textgen import Meter, Prompt, keywords

from supervisor.sdk import MemoryConflict

PER_MINUTE = float(os.environ.get("SEO_PER_MINUTE", "6"))
BURST = float(os.environ.get("SEO_BURST", "3"))
APPROVE_SCORE = int(os.environ.get("SEO_APPROVE_SCORE", "60"))
BUCKET = "_bucket"


def score_title(title: str, words: list[str]) -> int:
    """0-100: length in the 30-60 characters search results show, the main keyword early,
    a number, and no shouting."""
    score = 40 if 30 <= len(title) <= 60 else 20 if 15 <= len(title) <= 70 else 0
    lowered = title.lower()
    if words and words[0] in lowered:
        score += 30 if lowered.index(words[0]) < 20 else 15
    score += 10 * min(2, sum(1 for w in words[1:] if w in lowered))
    score += 10 if any(ch.isdigit() for ch in title) else 0
    return min(100, score - (20 if title.isupper() else 0))


def take_tokens(agent, wanted: int) -> tuple[int, float]:
    """Up to `wanted` drafts' worth of tokens from the bucket: (granted, tokens left)."""
    entry = agent.memory.entry("seo", BUCKET)
    now = time.time()
    state = entry["value"] if entry else {"tokens": BURST, "at": now}
    tokens = min(BURST, state["tokens"] + (now - state["at"]) * PER_MINUTE / 60)
    granted = min(wanted, int(tokens))
    try:
        agent.memory.put("seo", BUCKET, {"tokens": tokens - granted, "at": now},
                         expect_version=entry["version"] if entry else 0)
    except MemoryConflict:
        return 0, tokens  # another run took from it first: take nothing this time
    return granted, tokens - granted


def optimise(agent, meter: Meter, slug: str, draft: dict, version: int) -> bool:
    words = keywords(f"{draft['title']} {draft['title']} {draft['body']}")
    before = score_title(draft["title"], words)
    title = meter.generate(Prompt("title", "Rewrite this title for search: 30 to 60 "
                                  "characters, main keyword first.", subject=draft["title"],
                                  context=draft["body"], max_tokens=30))
    description = meter.generate(Prompt("description", "Write a meta description of at most "
                                        "155 characters.", subject=title,
                                        context=draft["body"], max_tokens=60))
    after = score_title(title, words)
    if after < before:
        title, after = draft["title"], before
    approved = after >= APPROVE_SCORE
    agent.emit("seo", f"{slug}: title score {before} -> {after}"
                      f"{'' if approved else ' (not approved)'}",
               content=f"{title}\n{description}\n{' '.join(words)}")
    agent.memory.put("seo", slug, {"title": title, "description": description, "keywords": words,
                                   "score_before": before, "score_after": after,
                                   "approved": approved, "draft_version": version,
                                   "optimised_at": time.time()})
    if approved:
        agent.memory.put("approved", slug, f"**{title}**\n{description}")
    say(agent, f"{slug}: '{draft['title']}' ({before}) -> '{title}' ({after})"
               f"{', approved' if approved else ', held back'}")
    return approved


def main(agent, meter: Meter, argv: list[str]) -> int:
    if not agent.upstream_ok("content"):
        chain = ", ".join(agent.degraded_upstreams)  # e.g. content<-research
        say(agent, f"degraded: content is stale or failing ({chain}); optimising the drafts "
                   "already stored")
    done = {e["key"]: e["value"].get("draft_version") for e in agent.memory.list("seo")}
    pending = [e for e in agent.memory.list("drafts") if done.get(e["key"]) != e["version"]]
    if not pending:
        say(agent, "no new drafts")
        return 0
    granted, left = take_tokens(agent, len(pending))
    for entry in sorted(pending, key=lambda e: e["updated_at"])[:granted]:
        optimise(agent, meter, entry["key"], entry["value"], entry["version"])
    if granted < len(pending):
        say(agent, f"rate limit: {len(pending) - granted} draft(s) wait for a later run "
                   f"({left:.1f} of {BURST:g} tokens left, {PER_MINUTE:g}/min)")
    return 0


if __name__ == "__main__":
    run(main)
