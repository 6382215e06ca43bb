"""Helpers shared by the tests: free ports, polling, and the real peers they run against.

The peers are real programs, never fakes, and the same ones `bin/nanogrid-local` runs:
`RedisServer`, `PeerProcess`, `free_port` and `wait_until` come from nanogrid.devtools.embedded
(one copy of each); `MotoServer` adds cached clients and fresh queues/buckets to the
embedded one (pidscgroup.py and otlpcollector.py hold the test process's pids cgroup and an
OTLP receiver). `put_code` puts a function into a sandbox as the worker does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
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
    "MotoServer",
    "NODE_IMAGE",
    "PeerProcess",
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
