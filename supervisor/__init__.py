"""The NanoGrid worker agent: supervisor, workers and their adapters (see README.md)."""
