"""The pipeline bench's measuring (bench_pipeline.py runs it): each system's consumer started
and stopped, the sequential invocations and the throughput run sent through it, and the
samples and CPU taken from them."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import boto3  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402
from pipeline_consumers import (  # noqa: E402
    AGENTS,
    BEFORE,
    BEFORE_RUNNER,
    FUNCTIONS_PATH,
    MULTI,
    _agent_main,  # BEFORE_RUNNER calls it here, as every revision's bench_pipeline has it
    _bare_main,
    _consumer_main,
    _die_with_parent,
)
from pipeline_report import Report, Sample  # noqa: E402

try:  # the peers the tests and bin/nanogrid-local run
    from nanogrid.devtools.embedded import MotoServer, RedisServer, free_port
except ImportError:  # older trees kept them with the tests
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import MotoServer, RedisServer, free_port  # type: ignore[no-redef]

HELLO = 'print("Hello from NanoGrid!")\n'
HELLO_NODE = 'console.log("Hello from NanoGrid!");\n'
HELLO_MODULE = {  # the same hello, its greeting in a module of its own (--own-module)
    "main.py": "import greeting\nprint(greeting.TEXT)\n",
    "greeting.py": 'TEXT = "Hello from NanoGrid!"\n',
}
HELLO_NODE_MODULE = {
    "main.js": "console.log(require('./greeting').text);\n",
    "greeting.js": 'exports.text = "Hello from NanoGrid!";\n',
}
SUPERVISOR = ROOT / "bin" / "nanogrid-supervisor"
RESULT_TIMEOUT_S = 30.0
BOOT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


class Program:
    """A program run as a consumer, with the few methods of multiprocessing.Process used here."""

    def __init__(self, argv: list[str], log_path: Path, cwd: Path = ROOT) -> None:
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.pid = self.process.pid

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def join(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)

    def kill(self) -> None:
        self.process.kill()

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()


@dataclass
class Consumer:
    """One system under test: its process, queue, log and what was measured of it."""

    system: str
    queue_url: str
    log: Path
    trace: Path
    workers: int
    """Worker processes of a bare or supervised system; 0 for the single-process ones."""
    child: Any = None
    report: Report = field(default_factory=lambda: Report(""))
    prefix: str = field(default_factory=lambda: uuid.uuid4().hex[:6])


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.redis_server = RedisServer(workdir)
        self.moto = MotoServer(workdir)
        self.python = os.path.realpath(shutil.which("python3", path=FUNCTIONS_PATH) or "")
        self.consumers: list[Consumer] = []

    # -- peers and consumers

    @contextlib.contextmanager
    def peers(self) -> Iterator[None]:
        try:
            self.redis_server.start()
            self.moto.start()
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
                os.environ.pop(name, None)
            os.environ.update(self.moto.environ())  # inherited by every child
            self.redis = self.redis_server.client()
            self.sqs = boto3.client("sqs")
            self.s3 = boto3.client("s3")
            self.bucket = f"bench-{uuid.uuid4().hex[:12]}"
            self.s3.create_bucket(
                Bucket=self.bucket,
                CreateBucketConfiguration={"LocationConstraint": os.environ["AWS_REGION"]},
            )
            self.key = "functions/hello-python/v1.zip"
            own = self.args.own_module
            python = HELLO_MODULE if own else {"main.py": HELLO}
            node = HELLO_NODE_MODULE if own else {"main.js": HELLO_NODE}
            self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=_zip(python))
            self.node_key = "functions/hello-node/v1.zip"
            self.s3.put_object(Bucket=self.bucket, Key=self.node_key, Body=_zip(node))
            yield
        finally:
            # The clean-up runs to its end: signals now would leave processes behind.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for consumer in self.consumers:
                with contextlib.suppress(Exception):
                    self.stop(consumer)
            self.moto.stop()
            self.redis_server.stop()

    def start(self, system: str) -> Consumer:
        """Start a system on a queue of its own and wait until it is ready."""
        queue_url = self.sqs.create_queue(
            QueueName=f"bench-{system}-{uuid.uuid4().hex[:8]}",
            Attributes={"VisibilityTimeout": "30"},
        )["QueueUrl"]
        workers = int(system.split("-")[1].rstrip("w")) if system.startswith(MULTI) else 0
        c = Consumer(
            system,
            queue_url,
            self.workdir / f"{system}.log",
            self.workdir / f"{system}.trace.jsonl",
            workers,
            report=Report(system),
        )
        self.consumers.append(c)
        if system == BEFORE:  # before the other agents: it is one of them
            settings_path = self.workdir / f"{system}.json"
            settings_path.write_text(json.dumps(self._agent_settings(queue_url, 1)))
            tree = self.workdir / "before"
            argv = [sys.executable, "-c", BEFORE_RUNNER, str(tree), str(settings_path),
                    str(c.log), str(c.trace)]
            c.child = Program(argv, c.log, cwd=tree)
            _wait_for(lambda: "ready" in _read(c.log), f"the agent of {self.args.before}", c)
        elif system in AGENTS:
            settings = self._agent_settings(queue_url, 1, node=system == "agent-node")
            c.child = self._fork(_agent_main, settings, str(c.log), str(c.trace))
            _wait_for(lambda: "ready" in _read(c.log), "the agent to boot", c)
        elif workers:
            settings = self._agent_settings(queue_url, workers)
            if system.startswith("bare"):
                c.child = self._fork(_bare_main, settings, str(c.log))
            else:
                config = self.workdir / f"{system}.yaml"
                config.write_text(yaml.safe_dump(settings))
                c.child = Program([sys.executable, str(SUPERVISOR), "-c", str(config)], c.log)
            _wait_for(
                lambda: _read(c.log).count(" ready (pid ") >= workers,
                f"{workers} workers to boot",
                c,
            )
        else:
            args = (system, queue_url, self.redis_server.url, self.python, str(c.log))
            c.child = self._fork(_consumer_main, *args)
        return c

    def stop(self, c: Consumer) -> None:
        """Stop a system (SIGTERM, then SIGKILL after a while); collect the agent's trace."""
        if c.child is None:
            return
        child, c.child = c.child, None
        if child.is_alive() and child.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        child.join(STOP_TIMEOUT_S)
        if child.is_alive():
            child.kill()
            child.join(STOP_TIMEOUT_S)
        if c.system not in AGENTS and not c.workers:
            return  # the naive loops die of SIGTERM; nothing to check
        if child.exitcode != 0:
            raise RuntimeError(f"{c.system} exited with {child.exitcode}; log:\n{_tail(c.log)}")
        if c.system in AGENTS:
            c.report.trace = [json.loads(line) for line in _read(c.trace).splitlines()]

    def _fork(self, target: Callable[..., None], *args: Any) -> Any:
        child = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
        child.start()
        return child

    def _agent_settings(self, queue_url: str, workers: int, node: bool = False) -> dict[str, Any]:
        work_dir = self.workdir / f"work-{uuid.uuid4().hex[:6]}"
        work_dir.mkdir(mode=0o711)
        os.chmod(work_dir, 0o711)  # sandbox users must pass through it
        return {
            "workers": workers,
            "runner": self.args.runner,
            "drain_timeout_seconds": 10,
            "queue": {"url": queue_url, "wait_time_seconds": 20, "visibility_timeout_seconds": 30},
            "redis": {"url": self.redis_server.url},
            "http": {"host": "127.0.0.1", "port": free_port()},
            "runtimes": {
                "python": {
                    "command": ["python3", "main.py"],
                    "warm": self.args.warm,
                    "image": self.args.image,
                },
                **(
                    {
                        "node": {
                            "command": ["node", "main.js"],
                            "warm": self.args.warm,
                            "image": self.args.node_image,
                        }
                    }
                    if node
                    else {}
                ),
            },
            # AF_UNIX socket paths are short: the containers' host dirs sit high in the tree.
            "docker": {"socket_dir": str(self.workdir / f"sb-{work_dir.name[-6:]}")},
            "paths": {
                "code_cache_dir": str(work_dir / "cache"),
                "work_dir": str(work_dir / "sandboxes"),
                "outbox_dir": str(work_dir / "outbox"),
            },
            "log": {"level": "INFO"},
        }

    def _task(self, request_id: str, c: Consumer) -> dict[str, Any]:
        node = c.system == "agent-node"
        return {
            "requestId": request_id,
            "functionId": "hello-node" if node else "hello-python",
            "runtime": "node" if node else "python",
            "s3Bucket": self.bucket,
            "s3Key": self.node_key if node else self.key,
            "memoryMb": 256,
            "inputData": {},
        }

    # -- the measurements

    def measure(self, systems: list[str]) -> dict[str, Report]:
        """Start every system, measure them taking turns (a busy moment on the machine is
        then shared by all instead of skewing one), stop them."""
        consumers = [self.start(system) for system in systems]
        sequential = [c for c in consumers if not c.workers]
        pubsub = self.redis.pubsub()
        try:
            for i in range(self.args.warmup + self.args.invocations):
                for c in sequential:
                    sample = self.invoke(c, f"{c.system}-{c.prefix}-seq-{i}", pubsub)
                    if i >= self.args.warmup:
                        c.report.samples.append(sample)
                    if self.args.gap_ms:
                        time.sleep(self.args.gap_ms / 1000)
        finally:
            pubsub.close()
        for c in consumers:  # reaches every worker of a supervisor, and fills its pool
            self.throughput(c, f"{c.system}-{c.prefix}-warm", 2 * self.args.window + 10)
        rounds = self.args.rounds
        for r in range(rounds):
            for c in consumers:
                tasks = self.args.tasks // rounds + (1 if r < self.args.tasks % rounds else 0)
                self.measured_throughput(c, f"{c.system}-{c.prefix}-tp{r}", tasks)
        for c in consumers:
            self.stop(c)
        return {c.system: c.report for c in consumers}

    def invoke(self, c: Consumer, request_id: str, pubsub: Any) -> Sample:
        """One invocation as the controller makes it: subscribe, send, wait for the PUBLISH."""
        channel = f"result:{request_id}"
        pubsub.subscribe(channel)
        try:
            _next_message(pubsub, "subscribe", channel, c)
            start = time.perf_counter()
            self.sqs.send_message(
                QueueUrl=c.queue_url, MessageBody=json.dumps(self._task(request_id, c))
            )
            sent = time.perf_counter()
            message = _next_message(pubsub, "message", channel, c)
            end = time.perf_counter()
        finally:
            pubsub.unsubscribe(channel)
        result = json.loads(message["data"])
        if result.get("status") != "SUCCESS":
            raise RuntimeError(f"{request_id} did not succeed: {result}")
        return Sample(
            request_id, start, sent, end, float(result["durationMillis"]), result.get("timings", {})
        )

    def measured_throughput(self, c: Consumer, prefix: str, tasks: int) -> None:
        """A throughput round, with the CPU each process spent on it."""
        processes = {
            "consumer": c.child.pid,
            "moto_server": self.moto.process.pid,
            "redis-server": self.redis_server.process.pid,
            "bench": os.getpid(),
        }
        before = {name: _cpu_seconds(pid) for name, pid in processes.items()}
        c.report.seconds += self.throughput(c, prefix, tasks)
        c.report.tasks += tasks
        for name, pid in processes.items():
            own, descendants = _cpu_seconds(pid)
            cpu = c.report.cpu_seconds
            cpu[name] = cpu.get(name, 0.0) + own - before[name][0]
            cpu[f"{name} children"] = (
                cpu.get(f"{name} children", 0.0) + descendants - before[name][1]
            )

    def throughput(self, c: Consumer, prefix: str, total: int) -> float:
        """Seconds for ``total`` tasks through a window of at most ``--window`` in flight."""
        window = self.args.window
        batch = refill_batch(window)
        pubsub = self.redis.pubsub()
        pattern = f"result:{prefix}-*"
        pubsub.psubscribe(pattern)
        _next_message(pubsub, "psubscribe", pattern, c)
        outstanding: set[str] = set()
        sent = done = 0
        try:
            start = time.perf_counter()
            while done < total:
                while sent < total and window - len(outstanding) >= min(batch, total - sent):
                    ids = [f"{prefix}-{sent + j}" for j in range(min(batch, total - sent))]
                    reply = self.sqs.send_message_batch(
                        QueueUrl=c.queue_url,
                        Entries=[
                            {"Id": str(j), "MessageBody": json.dumps(self._task(rid, c))}
                            for j, rid in enumerate(ids)
                        ],
                    )
                    if reply.get("Failed"):
                        raise RuntimeError(f"send_message_batch failed: {reply['Failed']}")
                    outstanding.update(ids)
                    sent += len(ids)
                result = json.loads(_next_message(pubsub, "pmessage", None, c)["data"])
                if result.get("status") != "SUCCESS":
                    raise RuntimeError(f"{result.get('requestId')} did not succeed: {result}")
                if result["requestId"] in outstanding:
                    outstanding.discard(result["requestId"])
                    done += 1
            return time.perf_counter() - start
        finally:
            pubsub.close()


