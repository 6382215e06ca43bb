"""Helpers shared by the tests: free ports, polling, and the real peers they run against.

The peers are real programs, never fakes: `RedisServer` runs Debian's redis-server,
`MotoServer` runs moto_server (SQS, S3 and CloudWatch over HTTP), and `PidsCgroup` confines
the test process to a pids cgroup so hostile code cannot fork-bomb the machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3
import redis

T = TypeVar("T")

RUNTIME_IMAGE = "nanogrid/python:3.11-bookworm"
AWS_REGION = "ap-northeast-2"
REDIS_SERVER = "/usr/bin/redis-server"
_PR_SET_PDEATHSIG = 1

# Pids of the running peers (redis-server, moto_server): spared when a pids cgroup is torn
# down, since a peer restarted by a test is born inside it.
PEER_PIDS: set[int] = set()


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


def _die_with_parent() -> None:
    # Runs in the child before exec: a peer must not outlive a killed pytest.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class PeerProcess:
    """A server program started in its own session, logging to a file, stopped on demand."""

    name = "peer"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the program (a no-op when it runs) and wait until it answers."""
        if self.alive:
            return
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        PEER_PIDS.add(self.process.pid)
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                self.stop()
                raise RuntimeError(f"{self.name} exited: {tail(self.log_path, 3)}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} did not answer within {timeout}s")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return self.ready()
        except OSError:  # refused, reset or timed out: not serving yet
            return False

    def stop(self, hard: bool = False) -> None:
        """Stop the program: SIGTERM (SIGKILL with hard=True, or after 10 s)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        PEER_PIDS.discard(self.process.pid)
        self.process = None


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
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

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


class MotoServer(PeerProcess):
    """moto_server on 127.0.0.1:`port`, emulating SQS, S3 and CloudWatch over real HTTP."""

    name = "moto_server"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir)
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._clients: dict[str, Any] = {}

    def command(self) -> list[str]:
        return [*moto_server_command(), "-H", "127.0.0.1", "-p", str(self.port)]

    def ready(self) -> bool:
        with contextlib.suppress(urllib.error.HTTPError):  # any HTTP answer means serving
            urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
        return True

    def environ(self) -> dict[str, str]:
        """Variables that point boto3 (tests and product code alike) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": AWS_REGION,
            "AWS_DEFAULT_REGION": AWS_REGION,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            # Never fall back on the host's profiles or instance metadata.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, service: str) -> Any:
        """A cached boto3 client, configured only by the environment."""
        if service not in self._clients:
            self._clients[service] = boto3.session.Session().client(service)
        return self._clients[service]

    def sqs(self) -> Any:
        return self.client("sqs")

    def s3(self) -> Any:
        return self.client("s3")

    def cloudwatch(self) -> Any:
        return self.client("cloudwatch")

    def new_queue(
        self, prefix: str = "nanogrid", visibility_timeout: int = 30, **attributes: Any
    ) -> str:
        """Create a queue with a fresh name; return its URL."""
        attrs = {"VisibilityTimeout": str(visibility_timeout)}
        attrs.update({key: str(value) for key, value in attributes.items()})
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        return self.sqs().create_queue(QueueName=name, Attributes=attrs)["QueueUrl"]

    def new_bucket(self, prefix: str = "nanogrid") -> str:
        """Create a bucket with a fresh name; return the name."""
        name = f"{prefix.lower()}-{uuid.uuid4().hex[:12]}"
        self.s3().create_bucket(
            Bucket=name, CreateBucketConfiguration={"LocationConstraint": AWS_REGION}
        )
        return name

    def reset(self) -> None:
        """Forget every queue, bucket and metric."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()


class CgroupError(Exception):
    """The pids cgroup could not be set up; the message is one line."""


class PidsCgroup:
    """A pids cgroup (v1 or v2) holding this process and everything it starts afterwards."""

    def __init__(self, limit: int, name: str | None = None) -> None:
        self.limit = limit
        self.name = name or f"nanogrid-tests-{os.getpid()}"
        self.origin: Path | None = None  # where this process was, and returns to
        self.path: Path | None = None

    def _locate(self) -> tuple[Path, Path]:
        """(the cgroup this process is in, the new cgroup's path)."""
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # unified (v2)
            current = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
            origin = Path("/sys/fs/cgroup") / current.lstrip("/")
            parent = self._v2_parent(Path("/sys/fs/cgroup"), current)
        elif Path("/sys/fs/cgroup/pids").is_dir():  # v1 pids hierarchy
            pids_lines = [line for line in lines if "pids" in line.split(":")[1].split(",")]
            current = pids_lines[0].split(":", 2)[2] if pids_lines else "/"
            origin = parent = Path("/sys/fs/cgroup/pids") / current.lstrip("/")
        else:
            raise CgroupError("no pids cgroup controller found under /sys/fs/cgroup")
        return origin, parent / self.name

    @staticmethod
    def _v2_parent(root: Path, current: str) -> Path:
        # v2 allows controllers for children only in a cgroup without processes of its own
        # (the root excepted): try the current cgroup, then the namespace root.
        for parent in dict.fromkeys([root / current.lstrip("/"), root]):
            if "pids" in (parent / "cgroup.subtree_control").read_text().split():
                return parent
            with contextlib.suppress(OSError):
                (parent / "cgroup.subtree_control").write_text("+pids")
                return parent
        raise CgroupError(f"cannot enable the pids controller in {current} or in the root")

    def enter(self) -> None:
        """Create the cgroup with pids.max = limit and move this process into it."""
        try:
            self.origin, path = self._locate()
        except (OSError, StopIteration) as exc:
            raise CgroupError(f"cannot find this process's cgroup: {exc}") from exc
        try:
            path.mkdir(exist_ok=True)
            self.path = path
            (path / "pids.max").write_text(str(self.limit))
            (path / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.rmdir()
            raise CgroupError(f"cannot set up {path}: {exc.strerror or exc}") from exc
        if os.getpid() not in self.pids():
            raise CgroupError(f"process {os.getpid()} did not move into {path}")

    def pids(self) -> list[int]:
        """Processes in the cgroup and in any cgroup created below it (by the code under test)."""
        assert self.path is not None, "enter() first"
        found: list[int] = []
        for directory in self._tree():
            with contextlib.suppress(FileNotFoundError):
                found += [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
        return found

    def _tree(self) -> list[Path]:
        """The cgroup and its descendants, deepest first."""
        assert self.path is not None, "enter() first"
        return [Path(directory) for directory, _, _ in os.walk(self.path, topdown=False)]

    def leave(self, spare: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """Move this process and the `spare` pids back where this process was, kill what is
        left in the cgroup and below it, remove them; return the pids that had to be killed."""
        assert self.origin is not None and self.path is not None, "enter() first"
        for pid in [os.getpid(), *spare]:
            with contextlib.suppress(ProcessLookupError):
                (self.origin / "cgroup.procs").write_text(str(pid))
        leftovers = self.pids()
        kill_all = self.path / "cgroup.kill"  # v2, Linux 5.14+: kills forks in flight too
        if leftovers and kill_all.exists():
            kill_all.write_text("1")
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for directory in self._tree():
            directory.rmdir()
        return leftovers
