"""Helpers shared by the tests: free ports, polling, and the real peers they run against.

`OtlpCollector` is the receiving end of OTLP/HTTP (what an OpenTelemetry Collector listens
with on 4318), in the test process: the agent's spans arrive as its SDK sends them.

The peers are real programs, never fakes, and the same ones `bin/nanogrid-local` runs:
`RedisServer`, `PeerProcess`, `free_port` and `wait_until` come from nanogrid.devtools.embedded
(one copy of each); `MotoServer` adds cached clients and fresh queues/buckets to the
embedded one. `PidsCgroup` confines the test process to a pids cgroup so hostile code
cannot fork-bomb the machine. `put_code` puts a function into a sandbox as the worker does.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import redis

from nanogrid.devtools import embedded
from nanogrid.devtools.embedded import (
    AWS_REGION,
    PEER_PIDS,
    PeerProcess,
    RedisServer,
    free_port,
    moto_server_command,
    tail,
    wait_until,
)

__all__ = [
    "AWS_REGION",
    "PEER_PIDS",
    "RUNTIME_IMAGE",
    "CgroupError",
    "MotoServer",
    "NODE_IMAGE",
    "OtlpCollector",
    "PeerProcess",
    "PidsCgroup",
    "RedisServer",
    "free_port",
    "moto_server_command",
    "tail",
    "wait_until",
]

RUNTIME_IMAGE = "nanogrid/python:3.11-bookworm"
NODE_IMAGE = "nanogrid/node:18-bookworm"


def scratch_dir(prefix: str, parent: str | None = None) -> Path:
    """A new directory sandbox users can reach (pytest's tmp_path is 0700) with a short path
    (a Docker sandbox's socket path has 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o711)
    return path


def sandbox_uid_base() -> int:
    """The first sandbox uid of this test process's agents: one range per pytest-xdist worker
    (``PYTEST_XDIST_WORKER`` gw0, gw1, ...), as agents of tests running side by side are two
    agents on one host, and a sandbox's uid is what its destroy sweeps when it ends."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    return 100_000 + int(worker or 0) * UID_RANGE_PER_TEST_PROCESS


UID_RANGE_PER_TEST_PROCESS = 20_000
"""Uids of one test process's agents: 20 workers' ranges of 1000, more than any test starts."""


def agent_settings(base: str | os.PathLike[str], runner: str = "process", **changes: Any
                   ) -> dict[str, Any]:
    """The settings every tier's agents and runners start from, the tests' one config
    builder: one worker of ``runner``, the local runtime images, its directories under
    ``base``, sandbox uids of this test process's own, and a low free-space floor (a CI disk
    may be nearly full; the disk tests set their own). ``changes`` replace top-level keys,
    except that a section given as a mapping is merged into the one here
    (``paths={"min_free_mb": 0}`` keeps the other paths)."""
    settings: dict[str, Any] = {
        "workers": 1,
        "runner": runner,
        "runtimes": {"python": {"image": RUNTIME_IMAGE, "warm": 1}},
        "paths": {
            "work_dir": f"{base}/w",
            "code_cache_dir": f"{base}/c",
            "outbox_dir": f"{base}/o",
            "min_free_mb": 16,
        },
        "docker": {"socket_dir": f"{base}/s"},
        "process": {"sandbox_uid_base": sandbox_uid_base()},
    }
    return merged(settings, changes)


def merged(settings: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with ``changes``: top-level keys replaced, except that a section given
    as a mapping is merged into the one there (``runtimes`` is replaced whole, as the agent
    reads it)."""
    out = dict(settings)
    for key, value in changes.items():
        current = out.get(key)
        if isinstance(value, dict) and isinstance(current, dict) and key != "runtimes":
            out[key] = {**current, **value}
        else:
            out[key] = value
    return out


def agent_config(base: str | os.PathLike[str], runner: str = "process", **changes: Any) -> Any:
    """``agent_settings`` as the agent's Config."""
    from nanogrid.common.config import from_dict

    return from_dict(agent_settings(base, runner, **changes))


class MotoServer(embedded.MotoServer):
    """The embedded moto_server, plus cached clients and fresh queues and buckets per test."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self._clients: dict[str, Any] = {}

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


class TaskClient:
    """The controller's side of a test: code to S3, tasks to SQS, results from Redis."""

    def __init__(self, aws: Any, redis_url: str, queue_url: str, bucket: str) -> None:
        self.aws = aws
        self.redis = redis.Redis.from_url(redis_url)
        self.queue_url = queue_url
        self.bucket = bucket

    def upload(self, code: bytes, key: str | None = None) -> str:
        key = key or f"functions/f-{uuid.uuid4().hex[:8]}/v1.zip"
        self.aws.s3().put_object(Bucket=self.bucket, Key=key, Body=code)
        return key

    def task(self, key: str, **fields: Any) -> dict[str, Any]:
        return {
            "requestId": f"req-{uuid.uuid4().hex}",
            "functionId": "fn",
            "runtime": "python",
            "s3Bucket": self.bucket,
            "s3Key": key,
            **fields,
        }

    def call(self, task: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        """Subscribe, send, wait: as the controller does."""
        from nanogrid.devtools.invoke import invoke

        result = invoke(self.aws.sqs(), self.redis, self.queue_url, task, timeout)
        assert result is not None, f"no result for {task['requestId']} within {timeout}s"
        return result

    def send(self, task: dict[str, Any]) -> str:
        """Send without waiting; returns the requestId."""
        self.aws.sqs().send_message(QueueUrl=self.queue_url, MessageBody=json.dumps(task))
        return task["requestId"]

    def send_together(self, tasks: list[dict[str, Any]]) -> list[str]:
        """Send up to 10 in one SendMessageBatch: on the queue at once, as a burst arrives;
        returns the requestIds."""
        entries = [{"Id": str(i), "MessageBody": json.dumps(t)} for i, t in enumerate(tasks)]
        sent = self.aws.sqs().send_message_batch(QueueUrl=self.queue_url, Entries=entries)
        assert not sent.get("Failed"), sent["Failed"]
        return [task["requestId"] for task in tasks]

    def result(self, request_id: str, timeout: float = 30) -> dict[str, Any]:
        """Wait for the stored result of a task sent some other way."""
        stored = wait_until(
            lambda: self.redis.get(f"result:{request_id}"),
            timeout=timeout,
            what=f"the result of {request_id}",
        )
        return json.loads(stored)


def http_json(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """(status code, JSON body) of GET http://127.0.0.1:port/path; 503 bodies included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@contextlib.contextmanager
def unreached_listener() -> Iterator[int]:
    """A listening port on the host's loopback; fails on exit if anything connected to it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        yield listener.getsockname()[1]
        try:
            listener.accept()
        except BlockingIOError:
            return  # nothing reached the host's listener
        raise AssertionError("a sandbox connected to the host's loopback listener")


def put_code(sandbox: Any, files: dict[str, str], key: str) -> None:
    """Put ``files`` (name -> text) into ``sandbox`` as the worker does, unless it holds
    ``key`` already: code_dir replaced, directories 0755 and files 0644 (readable by the
    sandbox's user whatever the umask)."""
    if sandbox.code_key == key:
        return
    shutil.rmtree(sandbox.code_dir, ignore_errors=True)
    sandbox.code_dir.mkdir(mode=0o755, parents=True)
    sandbox.code_dir.chmod(0o755)
    for name, text in files.items():
        (sandbox.code_dir / name).write_text(text)
        (sandbox.code_dir / name).chmod(0o644)
    sandbox.code_key = key


def release_settled(runner: Any, sandbox: Any) -> None:
    """Release ``sandbox`` as the worker does, then wait until it is back for the next call
    (``wait_settled``)."""
    runner.release(sandbox)
    wait_settled(sandbox)


def wait_settled(sandbox: Any) -> None:
    """Wait until a released ``sandbox`` is back for the next call: after a function's first
    run its server may preload its imports, and a call meanwhile would wait only briefly for
    it (pool.py) before it takes another."""
    wait_until(lambda: not sandbox.settling, timeout=10, what="the sandbox to settle")


def sandbox_pids(sandbox: Any) -> list[int]:
    """Every process of a process sandbox (its cgroup's) or of a Docker sandbox's container."""
    processes = getattr(sandbox, "processes", None)
    if processes is not None:
        return [processes.init_pid, processes.server_pid, *processes.strays()]
    return list(sandbox.cgroup.pids())


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU the processes ``pids`` (all their threads) used so far, from /proc."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def idle_cpu_seconds(sandbox: Any, seconds: float = 2.0) -> float:
    """The CPU a sandbox's processes use over ``seconds`` of doing nothing."""
    pids = sandbox_pids(sandbox)
    before = cpu_seconds(pids)
    time.sleep(seconds)
    return cpu_seconds(pids) - before


def frozen(sandbox: Any) -> bool:
    """Whether a sandbox's cgroup freezer has stopped it."""
    return cgroup_frozen(sandbox.cgroup.freezer.directory)


def cgroup_frozen(directory: Path) -> bool:
    """Whether the cgroup ``directory`` is frozen (v1 freezer.state, v2 cgroup.events): v1
    says FREEZING, v2 ``frozen 0``, until each of its processes has stopped."""
    if (directory / "freezer.state").exists():
        return (directory / "freezer.state").read_text().strip() == "FROZEN"
    return "frozen 1" in (directory / "cgroup.events").read_text()


SIGNAL_FACTS = """\
import json, signal
masks = dict(line.split(":") for line in open("/proc/self/status") if line.startswith("Sig"))
held = {name: int(masks[name], 16) for name in ("SigIgn", "SigCgt", "SigBlk")}
sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE, signal.SIGHUP)
print(json.dumps({
    "python": [signal.getsignal(s) == signal.SIG_DFL for s in sigs],
    "kernel": {name: [bool(mask >> (s - 1) & 1) for s in sigs] for name, mask in held.items()},
    "wakeup_fd": signal.set_wakeup_fd(-1),
}))
"""
"""A function that reports its signal dispositions (see assert_default_signals)."""


def assert_default_signals(out: Any) -> None:
    """``out`` (a run of SIGNAL_FACTS) started as a process spawned fresh: every signal at
    the default, none blocked, no wake-up fd, whatever its sandbox's server handles itself."""
    assert out.exit_code == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["python"] == [True] * 5
    assert facts["kernel"] == {name: [False] * 5 for name in ("SigIgn", "SigCgt", "SigBlk")}
    assert facts["wakeup_fd"] == -1


class OtlpCollector:
    """An OTLP/HTTP trace receiver on loopback: ``spans`` are the spans posted to
    ``endpoint``/v1/traces, decoded (opentelemetry-proto's messages)."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: list[Any] = []
        self.requests = 0
        lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                with lock:
                    collector.requests += 1
                    for resource in request.resource_spans:
                        for scope in resource.scope_spans:
                            collector.spans.extend(scope.spans)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def trace(self, trace_id: str) -> list[Any]:
        """The spans received of one trace (32 hex)."""
        return [s for s in list(self.spans) if s.trace_id.hex() == trace_id]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
