"""analytics: the pipeline's day in one report, from the run history, the outputs and memory.

    analytics.py summarise         today so far -> analytics/day-<date> and analytics/latest
    analytics.py close-day         yesterday, final -> analytics/day-<date>

The report counts runs by agent and outcome (`watchkeeper runs`), outputs by agent and kind,
denied ones apart (`watchkeeper outputs`), and the articles at each stage of the pipeline
(notes, drafts, approved, posted) in the steward. It is emitted as a `report` output only when
its news changed (articles, outputs, the breaker), so a quiet pipeline does not repeat itself.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict

from common import run, say
from textgen import Meter, Prompt

HISTORY_LIMIT = 1000  # the control protocol's maximum per call


def day_bounds(day: dt.date) -> tuple[float, float]:
    start = dt.datetime.combine(day, dt.time()).timestamp()
    return start, start + 86400


def count_runs(runs: list[dict], start: float, end: float) -> dict[str, dict[str, int]]:
    by_agent: dict[str, Counter] = defaultdict(Counter)
    for r in runs:
        if start <= r["started"] < end:
            by_agent[r["agent"]][r["outcome"] or "running"] += 1
            if r.get("degraded"):
                by_agent[r["agent"]]["degraded"] += 1
    return {agent: dict(c) for agent, c in sorted(by_agent.items())}


def count_outputs(outputs: list[dict], start: float, end: float) -> tuple[dict, int]:
    by_agent: dict[str, Counter] = defaultdict(Counter)
    denied = 0
    for o in outputs:
        if start <= o["time"] < end:
            if o["allowed"]:
                by_agent[o["agent"]][o["kind"]] += 1
            else:
                denied += 1
    return {agent: dict(c) for agent, c in sorted(by_agent.items())}, denied


def stages(agent) -> dict[str, int]:
    posted = [e for e in agent.memory.list("community", "posted-")
              if e["value"].get("state") == "posted"]
    return {"notes": len(agent.memory.list("notes")), "drafts": len(agent.memory.list("drafts")),
            "approved": len(agent.memory.list("approved")), "posted": len(posted)}


def facts_text(day: dt.date, runs: dict, outputs: dict, denied: int, pipeline: dict,
               breaker: dict) -> str:
    total = sum(sum(v for k, v in c.items() if k != "degraded") for c in runs.values())
    ok = sum(c.get("succeeded", 0) for c in runs.values())
    running = sum(c.get("running", 0) for c in runs.values())
    degraded = sum(c.get("degraded", 0) for c in runs.values())
    lines = [f"Pipeline day {day.isoformat()}.",
             f"Articles: {pipeline['notes']} notes, {pipeline['drafts']} drafts, "
             f"{pipeline['approved']} approved, {pipeline['posted']} posted.",
             f"Runs: {total} started, {ok} succeeded, {running} running, "
             f"{total - ok - running} did not; "
             f"{degraded} ran degraded.",
             f"Outputs: {sum(sum(c.values()) for c in outputs.values())} allowed, {denied} denied.",
             f"Circuit breaker {breaker['state']}, {breaker['trips_total']} trip(s) in all."]
    for agent, c in runs.items():
        lines.append(f"{agent}: " + ", ".join(f"{n} {k}" for k, n in sorted(c.items())) + ".")
    return "\n".join(lines)


def news(report: dict, me: str) -> tuple:
    """What a reader would call new: not the run counts, and not this agent's own reports."""
    outputs = {a: c for a, c in report.get("outputs", {}).items() if a != me}
    return (outputs, report.get("denied"), report.get("pipeline"), report.get("breaker"),
            report.get("final"))


def report(agent, meter: Meter, day: dt.date, final: bool) -> int:
    start, end = day_bounds(day)
    runs = count_runs(agent.call("runs", limit=HISTORY_LIMIT), start, end)
    outputs, denied = count_outputs(agent.call("outputs", limit=HISTORY_LIMIT), start, end)
    pipeline = stages(agent)
    breaker = agent.call("breaker-status")
    facts = facts_text(day, runs, outputs, denied, pipeline, breaker)
    summary = meter.generate(Prompt("summary", "Summarise the pipeline's day for the team in "
                                    "three sentences.", subject="pipeline articles runs",
                                    context=facts, max_tokens=120))
    key = f"day-{day.isoformat()}"
    value = {"date": day.isoformat(), "final": final, "runs": runs, "outputs": outputs,
             "denied": denied, "pipeline": pipeline, "breaker": breaker["state"],
             "summary": summary, "facts": facts}
    previous = agent.memory.get("analytics", key) or {}
    if news(previous, agent.name) != news(value, agent.name):
        agent.emit("report", f"{key}: {pipeline['posted']} posted, {denied} denied",
                   content="\n".join(facts.splitlines()[:5]))
    agent.memory.put("analytics", key, value)
    if not final:
        agent.memory.put("analytics", "latest", value)
    say(agent, facts.splitlines()[1] + " " + facts.splitlines()[2])
    return 0


def main(agent, meter: Meter, argv: list[str]) -> int:
    today = dt.date.today()
    if argv == ["summarise"]:
        return report(agent, meter, today, final=False)
    if argv == ["close-day"]:
        return report(agent, meter, today - dt.timedelta(days=1), final=True)
    print("usage: analytics.py summarise|close-day", flush=True)
    return 2


if __name__ == "__main__":
    run(main)
