"""Loading a config file the way the supervisor accepts it, at start, on ``--check`` and on
SIGHUP alike: valid keys and values, the runner's own checks, the AWS region and the host's
capacity budget computed once and pinned, so every worker uses the same."""

from __future__ import annotations

import runners
from common import awsregion, capacity
from common.config import Config, load
from common.errors import ConfigError
from worker import tracing


def load_checked(path: str) -> tuple[Config, awsregion.Region]:
    """The config at ``path`` with its region and capacity resolved once; ConfigError (one
    line) if not."""
    config = load(path)
    runners.check_config(config)
    if config.tracing.otlp_endpoint is not None and not tracing.sdk_installed():
        raise ConfigError(tracing.SDK_MISSING)
    region = awsregion.resolve(config)
    config = capacity.pin(config, capacity.resolve(config))
    return awsregion.pin(config, region), region
