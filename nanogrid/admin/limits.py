"""``nanogrid-limits``: per-function concurrency caps across all hosts.

A cap is a field of the Redis hash ``nanogrid:concurrency`` (functionId -> cap, the
contract the controller writes too); every agent reads it with each claim, so a change holds
from the next call on, on every host. ``ls`` also shows each function's runs in flight on all
hosts (its slots whose lease has not lapsed).
"""

from __future__ import annotations

import argparse
import os
import sys

import redis

from nanogrid.common import environ
from nanogrid.common.config import from_dict, load
from nanogrid.common.errors import ConfigError
from nanogrid.common.exitcodes import EXIT_CONFIG, EXIT_OK
from nanogrid.common.version import version_line
from nanogrid.worker import rediskeys
from nanogrid.worker.task import FUNCTION_ID

PROG = "nanogrid-limits"
EXIT_ERROR = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Per-function concurrency caps across all hosts.")
    parser.add_argument("--version", action="version", version=version_line(PROG))
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--redis-url", help="default: $NANOGRID_REDIS_URL, else redis.url of "
                       "the config file")
    where.add_argument("-c", "--config", help="the agent's config file (its redis.url); "
                       "default: $NANOGRID_CONFIG, else /etc/nanogrid/worker.yaml if present")
    commands = parser.add_subparsers(dest="command", required=True)
    set_cap = commands.add_parser("set", help="cap a function: at most N runs at once")
    set_cap.add_argument("function_id")
    set_cap.add_argument("cap", type=int, help="0 holds every call of it in the queue")
    commands.add_parser("get", help="a function's cap").add_argument("function_id")
    commands.add_parser("rm", help="remove a function's cap").add_argument("function_id")
    commands.add_parser("ls", help="every cap, with the runs in flight now")
    args = parser.parse_args(argv)
    try:
        client = redis.Redis.from_url(_redis_url(args), socket_timeout=5, decode_responses=True)
        return _run(client, args)
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (redis.RedisError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _run(client: redis.Redis, args: argparse.Namespace) -> int:
    if args.command == "ls":
        caps = {_text(k): _text(v) for k, v in client.hgetall(rediskeys.CONCURRENCY).items()}
        for function_id in sorted(caps):
            print(f"{function_id}\t{caps[function_id]}\t{_running(client, function_id)} running")
        return EXIT_OK
    function_id = args.function_id
    if not FUNCTION_ID.fullmatch(function_id):
        raise ValueError(f"function id {function_id!r}: must be 1-64 of A-Z a-z 0-9 . _ -")
    if args.command == "set":
        if args.cap < 0:
            raise ValueError(f"cap: must be 0 or more, got {args.cap}")
        client.hset(rediskeys.CONCURRENCY, function_id, args.cap)
        print(f"{function_id}: at most {args.cap} at once on all hosts")
    elif args.command == "get":
        cap = client.hget(rediskeys.CONCURRENCY, function_id)
        print(f"{function_id}: {'no cap of its own' if cap is None else _text(cap)}")
        return EXIT_OK if cap is not None else EXIT_ERROR
    else:
        removed = client.hdel(rediskeys.CONCURRENCY, function_id)
        print(f"{function_id}: {'cap removed' if removed else 'had no cap of its own'}")
    return EXIT_OK


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _running(client: redis.Redis, function_id: str) -> int:
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    return int(client.zcount(rediskeys.running(function_id), now_ms, "+inf"))


def _redis_url(args: argparse.Namespace) -> str:
    if args.redis_url:
        return str(args.redis_url)
    if args.config is None and os.environ.get("NANOGRID_REDIS_URL"):
        return environ.with_redis_password(os.environ["NANOGRID_REDIS_URL"], os.environ)
    path = environ.config_path(args.config)
    if args.config is None and not os.path.exists(path):
        return environ.with_redis_password(from_dict({}).redis.url, os.environ)
    return load(path).redis.url
