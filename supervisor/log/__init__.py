"""Logging setup: console lines for a person, JSON lines, journald fields."""
