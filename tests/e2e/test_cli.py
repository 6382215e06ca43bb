"""bin/nanogrid-supervisor's front door: --check, and one line for a bad config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "bin" / "nanogrid-supervisor"
SEOUL = "queue: {url: 'https://sqs.ap-northeast-2.amazonaws.com/1/q'}\n"


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
    path.write_text(text if "queue:" in text else SEOUL + text)
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
    path.write_text(SEOUL + "runner: process\n" + settings.format(tmp=tmp_path))
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


@pytest.mark.parametrize("check", [True, False])
def test_a_log_sink_that_cannot_be_made_is_a_config_error(tmp_path: Path, check: bool) -> None:
    # Both passed --check and then killed the agent at start or on SIGHUP (issue 24).
    for log, line in [
        (f"{{rotation: 'every tuesday-ish', file: {tmp_path}/agent.log}}",
         "log.rotation: cannot read 'every tuesday-ish': use a size ('50 MB')"),
        (f"{{file: {tmp_path}}}", f"log.file: {tmp_path} is a directory, not a file"),
        ("{file: /proc/nanogrid/agent.log}", "log.file: the agent cannot create files in /proc"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(SEOUL + "runner: process\nhttp: {port: 0}\nlog: " + log + "\n")
        done = supervisor(*(["--check"] if check else []), "-c", str(path))
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert done.stderr.startswith(f"nanogrid-supervisor: config error: {line}")
        assert done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "agent.log").exists()  # checking makes no file


def test_log_levels_in_lower_case_pass(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(SEOUL + "runner: process\nlog: {level: info}\n")
    done = supervisor("--check", "-c", str(path))
    assert done.returncode == 0, done.stderr


def test_queue_url_is_required_unless_the_local_profile_gives_it(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    done = supervisor("--check", "-c", str(path), AWS_REGION="eu-west-1")
    assert done.returncode == 2
    assert done.stderr.startswith("nanogrid-supervisor: config error: queue.url: required")
    from_env = supervisor("--check", "-c", str(path), AWS_REGION="eu-west-1",
                          NANOGRID_QUEUE_URL="https://sqs.eu-west-1.amazonaws.com/1/q")
    assert from_env.returncode == 0, from_env.stderr
    path.write_text("profile: local\nrunner: process\n")
    local = supervisor("--check", "-c", str(path), AWS_REGION="eu-west-1")
    assert local.returncode == 0, local.stderr


def test_the_config_file_comes_from_the_environment_when_not_given(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(SEOUL + "runner: process\n")
    done = supervisor("--check", NANOGRID_CONFIG=str(path))
    assert done.returncode == 0, done.stderr
    assert f"{path}: OK" in done.stdout
    default = supervisor("--check")  # /etc/nanogrid/worker.yaml is not on this machine
    assert "/etc/nanogrid/worker.yaml: cannot read config file" in default.stderr


def test_a_budget_alone_lowers_the_default_largest_task_to_it(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(SEOUL + "runner: process\ncapacity: {memory_mb: 1024}\n")
    done = supervisor("--check", "-c", str(path))
    assert done.returncode == 0, done.stderr
    assert "limits.max_memory_mb 1024: the budget's" in done.stdout
    path.write_text(SEOUL + "runner: process\ncapacity: {memory_mb: 1024}\n"
                    "limits: {max_memory_mb: 3008}\n")
    done = supervisor("--check", "-c", str(path))
    assert done.returncode == 2
    assert "limits.max_memory_mb: 3008 MB does not fit capacity.memory_mb (1024 MB)" in done.stderr
    path.write_text(SEOUL + "runner: process\ncapacity: {memory_mb: 128}\n")
    done = supervisor("--check", "-c", str(path))
    assert done.returncode == 2
    assert ("capacity.memory_mb: 128 MB cannot hold one run of limits.default_memory_mb "
            "(256 MB)") in done.stderr


@pytest.mark.parametrize("script", ["nanogrid-supervisor", "nanogrid-invoke", "nanogrid-local",
                                    "nanogrid-limits", "nanogrid-build-images", "nanogrid-dlq",
                                    "nanogrid-outbox"])
def test_every_script_tells_its_version(script: str) -> None:
    init = (ROOT / "nanogrid" / "__init__.py").read_text()
    version = re.search(r'^__version__ = "([^"]+)"$', init, re.M)[1]
    done = subprocess.run([sys.executable, str(ROOT / "bin" / script), "--version"],
                          capture_output=True, text=True, timeout=30, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{script} {version} (nanogrid-worker)\n"


CONFIG_READERS = {
    "nanogrid-supervisor": ["--check"],
    "nanogrid-invoke": ["examples/hello-python"],
    "nanogrid-limits": ["ls"],
    "nanogrid-dlq": ["ls"],
    "nanogrid-outbox": ["ls"],
}


@pytest.mark.parametrize("script", sorted(CONFIG_READERS))
def test_every_script_finds_the_config_in_nanogrid_config_not_the_working_directory(
        tmp_path: Path, script: str) -> None:
    """-c, else $NANOGRID_CONFIG, else /etc/nanogrid/worker.yaml: a conf/ beside the
    working directory (a checkout's, say) is never read."""
    (tmp_path / "conf").mkdir()
    for name in ("local.yaml", "worker.yaml"):
        (tmp_path / "conf" / name).write_text((ROOT / "conf" / name).read_text())
    bad = tmp_path / "chosen.yaml"
    bad.write_text(SEOUL + "redis: {urll: x}\n")
    env = {**os.environ, "NANOGRID_CONFIG": str(bad)}
    env.pop("NANOGRID_REDIS_URL", None)
    done = subprocess.run([sys.executable, str(ROOT / "bin" / script), *CONFIG_READERS[script]],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "redis.urll: unknown key" in done.stderr
