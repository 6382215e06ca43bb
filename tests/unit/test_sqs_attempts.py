"""TaskQueue's reading of ApproximateReceiveCount, and the heartbeat client's timeouts."""

from __future__ import annotations

from typing import Any

import pytest
from loguru import logger

from common.config import QueueConfig
from worker.sqs import TaskQueue

CONFIG = QueueConfig(url="http://127.0.0.1:1/123456789012/q", max_attempts=4)


class Reply:
    def __init__(self, attributes: dict[str, str]) -> None:
        self.attributes = attributes

    def receive_message(self, **params: Any) -> dict[str, Any]:
        assert "ApproximateReceiveCount" in params["MessageSystemAttributeNames"]
        return {"Messages": [{"MessageId": "m", "ReceiptHandle": "h", "Body": "{}",
                              "Attributes": self.attributes}]}


@pytest.mark.parametrize(("attributes", "attempt"), [
    ({"ApproximateReceiveCount": "2"}, 2),
    ({}, 4),  # unknown history: its last attempt, no retries
    ({"ApproximateReceiveCount": "many"}, 4),
])
def test_a_missing_receive_count_is_the_last_attempt_and_logged(
    attributes: dict[str, str], attempt: int
) -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, format="{level} {message}")
    try:
        (message,) = TaskQueue(CONFIG, client=Reply(attributes)).receive()
    finally:
        logger.remove(sink)
    assert message.attempt == attempt
    warned = [line for line in lines if "without a valid ApproximateReceiveCount" in line]
    assert len(warned) == (attempt == 4)
    assert all(line.startswith("WARNING") for line in warned)


def test_heartbeats_have_a_client_of_their_own_with_short_timeouts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-northeast-2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    tasks, beats = TaskQueue(CONFIG), TaskQueue.for_heartbeats(CONFIG)
    assert beats._client is not tasks._client
    config = beats._client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (2, 5)
    assert config.retries["total_max_attempts"] == 2  # one retry, then the next renewal
    assert tasks._client.meta.config.read_timeout == CONFIG.wait_time_seconds + 10
