"""dockerspaces: an event-driven reverse proxy that starts Docker containers on demand."""

__version__ = "0.1.0"
