"""The component tier's harness: a worker process on the real peers (``Agent``), more
workers on its queue, and what a test reads from their logs. Fixtures are in conftest.py."""

from __future__ import annotations

import io
import multiprocessing
import os
import re
import signal
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from helpers import (
    RUNTIME_IMAGE,
    TaskClient,
    agent_config,
    agent_settings,
    merged,
    scratch_dir,
    wait_until,
)

from nanogrid.common.config import Config, from_dict
from nanogrid.runners.docker.runner import DockerRunner
from nanogrid.runners.pooled import PooledRunner
from nanogrid.runners.process.runner import ProcessRunner
from nanogrid.worker.hostshare import HostShare

HELLO = 'print("Hello from NanoGrid!")\n'


def make_zip(files: dict[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


class Agent(TaskClient):
    """A worker process on a fresh queue, bucket and Redis database."""

    def __init__(self, aws: Any, redis_url: str, tmp: Path, **overrides: Any) -> None:
        self.host: HostShare | None = None
        """The host's shared pages, when the test makes them (else the worker makes its own)."""
        super().__init__(
            aws, redis_url, aws.new_queue("tasks", visibility_timeout=2), aws.new_bucket("code")
        )
        self.dlq_url = aws.new_queue("dlq")
        own = {
            "queue": {
                "url": self.queue_url,
                "wait_time_seconds": 1,
                "max_attempts": 2,
                "dead_letter_url": self.dlq_url,
                "visibility_timeout_seconds": 2,
            },
            "redis": {"url": redis_url, "result_ttl_seconds": 600},
            "paths": {"code_cache_dir": str(tmp / "cache"), "outbox_dir": str(tmp / "outbox")},
            "cloudwatch": {"flush_seconds": 0.2},
            "log": {"level": "DEBUG", "file": str(tmp / "agent.log")},
        }
        settings = agent_settings(
            scratch_dir("nanogrid-work-"),  # sandbox users must reach work_dir
            **merged(own, overrides),
        )
        self.config: Config = from_dict(settings)
        self.log = tmp / "agent.log"
        self.process = multiprocessing.get_context("fork").Process(target=self._run, daemon=True)

    def _run(self) -> None:
        from nanogrid.common import logs
        from nanogrid.worker.loop import serve

        logs.setup(self.config.log, "worker-0")
        os._exit(serve(self.config, 0, host=self.host and self.host.reopened()))

    def start(self) -> Agent:
        self.process.start()
        wait_until(
            lambda: self.log.exists() and "ready" in self.log.read_text(),
            timeout=20,
            what="the worker to boot",
        )
        return self

    def stop(self) -> int | None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGTERM)
        self.process.join(20)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        return self.process.exitcode

    def deploy(self, files: dict[str, str | bytes], key: str | None = None) -> str:
        return self.upload(make_zip(files), key)

    def send_raw(self, body: str) -> None:
        self.aws.sqs().send_message(QueueUrl=self.queue_url, MessageBody=body)

    def queue_depth(self, url: str | None = None) -> int:
        attrs = self.aws.sqs().get_queue_attributes(
            QueueUrl=url or self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return sum(int(v) for v in attrs.values())

    def dead_letters(self) -> list[dict[str, Any]]:
        reply = self.aws.sqs().receive_message(
            QueueUrl=self.dlq_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            MessageAttributeNames=["All"],
        )
        return reply.get("Messages", [])


def fork_worker(config: Config, index: int, host: HostShare | None = None) -> Any:
    """Another worker process on the same config (and so the same queue), as worker ``index``,
    on the host's shared pages ``host`` if given (else pages of its own)."""

    def run() -> None:
        from nanogrid.common import logs
        from nanogrid.worker.loop import serve

        logs.setup(config.log, f"worker-{index}")
        os._exit(serve(config, index, host=host and host.reopened()))

    process = multiprocessing.get_context("fork").Process(target=run, daemon=True)
    process.start()
    return process


def stop(process: Any) -> int | None:
    if process.is_alive():
        os.kill(process.pid, 15)
    process.join(20)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode


def runs_per_request(log: str) -> Counter[str]:
    """How many times each requestId's function started, from the workers' log lines."""
    return Counter(re.findall(r"\| (\S+) \| \[PROCESS\] running ", log))


# -- runners on their own ---------------------------------------------------------------------

SCRATCH: list[Path] = []
"""Work directories made by ``scratch``, removed after the test (the ``containers_agent``
fixture)."""


def scratch(prefix: str) -> Path:
    """A short directory for a runner's sandboxes (a Docker socket path has 107 bytes),
    reachable by sandbox users, removed after the test."""
    path = scratch_dir(prefix)
    SCRATCH.append(path)
    return path


def agent_containers(engine: Any, agent: str) -> list[Any]:
    """The containers of agent id ``agent`` (its label)."""
    return engine.containers.list(all=True, filters={"label": f"nanogrid.agent={agent}"})


MAX_PIDS = 32
"""Processes and threads per invocation in the runners' own tests."""


def runner_config(kind: str, runtimes: dict[str, Any], **changes: Any) -> Config:
    """One worker of runner ``kind`` with ``runtimes`` (and config sections ``changes``), its
    sandboxes in a scratch directory (not paused when idle: the tests time their calls)."""
    return agent_config(
        scratch(f"ng-{kind}-"), kind, runtimes=runtimes, limits={"max_pids": MAX_PIDS},
        docker={"pause_grace_seconds": 60}, **changes,
    )


def start_runner(kind: str, runtimes: dict[str, Any], **changes: Any) -> PooledRunner:
    """A runner of ``kind`` whose pools are warm (a first run during warm-up would be a
    cold start)."""
    config = runner_config(kind, runtimes, **changes)
    runner: PooledRunner = (ProcessRunner if kind == "process" else DockerRunner)(config, 0)
    for name, runtime in config.runtimes.items():
        if name not in runner.unavailable_runtimes():
            wait_until(
                lambda name=name, warm=runtime.warm: runner.pool_stats()[name]["warm"] == warm,
                timeout=30,
                what=f"the warm {name} pool",
            )
    return runner


# -- hostile code (test_hostile.py, test_hostile_node.py) -------------------------------------

MiB = 2**20
TMPFS_MB = 16
MAX_FILE_BYTES = 8 * MiB
"""Below the tmpfs size, so that a huge file meets RLIMIT_FSIZE before /tmp is full."""
MAX_OPEN_FILES = 256
MAX_OUTPUT = 100_000
SECRET = "nanogrid-hostile-FAKE-aws-secret"
CONTRACT_ENV = {
    "NANOGRID_REQUEST_ID", "NANOGRID_FUNCTION_ID", "NANOGRID_MEMORY_MB", "PATH", "HOME", "LANG",
}


def hostile_config(kind: str, base: str) -> Config:
    """A runner of ``kind`` with two warm sandboxes and tight limits, for hostile code."""
    return agent_config(
        base, kind,
        runtimes={"python": {"image": RUNTIME_IMAGE, "warm": 2}},
        limits={
            "max_pids": MAX_PIDS,
            "max_open_files": MAX_OPEN_FILES,
            "max_file_bytes": MAX_FILE_BYTES,
        },
        process={"tmpfs_mb": TMPFS_MB},
        docker={"tmpfs_mb": TMPFS_MB},
    )