def refill_batch(window: int) -> int:
    """Messages per send_message_batch in the throughput run: half the window, 1 to 10."""
    return max(1, min(10, window // 2))


def _next_message(pubsub: Any, kind: str, channel: str | None, c: Consumer) -> dict[str, Any]:
    """The next pub/sub message of ``kind`` (on ``channel`` when given), bounded in time."""
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=min(1.0, deadline - time.monotonic()))
        if message is None:
            if not c.child.is_alive():
                raise RuntimeError(f"{c.system} died; log:\n{_tail(c.log)}")
            continue
        name = message["channel"].decode() if message.get("channel") else None
        if message["type"] == kind and (channel is None or name == channel):
            return message
    raise TimeoutError(
        f"no {kind} on {channel or 'the pattern'} within {RESULT_TIMEOUT_S:g}s; "
        f"{c.system} log:\n{_tail(c.log)}"
    )


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user + system CPU of a process itself, that of its descendants live or reaped)."""
    if pid == os.getpid():
        own = os.times()
        return own.user + own.system, 0.0
    try:
        root = psutil.Process(pid)
        family = root.children(recursive=True)
        t = root.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    descendants = t.children_user + t.children_system
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            c = process.cpu_times()
            descendants += c.user + c.system + c.children_user + c.children_system
    return t.user + t.system, descendants


def _wait_for(predicate: Callable[[], bool], what: str, c: Consumer) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while not predicate():
        if not c.child.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what}; log:\n{_tail(c.log)}")
        time.sleep(0.05)


def _zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(_read(path).splitlines()[-lines:])


def supervisor_works() -> bool:
    """bin/nanogrid-supervisor exists and validates a config (``--check``)."""
    if not SUPERVISOR.exists():
        return False
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as config:
        config.write("workers: 1\nrunner: process\naws: {region: us-east-1}\n"
                     "queue: {url: 'http://127.0.0.1:1/000000000000/q'}\n")
        config.flush()
        try:
            check = subprocess.run(
                [sys.executable, str(SUPERVISOR), "--check", "-c", config.name],
                capture_output=True,
                timeout=30,
                cwd=ROOT,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
    return check.returncode == 0
