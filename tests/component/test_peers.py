"""The real peers the component tests rely on answer as the product expects."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import boto3
import pytest
import redis
from helpers import MotoServer, RedisServer, wait_until


def test_sqs_message_round_trip(aws: MotoServer) -> None:
    queue_url = aws.new_queue("peers", visibility_timeout=5)
    body = json.dumps({"requestId": "r-1", "functionId": "hello"})
    aws.sqs().send_message(QueueUrl=queue_url, MessageBody=body)

    # A client built the way product code builds it: no endpoint argument, only the env.
    sqs = boto3.client("sqs")
    got = sqs.receive_message(
        QueueUrl=queue_url, WaitTimeSeconds=1, AttributeNames=["ApproximateReceiveCount"]
    )["Messages"]
    assert [m["Body"] for m in got] == [body]
    assert got[0]["Attributes"]["ApproximateReceiveCount"] == "1"
    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=got[0]["ReceiptHandle"])
    assert "Messages" not in sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0)


def test_queues_are_fresh_and_visibility_timeout_applies(aws: MotoServer) -> None:
    first, second = aws.new_queue("peers", visibility_timeout=7), aws.new_queue("peers")
    assert first != second
    attrs = aws.sqs().get_queue_attributes(QueueUrl=first, AttributeNames=["VisibilityTimeout"])
    assert attrs["Attributes"]["VisibilityTimeout"] == "7"


def test_s3_put_get(aws: MotoServer) -> None:
    bucket = aws.new_bucket("peers")
    key = "functions/hello-python/v1.zip"
    aws.s3().put_object(Bucket=bucket, Key=key, Body=b"PK\x05\x06" + b"\0" * 18)
    assert boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()[:4] == b"PK\x05\x06"


def test_cloudwatch_put_metric_data(aws: MotoServer) -> None:
    cloudwatch = aws.cloudwatch()
    now = dt.datetime.now(dt.UTC)
    cloudwatch.put_metric_data(
        Namespace="NanoGrid/Test",
        MetricData=[
            {"MetricName": "PeakMemoryBytes", "Value": 6291456, "Unit": "Bytes", "Timestamp": now}
        ],
    )
    metrics = cloudwatch.list_metrics(Namespace="NanoGrid/Test")["Metrics"]
    assert [m["MetricName"] for m in metrics] == ["PeakMemoryBytes"]


def test_reset_forgets_everything(aws: MotoServer) -> None:
    queue_url = aws.new_queue("reset")
    aws.reset()
    assert queue_url not in aws.sqs().list_queues().get("QueueUrls", [])


def test_aws_environment_points_at_moto(aws: MotoServer) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == aws.endpoint
    assert boto3.session.Session().region_name == "ap-northeast-2"


def test_redis_set_get_with_fresh_db(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0
    client.set("result:r-1", b'{"status": "SUCCESS"}', ex=60)
    assert client.get("result:r-1") == b'{"status": "SUCCESS"}'
    assert 0 < client.ttl("result:r-1") <= 60


def test_redis_outage_then_recovery(redis_server: RedisServer, redis_url: str) -> None:
    client = redis_server.client(socket_timeout=1, socket_connect_timeout=1)
    assert client.ping()

    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        client.ping()

    redis_server.start()
    assert wait_until(client.ping, timeout=5, what="redis to answer again")
    assert redis_server.url == redis_url  # same port, so clients reconnect unchanged


def test_redis_fixture_restarts_a_stopped_server(redis_server: RedisServer) -> None:
    redis_server.stop(hard=True)
    assert not redis_server.alive
    redis_server.start()
    assert redis_server.client().ping()


def test_runtime_image_runs_python_under_docker_init(docker_engine, runtime_image: str) -> None:
    # init=True: dockerd mounts docker-init (Debian: tini-static) as the container's PID 1.
    code = "import json, zipfile, runpy, socket, array; print(open('/proc/1/comm').read())"
    out = docker_engine.containers.run(
        runtime_image,
        ["python3", "-c", code],
        network_mode="none",
        init=True,
        remove=True,
    )
    assert out.split() == [b"docker-init"]


def test_pids_cgroup_limits_this_process(pids_limited_tests: int) -> None:
    assert pids_limited_tests == 2048
    name = f"nanogrid-tests-{os.getpid()}"
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    [path] = [line.split(":", 2)[2] for line in lines if line.endswith(name)]
    v1 = Path("/sys/fs/cgroup/pids") / path.lstrip("/")
    cgroup = v1 if v1.is_dir() else Path("/sys/fs/cgroup") / path.lstrip("/")
    assert (cgroup / "pids.max").read_text().strip() == "2048"
