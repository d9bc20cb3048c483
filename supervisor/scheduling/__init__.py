"""Cron and interval schedules as firings on the loop's timers; catch-up."""
