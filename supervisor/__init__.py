"""watchkeeper: a supervisor daemon for teams of AI agents on one small server."""

__version__ = "0.1.0"
