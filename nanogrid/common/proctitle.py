"""Process titles, as gunicorn and celery set theirs: ``ps`` and ``top`` show
``nanogrid: supervisor`` and ``nanogrid: worker 0`` instead of N copies of the same python
command line (setproctitle rewrites the command line, and the kernel's short name too).
The sandboxes' servers name themselves (nanogrid/runners/forkserver/title.py, the node server)."""

from __future__ import annotations

from setproctitle import setproctitle

PREFIX = "nanogrid: "


def set_title(what: str, config_path: str | None = None) -> None:
    """This process shows as ``nanogrid: <what> [<config path>]``: the path tells two agents
    on one host apart (gunicorn names its app the same way)."""
    setproctitle(PREFIX + what + (f" [{config_path}]" if config_path else ""))
