"""``nanogrid-supervisor``: validate the config, then run the arbiter (or only validate)."""

from __future__ import annotations

import argparse
import sys

from nanogrid import runners
from nanogrid.common import environ
from nanogrid.common.errors import ConfigError
from nanogrid.common.exitcodes import EXIT_CONFIG, EXIT_OK
from nanogrid.common.version import version_line

from .configcheck import load_checked

PROG = "nanogrid-supervisor"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="NanoGrid worker agent: a supervisor forking N workers.")
    parser.add_argument("-c", "--config",
                        help=f"YAML config file (default: ${environ.CONFIG}, else "
                             f"{environ.DEFAULT_CONFIG_PATH})")
    parser.add_argument("--check", action="store_true",
                        help="only validate the config file: exit 0 when valid, 2 when not")
    parser.add_argument("--version", action="version", version=version_line(PROG))
    args = parser.parse_args(argv)
    try:
        config, region = load_checked(environ.config_path(args.config))
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"{PROG}: {config.path}: OK ({config.workers} workers, runner {config.runner}, "
              f"AWS region {region.name} from {region.source}; capacity "
              f"{config.capacity.memory_mb} MB, {config.capacity.max_concurrent} at once: "
              f"{config.capacity.source})")
        try:
            problems = runners.runtime_problems(config)
        except Exception as exc:  # noqa: BLE001 - a warning's check must not fail --check
            problems = {"(all)": f"could not check the runtimes: {exc}"}
        for name, problem in problems.items():
            print(f"{PROG}: warning: runtime {name!r} cannot start on this host: {problem} "
                  "(not a config error: the other runtimes serve, its tasks fail)")
        return EXIT_OK
    from .arbiter import Arbiter  # imports the worker's dependencies: not needed for --check

    return Arbiter(config).run()
