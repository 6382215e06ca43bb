"""The AWS region every client of the agent uses, resolved once per loaded config.

In this order: the config's ``aws.region``; the environment's ``AWS_REGION`` (the AWS SDKs'
and CLI v2's name, which botocore itself does not read); boto3's own chain
(``AWS_DEFAULT_REGION``, then the profile's ``region`` in the AWS config file); the region
in ``queue.url``'s host (``sqs.ap-northeast-2.amazonaws.com``). None of them is a config
error: botocore would otherwise fail each worker at its first call.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config import Config
from .errors import ConfigError

# botocore's own rule for a region name (botocore.utils.validate_region_name).
_VALID = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")
# A region as AWS names them in hosts: ap-northeast-2, us-gov-west-1, cn-north-1, eusc-de-east-1.
_IN_HOST = re.compile(r"[a-z]{2,4}(?:-[a-z]+)+-\d{1,2}")
_LEGACY_US_EAST_1 = {"queue.amazonaws.com", "sqs.amazonaws.com"}

NOT_FOUND = (
    "aws.region: no AWS region: set aws.region in the config, or AWS_REGION or "
    "AWS_DEFAULT_REGION in the environment, or use a queue.url of the form "
    "https://sqs.REGION.amazonaws.com/ACCOUNT/QUEUE"
)


@dataclass(frozen=True)
class Region:
    name: str
    source: str
    """Where it came from, for people: ``aws.region``, ``AWS_REGION``, ``queue.url``, ..."""


def region_from_url(url: str) -> str | None:
    """The region an SQS queue URL's host names, or None (an emulator on loopback).

    ``sqs.REGION.amazonaws.com``, ``sqs-fips.REGION...``, ``REGION.queue.amazonaws.com``,
    VPC endpoints (``vpce-ID.sqs.REGION.vpce.amazonaws.com``), ``.amazonaws.com.cn``.
    """
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return None
    if host in _LEGACY_US_EAST_1:
        return "us-east-1"
    return next((label for label in host.split(".") if _IN_HOST.fullmatch(label)), None)


def _boto_chain() -> Region | None:
    import botocore.exceptions
    import botocore.session

    try:
        name = botocore.session.Session().get_config_variable("region")
    except botocore.exceptions.BotoCoreError as exc:  # e.g. AWS_PROFILE names no profile
        raise ConfigError(f"aws.region: boto3 cannot read its config: {exc}") from None
    if not name:
        return None
    from_env = os.environ.get("AWS_DEFAULT_REGION") == name
    return Region(name, "AWS_DEFAULT_REGION" if from_env else "the AWS config file")


def resolve(config: Config) -> Region:
    """The region for ``config``; ConfigError (one line naming what to set) when none."""
    if config.aws.region:
        return _valid(Region(config.aws.region, "aws.region"))
    if os.environ.get("AWS_REGION"):
        return _valid(Region(os.environ["AWS_REGION"], "AWS_REGION"))
    found = _boto_chain()
    if found:
        return _valid(found)
    name = region_from_url(config.queue.url or "")
    if name:
        return Region(name, "queue.url")
    raise ConfigError(NOT_FOUND)


def pin(config: Config, region: Region) -> Config:
    """``config`` with ``aws.region`` set to ``region``: what the workers' clients use."""
    return dataclasses.replace(config, aws=dataclasses.replace(config.aws, region=region.name))


def _valid(region: Region) -> Region:
    if not _VALID.fullmatch(region.name):
        raise ConfigError(
            f"{region.source}: not an AWS region name (like ap-northeast-2), got {region.name!r}"
        )
    return region
