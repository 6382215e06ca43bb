"""Each bad setting tried three ways on the real supervisor: ``--check``, a start, and a SIGHUP
to a running agent. The rule (issue 24): ``--check`` fails whatever a start or a reload would
fail on, in the same one line, and a reload that fails keeps the old config.

The table in docs/operations.md is this test's output: it fails when the table differs, and
``NANOGRID_WRITE_DOCS=1`` rewrites it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import wait_until
from supervised import BIN, ROOT, Agent

pytestmark = pytest.mark.usefixtures("pids_limited_tests")  # own cgroups for our sandboxes

DOCS = ROOT / "docs" / "operations.md"
BEGIN, END = "<!-- bad-settings:begin -->", "<!-- bad-settings:end -->"
QUEUE = "https://sqs.ap-northeast-2.amazonaws.com/123456789012/q"

BAD: list[tuple[str, dict[str, Any] | str]] = [
    ("log.rotation: every tuesday-ish", {"log": {"rotation": "every tuesday-ish"}}),
    ("log.file: a directory", {"log": {"file": "<dir>"}}),
    ("log.file: under /proc", {"log": {"file": "/proc/nanogrid/agent.log"}}),
    ("log.level: LOUD", {"log": {"level": "LOUD"}}),
    ("no queue.url", {"queue": {"wait_time_seconds": 1}}),
    ("queue.url: not a URL", {"queue": {"url": "nanogrid-task-queue"}}),
    ("queue.wait_time_seconds: 30", {"queue": {"url": QUEUE, "wait_time_seconds": 30}}),
    ("queue.visibility_timeout_seconds: 0",
     {"queue": {"url": QUEUE, "visibility_timeout_seconds": 0}}),
    ("queue.dead_letter_url: not a URL", {"queue": {"url": QUEUE, "dead_letter_url": "dlq"}}),
    ("redis.url: http://", {"redis": {"url": "http://127.0.0.1:6379"}}),
    ("workers: 0", {"workers": 0}),
    ("workers: many", {"workers": "many"}),
    ("runner: podman", {"runner": "podman"}),
    ("http.port: 70000", {"http": {"host": "127.0.0.1", "port": 70000}}),
    ("runtimes: {}", {"runtimes": {}}),
    ("runtimes.python.command: a string", {"runtimes": {"python": {"command": "python3 x"}}}),
    ("runtimes.python.warm: -1", {"runtimes": {"python": {"warm": -1}}}),
    ("limits.default_memory_mb: 8000", {"limits": {"default_memory_mb": 8000}}),
    ("limits.max_memory_mb above capacity.memory_mb",
     {"capacity": {"memory_mb": 1024}, "limits": {"max_memory_mb": 3008}}),
    ("capacity.memory_mb: 128", {"capacity": {"memory_mb": 128}}),
    ("pool.max_idle: 0", {"pool": {"max_idle": 0}}),
    ("pool.warm_timeout_seconds: forever", {"pool": {"warm_timeout_seconds": "forever"}}),
    ("autotuner.step_mb: not increasing", {"autotuner": {"step_mb": [64, 32]}}),
    ("paths.work_dir: below a file", {"paths": {"work_dir": "/proc/version/work"}}),
    ("paths.code_cache_dir: under /proc", {"paths": {"code_cache_dir": "/proc/nanogrid"}}),
    ("paths.outbox_dir: below a file", {"paths": {"outbox_dir": "/etc/hostname/outbox"}}),
    ("docker.user: a name", {"docker": {"user": "nobody"}}),
    ("docker.user: root", {"docker": {"user": "0:0"}}),
    ("process.network: host, metadata_service unset", {"process": {"network": "host"}}),
    ("process.sandbox_uid_base: an account's uids", {"process": {"sandbox_uid_base": 65000}}),
    ("aws.region: not a region", {"aws": {"region": "ap northeast 2"}}),
    ("an unknown key", {"wokers": 2}),
    ("cloudwatch.enabled: yes (a string)", {"cloudwatch": {"enabled": "yes"}}),
    ("profile: dev", {"profile": "dev"}),
    ("not YAML", "workers: [\n"),
]


def bad_file(agent: Agent, change: dict[str, Any] | str) -> str:
    """The agent's own (good) settings with ``change`` merged in, as YAML."""
    if isinstance(change, str):
        return change
    settings = {key: dict(value) if isinstance(value, dict) else value
                for key, value in agent.settings.items()}
    for key, value in change.items():
        value = _placed(value, agent.base)
        merge = value and key != "queue"  # {} and a queue without url replace the section
        if merge and isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return yaml.safe_dump(settings)


