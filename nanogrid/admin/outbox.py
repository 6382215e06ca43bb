"""``nanogrid-outbox``: the results a host's agent could not write to Redis yet.

The outbox (``paths.outbox_dir``, nanogrid/worker/outbox.py) holds one file per result: waiting ones
(``<id>.json``, which the agent sends as soon as Redis takes writes) and ones set aside
after Redis refused them 5 times while it took other writes (``.failed-<id>.json``: an ACL,
a full memory; the agent tries them again every 10 minutes). ``ls`` shows both; ``resend``
puts set-aside ones back in line and sends everything waiting now, with the agent's own
publish (the first result stored for a requestId stands), whether the agent runs or not.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from loguru import logger

from nanogrid.admin import commandline
from nanogrid.common import environ
from nanogrid.common.config import LogConfig, load
from nanogrid.common.errors import ConfigError
from nanogrid.common.exitcodes import EXIT_CONFIG, EXIT_OK
from nanogrid.common.logs import setup
from nanogrid.worker.outbox import FAILED_PREFIX
from nanogrid.worker.result import Result
from nanogrid.worker.resultstore import ResultStore

PROG = "nanogrid-outbox"
EXIT_ERROR = 1


def main(argv: list[str] | None = None) -> int:
    parser = commandline.parser(PROG, __doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ls", help="waiting and set-aside results: state, age, requestId")
    resend = commands.add_parser("resend", help="send set-aside and waiting results now")
    resend.add_argument("request_ids", nargs="*", metavar="REQUEST_ID",
                        help="set-aside ones to put back (default: all of them)")
    args = parser.parse_args(argv)
    try:
        config = load(environ.config_path(args.config))
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    directory = Path(config.paths.outbox_dir)
    if args.command == "ls":
        return list_entries(directory)
    setup(LogConfig(level="WARNING"), PROG)  # the store's refusals, on stderr
    store = ResultStore(config.redis.url, config.redis.result_ttl_seconds, directory)
    try:
        return resend_entries(store, directory, set(args.request_ids))
    finally:
        store.close()
        logger.remove()


def entries(directory: Path) -> list[tuple[str, Path]]:
    """(state, file) of every result in the outbox, oldest first."""
    try:
        files = sorted(directory.iterdir(), key=lambda path: path.stat().st_mtime)
    except FileNotFoundError:
        return []
    found = []
    for path in files:
        if path.name.startswith(FAILED_PREFIX):
            found.append(("set-aside", path))
        elif path.name.endswith(".json") and not path.name.startswith("."):
            found.append(("waiting", path))
    return found


def list_entries(directory: Path) -> int:
    now = time.time()
    found = entries(directory)
    for state, path in found:
        try:
            result = Result.from_json(path.read_bytes())
            what = f"{result.request_id}\t{result.function_id}\t{result.status}"
        except (OSError, ValueError, TypeError):
            what = f"{path.name}\t-\tunreadable"
        print(f"{state}\t{now - path.stat().st_mtime:.0f}s\t{what}")
    print(f"{len(found)} results in {directory}", file=sys.stderr)
    return EXIT_OK


def resend_entries(store: ResultStore, directory: Path, request_ids: set[str]) -> int:
    put_back = 0
    for state, path in entries(directory):
        entry = path.name.removeprefix(FAILED_PREFIX)
        if state != "set-aside" or request_ids and entry.removesuffix(".json") not in request_ids:
            continue
        if not (directory / entry).exists():
            path.rename(directory / entry)
            put_back += 1
    if not store.writable():
        print(f"{PROG}: Redis cannot take results now ({store.trouble()}); {put_back} "
              "set-aside results put back in line for the agent", file=sys.stderr)
        return EXIT_ERROR
    sent = store.flush_outbox()
    left = entries(directory)
    print(f"{sent} results sent ({put_back} of them had been set aside); {len(left)} left in "
          f"{directory}" + (" (refused again: see the warnings above)" if left else ""))
    return EXIT_OK if not left else EXIT_ERROR
