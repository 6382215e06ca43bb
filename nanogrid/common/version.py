"""The agent's version, for ``--version``, the start line, /status and ``nanogrid_build_info``:
``nanogrid.__version__``, the one place it is set (pyproject.toml reads it from there), so a
checkout and an installed wheel each say the version of the code that runs."""

from __future__ import annotations

from nanogrid import __version__

DISTRIBUTION = "nanogrid-worker"
VERSION = __version__


def version_line(prog: str) -> str:
    """What ``PROG --version`` prints."""
    return f"{prog} {VERSION} ({DISTRIBUTION})"
