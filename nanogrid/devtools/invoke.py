"""``nanogrid-invoke``: deploy a function to S3, send it as a task, print the result JSON.

It does what the platform's controller does — subscribe to ``result:{requestId}`` before
sending, then wait — so it doubles as a smoke test of a running agent.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import boto3
import redis
from botocore.exceptions import BotoCoreError, ClientError

from nanogrid.common import awsregion, environ
from nanogrid.common import config as config_module
from nanogrid.common.errors import ConfigError
from nanogrid.common.version import version_line
from nanogrid.worker.result import Result

EXIT_FAILED = 1
EXIT_USAGE = 2


def zip_function(source: Path) -> bytes:
    """The code zip of a directory (its files at the zip's root), or a zip file as it is."""
    if source.is_file():
        return source.read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(source.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                archive.write(path, path.relative_to(source).as_posix())
    return buffer.getvalue()


def entry_files(source: Path) -> set[str]:
    """The file names at the root of a function directory or zip."""
    if source.is_file():
        with zipfile.ZipFile(source) as archive:
            return {name for name in archive.namelist() if "/" not in name.rstrip("/")}
    return {path.name for path in source.iterdir() if path.is_file()}


def infer_runtime(source: Path, runtimes: dict[str, tuple[str, ...]]) -> str:
    """The configured runtime whose command's file is at the function's root (``main.py``:
    python, ``main.js``: node); ValueError naming the choices when none or several are."""
    files = entry_files(source)
    found = [name for name, command in runtimes.items() if any(a in files for a in command[1:])]
    if len(found) == 1:
        return found[0]
    wanted = ", ".join(f"{name} ({' '.join(command)})" for name, command in runtimes.items())
    what = f"holds files for {' and '.join(found)}" if found else "has none of their files"
    raise ValueError(f"{source}: {what}; pass --runtime (configured: {wanted})")


def deploy(s3: Any, bucket: str, function_id: str, code: bytes) -> str:
    """Upload as ``functions/<id>/v<n>.zip`` with n one past the newest version; returns the key."""
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        region = s3.meta.region_name
        extra = (
            {}
            if region == "us-east-1"
            else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        )
        s3.create_bucket(Bucket=bucket, **extra)
    prefix = f"functions/{function_id}/v"
    versions = [0]
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            number = item["Key"][len(prefix) :].removesuffix(".zip")
            if number.isdigit():
                versions.append(int(number))
    key = f"{prefix}{max(versions) + 1}.zip"
    s3.put_object(Bucket=bucket, Key=key, Body=code)
    return key


def invoke(
    sqs: Any, redis_client: redis.Redis, queue_url: str, task: dict[str, Any], timeout_s: float
) -> dict[str, Any] | None:
    """Send the task and wait for its result JSON as published (subscribed first, GET as the
    fallback)."""
    channel = f"result:{task['requestId']}"
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    try:
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(task))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=min(1.0, deadline - time.monotonic()))
            if message is not None:
                return json.loads(message["data"])
            stored = redis_client.get(channel)
            if stored is not None:
                return json.loads(stored)
        return None
    finally:
        pubsub.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanogrid-invoke", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path,
                        help="function directory (with main.py or main.js) or zip")
    parser.add_argument(
        "-c",
        "--config",
        help=f"agent config naming the queue and Redis (default: ${environ.CONFIG}, else "
             f"{environ.DEFAULT_CONFIG_PATH}; `nanogrid-local up` prints the export)",
    )
    parser.add_argument("--function-id", help="default: the directory or zip name")
    parser.add_argument("--bucket", default="nanogrid-functions")
    parser.add_argument("--runtime",
                        help="default: the runtime whose file is there (main.py, main.js)")
    parser.add_argument("--input", default="{}", help="inputData as JSON")
    parser.add_argument("--memory-mb", type=int)
    parser.add_argument("--timeout-ms", type=int)
    parser.add_argument("--request-id", help="default: a new UUID")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the result")
    parser.add_argument("--version", action="version", version=version_line("nanogrid-invoke"))
    args = parser.parse_args(argv)
    try:
        cfg = config_module.load(environ.config_path(args.config))
        region = awsregion.resolve(cfg).name
        input_data = json.loads(args.input)
    except ConfigError as exc:
        print(f"nanogrid-invoke: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"nanogrid-invoke: --input is not JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.source.exists():
        print(f"nanogrid-invoke: {args.source}: no such file or directory", file=sys.stderr)
        return EXIT_USAGE
    function_id = args.function_id or args.source.name.removesuffix(".zip")
    try:
        runtime = args.runtime or infer_runtime(
            args.source, {name: rt.command for name, rt in cfg.runtimes.items()})
    except (ValueError, zipfile.BadZipFile) as exc:
        print(f"nanogrid-invoke: {exc}", file=sys.stderr)
        return EXIT_USAGE
    task: dict[str, Any] = {
        "requestId": args.request_id or str(uuid.uuid4()),
        "functionId": function_id,
        "runtime": runtime,
        "s3Bucket": args.bucket,
        "inputData": input_data,
    }
    if args.memory_mb is not None:
        task["memoryMb"] = args.memory_mb
    if args.timeout_ms is not None:
        task["timeoutMs"] = args.timeout_ms
    try:
        s3 = boto3.client("s3", region_name=region)
        sqs = boto3.client("sqs", region_name=region)
        task["s3Key"] = deploy(s3, args.bucket, function_id, zip_function(args.source))
        result = invoke(sqs, redis.Redis.from_url(cfg.redis.url), cfg.queue.url, task, args.wait)
    except (BotoCoreError, ClientError, redis.RedisError) as exc:
        print(f"nanogrid-invoke: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result is None:
        print(
            f"nanogrid-invoke: no result for {task['requestId']} within {args.wait:.0f}s "
            f"(is an agent running on {cfg.queue.url}?)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0 if Result.from_dict(result).ok else EXIT_FAILED
