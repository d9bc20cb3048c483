"""What `watchkeeper status` and `top` show beyond the pipeline's own snapshot: how close
each agent is to its breaker limit, its heartbeat age, why it is degraded, how full memory
is, and why and since when the pipeline is halted.

A feature that extends the status snapshot; it only reads (the loop owns every state it
looks at, and status is answered from the loop).
"""

from __future__ import annotations

import time

from ..core.feature import Feature, Services
from ..health.heartbeat import heartbeat_path, load_heartbeat
from .health import Health
from .output_gate import OutputGate


class StatusDetails(Feature):
    name = "status_details"

    def __init__(self) -> None:
        self.services: Services | None = None

    def start(self, services: Services) -> None:
        self.services = services

    def extend_status(self, snapshot: dict) -> None:
        now_wall = time.time()
        for agent in snapshot["agents"]:
            agent.update(self.agent_details(agent["agent"], now_wall))
        snapshot["daemon"].update(self.halt_details())
        snapshot["memory"] = self.memory_details()

    # -- per agent -------------------------------------------------------------------------
    def agent_details(self, name: str, now_wall: float) -> dict:
        rt = self.services.pipeline.agents[name]
        beat = load_heartbeat(heartbeat_path(self.services.state_dir, name)).heartbeat
        return {"breaker_window": self.output_window(name),
                "heartbeat_age_s": round(now_wall - beat.ts, 1) if beat else None,
                "degraded_reason": self.degraded_reason(rt.degraded)}

    def output_window(self, agent: str) -> dict | None:
        """{"outputs": 9, "max_outputs": 10, "window_s": 60}: the agent's outputs rule."""
        gate = self.services.features.find(OutputGate)
        if gate is None or gate.breaker is None:
            return None
        return gate.breaker.output_window_fill(agent)

    def degraded_reason(self, upstreams: list[str]) -> str | None:
        """'upstream research: its last run failed; upstream content degraded by research'."""
        if not upstreams:
            return None
        agents = self.services.pipeline.agents
        parts = []
        for chain in upstreams:
            name, _, cause = chain.partition("<-")
            rt = agents.get(name)
            why = (f"degraded by {cause.replace('<-', ' <- ')}" if cause
                   else "its last run failed" if rt and rt.last_outcome not in (None, "succeeded")
                   else "heartbeat stale or missing")
            parts.append(f"{name}: {why}")
        return "upstream " + "; upstream ".join(parts)

    # -- the daemon ------------------------------------------------------------------------
    def halt_details(self) -> dict:
        pipeline = self.services.pipeline
        gate = self.services.features.find(OutputGate)
        trip = gate.breaker.last_trip if gate is not None and gate.breaker is not None else None
        if not pipeline.halted:
            return {"halt_reason": None, "halted_since": None}
        reason = (f"circuit breaker tripped by {trip.agent}: {trip.count:g} seen, limit "
                  f"{trip.limit}" if trip else "circuit breaker open")
        return {"halt_reason": reason, "halted_since": trip.time if trip else None}

    def memory_details(self) -> dict | None:
        health = self.services.features.find(Health)
        guard = health.guard if health is not None else None
        if guard is None:
            return None
        reading = guard.system_reading()
        s = guard.settings
        return {"level": guard.level.value, "percent_used": round(reading.percent_used, 1),
                "warn_percent": s.warn_percent, "act_percent": s.act_percent}
