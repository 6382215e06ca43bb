"""bin/nanogrid-supervisor as a real process in its own session, sent real signals.

The agent runs the process runner on the real peers (moto_server for SQS and S3,
redis-server); tasks go in through SQS and results come back through Redis, as the
controller sends and receives them. Every test is bounded in time, and the whole session
is SIGKILLed at teardown; `leftovers()` finds any process (worker or sandbox) that
outlived the supervisor, by the test's unique directory in its command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from helpers import free_port, wait_until

from supervisor.invoke import invoke, zip_function

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "bin" / "nanogrid-supervisor"
HELLO = ROOT / "examples" / "hello-python"
SLOW_S = 2.0
SLOW = f"import time\ntime.sleep({SLOW_S})\nprint('slow done')\n"
DRAIN_TIMEOUT_S = 10

pytestmark = pytest.mark.usefixtures("pids_limited_tests")  # own cgroups for our sandboxes


class Agent:
    """One supervisor on a fresh queue, bucket and Redis database, in a directory of its own."""

    def __init__(self, aws: Any, redis_url: str, **settings: Any) -> None:
        self.aws = aws
        # Sandbox users must be able to reach work_dir: not under pytest's 0700 tmp_path.
        self.base = Path(tempfile.mkdtemp(prefix="nanogrid-e2e-"))
        os.chmod(self.base, 0o711)
        self.config_path = self.base / "agent.yaml"
        self.log = self.base / "agent.log"
        self.queue_url = aws.new_queue("e2e", visibility_timeout=2)
        self.bucket = aws.new_bucket("e2e")
        self.redis = redis.Redis.from_url(redis_url)
        self.settings: dict[str, Any] = {
            "workers": 2,
            "runner": "process",
            "drain_timeout_seconds": DRAIN_TIMEOUT_S,
            "queue": {"url": self.queue_url, "wait_time_seconds": 1,
                      "visibility_timeout_seconds": 2},
            "redis": {"url": redis_url},
            "http": {"host": "127.0.0.1", "port": 0},
            "runtimes": {"python": {"warm": 2}},
            "paths": {"code_cache_dir": str(self.base / "cache"),
                      "work_dir": str(self.base / "work"),
                      "outbox_dir": str(self.base / "outbox")},
            "cloudwatch": {"enabled": False},
            "log": {"level": "INFO", "file": str(self.log)},
            **settings,
        }
        self.write_config()
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def write_config(self, **changes: Any) -> None:
        self.settings.update(changes)
        self.config_path.write_text(yaml.safe_dump(self.settings))

    def start(self, wait_for_workers: bool = True) -> Agent:
        with (self.base / "stderr.log").open("ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(BIN), "-c", str(self.config_path)], cwd=self.base,
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True,
            )
        self.port = int(self.wait_for_log(r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)").group(1))
        if wait_for_workers:
            self.wait_for_workers(self.settings["workers"])
        return self

    def wait_for_log(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        return wait_until(lambda: re.search(pattern, self.log.read_text()), timeout=timeout,
                          interval=0.02, what=f"a log line like {pattern!r}")

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/status"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read())

    def alive(self) -> dict[int, int]:
        """Worker id -> pid of the workers booted and running."""
        return {w["id"]: w["pid"] for w in self.status()["workers"] if w["alive"]}

    def wait_for_workers(self, count: int, without: set[int] = frozenset(),
                         timeout: float = 20) -> dict[int, int]:
        def ready() -> dict[int, int] | None:
            alive = self.alive()
            fresh = len(alive) == count and not set(alive.values()) & without
            return alive if fresh and len(self.status()["workers"]) == count else None

        return wait_until(ready, timeout=timeout, interval=0.02,
                          what=f"{count} workers alive (not {sorted(without)})")

    def deploy(self, source: Path | str) -> str:
        code = zip_function(source) if isinstance(source, Path) else _zip({"main.py": source})
        key = f"functions/f-{uuid.uuid4().hex[:8]}/v1.zip"
        self.aws.s3().put_object(Bucket=self.bucket, Key=key, Body=code)
        return key

    def task(self, key: str) -> dict[str, Any]:
        return {"requestId": f"req-{uuid.uuid4().hex}", "functionId": "fn", "runtime": "python",
                "s3Bucket": self.bucket, "s3Key": key}

    def call(self, key: str, timeout: float = 20) -> dict[str, Any]:
        result = invoke(self.aws.sqs(), self.redis, self.queue_url, self.task(key), timeout)
        assert result is not None, f"no result within {timeout}s"
        return result

    def send(self, key: str) -> str:
        task = self.task(key)
        self.aws.sqs().send_message(QueueUrl=self.queue_url, MessageBody=json.dumps(task))
        return task["requestId"]

    def result(self, request_id: str, timeout: float = 30) -> dict[str, Any]:
        stored = wait_until(lambda: self.redis.get(f"result:{request_id}"), timeout=timeout,
                            what=f"the result of {request_id}")
        return json.loads(stored)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def leftovers(self) -> list[str]:
        """Command lines of processes still running from this agent's directory."""
        found = []
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if str(self.base) in cmdline and state != "Z":
                    found.append(f"{proc.name}: {cmdline}")
        return found

    def close(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for line in self.leftovers():  # sandboxes live in sessions of their own
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
        self.redis.close()
        shutil.rmtree(self.base, ignore_errors=True)


def _zip(files: dict[str, str]) -> bytes:
    directory = Path(tempfile.mkdtemp())
    try:
        for name, text in files.items():
            (directory / name).write_text(text)
        return zip_function(directory)
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def agents(aws: Any, redis_url: str) -> Iterator[Any]:
    made: list[Agent] = []

    def make(**settings: Any) -> Agent:
        made.append(Agent(aws, redis_url, **settings))
        return made[-1]

    yield make
    for agent in made:
        agent.close()


def test_killed_worker_is_replaced_and_serving_again_within_2s(
        agents: Any, record_property: Any) -> None:
    agent = agents(workers=1).start()
    hello = agent.deploy(HELLO)
    assert agent.call(hello)["status"] == "SUCCESS"
    (victim,) = agent.alive().values()

    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    request_id = agent.send(hello)  # waits in the queue for the replacement
    (replacement,) = agent.wait_for_workers(1, without={victim}, timeout=5).values()
    booted_s = time.monotonic() - killed_at
    result = agent.result(request_id, timeout=10)
    served_s = time.monotonic() - killed_at

    assert result["status"] == "SUCCESS" and result["stdout"] == "Hello from NanoGrid!\n"
    assert result["workerId"].endswith(f":{replacement}")
    assert agent.status()["workers"][0]["restarts"] == 1
    agent.wait_for_log(rf"worker 0 \(pid {victim}\) was killed by SIGKILL; replacing it in 0s")
    record_property("replacement_booted_s", round(booted_s, 3))
    record_property("replacement_first_result_s", round(served_s, 3))
    print(f"killed worker: replacement booted in {booted_s:.3f}s, "
          f"its first result {served_s:.3f}s after the kill")
    assert booted_s < 2.0, f"replacement booted {booted_s:.2f}s after the kill"
    assert served_s < 2.0, f"first result {served_s:.2f}s after the kill"


def test_sigkill_mid_run_the_task_still_completes(agents: Any) -> None:
    agent = agents().start()
    request_id = agent.send(agent.deploy(SLOW))
    running = wait_until(
        lambda: next((w for w in agent.status()["workers"]
                      if w["currentRequestId"] == request_id), None),
        timeout=15, what="the slow task to start")
    os.kill(running["pid"], signal.SIGKILL)

    result = agent.result(request_id, timeout=30)  # back after the visibility timeout
    assert result["status"] == "SUCCESS" and result["stdout"] == "slow done\n"
    assert result["attempt"] == 2
    assert not result["workerId"].endswith(f":{running['pid']}")
    agent.wait_for_workers(2, without={running["pid"]})


def test_sighup_to_a_different_worker_count(agents: Any) -> None:
    agent = agents().start()
    hello = agent.deploy(HELLO)
    old = set(agent.alive().values())
    agent.write_config(workers=3, runtimes={"python": {"warm": 3}})
    agent.signal(signal.SIGHUP)
    new = agent.wait_for_workers(3, without=old)
    assert sorted(new) == [0, 1, 2]
    assert agent.call(hello)["status"] == "SUCCESS"
    pools = wait_until(lambda: agent.status()["pools"], timeout=5, what="pool stats")
    assert set(pools["python"]) == {"warm", "busy"}
    agent.wait_for_log(r"reloaded .*: 3 workers, runner process")
    assert "SIGKILL" not in agent.log.read_text()  # the old workers drained


def test_sighup_with_a_broken_file_keeps_serving_on_the_old_config(agents: Any) -> None:
    agent = agents().start()
    hello = agent.deploy(HELLO)
    before = agent.alive()
    agent.config_path.write_text("workers: 3\nrunner: podman\n")
    agent.signal(signal.SIGHUP)
    agent.wait_for_log(r"reload refused, still running on the config loaded at .*: "
                       r"runner: must be one of docker, process, got 'podman'")
    assert agent.call(hello)["status"] == "SUCCESS"
    assert agent.alive() == before


def test_sigterm_finishes_in_flight_run_and_leaves_no_process(agents: Any) -> None:
    agent = agents().start()
    request_id = agent.send(agent.deploy(SLOW))
    wait_until(lambda: any(w["currentRequestId"] == request_id
                           for w in agent.status()["workers"]),
               timeout=15, what="the slow task to start")
    assert agent.leftovers()  # workers and their warm sandboxes
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.process is not None and agent.process.wait(timeout=DRAIN_TIMEOUT_S) == 0
    assert time.monotonic() - started < DRAIN_TIMEOUT_S
    assert agent.result(request_id, timeout=1)["status"] == "SUCCESS"  # finished, not cut
    assert agent.leftovers() == []
    assert list((agent.base / "work").glob("w*/*")) == []  # sandboxes removed
    log = agent.log.read_text()
    assert "received SIGTERM" in log and "SIGKILL" not in log and log.rstrip().endswith("stopped")


def test_worker_that_cannot_reach_redis_is_retried_with_backoff(agents: Any) -> None:
    agent = agents(workers=1, redis={"url": f"redis://127.0.0.1:{free_port()}/0"})
    agent.start(wait_for_workers=False)
    agent.wait_for_log(r"could not boot .*EXIT_BOOT_ERROR\)\); retry 2 in 2s", timeout=15)
    log = agent.log.read_text()
    assert len(re.findall(r"worker 0 started", log)) == 2  # 1 s apart, not a hot loop
    assert "Traceback" not in log
    with pytest.raises(urllib.error.HTTPError) as down:
        urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/health", timeout=5)
    assert down.value.code == 503


def test_bad_config_at_start_is_one_line_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("workers: 2\nqueue:\n  wait_time_seconds: 30\n")
    done = subprocess.run([sys.executable, str(BIN), "-c", str(config)], capture_output=True,
                          text=True, timeout=30, start_new_session=True)
    assert done.returncode == 2
    assert done.stderr == ("nanogrid-supervisor: config error: queue.wait_time_seconds: "
                           "must be between 0 and 20, got 30\n")
