"""bin/nanogrid-supervisor's front door: --check, and one line for a bad config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "bin" / "nanogrid-supervisor"


def supervisor(*args: str, **aws: str) -> subprocess.CompletedProcess[str]:
    """Run it with no AWS settings in the environment but ``aws`` (and no AWS config file)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true", **aws)
    return subprocess.run([sys.executable, str(BIN), *args], capture_output=True, text=True,
                          timeout=30, cwd="/", env=env)


@pytest.mark.parametrize("name", ["worker.yaml", "local.yaml"])
def test_check_accepts_the_shipped_configs(name: str) -> None:
    done = supervisor("--check", "-c", str(ROOT / "conf" / name))
    assert done.returncode == 0, done.stderr
    assert f"conf/{name}: OK" in done.stdout


@pytest.mark.parametrize(("text", "line"), [
    ("workers: 0\n", "workers: must be between 1 and 256, got 0"),
    ("workers: 2\nredis: {urll: x}\n", "redis.urll: unknown key"),
    ("runner: [\n", "not valid YAML"),
    ("docker: {user: nobody}\n", "docker.user: must be uid:gid numbers, got 'nobody'"),
    ("docker: {user: '0:0'}\n", "docker.user: functions must not run as root (uid 0)"),
    ("aws: {region: 5}\n", "aws.region: must be a non-empty string, got 5"),
    ("aws: {region: 'ap northeast 2'}\n", "aws.region: not an AWS region name"),
    ("queue: {url: 'http://127.0.0.1:5000/1/q'}\n", "aws.region: no AWS region: set aws.region"),
    (f"runner: docker\ndocker: {{socket_dir: /var/lib/{'x' * 40}}}\n",
     "docker.socket_dir: '/var/lib/xxxxxxxx"),
    ("runner: docker\ndocker: {network: bridge}\n",
     "docker.metadata_service: must be blocked or allowed when docker.network is bridge: "
     "functions could reach the instance metadata service (169.254.169.254)"),
    ("process: {metadata_service: open}\n",
     "process.metadata_service: must be one of blocked, allowed, got 'open'"),
])
@pytest.mark.parametrize("check", [True, False])
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, line: str,
                                               check: bool) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    done = supervisor(*(["--check"] if check else []), "-c", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and line in done.stderr
    assert done.stderr.startswith("nanogrid-supervisor: config error: ")


def test_missing_config_file() -> None:
    done = supervisor("-c", "/nonexistent/worker.yaml")
    assert done.returncode == 2
    assert done.stderr == ("nanogrid-supervisor: config error: /nonexistent/worker.yaml: "
                           "cannot read config file: No such file or directory\n")


def test_check_finds_the_region_in_the_queue_url(tmp_path: Path) -> None:
    path = tmp_path / "seoul.yaml"
    path.write_text("runner: process\nqueue: {url: 'https://sqs.ap-northeast-2.amazonaws.com/1/q'}\n")
    done = supervisor("--check", "-c", str(path))
    assert done.returncode == 0, done.stderr
    assert "AWS region ap-northeast-2 from queue.url" in done.stdout


@pytest.mark.parametrize(("aws", "source"), [
    ({"AWS_REGION": "eu-west-1"}, "AWS_REGION"),
    ({"AWS_DEFAULT_REGION": "eu-west-1"}, "AWS_DEFAULT_REGION"),
])
def test_check_takes_the_region_from_the_environment(tmp_path: Path, aws: dict[str, str],
                                                     source: str) -> None:
    path = tmp_path / "loopback.yaml"
    path.write_text("runner: process\nqueue: {url: 'http://127.0.0.1:5000/1/q'}\n")
    done = supervisor("--check", "-c", str(path), **aws)
    assert done.returncode == 0, done.stderr
    assert f"AWS region eu-west-1 from {source}" in done.stdout


@pytest.mark.parametrize(("settings", "line"), [
    ("paths: {{work_dir: {tmp}/work}}\n",  # pytest's tmp_path is 0700
     "paths.work_dir: sandbox users cannot reach {tmp}/work ({tmp} needs o+x"),
    ("paths: {{work_dir: /proc/version/work}}\n",
     "paths.work_dir: /proc/version is not a directory"),
    ("workers: 1\nprocess: {{sandbox_uid_base: 65000}}\n",
     "process.sandbox_uid_base: the sandbox uids 65000-65999 include uid 65534 of the account "
     "'nobody'"),
    ("process: {{network: host}}\n",
     "process.metadata_service: must be blocked or allowed when process.network is host: "
     "functions could reach the instance metadata service (169.254.169.254)"),
])
@pytest.mark.parametrize("check", [True, False])
def test_a_setting_the_workers_can_never_boot_on_is_a_config_error(
    tmp_path: Path, settings: str, line: str, check: bool
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("runner: process\n" + settings.format(tmp=tmp_path))
    done = supervisor(*(["--check"] if check else []), "-c", str(path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and line.format(tmp=tmp_path) in done.stderr


@pytest.mark.parametrize("setting", ["blocked", "allowed"])
def test_the_hosts_network_is_accepted_once_the_metadata_service_is_decided(
    tmp_path: Path, setting: str
) -> None:
    path = tmp_path / "host.yaml"
    path.write_text(
        "runner: process\nqueue: {url: 'https://sqs.ap-northeast-2.amazonaws.com/1/q'}\n"
        f"process: {{network: host, metadata_service: {setting}}}\n"
    )
    done = supervisor("--check", "-c", str(path))
    assert done.returncode == 0, done.stderr


def test_an_otlp_endpoint_without_the_sdk_is_a_config_error(tmp_path: Path) -> None:
    """Spans asked for, the OpenTelemetry SDK missing: refused at start, not a worker that
    crashes on boot. The SDK is hidden from the supervisor's interpreter (``-c`` prelude)."""
    path = tmp_path / "traced.yaml"
    path.write_text("queue: {url: 'https://sqs.ap-northeast-2.amazonaws.com/1/q'}\n"
                    "tracing: {otlp_endpoint: 'http://127.0.0.1:4318'}\n")
    hide = ("import sys; sys.modules['opentelemetry.sdk.trace'] = None; "
            f"sys.argv = ['{BIN}', '--check', '-c', '{path}']; "
            f"exec(compile(open('{BIN}').read(), '{BIN}', 'exec'), "
            f"{{'__file__': '{BIN}', '__name__': '__main__'}})")
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    done = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True,
                          timeout=30, cwd="/", env=env)
    assert done.returncode == 2
    assert "tracing.otlp_endpoint is set but the OpenTelemetry SDK is not installed" in done.stderr
    assert supervisor("--check", "-c", str(path)).returncode == 0  # with it installed
