"""Loading a config file the way the supervisor accepts it, at start, on ``--check`` and on
SIGHUP alike: valid keys and values, the environment's overrides, the runner's own checks,
the paths and the log sink the agent will write, the AWS region and the host's capacity
budget computed once and pinned, so every worker uses the same. Whatever a start or a reload
would fail on is refused here, before anything is replaced."""

from __future__ import annotations

from pathlib import Path

from nanogrid import runners
from nanogrid.common import awsregion, capacity, logsink
from nanogrid.common.config import Config, load
from nanogrid.common.errors import ConfigError
from nanogrid.common.writable import check_dir
from nanogrid.worker import tracing


def load_checked(path: str) -> tuple[Config, awsregion.Region]:
    """The config at ``path`` with its region and capacity resolved once; ConfigError (one
    line) if not."""
    config = load(path)
    runners.check_config(config)
    if config.tracing.otlp_endpoint is not None and not tracing.sdk_installed():
        raise ConfigError(tracing.SDK_MISSING)
    for key in ("code_cache_dir", "outbox_dir"):
        check_dir(f"paths.{key}", Path(getattr(config.paths, key)))
    logsink.check(config.log)
    region = awsregion.resolve(config)
    config = capacity.pin(config, capacity.resolve(config))
    return awsregion.pin(config, region), region
