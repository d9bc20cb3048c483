"""`watchkeeper top`: the pipeline live, full-screen, over SSH, in 80x24.

What it shows comes from the control socket every `--interval-s` (status, runs, outputs):
the daemon line and a halt's reason and reset command, one row per agent (state, breaker
window fill, heartbeat age, last run) with its timeline of the last hours, one cell per
interval coloured by the outcome of the runs in it, and the recent events. Keys act on the
selected agent: p pause, r resume, s start now; ↑/↓ select; q quits.

The standard library's curses: nothing to install, and it is imported only by this verb
so the agents' verbs stay fast. `frame()` is pure (lines of styled segments), so the
layout is tested without a terminal and curses only draws it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from .views import ago, bar, span, undelivered_alerts, window_fill, window_near_limit

# Segment styles; curses maps them to colours, NO_COLOR to plain text.
PLAIN, DIM, GOOD, BAD, WARN, BOLD, SELECTED = "plain", "dim", "good", "bad", "warn", "bold", "sel"
CELL = {"succeeded": ("#", GOOD), "running": (">", WARN), None: (".", DIM)}
FAILED_CELL = ("x", BAD)
NAME_W, STATE_W, FILL_W, BEAT_W = 10, 9, 13, 8


@dataclass
class View:
    """What the screen shows, fetched once per refresh."""

    status: dict
    runs: list[dict]
    outputs: list[dict]
    now: float
    selected: int = 0
    message: str = ""
    hours: float = 3.0
    paused_screen: bool = False
    command: str = "watchkeeper"  # how the operator runs watchkeeper, for the reset line
    agents: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.agents = [a["agent"] for a in self.status["agents"]]


Line = list[tuple[str, str]]


def frame(view: View, width: int, height: int) -> list[Line]:
    """The whole screen as lines of (text, style), fitted to width x height."""
    lines = header(view, width)
    timeline_w = max(8, width - (NAME_W + STATE_W + FILL_W + BEAT_W + 6))  # 1 col spare
    lines.append([(f"{'AGENT':<{NAME_W}} {'STATE':<{STATE_W}} {'OUTPUTS':<{FILL_W}} "
                   f"{'BEAT':<{BEAT_W}} last {view.hours:g} h, "
                   f"{view.hours * 60 / timeline_w:.0f} min per cell", DIM)])
    for index, agent in enumerate(view.status["agents"]):
        lines.append(agent_row(view, agent, index, timeline_w))
    keys = [("p", BOLD), (" pause  ", DIM), ("r", BOLD), (" resume  ", DIM), ("s", BOLD),
            (" start now  ", DIM), ("↑↓", BOLD), (" select  ", DIM), ("q", BOLD),
            (" quit", DIM)]
    footer: list[Line] = [[(view.message, WARN)]] if view.message else []
    footer.append(keys)
    room = height - len(lines) - len(footer) - 1
    if room > 0:
        lines.append([("RECENT", DIM)])
        lines.extend([[(text, style)] for text, style in recent_events(view)][:room - 1])
    lines = lines[:max(0, height - len(footer))]
    lines.extend([[]] * (height - len(lines) - len(footer)))
    return [fit(line, width) for line in lines + footer]


def header(view: View, width: int) -> list[Line]:
    d = view.status["daemon"]
    breaker = view.status.get("extensions", {}).get("breaker", {}).get("state", "?")
    memory = view.status.get("memory")
    top: Line = [(f"watchkeeper pid {d['pid']} up {span(d['uptime_s'])}  ", BOLD),
                 ("breaker ", PLAIN), (breaker, BAD if breaker != "closed" else GOOD)]
    if memory:
        top += [(f"  memory {bar(memory['percent_used'], memory['act_percent'], 10)} "
                 f"{memory['percent_used']:.0f}% {memory['level']}", PLAIN)]
    if view.paused_screen:
        top.append(("  [screen paused]", WARN))
    lines = [top]
    if d.get("halted"):
        since = f" {ago(d.get('halted_since'), view.now)}" if d.get("halted_since") else ""
        lines.append([(f"HALTED{since}: {d.get('halt_reason') or 'circuit breaker open'}",
                       BAD)])
        pending = undelivered_alerts(view.status)
        alert = f"; alerts undelivered: {pending}" if pending is not None else ""
        lines.append([(f'reset: {view.command} breaker reset --reason "..."' + alert, WARN)])
    return lines


def agent_row(view: View, agent: dict, index: int, timeline_w: int) -> Line:
    state = agent["state"] + (" ⏸" if agent["paused"] else "")
    if agent["degraded"]:
        state += " !"
    beat = agent.get("heartbeat_age_s")
    beat_text = "-" if beat is None else span(beat)
    selected = index == view.selected
    window = agent.get("breaker_window")
    name_style = SELECTED if selected else BOLD
    row: Line = [(f"{agent['agent'][:NAME_W]:<{NAME_W}}", name_style),
                 (f" {state[:STATE_W]:<{STATE_W}}", WARN if agent["degraded"] else PLAIN),
                 (f" {window_fill(window, painted=False)[:FILL_W]:<{FILL_W}}",
                  BAD if window_near_limit(window) else PLAIN),
                 (f" {beat_text[:BEAT_W]:<{BEAT_W}} ", DIM)]
    return row + timeline(view, agent["agent"], timeline_w)


def timeline(view: View, agent: str, cells: int) -> Line:
    """One cell per interval over the last `hours`, oldest left: the worst outcome of the
    runs that overlap it (failed beats running beats succeeded); '.' when none did."""
    span_s = view.hours * 3600
    cell_s = span_s / cells
    start = view.now - span_s
    outcome: list[str | None] = [None] * cells
    for run in view.runs:
        if run["agent"] != agent:
            continue
        ended = run["ended"] or view.now
        first = int((run["started"] - start) // cell_s)
        last = int((ended - start) // cell_s)
        for i in range(max(first, 0), min(last, cells - 1) + 1):
            outcome[i] = _worse(outcome[i], run["outcome"] if run["ended"] else "running")
    segments: Line = []
    for value in outcome:
        text, style = CELL.get(value, FAILED_CELL)
        if segments and segments[-1][1] == style:
            segments[-1] = (segments[-1][0] + text, style)
        else:
            segments.append((text, style))
    return segments


def _worse(old: str | None, new: str | None) -> str | None:
    rank = {None: 0, "succeeded": 1, "running": 2}
    return old if rank.get(old, 3) >= rank.get(new, 3) else new


def recent_events(view: View) -> list[tuple[str, str]]:
    """Runs that ended and outputs emitted, newest first, as `HH:MM:SS agent │ text`."""
    events = []
    for run in view.runs:
        if run["ended"]:
            ok = run["outcome"] == "succeeded"
            exit_text = f"signal {run['signal']}" if run["signal"] else f"exit {run['exit_code']}"
            events.append((run["ended"], run["agent"], f"run {run['outcome']} ({exit_text})",
                           DIM if ok else BAD))
    for out in view.outputs:
        events.append((out["time"], out["agent"], f"{out['kind']}: {out['summary']}",
                       PLAIN if out["allowed"] else BAD))
    trip = view.status.get("extensions", {}).get("breaker", {}).get("last_trip")
    if trip:
        events.append((trip["time"], trip["agent"], f"BREAKER TRIPPED: {trip['limit']}", BAD))
    events.sort(key=lambda e: e[0], reverse=True)
    return [(f"{time.strftime('%H:%M:%S', time.localtime(ts))} {agent:<{NAME_W}} │ {text}",
             style) for ts, agent, text, style in events]


def fit(line: Line, width: int) -> Line:
    """Cut a line's segments to `width` characters (curses fails on the last column)."""
    out, used = [], 0
    for text, style in line:
        room = width - 1 - used
        if room <= 0:
            break
        out.append((text[:room], style))
        used += len(text[:room])
    return out


