"""The NanoGrid worker agent: one namespace for its packages (common, runners, worker,
supervisor, admin, devtools), so an installed agent adds one top-level module."""

__version__ = "0.1.0"
