"""research: reads the configured pages and stores what they say as notes, through the steward.

    research.py fetch [INDEX_URL...]     note up to RESEARCH_MAX_PAGES new pages linked from them
    research.py refresh [INDEX_URL...]   re-read the oldest note's page; update it if it changed

Without INDEX_URL, the demo's pages (http://127.0.0.1:$WATCHKEEPER_DEMO_PORT/pages/).

Pages are read with headless Chromium when it is installed, so text that JavaScript puts on
the page is seen too, and with plain HTTP otherwise (RESEARCH_FETCHER=auto|chromium|http).
Each note is `notes/<slug>`: title, url, summary, text, facts, and how it was fetched.
WATCHKEEPER_SCENARIO=research-down makes every run fail, to watch the downstream agents
degrade.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from html.parser import HTMLParser

from common import demo_url, run, say, scenario, slugify
from textgen import Meter, Prompt

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "headless_shell")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")
FETCH_TIMEOUT_S = 30.0
MAX_TEXT_CHARS = 2000


class PageText(HTMLParser):
    """Title, readable text, 'Key facts' list items and links of one HTML page."""

    SKIP = {"script", "style", "nav", "footer", "noscript", "template"}

    def __init__(self) -> None:
        super().__init__()
        self.title, self.paragraphs, self.facts, self.links = "", [], [], []
        self._stack: list[str] = []
        self._in_facts = False
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "ul" and attrs.get("id") == "facts":
            self._in_facts = True
        if tag in ("p", "li", "title", "h1"):
            self._text = []
        self._stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._stack:
            while self._stack and self._stack.pop() != tag:
                pass
        text = " ".join("".join(self._text).split())
        if tag == "title":
            self.title = text
        elif tag == "p" and text:
            self.paragraphs.append(text)
        elif tag == "li" and text and self._in_facts:
            self.facts.append(text)
        elif tag == "ul":
            self._in_facts = False

    def handle_data(self, data: str) -> None:
        if not self.SKIP & set(self._stack):
            self._text.append(data)


def chromium_path() -> str | None:
    for name in (os.environ.get("RESEARCH_CHROMIUM", ""), *CHROMIUM_NAMES):
        if name and (found := shutil.which(name)):
            return found
    return None


def fetch_chromium(binary: str, url: str) -> str:
    """The DOM after scripts ran. A throwaway profile, and the whole browser ends with the
    call: leftover renderers are what filled the seed's 4 GB server."""
    with tempfile.TemporaryDirectory(prefix="research-chromium-") as profile:
        result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 "--dump-dom", url], capture_output=True, text=True,
                                timeout=FETCH_TIMEOUT_S)
    if result.returncode != 0 or "<html" not in result.stdout:
        raise OSError(f"chromium exited {result.returncode}: {result.stderr.strip()[-200:]}")
    return result.stdout


def fetch_http(url: str) -> str:
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
        return response.read(2_000_000).decode("utf-8", "replace")


class Fetcher:
    def __init__(self, mode: str) -> None:
        self.chromium = chromium_path() if mode in ("auto", "chromium") else None
        if mode == "chromium" and self.chromium is None:
            raise SystemExit("research: RESEARCH_FETCHER=chromium but no Chromium on PATH")
        self.method = "chromium" if self.chromium else "http"

    def __call__(self, url: str) -> tuple[PageText, str]:
        method, text = self.method, None
        if self.chromium:
            try:
                text = fetch_chromium(self.chromium, url)
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"research: chromium failed on {url} ({exc}); falling back to HTTP",
                      flush=True)
                method = "http"
        page = PageText()
        page.feed(text if text is not None else fetch_http(url))
        return page, method


def page_links(fetch: Fetcher, index_urls: list[str]) -> list[str]:
    """Links from each index page to pages under it, in order, without repeats."""
    found: list[str] = []
    for index in index_urls:
        page, _ = fetch(index)
        for href in page.links:
            url = urllib.parse.urljoin(index, href)
            if url.startswith(index) and url != index and url not in found:
                found.append(url)
    return found


def slug_of(url: str) -> str:
    name = urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    return slugify(name.removesuffix(".html"))


