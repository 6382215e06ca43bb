"""What this host offers the configured runner, found at start and on reload: the isolation
its sandboxes get, the runtimes that can start, and sandboxes an earlier agent left."""

from __future__ import annotations

from typing import Any

from loguru import logger

from nanogrid import runners
from nanogrid.common.config import Config


def isolation(config: Config) -> dict[str, Any]:
    """/status ``isolation``: what the runner's sandboxes are isolated by here; one warning
    line naming what is not."""
    found = runners.isolation(config)
    warning = found.warning(config.runner)
    if warning:
        logger.warning(warning)
    return {config.runner: found.as_status()}


def runtimes(config: Config) -> dict[str, dict[str, Any]]:
    """/status ``runtimes``; each runtime that cannot start named once, in a line of its own."""
    try:
        problems = runners.runtime_problems(config)
    except Exception as exc:  # noqa: BLE001 - a failed check must not stop the agent
        logger.warning(f"could not check the runtimes: {exc}")
        problems = {}
    for name, problem in problems.items():
        logger.error(f"runtime {name!r} cannot start on this host: {problem}")
    return {
        name: {"available": name not in problems, "problem": problems.get(name)}
        for name in config.runtimes
    }


def remove_leftovers(config: Config, whose: str) -> None:
    """Remove the sandboxes ``whose`` left behind (an earlier agent, or this one stopping)."""
    try:
        removed = runners.cleanup_stale(config)
    except Exception as exc:  # noqa: BLE001 - a cleanup failure must not stop the agent
        logger.warning(f"could not remove sandboxes left by {whose}: {exc}")
        return
    if removed:
        logger.info(f"removed {removed} sandboxes left by {whose}")
