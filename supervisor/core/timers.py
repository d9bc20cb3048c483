"""A heap of monotonic deadlines for the daemon's loop: timeouts, grace periods, backoffs."""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable


class Timer:
    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.clock() + max(0.0, delay_s), callback)
        heapq.heappush(self._heap, (timer.deadline, next(self._counter), timer))
        return timer

    def next_deadline(self) -> float | None:
        """The earliest deadline of a timer still pending, on `clock`."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def time_until_next(self) -> float | None:
        deadline = self.next_deadline()
        return None if deadline is None else max(0.0, deadline - self.clock())

    def run_due(self, call: Callable[..., None] = lambda fn: fn()) -> int:
        """Run every timer whose deadline has passed (through `call`, which may guard
        against a failing callback); return how many ran."""
        ran = 0
        now = self.clock()
        while self._heap and self._heap[0][0] <= now:
            _, _, timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                timer.cancelled = True
                call(timer.callback)
                ran += 1
        return ran
