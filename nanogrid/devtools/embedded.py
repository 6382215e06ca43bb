"""The embedded peers: a real redis-server and moto_server on loopback, as child processes.

``bin/nanogrid-local`` runs the agent against them (the embedded default, conf/local.yaml)
and the tests run against the same classes, so what the demo starts is what CI exercises.
They are real programs, never fakes: `RedisServer` runs Debian's redis-server, `MotoServer`
runs moto_server (SQS, S3 and CloudWatch over HTTP; installed with the ``test`` extras).

Every peer runs in its own session (a Ctrl-C in the terminal reaches only its parent, which
stops it in order) and gets a signal when its parent dies, so none outlives a killed parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import redis

T = TypeVar("T")

AWS_REGION = "ap-northeast-2"
REDIS_SERVER = "/usr/bin/redis-server"
_PR_SET_PDEATHSIG = 1

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""An HTTP opener that ignores http_proxy: the peers are on this host."""

PEER_PIDS: set[int] = set()
"""Pids of the running peers: the tests spare them when they tear a pids cgroup down, since a
peer restarted by a test is born inside it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> T:
    """Call `predicate` until it returns something truthy and return that; TimeoutError after
    `timeout` seconds. Exceptions from the predicate count as "not yet"."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - "not ready yet" looks like anything
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"waited {timeout}s for {what or predicate}{detail}")
        time.sleep(interval)


def die_with_parent(signum: int = signal.SIGKILL) -> Callable[[], None]:
    """A preexec_fn: the child gets `signum` when its parent dies (no peer outlives it)."""

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)

    return preexec


def tail(path: Path | None, lines: int = 15) -> str:
    """The last `lines` lines of a log file ("" when there is none)."""
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class PeerProcess:
    """A server program started in its own session, logging to a file, stopped on demand.

    Subclasses give ``command`` and ``ready``. ``log_path = None`` leaves the program's output
    on this process's terminal. ``stop_timeout`` is how long ``stop`` waits after SIGTERM
    before SIGKILL; ``death_signal`` is what the program gets when this process dies.
    """

    name = "peer"
    stop_timeout = 10.0
    death_signal = signal.SIGKILL

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path: Path | None = workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, timeout: float = 30.0) -> None:
        """Start the program (a no-op when it runs) and wait until it answers; RuntimeError
        when it exits first, TimeoutError when it does not answer in time (it is stopped)."""
        if self.alive:
            return
        with contextlib.ExitStack() as stack:
            log: IO[bytes] | None = None
            if self.log_path is not None:
                log = stack.enter_context(self.log_path.open("ab"))
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log is not None else None,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=die_with_parent(self.death_signal),
            )
        PEER_PIDS.add(self.process.pid)
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll() if self.process is not None else None
            if code is not None:
                self.stop()
                last = tail(self.log_path, 3)
                raise RuntimeError(
                    f"{self.name} exited with code {code}" + (f": {last}" if last else "")
                )
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} did not answer within {timeout:g}s")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return self.ready()
        except (OSError, ValueError):  # refused, reset, timed out, half-written: not yet
            return False

    def stop(self, hard: bool = False) -> None:
        """Stop the program: SIGTERM (SIGKILL with hard=True, or after ``stop_timeout``)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        PEER_PIDS.discard(self.process.pid)
        self.process = None


def redis_answers(port: int, host: str = "127.0.0.1") -> bool:
    """True when a Redis server answers PING on (host, port); OSError when nothing listens."""
    with socket.create_connection((host, port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


class RedisServer(PeerProcess):
    """Debian's redis-server on 127.0.0.1:`port`, no persistence; restartable on that port."""

    name = "redis-server"

    def __init__(self, workdir: Path, port: int | None = None, binary: str | None = None) -> None:
        super().__init__(workdir)
        self.port = port or free_port()
        self.binary = binary or shutil.which("redis-server") or REDIS_SERVER
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            "",
        ]

    def ready(self) -> bool:
        return redis_answers(self.port)

    def client(self, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("socket_connect_timeout", 5)
        return redis.Redis.from_url(self.url, **kwargs)


def moto_server_command() -> list[str]:
    """moto_server of the running interpreter's environment."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("moto_server")
    return [found] if found else [sys.executable, "-m", "moto.server"]


def moto_answers(endpoint: str) -> bool:
    """True when `endpoint` is a moto server (its /moto-api/data.json is a JSON object)."""
    with DIRECT.open(f"{endpoint}/moto-api/data.json", timeout=2) as response:
        return isinstance(json.loads(response.read()), dict)


class MotoServer(PeerProcess):
    """moto_server on 127.0.0.1:`port`, emulating SQS, S3 and CloudWatch over real HTTP."""

    name = "moto_server"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir)
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [*moto_server_command(), "-H", "127.0.0.1", "-p", str(self.port)]

    def ready(self) -> bool:
        with contextlib.suppress(urllib.error.HTTPError):  # any HTTP answer means serving
            DIRECT.open(f"{self.endpoint}/moto-api/", timeout=1).close()
        return True

    def environ(self) -> dict[str, str]:
        """Variables that point boto3 (tests and product code alike) at this server."""
        return aws_environ(self.endpoint)


def aws_environ(endpoint: str) -> dict[str, str]:
    """The AWS_* variables that point boto3 at an emulator at `endpoint`, and only there."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": AWS_REGION,
        "AWS_DEFAULT_REGION": AWS_REGION,  # what this botocore reads for the region
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        # Never fall back on the host's profiles or instance metadata.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
