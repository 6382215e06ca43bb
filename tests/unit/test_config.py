"""Config: contract keys, defaults that work, and one clear line naming a bad key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from nanogrid.common import config, environ
from nanogrid.common.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["worker.yaml", "local.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = config.load(REPO / "conf" / name)
    assert cfg.runtimes["python"].command == ("python3", "main.py")
    assert cfg.runtimes["node"].command == ("node", "main.js")
    assert cfg.path == str(REPO / "conf" / name) and cfg.loaded_at


def test_defaults_hold_the_contract_keys() -> None:
    cfg = config.from_dict({})
    assert cfg.queue.wait_time_seconds == 20 and cfg.queue.max_attempts == 3
    assert cfg.queue.dead_letter_url is None
    assert cfg.redis.result_ttl_seconds == 3600
    assert (cfg.http.host, cfg.http.port) == ("0.0.0.0", 8080)
    assert cfg.runtimes["python"].image == "python:3.11-slim"
    assert cfg.runtimes["python"].warm == 4
    node = cfg.runtimes["node"]
    assert (node.image, node.command, node.warm) == ("node:20-slim", ("node", "main.js"), 2)
    assert cfg.cloudwatch.namespace == "NanoGrid"
    assert cfg.autotuner.language == "en" and cfg.tracing.otlp_endpoint is None
    traced = config.from_dict({"tracing": {"otlp_endpoint": "http://127.0.0.1:4318"}})
    assert traced.tracing.otlp_endpoint == "http://127.0.0.1:4318"


def test_a_named_runtime_starts_from_its_own_defaults() -> None:
    cfg = config.from_dict({"runtimes": {"node": {"warm": 1}, "go": {"command": ["./main"]}}})
    assert cfg.runtimes["node"].command == ("node", "main.js") and cfg.runtimes["node"].warm == 1
    assert cfg.runtimes["go"].command == ("./main",) and cfg.runtimes["go"].warm == 4
    assert set(cfg.runtimes) == {"node", "go"}  # a runtimes mapping replaces the defaults


def test_workers_auto_is_the_cpu_count() -> None:
    assert config.from_dict({"workers": "auto"}).workers == (os.cpu_count() or 1)


def test_config_is_frozen() -> None:
    cfg = config.from_dict({})
    with pytest.raises(AttributeError):
        cfg.workers = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.runtimes["go"] = cfg.runtimes["python"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"workers": 0}, "workers: must be between 1 and 256, got 0"),
        ({"workers": "many"}, "workers: must be an integer or 'auto', got 'many'"),
        ({"wokers": 2}, "wokers: unknown key"),
        ({"queue": {"wait_time_seconds": 30}}, "queue.wait_time_seconds: must be between 0 and 20"),
        ({"queue": {"url": "not a url"}}, "queue.url: must be an SQS queue URL"),
        ({"queue": {"colour": 1}}, "queue.colour: unknown key"),
        ({"queue": []}, "queue: must be a mapping"),
        ({"redis": {"url": "http://x"}}, "redis.url: must start with redis://"),
        ({"http": {"port": 70000}}, "http.port: must be between 0 and 65535"),
        ({"runtimes": {}}, "runtimes: must be a non-empty mapping"),
        ({"runtimes": {"python": {"warm": -1}}}, "runtimes.python.warm: must be between 0"),
        (
            {"runtimes": {"python": {"command": "python3 main.py"}}},
            "runtimes.python.command: must be a non-empty list",
        ),
        ({"runtimes": {"bad name!": {}}}, "runtimes: bad name 'bad name!'"),
        ({"limits": {"default_memory_mb": 8000}}, "limits.default_memory_mb: must lie between"),
        ({"cloudwatch": {"enabled": "yes"}}, "cloudwatch.enabled: must be true or false"),
        ({"log": {"level": "LOUD"}}, "log.level: must be one of"),
        ({"autotuner": {"step_mb": [64, 32]}}, "autotuner.step_mb: must be strictly increasing"),
        ({"autotuner": {"language": "de"}}, "autotuner.language: must be one of en, ko, got 'de'"),
        ({"tracing": {"otlp_endpoint": "localhost:4318"}}, "tracing.otlp_endpoint: must be an"),
        ({"tracing": {"endpoint": "x"}}, "tracing.endpoint: unknown key"),
    ],
)
def test_bad_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.from_dict(data)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("workers: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        config.load(broken)


def test_an_empty_file_is_refused_for_want_of_a_queue(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"^queue.url: required: the task queue's URL"):
        config.load(empty)


def test_the_local_profile_gives_the_emulators_queue(tmp_path: Path) -> None:
    local = tmp_path / "local.yaml"
    local.write_text("profile: local\n")
    cfg = config.load(local)
    assert cfg.queue.url == "http://127.0.0.1:5000/123456789012/nanogrid-task-queue"
    assert cfg.workers == 2  # every other key keeps its default
    with pytest.raises(ConfigError, match="profile: must be one of production, local"):
        config.from_dict({"profile": "dev"})


@pytest.mark.parametrize("level", ["info", "Debug", "WARNING", "error"])
def test_log_levels_are_read_in_any_case(level: str) -> None:
    assert config.from_dict({"log": {"level": level}}).log.level == level.upper()


def test_the_environment_overrides_per_host_values_and_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("workers: 2\nredis: {url: 'redis://cache.internal:6379/1'}\n")
    monkeypatch.setenv("NANOGRID_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/1/q")
    monkeypatch.setenv("NANOGRID_WORKERS", "auto")
    monkeypatch.setenv("NANOGRID_HTTP_PORT", "9090")
    monkeypatch.setenv("NANOGRID_LOG_LEVEL", "debug")
    monkeypatch.setenv("NANOGRID_REDIS_PASSWORD", "s3cr@t/pw")
    cfg = config.load(path)
    assert cfg.queue.url == "https://sqs.eu-west-1.amazonaws.com/1/q"
    assert cfg.workers == (os.cpu_count() or 1) and cfg.http.port == 9090
    assert cfg.log.level == "DEBUG"
    assert cfg.redis.url == "redis://:s3cr%40t%2Fpw@cache.internal:6379/1"
    assert redis.Redis.from_url(cfg.redis.url).connection_pool.connection_kwargs["password"] \
        == "s3cr@t/pw"
    assert environ.redacted(cfg.redis.url) == "redis://:***@cache.internal:6379/1"
    assert {"workers", "http.port", "queue.url"} <= cfg.given

    monkeypatch.setenv("NANOGRID_REDIS_URL", "http://:hunter2@cache.internal")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value).startswith("NANOGRID_REDIS_URL: redis.url: must start with redis://")
    assert "hunter2" not in str(caught.value)
    monkeypatch.setenv("NANOGRID_REDIS_URL", "")  # empty: unset
    monkeypatch.setenv("NANOGRID_HTTP_PORT", "eighty")
    with pytest.raises(ConfigError, match=r"^NANOGRID_HTTP_PORT: http.port: must be an integer"):
        config.load(path)


def test_the_config_file_is_found_by_flag_then_environment_then_etc(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NANOGRID_CONFIG", raising=False)
    assert environ.config_path(None) == "/etc/nanogrid/worker.yaml"
    monkeypatch.setenv("NANOGRID_CONFIG", "/srv/agent.yaml")
    assert environ.config_path(None) == "/srv/agent.yaml"
    assert environ.config_path("here.yaml") == "here.yaml"
