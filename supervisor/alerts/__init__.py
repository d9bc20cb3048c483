"""Alerts: what one is, its sinks, the durable outbox and the sender."""
