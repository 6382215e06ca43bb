"""TaskQueue's reading of ApproximateReceiveCount, and the heartbeat client's timeouts."""

from __future__ import annotations

from typing import Any

import pytest

from nanogrid.common.config import QueueConfig
from nanogrid.worker.sqs import TaskQueue

CONFIG = QueueConfig(url="http://127.0.0.1:1/123456789012/q", max_attempts=4)


class Reply:
    def __init__(self, attributes: dict[str, str]) -> None:
        self.attributes = attributes

    def receive_message(self, **params: Any) -> dict[str, Any]:
        assert "ApproximateReceiveCount" in params["MessageSystemAttributeNames"]
        return {"Messages": [{"MessageId": "m", "ReceiptHandle": "h", "Body": "{}",
                              "Attributes": self.attributes}]}


@pytest.mark.parametrize(("attributes", "receives"), [
    ({"ApproximateReceiveCount": "2"}, 2),
    ({}, 0),  # SQS did not say: reported as unknown (tries are counted in Redis)
    ({"ApproximateReceiveCount": "many"}, 0),
])
def test_the_receive_count_is_read_and_an_unknown_one_is_zero(
    attributes: dict[str, str], receives: int
) -> None:
    (message,) = TaskQueue(CONFIG, client=Reply(attributes)).receive()
    assert message.receives == receives


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
