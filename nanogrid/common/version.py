"""The agent's version, for ``--version``, the start line and /status: a checkout's
pyproject.toml when the code runs from one (it may not be the checkout pip installed),
else the installed distribution's."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "nanogrid-worker"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _version() -> str:
    try:
        with PYPROJECT.open("rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


def version_line(prog: str) -> str:
    """What ``PROG --version`` prints."""
    return f"{prog} {VERSION} ({DISTRIBUTION})"
