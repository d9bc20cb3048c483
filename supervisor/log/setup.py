"""Logging setup: short lines for a person in a terminal (log/console.py), JSON lines otherwise,
journald fields under systemd. Configured once by the command that needs it, never at
import time."""

from __future__ import annotations

import logging
import os
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}


def choose_format(requested: str) -> str:
    """`auto` picks journal under systemd, console on a terminal and JSON otherwise."""
    if requested != "auto":
        return requested
    try:
        from ..systemd.journal import journal_stream_matches
    except ImportError:  # pragma: no cover - journal support is optional
        journal_stream_matches = None
    if journal_stream_matches is not None and journal_stream_matches():
        return "journal"
    return "console" if sys.stderr.isatty() else "json"


def configure(fmt: str = "auto", level: str = "info", verbose: bool = False) -> str:
    """`verbose` shows the console's bookkeeping events too (`watchkeeper run -v`)."""
    fmt = choose_format(fmt)
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "journal":
        from ..systemd.journal import JournalRenderer

        processors.append(JournalRenderer())
    elif fmt == "console":
        from .console import PersonConsole

        colors = sys.stderr.isatty() and "NO_COLOR" not in os.environ
        processors.append(PersonConsole(verbose=verbose, colors=colors))
    else:
        processors.append(structlog.processors.JSONRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    return fmt