def make_note(meter: Meter, url: str, page: PageText, method: str) -> dict:
    text = " ".join(page.paragraphs)[:MAX_TEXT_CHARS]
    summary = meter.generate(Prompt("summary", "Summarise this page in three sentences.",
                                    subject=page.title, context=text, max_tokens=150))
    return {"title": page.title, "url": url, "summary": summary, "text": text,
            "facts": page.facts, "fetched_with": method, "fetched_at": time.time(),
            "digest": hashlib.sha256((text + "".join(page.facts)).encode()).hexdigest()[:16]}


CHROMIUM_HINT_KEY = "chromium-hint-given"


def hint_chromium_once(agent, fetcher: Fetcher) -> None:
    """Without Chromium, say once (per state: remembered in memory) how to get it, instead
    of falling back to plain HTTP silently on every run."""
    if fetcher.chromium or agent.memory.get("research", CHROMIUM_HINT_KEY) is not None:
        return
    say(agent, "no Chromium on PATH: reading pages with plain HTTP, which misses text that "
               "JavaScript adds; install it with `apt-get install chromium` (Debian) and the "
               "next run uses it")
    agent.memory.put("research", CHROMIUM_HINT_KEY, True)


def fetch(agent, meter: Meter, index_urls: list[str]) -> int:
    fetcher = Fetcher(os.environ.get("RESEARCH_FETCHER", "auto"))
    if os.environ.get("RESEARCH_FETCHER", "auto") == "auto":
        hint_chromium_once(agent, fetcher)
    known = {e["key"] for e in agent.memory.list("notes")}
    new = [u for u in page_links(fetcher, index_urls) if slug_of(u) not in known]
    limit = int(os.environ.get("RESEARCH_MAX_PAGES", "2"))
    notes = {}
    for url in new[:limit]:
        agent.heartbeat()
        page, method = fetcher(url)
        notes[slug_of(url)] = make_note(meter, url, page, method)
    if not notes:
        say(agent, f"nothing new on {len(index_urls)} index page(s); {len(known)} notes stored")
        return 0
    agent.emit("notes", f"{len(notes)} new: {', '.join(notes)}",
               content="\n".join(f"{slug} {n['digest']}" for slug, n in notes.items()))
    for slug, note in notes.items():
        agent.memory.put("notes", slug, note, expect_version=0)
    facts = sum(len(n["facts"]) for n in notes.values())
    say(agent, f"noted {', '.join(notes)} with {fetcher.method} ({facts} facts rendered by "
               f"scripts); {len(known) + len(notes)} notes stored, {len(new) - len(notes)} "
               "pages left for the next run")
    return 0


def refresh(agent, meter: Meter, index_urls: list[str]) -> int:
    entries = sorted(agent.memory.list("notes"), key=lambda e: e["value"].get("fetched_at", 0))
    if not entries:
        say(agent, "no notes to refresh")
        return 0
    oldest = entries[0]
    fetcher = Fetcher(os.environ.get("RESEARCH_FETCHER", "auto"))
    page, method = fetcher(oldest["value"]["url"])
    note = make_note(meter, oldest["value"]["url"], page, method)
    if note["digest"] == oldest["value"].get("digest"):
        agent.memory.merge("notes", oldest["key"], {"fetched_at": note["fetched_at"]},
                           expect_version=oldest["version"])
        say(agent, f"{oldest['key']} unchanged")
        return 0
    agent.emit("notes", f"refreshed: {oldest['key']}", content=f"{oldest['key']} {note['digest']}")
    agent.memory.put("notes", oldest["key"], note, expect_version=oldest["version"])
    say(agent, f"{oldest['key']} changed; note updated")
    return 0


def main(agent, meter: Meter, argv: list[str]) -> int:
    if not argv or argv[0] not in ("fetch", "refresh"):
        print("usage: research.py fetch|refresh [INDEX_URL...]", flush=True)
        return 2
    if scenario() == "research-down":
        say(agent, "scenario research-down: every source unreachable (simulated); failing")
        return 1
    index_urls = argv[1:] or [demo_url("/pages/")]
    return (fetch if argv[0] == "fetch" else refresh)(agent, meter, index_urls)


if __name__ == "__main__":
    run(main)
