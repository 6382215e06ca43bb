"""The agent's ``NANOGRID_*`` environment: where its config file is, and the per-host values
and secrets that override the file's (systemd's ``EnvironmentFile=``, mode 0600), so one
file serves every host and a password never has to sit in the YAML.

Each override replaces its key before the file is validated, so a bad value is refused like
one in the file, naming the variable. An empty variable counts as unset.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import yaml

CONFIG = "NANOGRID_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/nanogrid/worker.yaml"
QUEUE_URL = "NANOGRID_QUEUE_URL"
REDIS_PASSWORD = "NANOGRID_REDIS_PASSWORD"

OVERRIDES: dict[str, tuple[str, bool]] = {
    QUEUE_URL: ("queue.url", False),
    "NANOGRID_DEAD_LETTER_URL": ("queue.dead_letter_url", False),
    "NANOGRID_REDIS_URL": ("redis.url", False),
    "NANOGRID_WORKERS": ("workers", True),
    "NANOGRID_HTTP_HOST": ("http.host", False),
    "NANOGRID_HTTP_PORT": ("http.port", True),
    "NANOGRID_LOG_LEVEL": ("log.level", False),
    "NANOGRID_LOG_FILE": ("log.file", False),
}
"""Variable -> (the key it replaces, whether its text is read as a YAML scalar: ``4`` an
integer, ``auto`` a word); the others are taken as they are (URLs, hosts)."""


def config_path(given: str | None) -> str:
    """The config file: ``-c PATH``, else ``$NANOGRID_CONFIG``, else /etc/nanogrid/worker.yaml."""
    return given or os.environ.get(CONFIG) or DEFAULT_CONFIG_PATH


def apply(data: Any, env: Mapping[str, str]) -> tuple[Any, dict[str, str]]:
    """``data`` (the parsed file) with the overrides set in ``env``, and key -> variable of
    each one applied. A ``data`` that is not a mapping is left for validation to refuse."""
    if not isinstance(data, Mapping):
        return data, {}
    merged: dict[str, Any] = dict(data)
    sources = {}
    for variable, (key, scalar) in OVERRIDES.items():
        text = env.get(variable)
        if not text:
            continue
        value = yaml.safe_load(text) if scalar else text
        section, _, name = key.rpartition(".")
        if section:
            inner = merged.get(section)
            merged[section] = {**(inner if isinstance(inner, Mapping) else {}), name: value}
        else:
            merged[key] = value
        sources[key] = variable
    return merged, sources


def with_redis_password(url: str, env: Mapping[str, str]) -> str:
    """redis.url with ``$NANOGRID_REDIS_PASSWORD`` (when set) as its password."""
    password = env.get(REDIS_PASSWORD)
    if not password:
        return url
    parts = urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def redacted(url: str) -> str:
    """``url`` with its password, if any, shown as ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
