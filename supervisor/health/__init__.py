"""Heartbeat files and the memory guard. Their place in the loop is features/health.py."""
