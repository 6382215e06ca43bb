"""``nanogrid-dlq``: look at the dead-letter queue and send its messages back to the task queue.

A message is dead-lettered after its FAILED result was stored (a runtime this host could not
start, missing code after ``queue.max_attempts``, a body that is not a task); once the cause
is fixed, ``replay`` sends the body as it was received back to ``queue.url``. The stored
FAILED ``result:{requestId}`` is deleted first, or the agent would re-publish it instead of
running the task (one run per requestId). ``ls`` only looks: what it receives goes back at
once (visibility 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import redis
from botocore.exceptions import BotoCoreError, ClientError

from nanogrid.admin import commandline
from nanogrid.common import awsregion, environ
from nanogrid.common.config import Config, load
from nanogrid.common.errors import ConfigError
from nanogrid.common.exitcodes import EXIT_CONFIG, EXIT_OK
from nanogrid.worker import rediskeys
from nanogrid.worker.result import FAILED, Result

PROG = "nanogrid-dlq"
EXIT_ERROR = 1
HOLD_S = 60
"""How long a received dead letter stays invisible while this command decides about it."""


@dataclass(frozen=True)
class DeadLetter:
    body: str
    receipt: str
    request_id: str | None
    function_id: str | None
    reason: str

    @classmethod
    def of(cls, message: dict[str, Any]) -> DeadLetter:
        try:
            task = json.loads(message["Body"])
        except ValueError:
            task = None
        task = task if isinstance(task, dict) else {}
        attributes = message.get("MessageAttributes", {})
        return cls(
            body=message["Body"],
            receipt=message["ReceiptHandle"],
            request_id=_text(task.get("requestId")),
            function_id=_text(task.get("functionId")),
            reason=attributes.get("nanogridError", {}).get("StringValue", "-"),
        )

    def line(self) -> str:
        return f"{self.request_id or '-'}\t{self.function_id or '-'}\t{self.reason}"


def main(argv: list[str] | None = None) -> int:
    parser = commandline.parser(PROG, __doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ls", help="list the dead letters: requestId, functionId, why")
    replay = commands.add_parser("replay", help="send dead letters back to the task queue")
    replay.add_argument("request_ids", nargs="*", metavar="REQUEST_ID",
                        help="only these (default: all, or --function's)")
    replay.add_argument("--function", help="only this function's")
    replay.add_argument("--max", type=int, default=None, help="at most this many")
    replay.add_argument("--dry-run", action="store_true", help="say what would go, send nothing")
    args = parser.parse_args(argv)
    try:
        config = load(environ.config_path(args.config))
        if config.queue.dead_letter_url is None:
            raise ConfigError("queue.dead_letter_url: not set: there is no dead-letter queue")
        region = awsregion.resolve(config).name
        sqs = boto3.client("sqs", region_name=region)
        if args.command == "ls":
            return list_letters(sqs, config)
        return replay_letters(sqs, redis.Redis.from_url(config.redis.url, socket_timeout=5),
                              config, args)
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (BotoCoreError, ClientError, redis.RedisError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def received(sqs: Any, url: str) -> Iterator[list[DeadLetter]]:
    """Batches of dead letters, each held invisible for HOLD_S, until the queue is empty."""
    while True:
        reply = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                    VisibilityTimeout=HOLD_S, MessageAttributeNames=["All"])
        batch = [DeadLetter.of(message) for message in reply.get("Messages", [])]
        if not batch:
            return
        yield batch


def list_letters(sqs: Any, config: Config) -> int:
    url = str(config.queue.dead_letter_url)
    seen = []
    for batch in received(sqs, url):
        for letter in batch:
            print(letter.line())
        seen += batch
    _give_back(sqs, url, seen)
    print(f"{len(seen)} dead letters in {url}", file=sys.stderr)
    return EXIT_OK


def replay_letters(sqs: Any, store: redis.Redis, config: Config,
                   args: argparse.Namespace) -> int:
    url, queue = str(config.queue.dead_letter_url), str(config.queue.url)
    wanted = set(args.request_ids)
    sent, kept = 0, []
    for batch in received(sqs, url):
        for letter in batch:
            chosen = (not wanted or letter.request_id in wanted) and (
                args.function is None or letter.function_id == args.function)
            if not chosen or (args.max is not None and sent >= args.max) or args.dry_run:
                kept.append(letter)
                if chosen and args.dry_run:
                    print(f"would replay {letter.line()}")
                continue
            _forget_failed_result(store, letter.request_id)
            sqs.send_message(QueueUrl=queue, MessageBody=letter.body)
            sqs.delete_message(QueueUrl=url, ReceiptHandle=letter.receipt)
            print(f"replayed {letter.line()}")
            sent += 1
    _give_back(sqs, url, kept)
    print(f"{sent} replayed to {queue}; {len(kept)} left in {url}", file=sys.stderr)
    return EXIT_OK


def _forget_failed_result(store: redis.Redis, request_id: str | None) -> None:
    """Delete the stored FAILED result of ``request_id``, so the replay runs it again (a
    stored SUCCESS is kept: that task ran)."""
    if request_id is None:
        return
    key = rediskeys.result(request_id)
    stored = store.get(key)
    if stored is None:
        return
    try:
        status = Result.from_json(stored).status
    except (ValueError, TypeError):
        status = FAILED
    if status == FAILED:
        store.delete(key)


def _give_back(sqs: Any, url: str, letters: list[DeadLetter]) -> None:
    """Make the dead letters this command held visible again at once."""
    for letter in letters:
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=letter.receipt,
                                      VisibilityTimeout=0)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
