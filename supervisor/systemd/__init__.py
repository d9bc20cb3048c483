"""Talking to systemd: sd_notify, journald, the daemon as a service."""
