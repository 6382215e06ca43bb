"""Every AWS client of the agent names the agent in its User-Agent, on every request."""

from __future__ import annotations

import pytest

from nanogrid.common import awsclient
from nanogrid.common.config import QueueConfig
from nanogrid.worker import cloudwatch
from nanogrid.worker.codestore import CodeStore
from nanogrid.worker.sqs import TaskQueue


class _Sent(Exception):
    """Raised in place of sending: the request was built and signed."""


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")


def _user_agents(client: object, calls: int) -> list[str]:
    seen = []

    def capture(request: object, **_: object) -> None:
        seen.append(request.headers["User-Agent"].decode())  # type: ignore[attr-defined]
        raise _Sent

    client.meta.events.register("before-send", capture)  # type: ignore[attr-defined]
    for _ in range(calls):
        with pytest.raises(_Sent):
            client.list_queues()  # type: ignore[attr-defined]
    return seen


def test_every_request_sends_the_agents_user_agent(credentials: None) -> None:
    seen = _user_agents(awsclient.client("sqs", "eu-west-1"), calls=2)
    assert len(seen) == 2 and seen[0] == seen[1]
    assert seen[0].startswith(f"{awsclient.USER_AGENT} Botocore/"), seen[0]
    assert awsclient.USER_AGENT.startswith("nanogrid-worker/")


def test_the_agents_clients_all_use_it(credentials: None, tmp_path: object) -> None:
    queue = TaskQueue(QueueConfig(url="http://127.0.0.1:9/000000000000/tasks"), region="eu-west-1")
    clients = [
        queue._client,
        TaskQueue.for_heartbeats(queue.config, "eu-west-1")._client,
        CodeStore(tmp_path, 1 << 20, region="eu-west-1").s3,  # type: ignore[arg-type]
        cloudwatch._default_client("eu-west-1"),
    ]
    for made in clients:
        assert made.meta.config.user_agent.startswith(awsclient.USER_AGENT)
        assert made.meta.region_name == "eu-west-1"
