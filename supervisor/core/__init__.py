"""Shared types and primitives every room uses: states, firings, cron fields, timers, setting ranges, safe files."""