# -- the terminal ----------------------------------------------------------------------------
class Top:
    """The loop: fetch, draw, wait for a key or the next refresh."""

    def __init__(self, client, interval_s: float = 2.0, hours: float = 3.0,
                 command: str = "watchkeeper") -> None:
        self.client, self.interval_s, self.hours = client, interval_s, hours
        self.command = command
        self.selected, self.message, self.frozen = 0, "", False
        self.view: View | None = None

    def fetch(self) -> View:
        status = self.client.call("status")
        runs = self.client.call("runs", limit=500)
        outputs = self.client.call("outputs", limit=20)
        return View(status, runs, outputs, time.time(), hours=self.hours, command=self.command)

    def run(self, screen) -> int:
        import curses

        styles = _styles(curses)
        curses.curs_set(0)
        screen.timeout(int(self.interval_s * 1000))
        while True:
            if not self.frozen or self.view is None:
                self.view = self.fetch()
            view = self.view
            view.selected = min(self.selected, max(0, len(view.agents) - 1))
            view.message, view.paused_screen = self.message, self.frozen
            self.draw(screen, view, styles)
            key = screen.getch()
            if key in (ord("q"), 27):
                return 0
            self.on_key(key, view, curses)

    def draw(self, screen, view: View, styles: dict) -> None:
        height, width = screen.getmaxyx()
        screen.erase()
        for y, line in enumerate(frame(view, width, height)):
            x = 0
            for text, style in line:
                screen.addstr(y, x, text, styles.get(style, 0))
                x += len(text)
        screen.refresh()

    def on_key(self, key: int, view: View, curses) -> None:
        if key == curses.KEY_UP:
            self.selected = max(0, self.selected - 1)
        elif key == curses.KEY_DOWN:
            self.selected = min(len(view.agents) - 1, self.selected + 1)
        elif key == ord(" "):
            self.frozen = not self.frozen
        elif key in (ord("p"), ord("r"), ord("s")) and view.agents:
            self.act(chr(key), view.agents[view.selected])

    def act(self, key: str, agent: str) -> None:
        from ..errors import ControlError

        verb = {"p": "pause", "r": "resume", "s": "start-now"}[key]
        try:
            result = self.client.call(verb, agent=agent)
        except ControlError as exc:
            self.message = f"{verb} {agent}: {exc}"
            return
        detail = result.get("result", "done") if verb == "start-now" else "done"
        self.message = f"{verb} {agent}: {detail}"
        self.frozen = False


def _styles(curses) -> dict:
    styles = {BOLD: curses.A_BOLD, DIM: curses.A_DIM, SELECTED: curses.A_REVERSE}
    if "NO_COLOR" in os.environ or not curses.has_colors():
        return styles
    curses.start_color()
    curses.use_default_colors()
    for number, (style, colour) in enumerate(((GOOD, curses.COLOR_GREEN),
                                             (BAD, curses.COLOR_RED),
                                             (WARN, curses.COLOR_YELLOW)), start=1):
        curses.init_pair(number, colour, -1)
        styles[style] = curses.color_pair(number)
    return styles


def main(client, interval_s: float = 2.0, hours: float = 3.0,
         command: str = "watchkeeper") -> int:
    import curses

    top = Top(client, interval_s, hours, command)
    top.fetch()  # fail before the screen is taken: "not running" goes to a plain terminal
    return curses.wrapper(top.run)
