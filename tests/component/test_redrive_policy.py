"""A task queue with a redrive policy on moto_server (which moves a message to its dead-letter
queue on the receive past maxReceiveCount, as SQS does): hand-backs near the count are sent
again as new messages, so a message held at its function's cap is never dead-lettered and
runs once, at attempt 1."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from harness import HELLO, Agent
from helpers import wait_until

from nanogrid.common.config import QueueConfig
from nanogrid.worker.redrive import Redrive
from nanogrid.worker.sqs import TaskQueue

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
AWS_TRACE_HEADER = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"


def redrive_to(aws: Any, queue_url: str, dead_letter_url: str, count: int) -> None:
    arn = aws.sqs().get_queue_attributes(
        QueueUrl=dead_letter_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": str(count)})
    aws.sqs().set_queue_attributes(QueueUrl=queue_url, Attributes={"RedrivePolicy": policy})


def test_a_copy_sent_again_carries_the_body_attributes_and_trace_header(aws: Any) -> None:
    queue = TaskQueue(QueueConfig(url=aws.new_queue("q"), wait_time_seconds=1,
                                  visibility_timeout_seconds=30))
    assert queue.redrive_limit() == 0
    redrive_to(aws, queue.config.url, aws.new_queue("dlq"), 3)
    assert queue.redrive_limit() == 3
    attributes = {
        "traceparent": {"DataType": "String", "StringValue": TRACEPARENT},
        "tenant": {"DataType": "String.id", "StringValue": "acme"},
        "blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
    }
    aws.sqs().send_message(
        QueueUrl=queue.config.url, MessageBody='{"x": 1}', MessageAttributes=attributes,
        MessageSystemAttributes={"AWSTraceHeader": {"DataType": "String",
                                                    "StringValue": AWS_TRACE_HEADER}},
    )
    time.sleep(0.2)  # a wait in SQS before the first receive, for queuedMs
    (original,) = queue.receive()
    redrive = Redrive(queue, max_attempts=2)
    assert redrive.resend(original, 2) and redrive.resent == 1
    queue.delete(original)
    sent = time.monotonic()
    (copy,) = wait_until(lambda: queue.receive(), timeout=10, what="the copy")
    assert time.monotonic() - sent >= 1.5  # its DelaySeconds held it
    assert copy.message_id != original.message_id and copy.receives == 1
    assert copy.body == '{"x": 1}' and copy.trace_header == AWS_TRACE_HEADER
    assert copy.trace_id == TRACE_ID
    theirs = {name: {k: v for k, v in value.items() if k in ("DataType", "StringValue",
                                                               "BinaryValue")}
              for name, value in copy.attributes.items() if not name.startswith("nanogrid")}
    assert theirs == attributes
    assert copy.earlier_receives == 1 and copy.all_receives == 2
    assert abs(copy.sent_at - original.sent_at) < 0.002  # the first send: queuedMs spans both
    assert copy.queued_ms >= 1700


def test_a_message_held_at_its_cap_past_the_redrive_count_is_never_dead_lettered(
    aws: Any, redis_url: str, tmp_path: Path
) -> None:
    agent = Agent(aws, redis_url, tmp_path)
    redrive_to(aws, agent.queue_url, agent.dlq_url, 3)
    function_id = f"held-{uuid.uuid4().hex[:8]}"
    agent.redis.hset("nanogrid:concurrency", function_id, 0)
    agent.start()
    try:
        task = agent.task(agent.deploy({"main.py": HELLO}), functionId=function_id)
        aws.sqs().send_message(
            QueueUrl=agent.queue_url, MessageBody=json.dumps(task),
            MessageAttributes={"traceparent": {"DataType": "String", "StringValue": TRACEPARENT}},
        )

        def deferrals() -> int:
            return agent.log.read_text().count(f"[CAP] {function_id} ")

        # Five receives at the cap: past maxReceiveCount 3, so SQS would have moved it by now.
        wait_until(lambda: deferrals() >= 5 or agent.queue_depth(agent.dlq_url), timeout=60,
                   what="five receives at the cap")
        assert agent.queue_depth(agent.dlq_url) == 0
        assert agent.log.read_text().count("sent again as") >= 4
        agent.redis.hdel("nanogrid:concurrency", function_id)
        result = agent.result(task["requestId"], timeout=30)
        assert (result["status"], result["attempt"]) == ("SUCCESS", 1)
        assert result["traceId"] == TRACE_ID  # the copies carried the message attributes
        wait_until(lambda: agent.queue_depth() == 0, timeout=10, what="the queue to drain")
        assert agent.queue_depth(agent.dlq_url) == 0
        runs = [line for line in agent.log.read_text().splitlines()
                if task["requestId"] in line and "[PROCESS] running " in line]
        assert len(runs) == 1
    finally:
        assert agent.stop() == 0
