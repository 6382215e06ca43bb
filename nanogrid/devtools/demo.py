"""``nanogrid-local demo``: invoke the examples the way the controller would and print their
results."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from nanogrid.worker.result import Result

from .embedded import (
    AWS_REGION,
)
from .localbase import (
    BUCKET,
    EXAMPLES,
    EXIT_FAILED,
    EXIT_OK,
    WARM_UP_TIMEOUT_S,
    LocalError,
    one_line,
    say,
)
from .localplan import Plan
from .stack import Stack

# -- demo ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoCall:
    example: str
    input_data: Any
    why: str


DEMO_CALLS = (
    DemoCall("hello-python", {}, "a fresh sandbox from the warm pool"),
    DemoCall("echo-input", {"name": "NanoGrid", "numbers": [1, 2, 3]}, "inputData on stdin"),
    DemoCall("hello-python", {}, "same code again: warm, and the auto-tuner's tip over 2 runs"),
)


def summary(result: Result, end_to_end_ms: float) -> str:
    """One line of what matters in a result."""
    parts = [
        result.status,
        f"durationMillis {result.duration_millis}",
        f"end to end {end_to_end_ms:.0f} ms",
        f"peakMemoryMB {result.peak_memory_mb}",
        f"coldStart {json.dumps(result.cold_start)}",
        str(result.optimization_tip or "no optimizationTip"),
    ]
    if result.timings is not None:
        parts.append(f"agent overhead {result.timings.total_ms - result.timings.run_ms:.1f} ms")
    if result.error_message:
        parts.append(f"error: {result.error_type}: {result.error_message}")
    return " | ".join(parts)


def run_demo_calls(plan: Plan, wait: float) -> tuple[int, int]:
    """Deploy and invoke the demo calls in order; returns (SUCCESS count, calls made)."""
    import boto3
    import redis
    from botocore.exceptions import BotoCoreError, ClientError

    from .invoke import deploy, invoke, zip_function

    s3 = boto3.client("s3", region_name=AWS_REGION)
    sqs = boto3.client("sqs", region_name=AWS_REGION)
    client = redis.Redis.from_url(plan.config.redis.url, socket_timeout=5, socket_connect_timeout=5)
    keys: dict[str, str] = {}
    ok = 0
    try:
        for number, call in enumerate(DEMO_CALLS, 1):
            try:
                if call.example not in keys:
                    code = zip_function(EXAMPLES / call.example)
                    keys[call.example] = deploy(s3, BUCKET, call.example, code)
                task = {
                    "requestId": f"demo-{uuid.uuid4()}",
                    "functionId": call.example,
                    "runtime": "python",
                    "s3Bucket": BUCKET,
                    "s3Key": keys[call.example],
                    "inputData": call.input_data,
                }
                print(
                    f"\n== {number}/{len(DEMO_CALLS)} {call.example} ({call.why}): "
                    f"s3://{BUCKET}/{task['s3Key']}, inputData {json.dumps(call.input_data)}",
                    flush=True,
                )
                started = time.monotonic()
                result = invoke(sqs, client, plan.config.queue.url, task, wait)
                end_to_end_ms = (time.monotonic() - started) * 1000
            except (BotoCoreError, ClientError, redis.RedisError) as exc:
                raise LocalError(f"{call.example}: {one_line(str(exc))}") from None
            if result is None:
                raise LocalError(
                    f"{call.example}: no result for {task['requestId']} within {wait:.0f}s"
                )
            print(json.dumps(result, indent=2, ensure_ascii=False))
            typed = Result.from_dict(result)
            print(f"-> {summary(typed, end_to_end_ms)}", flush=True)
            ok += typed.ok
    finally:
        client.close()
    return ok, len(DEMO_CALLS)


def run_demo(stack: Stack, timeout: float, wait: float) -> int:
    """Bring up, invoke the examples, print their results; 0 only if every one succeeded."""
    began = time.monotonic()
    stack.check()
    say(f"logs: {stack.run_dir}")
    stack.bring_up(timeout)
    stack.wait_for_warm_pools(WARM_UP_TIMEOUT_S)
    up_s = time.monotonic() - began
    say(
        f"up in {up_s:.1f}s; invoking the examples as the controller would "
        f"(SQS task -> agent -> result on Redis result:{{requestId}})"
    )
    try:
        ok, total = run_demo_calls(stack.plan, wait)
    except LocalError as exc:
        raise LocalError(f"{exc} (agent log: {stack.supervisor.log_path})") from None
    print(flush=True)
    verdict = "OK" if ok == total else "FAILED"
    say(
        f"demo {verdict}: {ok}/{total} SUCCESS; {time.monotonic() - began:.1f}s in all "
        f"(bring-up {up_s:.1f}s); agent log: {stack.supervisor.log_path}"
    )
    return EXIT_OK if ok == total else EXIT_FAILED


