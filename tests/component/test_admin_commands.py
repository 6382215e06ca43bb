"""bin/nanogrid-dlq and bin/nanogrid-outbox against the real peers (moto_server, redis-server):
what docs/operations.md tells an operator to run."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import redis
import yaml

from nanogrid.worker import result

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "bin" / script), "-c", str(config), *args],
                          capture_output=True, text=True, timeout=60)


def write_config(path: Path, redis_url: str, queue: str, dlq: str | None = None) -> Path:
    path.write_text(yaml.safe_dump({
        "queue": {"url": queue, "dead_letter_url": dlq},
        "redis": {"url": redis_url},
        "paths": {"outbox_dir": str(path.parent / "outbox")},
    }))
    return path


def failed_result(request_id: str, function_id: str = "f") -> result.Result:
    return result.failed(result.TaskIds(request_id, function_id, "ruby"),
                         "RUNTIME_NOT_SUPPORTED", "no ruby here", memory_mb=128, attempt=1,
                         worker_id="h:1", timings=None)


def dead_letter(aws: Any, dlq: str, request_id: str, function_id: str) -> None:
    body = json.dumps({"requestId": request_id, "functionId": function_id, "runtime": "ruby",
                       "s3Bucket": "b", "s3Key": "k"})
    aws.sqs().send_message(QueueUrl=dlq, MessageBody=body, MessageAttributes={
        "nanogridError": {"DataType": "String", "StringValue": "runtime 'ruby' is not configured"}})


def test_dead_letters_are_listed_then_replayed_to_run_again(
    aws: Any, redis_url: str, tmp_path: Path
) -> None:
    queue, dlq = aws.new_queue("tasks"), aws.new_queue("dlq")
    config = write_config(tmp_path / "agent.yaml", redis_url, queue, dlq)
    store = redis.Redis.from_url(redis_url)
    ids = [f"req-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for request_id, function_id in zip(ids, ["resize", "resize", "audit"], strict=True):
        dead_letter(aws, dlq, request_id, function_id)
        store.set(f"result:{request_id}", failed_result(request_id, function_id).to_json())

    listed = run("nanogrid-dlq", config, "ls")
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.splitlines()) == sorted(
        f"{i}\t{f}\truntime 'ruby' is not configured"
        for i, f in zip(ids, ["resize", "resize", "audit"], strict=True))
    dry = run("nanogrid-dlq", config, "replay", "--function", "resize", "--dry-run")
    assert dry.stdout.count("would replay") == 2 and aws.sqs().receive_message(
        QueueUrl=queue, WaitTimeSeconds=0).get("Messages") is None

    replayed = run("nanogrid-dlq", config, "replay", "--function", "resize")
    assert replayed.returncode == 0, replayed.stderr
    assert "2 replayed" in replayed.stderr and "1 left" in replayed.stderr
    bodies = []
    for _ in range(5):
        bodies += [m["Body"] for m in aws.sqs().receive_message(
            QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])]
    assert sorted(json.loads(b)["requestId"] for b in bodies) == sorted(ids[:2])
    # The stored FAILED results go, or the agent would re-publish them instead of running.
    assert [store.exists(f"result:{i}") for i in ids] == [0, 0, 1]
    left = run("nanogrid-dlq", config, "ls")
    assert left.stdout.split("\t")[0] == ids[2]


def test_the_dead_letter_queue_must_be_configured(
    aws: Any, redis_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "agent.yaml", redis_url, aws.new_queue("tasks"))
    done = run("nanogrid-dlq", config, "ls")
    assert done.returncode == 2
    assert done.stderr == ("nanogrid-dlq: config error: queue.dead_letter_url: not set: there "
                           "is no dead-letter queue\n")


def test_set_aside_results_are_listed_and_resent(
    aws: Any, redis_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "agent.yaml", redis_url, aws.new_queue("tasks"))
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    refused, waiting = failed_result("req-refused"), failed_result("req-waiting")
    (outbox / ".failed-req-refused.json").write_text(refused.to_json())
    (outbox / "req-waiting.json").write_text(waiting.to_json())

    listed = run("nanogrid-outbox", config, "ls")
    assert listed.returncode == 0, listed.stderr
    states = {line.split("\t")[2]: line.split("\t")[0] for line in listed.stdout.splitlines()}
    assert states == {"req-refused": "set-aside", "req-waiting": "waiting"}

    sent = run("nanogrid-outbox", config, "resend")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.startswith("2 results sent (1 of them had been set aside); 0 left")
    store = redis.Redis.from_url(redis_url)
    for res in (refused, waiting):
        assert json.loads(store.get(f"result:{res.request_id}")) == res.to_dict()
    assert list(outbox.iterdir()) == []


def test_resend_while_redis_is_away_puts_them_back_for_the_agent(
    aws: Any, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "agent.yaml", "redis://127.0.0.1:1/0", aws.new_queue("t"))
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / ".failed-req-x.json").write_text(failed_result("req-x").to_json())
    done = run("nanogrid-outbox", config, "resend")
    assert done.returncode == 1
    assert "Redis cannot take results now" in done.stderr
    assert [p.name for p in outbox.iterdir()] == ["req-x.json"]
