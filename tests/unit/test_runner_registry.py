"""Runners are chosen by name through one registry."""

from __future__ import annotations

import pytest

from nanogrid import runners
from nanogrid.common.config import from_dict
from nanogrid.common.errors import ConfigError
from nanogrid.runners.docker import DockerRunner
from nanogrid.runners.process import ProcessRunner


def test_the_registry_names_each_runner_class() -> None:
    assert runners.runner_class("process") is ProcessRunner
    assert runners.runner_class("docker") is DockerRunner


def test_an_unknown_runner_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"^runner: must be one of docker, process, got 'lxc'$"):
        runners.check_config(from_dict({"runner": "lxc"}))


def test_the_configured_runner_checks_its_own_settings() -> None:
    config = from_dict({"runner": "docker", "docker": {"socket_dir": "/x" * 60}})
    with pytest.raises(ConfigError, match=r"^docker.socket_dir: .* is too long"):
        runners.check_config(config)
