"""The agent's boto3 clients, made in one place so that each says who is calling.

Every client sends ``User-Agent: nanogrid-worker/VERSION python/X.Y.Z`` (botocore adds its
own name and version after it): CloudTrail
and S3 access logs name the agent. A User-Agent given in the client's config is also sent as
it is, where botocore otherwise rebuilds its standard one (some 90 sanitized components) on
every request: about a tenth of the CPU of an SQS call, measured against moto_server.
Endpoint and credentials stay with boto3's own chain (``AWS_ENDPOINT_URL``, instance profile).
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError


def _agent_version() -> str:
    try:
        return metadata.version("nanogrid-worker")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0"


USER_AGENT = f"nanogrid-worker/{_agent_version()} python/{platform.python_version()}"
UNREACHABLE = (BotoConnectionError, HTTPClientError)
"""What a call raises when the service was not reached or did not answer: refused, DNS,
timeouts, a dropped connection."""


def client(service: str, region: str | None, **config: Any) -> Any:
    """A boto3 client of ``service`` in ``region`` with these botocore Config settings."""
    return boto3.client(
        service, region_name=region, config=Config(user_agent=USER_AGENT, **config)
    )