def _placed(value: Any, base: Path) -> Any:
    if isinstance(value, dict):
        return {k: _placed(v, base) for k, v in value.items()}
    return str(base) if value == "<dir>" else value


def supervisor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BIN), *args], capture_output=True, text=True,
                          timeout=60, start_new_session=True)


def test_check_fails_whatever_start_or_reload_fails_on(agents: Any) -> None:
    agent = agents(workers=1, runtimes={"python": {"warm": 1}}).start()
    good = agent.config_path.read_text()
    before = agent.alive()
    loaded_at = agent.status()["configLoadedAt"]
    bad_path = agent.base / "bad.yaml"
    rows = []
    for number, (what, change) in enumerate(BAD, start=1):
        text = bad_file(agent, change)
        bad_path.write_text(text)
        check = supervisor("--check", "-c", str(bad_path))
        start = supervisor("-c", str(bad_path))
        agent.config_path.write_text(text)
        agent.signal(signal.SIGHUP)
        line = reload_answer(agent, number)
        message = check.stderr.removeprefix("nanogrid-supervisor: config error: ").rstrip("\n")
        message = message.replace(str(bad_path), str(agent.config_path))  # the same file
        assert (check.returncode, check.stdout, check.stderr.count("\n")) == (2, "", 1), what
        assert (start.returncode, start.stderr) == (2, check.stderr), what
        assert line == message, what
        did = (f"exit {check.returncode}", f"exit {start.returncode}",
               "refused, old config kept" if line == message else "reloaded")
        rows.append((what, *did, message.replace(str(agent.base), "DIR")))
    agent.config_path.write_text(good)
    assert agent.alive() == before
    assert agent.status()["configLoadedAt"] == loaded_at
    assert agent.run(agent.deploy(ROOT / "examples" / "hello-python"))["status"] == "SUCCESS"
    assert "Traceback" not in agent.log.read_text()
    table = render(rows)
    documented = DOCS.read_text()
    start, end = documented.index(BEGIN) + len(BEGIN), documented.index(END)
    if os.environ.get("NANOGRID_WRITE_DOCS") == "1":
        DOCS.write_text(documented[:start] + table + documented[end:])
    else:
        assert documented[start:end] == table, "docs/operations.md is out of date: " \
            "run this test with NANOGRID_WRITE_DOCS=1"


def reload_answer(agent: Agent, number: int) -> str:
    """What the agent said to its ``number``-th SIGHUP: the reason it refused it, or the
    line saying it reloaded."""
    def answers() -> list[str] | None:
        said = [line for line in agent.log.read_text().splitlines()
                if "reload refused" in line or "| reloaded " in line]
        return said if len(said) >= number else None

    line = wait_until(answers, timeout=20, what=f"the answer to SIGHUP {number}")[number - 1]
    refused = re.search(r"reload refused, still running on the config loaded at \S+: (.*)", line)
    return refused.group(1) if refused else line


def render(rows: list[tuple[str, str, str, str, str]]) -> str:
    lines = ["", f"{len(rows)} bad settings, each tried on `--check`, a start and a SIGHUP "
             "(`tests/e2e/test_bad_settings.py`). Every one: `--check` exits 2 with the line "
             "shown; a start exits 2 with the same line, before it listens or forks; a SIGHUP "
             "logs `reload refused, still running on the config loaded at ...:` and the same "
             "line, and the workers serve on unchanged.", "",
             "| setting | `--check` | start | SIGHUP | the one line (`config error: ...`) |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {what} | {check} | {start} | {hup} | `{message}` |"
              for what, check, start, hup, message in rows]
    return "\n".join(lines) + "\n"


def test_processes_are_titled_by_role(agents: Any) -> None:
    agent = agents(workers=2).start()
    assert agent.process is not None
    config = str(agent.config_path.resolve())
    titles = {pid: _title(pid) for pid in [agent.process.pid, *agent.alive().values()]}
    assert titles[agent.process.pid] == f"nanogrid: supervisor [{config}]"
    for index, pid in agent.alive().items():
        assert titles[pid] == f"nanogrid: worker {index} [{config}]"


def _title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().strip()
