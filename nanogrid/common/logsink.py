"""The log sinks a config asks for, checked before they replace the ones in use: loguru's own
reading of ``log.rotation``, and a ``log.file`` the agent can write. ``install`` turns a sink
that still fails when it is made into a ConfigError, so a start exits with the config code
and a reload keeps its old config (and logs)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from loguru import logger

from . import logs
from .config import LogConfig
from .errors import ConfigError
from .writable import check_file

NEVER = 10**6
"""A level no message reaches: the sink made only to check its settings writes nothing."""


def check(config: LogConfig) -> None:
    """ConfigError (one line naming the key) unless ``config``'s sinks can be made."""
    if config.file is None:
        return
    check_file("log.file", Path(config.file))
    try:
        handler = logger.add(config.file, level=NEVER, rotation=config.rotation,
                             retention=config.retention, delay=True)
    except (ValueError, TypeError):
        raise ConfigError(
            f"log.rotation: cannot read {config.rotation!r}: use a size ('50 MB'), an "
            "interval ('1 day', '12 hours') or a time ('00:00', 'monday at 12:00')"
        ) from None
    logger.remove(handler)


def install(config: LogConfig, role: str) -> None:
    """``logs.setup``; ConfigError (one line) when a sink cannot be made."""
    try:
        logs.setup(config, role)
    except (OSError, ValueError, TypeError) as exc:
        logs.setup(LogConfig(level=config.level), role)  # stderr only: say it somewhere
        raise ConfigError(f"log.file: cannot log to {config.file}: {exc}") from None


def swap(new: LogConfig, old: LogConfig, role: str) -> None:
    """The sinks of ``new`` in place of ``old``'s; when one of them fails to open, ``old``'s
    again (stderr alone if they fail too) and ConfigError."""
    try:
        install(new, role)
    except ConfigError:
        with contextlib.suppress(ConfigError):
            install(old, role)
        raise
