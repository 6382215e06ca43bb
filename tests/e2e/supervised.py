"""The e2e tier's agent: bin/nanogrid-supervisor as a real process in its own session.

`Agent` gives each test a supervisor on a fresh queue, bucket and Redis database, in a
directory of its own; the `agents` fixture (conftest.py) SIGKILLs their sessions at teardown.
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
import urllib.request
from pathlib import Path
from typing import Any

import docker
import yaml
from helpers import TaskClient, agent_settings, merged, scratch_dir, wait_until

from nanogrid.devtools.invoke import zip_function

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "bin" / "nanogrid-supervisor"
DRAIN_TIMEOUT_S = 10


class Agent(TaskClient):
    """One supervisor on a fresh queue, bucket and Redis database, in a directory of its own."""

    def __init__(
        self, aws: Any, redis_url: str, beside: Agent | None = None, **settings: Any
    ) -> None:
        """``beside``: another agent whose queue and bucket this one shares (a second host)."""
        super().__init__(
            aws,
            redis_url,
            beside.queue_url if beside else aws.new_queue("e2e", visibility_timeout=2),
            beside.bucket if beside else aws.new_bucket("e2e"),
        )
        # Sandbox users must be able to reach work_dir: not under pytest's 0700 tmp_path.
        self.base = scratch_dir("nanogrid-e2e-")
        self.config_path = self.base / "agent.yaml"
        self.log = self.base / "agent.log"
        self.settings: dict[str, Any] = agent_settings(
            self.base,
            **merged({
                "workers": 2,
                "drain_timeout_seconds": DRAIN_TIMEOUT_S,
                "queue": {
                    "url": self.queue_url,
                    "wait_time_seconds": 1,
                    "visibility_timeout_seconds": 2,
                },
                "redis": {"url": redis_url},
                "http": {"host": "127.0.0.1", "port": 0},
                "runtimes": {"python": {"warm": 2}},
                "cloudwatch": {"enabled": False},
                "log": {"level": "INFO", "file": str(self.log)},
            }, settings),
        )
        self.write_config()
        self.command = [sys.executable, str(BIN)]
        """What starts the supervisor (test_wheel.py: the installed entry point)."""
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def write_config(self, **changes: Any) -> None:
        self.settings.update(changes)
        self.config_path.write_text(yaml.safe_dump(self.settings))

    def start(self, wait_for_workers: bool = True) -> Agent:
        with (self.base / "stderr.log").open("ab") as stderr:
            self.process = subprocess.Popen(
                [*self.command, "-c", str(self.config_path)],
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        self.port = int(self.wait_for_log(r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)").group(1))
        if wait_for_workers:
            self.wait_for_workers(self.settings["workers"])
        return self

    def wait_for_log(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        return wait_until(
            lambda: re.search(pattern, self.log.read_text()),
            timeout=timeout,
            interval=0.02,
            what=f"a log line like {pattern!r}",
        )

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/status"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read())

    def alive(self) -> dict[int, int]:
        """Worker id -> pid of the workers booted and running."""
        return {w["id"]: w["pid"] for w in self.status()["workers"] if w["alive"]}

    def wait_for_workers(
        self, count: int, without: set[int] = frozenset(), timeout: float = 20
    ) -> dict[int, int]:
        def ready() -> dict[int, int] | None:
            alive = self.alive()
            fresh = len(alive) == count and not set(alive.values()) & without
            return alive if fresh and len(self.status()["workers"]) == count else None

        return wait_until(
            ready,
            timeout=timeout,
            interval=0.02,
            what=f"{count} workers alive (not {sorted(without)})",
        )

    def deploy(self, source: Path | str) -> str:
        return self.upload(
            zip_function(source) if isinstance(source, Path) else _zip({"main.py": source})
        )

    def run(self, key: str, timeout: float = 20) -> dict[str, Any]:
        """Invoke the code at ``key`` and wait for its result."""
        return self.call(self.task(key), timeout)

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

    def remove_containers(self) -> None:
        """Its containers, which a SIGKILLed agent leaves (the next agent on the host would
        sweep them; until then they hold memory and skew other tests' timings)."""
        with contextlib.suppress(docker.errors.DockerException):
            engine = docker.from_env()
            for found in engine.api.containers(all=True, filters={"label": "nanogrid.agent"}):
                if found["Labels"].get("nanogrid.dir", "").startswith(str(self.base)):
                    with contextlib.suppress(docker.errors.DockerException):
                        engine.api.remove_container(found["Id"], force=True)
            engine.close()

    def close(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for line in self.leftovers():  # sandboxes live in sessions of their own
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
        if self.settings.get("runner") == "docker":
            self.remove_containers()
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
