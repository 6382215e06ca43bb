"""Whether the agent can make and write a path its config names, checked before any process
depends on it (``--check``, start and reload alike). Nothing is left behind: a file is made
and removed at once in the closest directory that exists (access() tells root yes to all,
even on /proc or a read-only mount)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import ConfigError


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (what a ``mkdir -p`` would start from)."""
    return next(p for p in [path, *path.parents] if p.exists())


def check_dir(key: str, path: Path) -> None:
    """ConfigError naming ``key`` unless ``path`` is, or can be made as, a directory the
    agent writes in."""
    nearest = nearest_existing(path)
    if not nearest.is_dir():
        raise ConfigError(f"{key}: {nearest} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nanogrid-check-", dir=nearest)
    except OSError as exc:
        raise ConfigError(f"{key}: the agent cannot create files in {nearest} ({exc.strerror})") \
            from None
    os.close(fd)
    os.unlink(probe)


def check_file(key: str, path: Path) -> None:
    """ConfigError naming ``key`` unless the agent can append to ``path`` (made, with its
    directories, when missing)."""
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a directory, not a file")
    if not path.exists():
        check_dir(key, path.parent)
        return
    try:  # append mode creates nothing and truncates nothing
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_NONBLOCK))
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write {path}: {exc.strerror}") from None
