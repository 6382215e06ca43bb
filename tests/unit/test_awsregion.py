"""The AWS region: config key, then AWS_REGION, then boto3's chain, then the queue URL's host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nanogrid.common import awsregion, config
from nanogrid.common.errors import ConfigError
from nanogrid.worker import cloudwatch as metrics
from nanogrid.worker.codestore import CodeStore
from nanogrid.worker.sqs import TaskQueue

LOOPBACK_QUEUE = "http://127.0.0.1:5000/123456789012/q"
SEOUL_QUEUE = "https://sqs.ap-northeast-2.amazonaws.com/123456789012/q"


@pytest.fixture(autouse=True)
def no_region_in_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment naming no region, with no AWS config file or profile to read one from."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    return monkeypatch


def resolve(queue_url: str = LOOPBACK_QUEUE, region: str | None = None) -> awsregion.Region:
    return awsregion.resolve(
        config.from_dict({"queue": {"url": queue_url}, "aws": {"region": region}})
    )


@pytest.mark.parametrize(
    ("url", "region"),
    [
        (SEOUL_QUEUE, "ap-northeast-2"),
        ("https://sqs.us-east-1.amazonaws.com/123456789012/q", "us-east-1"),
        ("https://sqs-fips.us-gov-west-1.amazonaws.com/123456789012/q", "us-gov-west-1"),
        ("https://eu-west-1.queue.amazonaws.com/123456789012/q", "eu-west-1"),
        ("https://queue.amazonaws.com/123456789012/q", "us-east-1"),
        ("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q", "cn-north-1"),
        (
            "https://vpce-0a1b2c3d4e5f-abcd1234.sqs.eu-central-1.vpce.amazonaws.com/123456789012/q",
            "eu-central-1",
        ),
        ("https://SQS.AP-SOUTHEAST-2.AMAZONAWS.COM:443/123456789012/q", "ap-southeast-2"),
        (LOOPBACK_QUEUE, None),
        ("http://localhost:9324/000000000000/q", None),
        ("http://[::1:5000/q", None),
    ],
)
def test_region_from_url(url: str, region: str | None) -> None:
    assert awsregion.region_from_url(url) == region


def test_config_key_comes_first(no_region_in_env: pytest.MonkeyPatch) -> None:
    no_region_in_env.setenv("AWS_REGION", "eu-west-1")
    no_region_in_env.setenv("AWS_DEFAULT_REGION", "eu-west-2")
    assert resolve(SEOUL_QUEUE, "us-west-2") == awsregion.Region("us-west-2", "aws.region")


def test_aws_region_comes_before_aws_default_region(no_region_in_env: pytest.MonkeyPatch) -> None:
    # botocore reads only AWS_DEFAULT_REGION; the AWS CLI v2 and the other SDKs read AWS_REGION
    # and let it win.
    no_region_in_env.setenv("AWS_REGION", "eu-west-1")
    no_region_in_env.setenv("AWS_DEFAULT_REGION", "eu-west-2")
    assert resolve(SEOUL_QUEUE) == awsregion.Region("eu-west-1", "AWS_REGION")


def test_boto3_chain_before_the_queue_url(no_region_in_env: pytest.MonkeyPatch) -> None:
    no_region_in_env.setenv("AWS_DEFAULT_REGION", "eu-west-2")
    assert resolve(SEOUL_QUEUE) == awsregion.Region("eu-west-2", "AWS_DEFAULT_REGION")


def test_aws_config_file(no_region_in_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "config").write_text("[default]\nregion = sa-east-1\n")
    no_region_in_env.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    assert resolve(SEOUL_QUEUE) == awsregion.Region("sa-east-1", "the AWS config file")


def test_queue_url_last() -> None:
    assert resolve(SEOUL_QUEUE) == awsregion.Region("ap-northeast-2", "queue.url")


def test_none_is_one_line_naming_what_to_set() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(LOOPBACK_QUEUE)
    message = str(caught.value)
    assert "\n" not in message
    for what in ("aws.region", "AWS_REGION", "AWS_DEFAULT_REGION", "queue.url"):
        assert what in message


@pytest.mark.parametrize(
    ("variable", "source"), [(None, "aws.region"), ("AWS_REGION", "AWS_REGION")]
)
def test_bad_region_name_is_refused(
    no_region_in_env: pytest.MonkeyPatch, variable: str | None, source: str
) -> None:
    if variable:
        no_region_in_env.setenv(variable, "ap northeast 2")
    with pytest.raises(ConfigError, match=f"^{source}: not an AWS region name"):
        resolve(SEOUL_QUEUE, None if variable else "ap northeast 2")


def test_unknown_profile_is_a_config_error(no_region_in_env: pytest.MonkeyPatch) -> None:
    no_region_in_env.setenv("AWS_PROFILE", "nope")
    with pytest.raises(ConfigError, match="profile .nope. could not be found"):
        resolve(SEOUL_QUEUE)


def test_pin_sets_the_region_the_workers_use() -> None:
    cfg = config.from_dict({"queue": {"url": SEOUL_QUEUE}})
    assert cfg.aws.region is None
    assert awsregion.pin(cfg, awsregion.resolve(cfg)).aws.region == "ap-northeast-2"


def test_every_client_of_a_worker_uses_the_pinned_region(tmp_path: Path) -> None:
    # No region anywhere but the pinned one: a client that ignored it would fail to build.
    region = "ap-southeast-1"
    assert TaskQueue(config.QueueConfig(), region=region)._client.meta.region_name == region
    assert CodeStore(tmp_path, 1024, region=region).s3.meta.region_name == region
    publisher = metrics.MetricsPublisher(config.CloudWatchConfig(), region=region)
    assert publisher._client_factory().meta.region_name == region
