"""Loading a config file the way the supervisor accepts it, at start, on ``--check`` and on
SIGHUP alike: valid keys and values, the runner's own checks, and the AWS region pinned."""

from __future__ import annotations

import runners
from common import awsregion
from common.config import Config, load


def load_checked(path: str) -> tuple[Config, awsregion.Region]:
    """The config at ``path`` with its region resolved once; ConfigError (one line) if not."""
    config = load(path)
    runners.check_config(config)
    region = awsregion.resolve(config)
    return awsregion.pin(config, region), region
