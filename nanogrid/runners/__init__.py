"""Sandbox runners, chosen by name from ``RUNNERS``: ``docker`` (warm containers) and
``process`` (local fork-server sandboxes).

Each is imported only when chosen, so a host without Docker never loads the Docker SDK.
"""

from __future__ import annotations

import importlib

from nanogrid.common.config import Config
from nanogrid.common.errors import ConfigError

from .base import Runner
from .isolation import Isolation
from .lending import SandboxBoard

RUNNERS = {
    "docker": "nanogrid.runners.docker:DockerRunner",
    "process": "nanogrid.runners.process:ProcessRunner",
}
"""Runner name (the config's ``runner``) -> ``module:class``."""


def runner_class(name: str) -> type[Runner]:
    """The runner class registered as ``name``; ConfigError for an unknown one."""
    try:
        module, _, cls = RUNNERS[name].partition(":")
    except KeyError:
        raise ConfigError(
            f"runner: must be one of {', '.join(RUNNERS)}, got {name!r}"
        ) from None
    runner: type[Runner] = getattr(importlib.import_module(module), cls)
    return runner


def create_runner(config: Config, worker_index: int, board: SandboxBoard | None = None
                  ) -> Runner:
    """The runner the config names, for one worker: its slice of the warm pools, their idle
    sandboxes on the host's ``board`` (None: a board of its own, for a worker alone)."""
    return runner_class(config.runner)(config, worker_index, board)


def check_config(config: Config) -> None:
    """The runner's own checks of a loaded config (ConfigError, one line), for --check and
    SIGHUP: a config the workers could not boot on is refused before they are replaced."""
    runner_class(config.runner).check_config(config)


def isolation(config: Config) -> Isolation:
    """What the configured runner's sandboxes are isolated by on this host (probed)."""
    return runner_class(config.runner).isolation(config)


def runtime_problems(config: Config) -> dict[str, str]:
    """The configured runtimes that cannot start on this host -> why (one line each)."""
    return runner_class(config.runner).runtime_problems(config)


def cleanup_stale(config: Config) -> int:
    """Remove sandboxes an earlier agent on this host left behind; returns how many."""
    return runner_class(config.runner).remove_stale()
