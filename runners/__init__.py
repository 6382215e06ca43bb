"""Sandbox runners: ``process`` (local fork-server sandboxes) and ``docker`` (warm containers)."""

from __future__ import annotations

from supervisor.config import Config

from .base import Runner


def create_runner(config: Config, worker_index: int) -> Runner:
    """The runner the config names, for one worker (its slice of the warm pools)."""
    if config.runner == "docker":
        from .docker import DockerRunner

        return DockerRunner(config, worker_index)
    from .process import ProcessRunner

    return ProcessRunner(config, worker_index)


def check_config(config: Config) -> None:
    """The runner's own checks of a loaded config (ConfigError, one line), for --check and
    SIGHUP: a config the workers could not boot on is refused before they are replaced."""
    if config.runner == "docker":
        from .docker import check_config as check_docker

        check_docker(config)


def cleanup_stale(config: Config) -> int:
    """Remove sandboxes an earlier agent on this host left behind; returns how many."""
    from .cgroups import SandboxCgroups

    removed = SandboxCgroups.remove_stale()
    if config.runner == "docker":
        from .docker import remove_agent_containers

        removed += remove_agent_containers()
    return removed
