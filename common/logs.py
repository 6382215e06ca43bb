"""Loguru set-up: every line names its process role, and task lines their requestId."""

from __future__ import annotations

import sys

from loguru import logger

from .config import LogConfig

FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[role]} | {extra[requestId]} | {message}"
)


def setup(config: LogConfig, role: str) -> None:
    """(Re)configure the sinks for this process; ``role`` is e.g. ``arbiter`` or ``worker-1``."""
    logger.remove()
    logger.configure(extra={"role": role, "requestId": "-"})
    logger.add(
        sys.stderr,
        level=config.level,
        format=FORMAT,
        serialize=config.json,
        backtrace=False,
        diagnose=False,
    )
    if config.file:
        logger.add(
            config.file,
            level=config.level,
            format=FORMAT,
            serialize=config.json,
            rotation=config.rotation,
            retention=config.retention,
            enqueue=False,
            backtrace=False,
            diagnose=False,
        )
