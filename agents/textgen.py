"""Text generation for the demo agents: one call, `generate(Prompt) -> Generation`.

Two backends behind it:
- `Offline` (the default): deterministic and extractive. It writes only sentences it finds in
  the prompt's context, arranged by templates, so the demo runs anywhere, offline, and its
  output is the same on every run.
- `OpenAICompatible`: POST {base}/chat/completions to any OpenAI-compatible server (OpenAI,
  vLLM, llama.cpp, Ollama...), chosen when WATCHKEEPER_LLM_BASE_URL is set, with
  WATCHKEEPER_LLM_API_KEY, WATCHKEEPER_LLM_MODEL and, to price the tokens,
  WATCHKEEPER_LLM_COST_PER_1K_TOKENS. When the server fails, the call falls back to Offline
  and says so on stderr: a model outage degrades the text, not the pipeline.

Every Generation carries its token count, cost and model for `agent.report_usage`; Offline
counts tokens with the daemon's estimate (4 characters a token) at zero cost.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Protocol

KINDS = ("article", "title", "description", "summary")
CHARS_PER_TOKEN = 4  # the daemon's estimate (supervisor/memory/context.py)

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'])")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'-]+")
_STOP = frozenset("""a an and are as at be by for from has have in is it its of on or that the
this to was were will with than then there their they which who what when how why not but
can into more most also been being over per about after before your our you we""".split())


@dataclasses.dataclass(frozen=True)
class Prompt:
    kind: str          # one of KINDS
    instruction: str   # what a model is asked to do
    subject: str = ""  # the topic, or the text to rewrite
    context: str = ""  # retrieved notes, as rendered by agent.search()
    max_tokens: int = 600

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Prompt.kind must be one of {', '.join(KINDS)}; got {self.kind!r}")

    def text(self) -> str:
        return f"{self.instruction}\n\nSubject: {self.subject}\n\nContext:\n{self.context}"


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str
    tokens: int  # prompt and completion
    cost: float
    model: str


class Backend(Protocol):
    model: str

    def generate(self, prompt: Prompt) -> Generation: ...


class TextGenError(Exception):
    """The backend could not produce text."""


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def words(text: str) -> list[str]:
    """Content words of `text`, lower-cased, plural 's' dropped ("panels" is "panel")."""
    found = (m.lower() for m in _WORD.findall(text))
    return [w[:-1] if len(w) > 4 and w.endswith("s") and not w.endswith("ss") else w
            for w in found if w not in _STOP]


def keywords(text: str, n: int = 5) -> list[str]:
    """The `n` most frequent content words, ties broken by first appearance."""
    counts = Counter(w for w in words(text) if len(w) > 3)
    return [w for w, _ in counts.most_common(n)]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if len(s.strip()) > 20]


# -- offline ----------------------------------------------------------------------------------


def context_passages(context: str) -> list[str]:
    """The prose in a context: for entries rendered by search() ("## namespace/key" then
    JSON), every string value that reads as a sentence; plain text is taken as it is."""
    if not context.startswith("## "):
        return [context] if context.strip() else []
    passages: list[str] = []
    for block in ("\n" + context).split("\n## ")[1:]:
        _, _, body = block.partition("\n")
        try:
            value = json.loads(body.strip() or "null")
        except ValueError:
            value = body
        passages.extend(_strings(value))
    return passages


def _strings(value) -> list[str]:
    if isinstance(value, str):  # prose, not titles, identifiers or URLs
        return [value] if re.search(r"\w[.!?](\s|$)", value) else []
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    return []


class Offline:
    """Extractive and templated: no model, no network, the same text for the same prompt."""

    model = "offline-extractive"

    def generate(self, prompt: Prompt) -> Generation:
        text = getattr(self, f"_{prompt.kind}")(prompt)
        return Generation(text, estimate_tokens(prompt.text()) + estimate_tokens(text), 0.0,
                          self.model)

    def _ranked(self, prompt: Prompt, limit: int) -> list[str]:
        """Context sentences sharing the most words with the subject, in context order."""
        topic = set(words(prompt.subject))
        found: list[str] = []
        for passage in context_passages(prompt.context):
            found.extend(s for s in sentences(passage) if s not in found)
        overlap = [len(topic & set(words(s))) for s in found]
        if sum(1 for n in overlap if n) >= 3:  # enough on topic: leave the rest out
            kept = [i for i, n in enumerate(overlap) if n]
            found, overlap = [found[i] for i in kept], [overlap[i] for i in kept]
        best = sorted(range(len(found)), key=lambda i: (-overlap[i], i))[:limit]
        return [found[i] for i in sorted(best)]

    def _article(self, prompt: Prompt) -> str:
        picked = self._ranked(prompt, 9)
        if not picked:
            return f"There is nothing on record about {prompt.subject} yet."
        paragraphs = [" ".join(picked[i:i + 3]) for i in range(0, len(picked), 3)]
        return "\n\n".join(paragraphs)

    def _summary(self, prompt: Prompt) -> str:
        return " ".join(self._ranked(prompt, 3)) or prompt.subject

    def _title(self, prompt: Prompt) -> str:
        title = prompt.subject.strip().rstrip(".")
        title = title[0].upper() + title[1:] if title else "Untitled"
        facts = len(self._ranked(prompt, 9))
        if len(title) < 40 and facts >= 3:
            title = f"{title}: {facts} Things Worth Knowing"
        if len(title) > 60:
            title = title[:57].rsplit(" ", 1)[0].rstrip(",:;") + "..."
        return title

    def _description(self, prompt: Prompt) -> str:
        passages = context_passages(prompt.context)
        first = next((s for p in passages for s in sentences(p)), prompt.subject)
        if len(first) <= 155:
            return first
        return first[:152].rsplit(" ", 1)[0].rstrip(",;:") + "..."


# -- OpenAI-compatible ------------------------------------------------------------------------


class OpenAICompatible:
    """Chat completions over HTTP; usage as the server reports it."""

    def __init__(self, base_url: str, model: str, api_key: str = "",
                 cost_per_1k_tokens: float = 0.0, timeout_s: float = 60.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.cost_per_1k_tokens = cost_per_1k_tokens
        self.timeout_s = timeout_s

    def generate(self, prompt: Prompt) -> Generation:
        body = {"model": self.model, "max_tokens": prompt.max_tokens, "temperature": 0.3,
                "messages": [
                    {"role": "system", "content": "You write for a small publication. Use only "
                     "facts from the context. Answer with the requested text and nothing else."},
                    {"role": "user", "content": prompt.text()}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.load(response)
            text = reply["choices"][0]["message"]["content"].strip()
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise TextGenError(f"{self.url}: {type(exc).__name__}: {exc}") from None
        usage = reply.get("usage") or {}
        tokens = usage.get("total_tokens") or estimate_tokens(prompt.text()) + estimate_tokens(text)
        return Generation(text, int(tokens), tokens / 1000 * self.cost_per_1k_tokens,
                          reply.get("model") or self.model)


class WithFallback:
    """`primary`, or `Offline` for any call the primary cannot answer."""

    def __init__(self, primary: Backend) -> None:
        self.primary, self.offline = primary, Offline()
        self.model = primary.model

    def generate(self, prompt: Prompt) -> Generation:
        try:
            return self.primary.generate(prompt)
        except TextGenError as exc:
            print(f"textgen: {exc}; writing this {prompt.kind} offline", file=sys.stderr)
            return self.offline.generate(prompt)


def backend_from_env(env: Mapping[str, str] = os.environ) -> Backend:
    """Offline unless WATCHKEEPER_LLM_BASE_URL names an OpenAI-compatible server."""
    base_url = env.get("WATCHKEEPER_LLM_BASE_URL", "")
    if not base_url:
        return Offline()
    return WithFallback(OpenAICompatible(
        base_url, env.get("WATCHKEEPER_LLM_MODEL", "gpt-4o-mini"),
        api_key=env.get("WATCHKEEPER_LLM_API_KEY", ""),
        cost_per_1k_tokens=float(env.get("WATCHKEEPER_LLM_COST_PER_1K_TOKENS", "0") or 0),
        timeout_s=float(env.get("WATCHKEEPER_LLM_TIMEOUT_S", "60") or 60)))


class Meter:
    """Generates through `backend` and reports each generation's usage at once (the spend
    limit must see a runaway loop while it runs, not after), keeping the run's totals."""

    def __init__(self, backend: Backend, report: Callable[[int, float, str], None]) -> None:
        self.backend, self.report = backend, report
        self.tokens, self.cost, self.calls = 0, 0.0, 0

    def generate(self, prompt: Prompt) -> str:
        gen = self.backend.generate(prompt)
        self.tokens += gen.tokens
        self.cost += gen.cost
        self.calls += 1
        self.report(gen.tokens, gen.cost, gen.model)
        return gen.text
