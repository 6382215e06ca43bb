"""TaskQueue against moto_server: attempts, release, heartbeats, dead letters, outages."""

from __future__ import annotations

import time
from typing import Any

import pytest

from nanogrid.common.config import QueueConfig
from nanogrid.common.errors import QueueUnavailable
from nanogrid.worker.deleter import BatchDeleter
from nanogrid.worker.sqs import TaskQueue
from nanogrid.worker.visibility import VisibilityHeartbeat


def make_queue(aws: Any, **changes: Any) -> TaskQueue:
    settings = {
        "url": aws.new_queue("q"),
        "wait_time_seconds": 1,
        "visibility_timeout_seconds": 30,
        **changes,
    }
    return TaskQueue(QueueConfig(**settings))


def test_receives_are_counted_and_release_returns_the_message_at_once(aws: Any) -> None:
    queue = make_queue(aws)
    aws.sqs().send_message(QueueUrl=queue.config.url, MessageBody="hello")
    (first,) = queue.receive()
    assert (first.body, first.receives) == ("hello", 1)
    assert queue.receive() == []  # invisible for 30 s ...
    queue.release(first)
    (again,) = queue.receive()  # ... unless released
    assert again.receives == 2 and again.message_id == first.message_id
    queue.delete(again)
    assert queue.receive() == []


def test_heartbeat_keeps_a_long_run_invisible(aws: Any) -> None:
    queue = make_queue(aws, visibility_timeout_seconds=2)
    aws.sqs().send_message(QueueUrl=queue.config.url, MessageBody="long run")
    (message,) = queue.receive()
    heartbeat = VisibilityHeartbeat(TaskQueue.for_heartbeats(queue.config))
    try:
        heartbeat.add(message)
        time.sleep(3.5)  # well past the 2 s visibility timeout
        assert queue.receive(wait_seconds=0) == []
        heartbeat.discard(message)
        time.sleep(2.5)
        (back,) = queue.receive(wait_seconds=1)
        assert back.message_id == message.message_id
    finally:
        heartbeat.stop()


def test_visibility_changes_ten_at_a_time_and_names_the_ones_sqs_refused(aws: Any) -> None:
    queue = make_queue(aws, visibility_timeout_seconds=2)
    for i in range(10):
        aws.sqs().send_message(QueueUrl=queue.config.url, MessageBody=str(i))
    received = []
    while len(received) < 10:
        received += queue.receive(10)
    queue.delete(received[0])  # its receipt handle is stale now
    refused = queue.extend_batch(received, 30)
    assert list(refused) in ([], [received[0]])  # SQS refuses it; moto may take it
    time.sleep(2.5)  # past the 2 s the receive gave them
    assert queue.receive(wait_seconds=0) == []  # all nine still invisible


def test_dead_letter_copies_body_and_reason(aws: Any) -> None:
    dlq = aws.new_queue("dlq")
    queue = make_queue(aws, dead_letter_url=dlq)
    aws.sqs().send_message(QueueUrl=queue.config.url, MessageBody="not json")
    (message,) = queue.receive()
    queue.dead_letter(message, "message body is not JSON")
    reply = aws.sqs().receive_message(QueueUrl=dlq, MessageAttributeNames=["All"])
    (copy,) = reply["Messages"]
    assert copy["Body"] == "not json"
    attributes = copy["MessageAttributes"]
    assert attributes["nanogridError"]["StringValue"] == "message body is not JSON"
    assert attributes["originalMessageId"]["StringValue"] == message.message_id


def test_unreachable_queue_is_one_clear_line(aws: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    queue = make_queue(aws)
    problem = queue.check()  # an outage: the boot goes on
    assert problem is not None and problem.startswith("SQS get_queue_attributes failed: ")
    assert "\n" not in problem and "http://127.0.0.1:9" in problem
    with pytest.raises(QueueUnavailable, match="SQS receive_message failed: "):
        queue.receive()


def test_a_queue_sqs_does_not_know_fails_the_boot(aws: Any) -> None:
    queue = make_queue(aws)
    aws.sqs().delete_queue(QueueUrl=queue.config.url)
    with pytest.raises(QueueUnavailable, match="get_queue_attributes failed: .*NonExistentQueue"):
        queue.check()


def test_batch_deleter_deletes_everything_by_close(aws: Any) -> None:
    queue = make_queue(aws)
    for i in range(12):
        aws.sqs().send_message(QueueUrl=queue.config.url, MessageBody=str(i))
    received = []
    while len(received) < 12:
        received += queue.receive(10)
    deleter = BatchDeleter(queue)
    for message in received:
        deleter.delete(message)
    deleter.close()
    attrs = aws.sqs().get_queue_attributes(
        QueueUrl=queue.config.url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    assert sum(int(v) for v in attrs.values()) == 0
