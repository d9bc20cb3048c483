"""The breaker's sliding windows: what each agent did recently, in bounded memory.

Windows slide: each key keeps the timestamps of its newest `limit + 1` events, which is all a
verdict needs, so memory per key is bounded by its limit and not by the event rate. Spend
windows merge reports that come close together for the same reason. A window that finds its
limit changed (config reload) is rebuilt with the new limit and keeps its timestamps.

Timestamps are on the breaker's monotonic clock; counting only, no verdicts (`rules.py`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

_SPEND_GRAIN = 512  # a spend window holds at most this many merged entries (+1)


class EventWindow:
    """Timestamps of one key's newest `limit + 1` events, oldest first."""

    __slots__ = ("limit", "window_s", "stamps")

    def __init__(self, limit: int, window_s: float, stamps: Iterable[float] = ()) -> None:
        self.limit, self.window_s = limit, window_s
        self.stamps: deque[float] = deque(stamps, maxlen=limit + 1)

    def fits(self, limit: int, window_s: float) -> bool:
        return self.limit == limit and self.window_s == window_s

    def prune(self, now: float) -> int:
        cutoff, stamps = now - self.window_s, self.stamps
        while stamps and stamps[0] <= cutoff:
            stamps.popleft()
        return len(stamps)

    def add(self, now: float) -> int:
        """Record one event and return how many fall in the window (capped at limit + 1)."""
        self.stamps.append(now)
        return self.prune(now)


class SpendWindow:
    """Token and cost sums over a sliding window.

    Reports closer together than window_s/512 merge into one entry that expires with its
    newest report, so memory stays bounded and the sums can only over-count, never under-count.
    """

    __slots__ = ("window_s", "entries", "tokens", "cost")

    def __init__(self, window_s: float, entries: Iterable[list[float]] = ()) -> None:
        self.window_s = window_s
        self.entries: deque[list[float]] = deque()  # [first_ts, last_ts, tokens, cost]
        self.tokens, self.cost = 0, 0.0
        for first, last, tokens, cost in entries:
            self.entries.append([first, last, tokens, cost])
            self.tokens += int(tokens)
            self.cost += cost

    def prune(self, now: float) -> None:
        cutoff, entries = now - self.window_s, self.entries
        while entries and entries[0][1] <= cutoff:
            _, _, tokens, cost = entries.popleft()
            self.tokens -= int(tokens)
            self.cost -= cost
        if not entries:
            self.tokens, self.cost = 0, 0.0  # drop float drift from the subtractions

    def add(self, now: float, tokens: int, cost: float) -> None:
        self.prune(now)
        last = self.entries[-1] if self.entries else None
        if last is not None and now - last[0] < self.window_s / _SPEND_GRAIN:
            last[1], last[2], last[3] = now, last[2] + tokens, last[3] + cost
        else:
            self.entries.append([now, now, tokens, cost])
        self.tokens += tokens
        self.cost += cost

    def resized(self, window_s: float) -> SpendWindow:
        """This window, or a copy of its entries under a new length."""
        return self if window_s == self.window_s else SpendWindow(window_s, self.entries)


class BreakerWindows:
    """Every window one breaker keeps, with the summaries and probe counts a trip reports."""

    __slots__ = ("counts", "hashes", "spend", "pipeline_spend", "summaries", "probes")

    def __init__(self, pipeline_window_s: float) -> None:
        self.counts: dict[tuple[str, str, str], EventWindow] = {}  # (rule, agent, kind)
        # (agent, content hash), least recently seen first
        self.hashes: OrderedDict[tuple[str, str], EventWindow] = OrderedDict()
        self.spend: dict[str, SpendWindow] = {}
        self.pipeline_spend = SpendWindow(pipeline_window_s)
        self.summaries: dict[str, deque[str]] = {}
        self.probes: dict[str, int] = {}

    def count(self, key: tuple[str, str, str], limit: int, window_s: float, now: float) -> int:
        """Record one event under `key`; returns how many fall in its window."""
        window = self.counts.get(key)
        if window is None or not window.fits(limit, window_s):
            window = self.counts[key] = EventWindow(limit, window_s,
                                                    window.stamps if window else ())
        return window.add(now)

    def count_hash(self, key: tuple[str, str], limit: int, window_s: float, now: float,
                   max_tracked: int) -> int:
        """Record one sighting of (agent, content hash); returns how many fall in its window."""
        hashes = self.hashes
        window = hashes.pop(key, None)
        if window is None or not window.fits(limit, window_s):
            window = EventWindow(limit, window_s, window.stamps if window else ())
        hashes[key] = window  # re-inserted last: the dict stays ordered by last sighting
        # An agent emitting a stream of distinct outputs must not grow this without end; the
        # output limit catches such a stream long before this cap drops a live hash.
        while len(hashes) > max_tracked:
            hashes.popitem(last=False)
        return window.add(now)

    def add_spend(self, agent: str, window_s: float, now: float, tokens: int,
                  cost: float) -> SpendWindow:
        """Add one usage report to the agent's spend window and return that window."""
        window = self.spend.get(agent)
        window = self.spend[agent] = (SpendWindow(window_s) if window is None
                                      else window.resized(window_s))
        window.add(now, tokens, cost)
        return window

    def add_pipeline_spend(self, window_s: float, now: float, tokens: int,
                           cost: float) -> SpendWindow:
        """Add one usage report to the whole pipeline's spend window and return that window."""
        window = self.pipeline_spend = self.pipeline_spend.resized(window_s)
        window.add(now, tokens, cost)
        return window

    def remember_summary(self, agent: str, summary: str, kept: int) -> None:
        self.summaries.setdefault(agent, deque(maxlen=kept)).append(summary)

    def keep_summaries(self, kept: int) -> None:
        """Keep at most `kept` summaries per agent from now on (config reload)."""
        for agent, summaries in list(self.summaries.items()):
            self.summaries[agent] = deque(summaries, maxlen=kept)

    def count_probe(self, agent: str) -> int:
        """Count one output made while half-open; returns the agent's probes so far."""
        self.probes[agent] = self.probes.get(agent, 0) + 1
        return self.probes[agent]

    def sweep(self, now: float) -> None:
        """Drop expired timestamps, and every window left empty."""
        for table in (self.counts, self.hashes):
            for key in [k for k, w in table.items() if w.prune(now) == 0]:
                del table[key]
        for window in (*self.spend.values(), self.pipeline_spend):
            window.prune(now)
        for agent in [a for a, w in self.spend.items() if not w.entries]:
            del self.spend[agent]

    def footprint(self) -> dict[str, int]:
        """Counts of tracked keys and stored timestamps, for metrics and the bounded-memory test."""
        return {
            "windows": len(self.counts),
            "hashes": len(self.hashes),
            "stamps": sum(len(w.stamps) for w in (*self.counts.values(),
                                                  *self.hashes.values())),
            "spend_entries": len(self.pipeline_spend.entries)
            + sum(len(w.entries) for w in self.spend.values()),
        }
