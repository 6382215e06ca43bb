"""TaskQueue.check at boot: a refusal fails the boot, trouble that passes does not."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from nanogrid.common.config import QueueConfig
from nanogrid.common.errors import QueueUnavailable
from nanogrid.worker.sqs import TaskQueue

CONFIG = QueueConfig(url="http://127.0.0.1:1/123456789012/q")


def refusal(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetQueueAttributes",
    )


class Failing:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def get_queue_attributes(self, **params: Any) -> dict[str, Any]:
        raise self.error


@pytest.mark.parametrize("error", [
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    refusal(503, "ServiceUnavailable"),
    refusal(500, "InternalError"),
    refusal(400, "ThrottlingException"),
    refusal(400, "RequestThrottled"),
])
def test_trouble_that_passes_is_returned_for_the_receive_loop_to_wait_out(error: Exception) -> None:
    problem = TaskQueue(CONFIG, client=Failing(error)).check()
    assert problem is not None and problem.startswith("SQS get_queue_attributes failed: ")


@pytest.mark.parametrize("error", [
    refusal(400, "AWS.SimpleQueueService.NonExistentQueue"),
    refusal(403, "AccessDenied"),
    refusal(403, "InvalidClientTokenId"),
    NoCredentialsError(),
])
def test_a_refusal_is_a_boot_error(error: Exception) -> None:
    with pytest.raises(QueueUnavailable, match="SQS get_queue_attributes failed: "):
        TaskQueue(CONFIG, client=Failing(error)).check()


def test_a_queue_that_answers_passes() -> None:
    class Answering:
        def get_queue_attributes(self, **params: Any) -> dict[str, Any]:
            return {"Attributes": {"QueueArn": "arn:aws:sqs:us-east-1:123456789012:q"}}

    assert TaskQueue(CONFIG, client=Answering()).check() is None
