"""What the admin commands' command lines share: the agent's config file and the version."""

from __future__ import annotations

import argparse

from nanogrid.common import environ
from nanogrid.common.version import version_line


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A command's parser with ``-c/--config`` (found as the agent finds it when not given)
    and ``--version``."""
    made = argparse.ArgumentParser(prog=prog, description=description)
    made.add_argument("-c", "--config", help=f"the agent's config file (default: "
                      f"${environ.CONFIG}, else {environ.DEFAULT_CONFIG_PATH})")
    made.add_argument("--version", action="version", version=version_line(prog))
    return made
