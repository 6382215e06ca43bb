#!/usr/bin/env python3
"""End-to-end pipeline benchmark: one worker on the process runner vs a naive loop vs the floor.

Starts its own redis-server and moto_server on free loopback ports, then measures consumers
of the same hello-world task, all running at once, each on a queue of its own:

``floor``     receive (long poll) -> SET + PUBLISH a stub result -> delete: no work at all,
              the cost of the SQS/Redis plumbing through moto.
``agent``     nanogrid.worker.loop.Worker with the process runner (warm fork-server sandboxes),
              forked from this script as the supervisor forks it.
``agent-node`` (by ``--systems``) the same worker, given python and node runtimes, running
              examples/hello-node's ``console.log`` in its warm node sandboxes.
``baseline``  the naive loop: receive -> GET the zip from S3 (no cache) -> unzip into a temp
              dir -> ``subprocess.run([python3, "main.py"])`` -> SET + PUBLISH -> delete.

For each: N sequential invocations (subscribe to ``result:{requestId}``, then
``send_message``; end to end is from just before the send to the PUBLISH arriving; a short
pause between invocations lets the consumer get back into its long poll), then a
throughput run of M tasks through a bounded window: at most ``--window`` in flight, topped
up with one ``send_message_batch`` whenever half the window is free, so that moto, whose
receive and delete costs grow with queue depth, never holds more than a window's worth of
messages, and the queue never runs dry. The systems take turns (one invocation each, then
the next; throughput in ``--rounds`` rounds each), so that a busy moment on a shared
machine is spread over all of them rather than skewing one.

``--before REF`` also measures ``agent-before``: the same agent from git revision REF (its tree
exported into the work directory and run by its own copy of this script), taking turns with
the others in the same run, so a change's cost is measured against the code before it on
the same machine at the same moment.

``--supervisor`` also measures the throughput of 1 and then 2 workers, forked from this
script (``bare``) and run by ``bin/nanogrid-supervisor`` (the window keeps both workers
busy), and reports the CPU every process spent: how many cores each system keeps busy, so
what 2 workers could at best reach on this machine, and what the supervisor itself costs.

The agent runs with timing wrappers around its stages (microseconds per task) so the report
can say where its time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
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
import redis  # noqa: E402
import yaml  # noqa: E402

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
FUNCTIONS_PATH = "/usr/local/bin:/usr/bin:/bin"
"""The agent's default ``process.path``: the baseline resolves python3 on it as the agent does."""
SUPERVISOR = ROOT / "bin" / "nanogrid-supervisor"
RESULT_TIMEOUT_S = 30.0
BOOT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
SYSTEMS = ("floor", "agent", "baseline", "agent-node")
DEFAULT_SYSTEMS = ("floor", "agent", "baseline")
BEFORE = "agent-before"
"""The agent of an earlier git revision (``--before REF``)."""
BEFORE_RUNNER = """
import json, sys
sys.path.insert(0, sys.argv[1] + "/bench")
import bench_pipeline  # the exported tree's own copy: it puts that tree first on sys.path
with open(sys.argv[2]) as settings:
    bench_pipeline._agent_main(json.load(settings), sys.argv[3], sys.argv[4])
"""
AGENTS = ("agent", "agent-node", BEFORE)
"""Systems that are one traced nanogrid.worker.loop.Worker."""
SCALING = ("bare-1w", "bare-2w", "supervisor-1w", "supervisor-2w")
MULTI = ("bare", "supervisor")
"""Systems of N workers: forked from here (bare) or by bin/nanogrid-supervisor."""
_PR_SET_PDEATHSIG = 1


# -- child processes --------------------------------------------------------------------------


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_setup(log_path: str) -> None:
    """In a forked child: die with this script, and log to a file instead of the terminal."""
    _die_with_parent()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not this script's handler: just stop


def _agent_main(settings: dict[str, Any], log_path: str, trace_path: str) -> None:
    _child_setup(log_path)
    from nanogrid.common import logs
    from nanogrid.common.config import from_dict

    config = from_dict(settings)
    logs.setup(config.log, "worker-0")
    try:
        import nanogrid.worker.hooks  # noqa: F401
    except ImportError:  # a revision from before the worker's hooks (--before REF)
        os._exit(_traced_worker_class()(config, 0, trace_path).run())
    os._exit(_serve_traced(config, trace_path))


def _bare_main(settings: dict[str, Any], log_path: str) -> None:
    """``workers`` plain Worker processes forked from here: the supervisor's workers without
    the supervisor (no arbiter loop, status pipe or HTTP), to tell its cost from the machine's."""
    _child_setup(log_path)
    from nanogrid.common import logs
    from nanogrid.common.config import from_dict
    from nanogrid.worker.loop import serve

    config = from_dict(settings)
    pids = []
    for index in range(config.workers):
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            logs.setup(config.log, f"worker-{index}")
            os._exit(serve(config, index))
        pids.append(pid)

    def forward(signum: int, frame: Any) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    os._exit(max(codes, key=abs))


STAGE_LABELS = {"claim": "claim", "fetch": "code_fetch", "sandbox": "acquire",
                "unpack": "extract", "run": "run", "end": "publish"}
"""The worker's stages (nanogrid/worker/hooks.py) as the breakdown names them; ``end`` holds the
publish, the delete and the metrics."""


def _serve_traced(config: Any, trace_path: str) -> int:
    """nanogrid.worker.loop.serve with a hook that times each receive and each message's stages
    (time.monotonic and perf_counter are both CLOCK_MONOTONIC here: comparable across
    processes); the spans go to a JSON-lines file at the end."""
    from nanogrid.worker.hooks import Hook
    from nanogrid.worker.loop import serve

    records: list[dict[str, Any]] = []
    last_receive = [(0.0, 0.0)]

    class Spans(Hook):
        def received(self, messages: Any, started: float) -> None:
            last_receive[0] = (started, time.perf_counter())

        def before(self, stage: str, run: Any) -> None:
            if stage == "message":
                task = run.task
                run.notes["bench"] = {
                    "requestId": task.request_id if task is not None else None,
                    "receive": last_receive[0],
                    "spans": [],
                }
            run.notes[f"bench.{stage}"] = time.perf_counter()

        def after(self, stage: str, run: Any, error: BaseException | None) -> None:
            started, ended = run.notes.pop(f"bench.{stage}"), time.perf_counter()
            record = run.notes["bench"]
            if stage == "message":
                record["handle"] = (started, ended)
                records.append(record)
            elif stage in STAGE_LABELS:
                record["spans"].append((STAGE_LABELS[stage], started, ended))

    code = serve(config, 0, hooks=(Spans(),))
    with open(trace_path, "w") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    return code


def _traced_worker_class() -> type:
    """For revisions before the worker's hooks: a Worker whose stages are timed
    (perf_counter, CLOCK_MONOTONIC: comparable across processes); the spans of each handled
    message go to a JSON-lines file at shutdown."""
    import nanogrid.worker.invoke as invoke_module
    import nanogrid.worker.loop as worker_module

    class TracedWorker(worker_module.Worker):
        def __init__(self, config: Any, index: int, trace_path: str) -> None:
            super().__init__(config, index)
            self._trace_path = trace_path
            self._records: list[dict[str, Any]] = []
            self._local = threading.local()  # each run thread traces its own message
            self._last_receive = (0.0, 0.0)

        def boot(self) -> None:
            super().boot()
            for owner, name, label in (
                (self.store, "existing", "redis_get"),
                (getattr(self, "claims", None), "acquire", "claim"),
                (self.codes, "fetch", "code_fetch"),
                (self.runner, "acquire", "acquire"),
                (self.runner, "run", "run"),
                (self.runner, "release", "release"),
                (self.store, "publish", "publish"),
                (self.queue, "delete", "sqs_delete"),
                (self.metrics, "record", "metrics"),
            ):
                if callable(getattr(owner, name, None)):  # tolerate a renamed stage
                    setattr(owner, name, self._timed(getattr(owner, name), label))
            invoke_module.extract = self._timed(invoke_module.extract, "extract")

        def _timed(self, function: Callable[..., Any], label: str) -> Callable[..., Any]:
            def timed(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    current = getattr(self._local, "current", None)
                    if current is not None:
                        current["spans"].append((label, start, time.perf_counter()))

            return timed

        def receive(self, wanted: int = 1) -> list[Any]:
            start = time.perf_counter()
            messages = super().receive(wanted)
            self._last_receive = (start, time.perf_counter())
            return messages

        def handle(self, message: Any) -> None:
            try:
                request_id = json.loads(message.body).get("requestId")
            except (ValueError, AttributeError):
                request_id = None
            record = {"requestId": request_id, "receive": self._last_receive, "spans": []}
            self._local.current = record
            start = time.perf_counter()
            try:
                super().handle(message)
            finally:
                record["handle"] = (start, time.perf_counter())
                self._local.current = None
                self._records.append(record)

        def shutdown(self) -> None:
            super().shutdown()
            with open(self._trace_path, "w") as out:
                for record in self._records:
                    out.write(json.dumps(record) + "\n")

    return TracedWorker


def _consumer_main(mode: str, queue_url: str, redis_url: str, python: str, log_path: str) -> None:
    """The floor (``mode="floor"``) or the naive baseline (``mode="baseline"``)."""
    _child_setup(log_path)
    sqs = boto3.client("sqs")
    s3 = boto3.client("s3")
    store = redis.Redis.from_url(redis_url)
    while True:
        reply = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=1,
            WaitTimeSeconds=20,
            AttributeNames=["ApproximateReceiveCount"],
        )
        for message in reply.get("Messages", []):
            task = json.loads(message["Body"])
            if mode == "floor":
                result = {"requestId": task["requestId"], "status": "SUCCESS", "durationMillis": 0}
            else:
                result = _naive_run(s3, task, python)
            data = json.dumps(result)
            key = f"result:{task['requestId']}"
            store.set(key, data, ex=3600)
            store.publish(key, data)
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


def _naive_run(s3: Any, task: dict[str, Any], python: str) -> dict[str, Any]:
    code = s3.get_object(Bucket=task["s3Bucket"], Key=task["s3Key"])["Body"].read()
    with tempfile.TemporaryDirectory(prefix="naive-") as workdir:
        zipfile.ZipFile(io.BytesIO(code)).extractall(workdir)
        env = {
            "NANOGRID_REQUEST_ID": task["requestId"],
            "NANOGRID_FUNCTION_ID": task["functionId"],
            "NANOGRID_MEMORY_MB": str(task.get("memoryMb", 256)),
            "PATH": FUNCTIONS_PATH,
            "HOME": workdir,
            "LANG": "C.UTF-8",
        }
        start = time.perf_counter()
        done = subprocess.run(
            [python, "main.py"],
            input=json.dumps(task.get("inputData", {})).encode(),
            capture_output=True,
            cwd=workdir,
            env=env,
            timeout=task.get("timeoutMs", 30000) / 1000,
        )
        duration = (time.perf_counter() - start) * 1000
    return {
        "requestId": task["requestId"],
        "functionId": task["functionId"],
        "status": "SUCCESS" if done.returncode == 0 else "FAILED",
        "exitCode": done.returncode,
        "stdout": done.stdout.decode(errors="replace"),
        "stderr": done.stderr.decode(errors="replace"),
        "durationMillis": duration,
    }


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


# -- the measuring side ---------------------------------------------------------------------


@dataclass
class Sample:
    request_id: str
    start: float
    sent: float
    end: float
    duration_ms: float
    timings: dict[str, float] = field(default_factory=dict)
    """The result's own ``timings`` (the agent's; empty for the other systems)."""

    @property
    def e2e_ms(self) -> float:
        return (self.end - self.start) * 1000

    @property
    def overhead_ms(self) -> float:
        return self.e2e_ms - self.duration_ms


@dataclass
class Report:
    system: str
    samples: list[Sample] = field(default_factory=list)
    tasks: int = 0
    seconds: float = 0.0
    trace: list[dict[str, Any]] = field(default_factory=list)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    """CPU time spent during the throughput rounds, by process."""

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.seconds if self.seconds else 0.0

    @property
    def cores_busy(self) -> float:
        """CPU seconds per second over the throughput rounds, every process counted."""
        return sum(self.cpu_seconds.values()) / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_task(self) -> dict[str, float]:
        return {k: v * 1000 / self.tasks for k, v in self.cpu_seconds.items()} if self.tasks else {}


def stats(values: list[float]) -> tuple[float, float, float]:
    """(p50, p99, mean)."""
    if not values:
        return (float("nan"),) * 3
    p99 = (
        statistics.quantiles(values, n=100, method="inclusive")[98]
        if len(values) > 1
        else values[0]
    )
    return statistics.median(values), p99, statistics.fmean(values)


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
        config.write("workers: 1\nrunner: process\n")
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


# -- the report -------------------------------------------------------------------------------


def breakdown(report: Report) -> list[tuple[str, list[float]]]:
    """Where an agent invocation's end-to-end time goes (sequential runs), in ms."""
    by_id = {r["requestId"]: r for r in report.trace}
    rows: dict[str, list[float]] = {}

    def add(label: str, seconds: float) -> None:
        rows.setdefault(label, []).append(seconds * 1000)

    for s in report.samples:
        record = by_id.get(s.request_id)
        if record is None:
            continue
        spans: dict[str, tuple[float, float]] = {}
        for label, start, end in record["spans"]:
            spans.setdefault(label, (start, end))
        if "run" not in spans or "publish" not in spans:
            continue
        received = record["receive"][1]
        handle_start, handle_end = record["handle"]
        run, publish = spans["run"], spans["publish"]

        def part(*labels: str, spans: dict[str, tuple[float, float]] = spans) -> None:
            for label in labels:
                if label in spans:
                    add(f"  of which {label}", spans[label][1] - spans[label][0])

        add("client: send_message round trip", s.sent - s.start)
        add("send starts -> worker's receive_message returns", received - s.start)
        add("receive returned -> handle starts", handle_start - received)
        add("handle starts -> run starts", run[0] - handle_start)
        part("redis_get", "claim", "code_fetch", "acquire", "extract")
        add("runner.run", run[1] - run[0])
        add("  of which durationMillis (fork -> exit)", s.duration_ms / 1000)
        add("run ends -> publish starts", publish[0] - run[1])
        part("release")
        add("publish (one script: SET, PUBLISH, claim, peak)", publish[1] - publish[0])
        add("publish returns -> client has the result", s.end - publish[1])
        add("after publish (not in e2e): delete, metrics, logs", handle_end - publish[1])
        part("sqs_delete", "metrics")
    return list(rows.items())


def service_times(report: Report) -> tuple[float, float]:
    """Median receive and handle time per task in the throughput run, in ms."""
    records = [r for r in report.trace if "-tp" in (r["requestId"] or "")]
    receive = [(r["receive"][1] - r["receive"][0]) * 1000 for r in records]
    handle = [(r["handle"][1] - r["handle"][0]) * 1000 for r in records]
    return (
        statistics.median(receive) if receive else 0.0,
        statistics.median(handle) if handle else 0.0,
    )


def phase_table(report: Report) -> list[str]:
    """The agent's own account of each sequential invocation: its result's ``timings``."""
    timed = [s.timings for s in report.samples]
    rows = [(name, [t[f"{name}Ms"] for t in timed]) for name in (
        "queued", "fetch", "unpack", "sandbox", "run", "total")]
    rows.append(("agent overhead (totalMs - runMs)", [t["totalMs"] - t["runMs"] for t in timed]))
    lines = [
        f"agent, from its results' timings ({len(timed)} sequential warm invocations):",
        "",
        "| phase | p50 | p99 |",
        "|---|---:|---:|",
    ]
    for name, values in rows:
        p50, p99, _ = stats(values)
        lines.append(f"| {name} | {p50:.3f} | {p99:.3f} |")
    return lines


def render(
    reports: dict[str, Report], args: argparse.Namespace, python: str, load: tuple[float, float]
) -> str:
    lines = [
        f"machine: nproc={os.cpu_count()}, kernel {platform.release()}, "
        f"python {platform.python_version()} (bench, agent), functions on {python} "
        f"({_version(python)}); load average (1 min) {load[0]:.2f} before, {load[1]:.2f} after",
        f"sequential: {args.invocations} invocations after {args.warmup} warm-up, "
        f"{args.gap_ms:g} ms apart; throughput: {args.tasks} tasks in {args.rounds} rounds, "
        f"at most {args.window} in flight, sent with send_message_batch of "
        f"{refill_batch(args.window)}; the systems take turns",
        "",
        "| system | e2e p50 | e2e p99 | e2e mean | run p50 | overhead p50 | overhead p99 "
        "| overhead mean | tasks/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, report in reports.items():
        if not report.samples:
            lines.append(f"| {name} | | | | | | | | {report.tasks_per_s:.1f} |")
            continue
        e2e = stats([s.e2e_ms for s in report.samples])
        run = stats([s.duration_ms for s in report.samples])
        over = stats([s.overhead_ms for s in report.samples])
        lines.append(
            f"| {name} | {e2e[0]:.1f} | {e2e[1]:.1f} | {e2e[2]:.1f} | {run[0]:.1f} "
            f"| {over[0]:.1f} | {over[1]:.1f} | {over[2]:.1f} | {report.tasks_per_s:.1f} |"
        )
    lines += [
        "",
        "times in ms; e2e = send_message starts -> result arrives by pub/sub; "
        "run = the result's durationMillis; overhead = e2e - run",
    ]
    agent, baseline = reports.get("agent"), reports.get("baseline")
    if agent and agent.samples and agent.samples[0].timings:
        lines += ["", *phase_table(agent)]
    before = reports.get(BEFORE)
    if agent and before and agent.samples and before.samples:
        a, b = stats([s.e2e_ms for s in agent.samples]), stats([s.e2e_ms for s in before.samples])
        lines.append(
            f"agent vs agent-before ({args.before}): e2e p50 {a[0] - b[0]:+.2f} ms, "
            f"p99 {a[1] - b[1]:+.2f} ms, mean {a[2] - b[2]:+.2f} ms; throughput "
            f"{agent.tasks_per_s / before.tasks_per_s:.2f}x"
        )
    if agent and baseline:
        a, b = stats([s.e2e_ms for s in agent.samples]), stats([s.e2e_ms for s in baseline.samples])
        lines.append(
            f"agent vs baseline: e2e {b[0] / a[0]:.2f}x faster at p50, {b[1] / a[1]:.2f}x at p99, "
            f"{b[2] / a[2]:.2f}x in the mean; "
            f"throughput {agent.tasks_per_s / baseline.tasks_per_s:.2f}x"
        )
    cores = os.cpu_count() or 1
    for kind in MULTI:
        one, two = reports.get(f"{kind}-1w"), reports.get(f"{kind}-2w")
        if one and two and one.tasks_per_s:
            busy = one.cores_busy
            lines.append(
                f"{kind}: 2 workers {two.tasks_per_s / one.tasks_per_s:.2f}x the throughput of "
                f"1 worker; 1 worker already keeps {busy:.2f} of the {cores} cores busy "
                f"(everything counted), so no 2 workers can beat {cores / busy:.2f}x here"
            )
    supervised, bare = reports.get("supervisor-2w"), reports.get("bare-2w")
    if supervised and bare and bare.tasks_per_s:
        ratio = supervised.tasks_per_s / bare.tasks_per_s
        lines.append(
            f"supervisor's own cost: supervisor-2w {ratio:.2f}x the throughput of bare-2w "
            "(the same workers without the supervisor)"
        )
    lines += [
        "",
        "throughput run, CPU ms per task (user + system):",
        "",
        "| system | consumer process | its descendants (sandboxes, workers) | moto_server "
        "| redis-server | bench client | total | cores busy | tasks/s if CPU-bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, report in reports.items():
        cpu = report.cpu_ms_per_task
        total = sum(cpu.values())
        bound = (os.cpu_count() or 1) * 1000 / total if total else 0.0
        moto = cpu.get("moto_server", 0) + cpu.get("moto_server children", 0)
        lines.append(
            f"| {name} | {cpu.get('consumer', 0):.2f} | {cpu.get('consumer children', 0):.2f} "
            f"| {moto:.2f} | {cpu.get('redis-server', 0):.2f} | {cpu.get('bench', 0):.2f} "
            f"| {total:.2f} | {report.cores_busy:.2f} | {bound:.0f} |"
        )
    if agent and agent.trace:
        lines += [
            "",
            "agent, sequential runs: where the time goes (ms)",
            "",
            "| stage | p50 | p99 | mean |",
            "|---|---:|---:|---:|",
        ]
        for label, values in breakdown(agent):
            p50, p99, mean = stats(values)
            lines.append(f"| {label} | {p50:.2f} | {p99:.2f} | {mean:.2f} |")
        receive, handle = service_times(agent)
        lines += [
            "",
            f"agent, throughput run: median receive_message {receive:.2f} ms, "
            f"median handle {handle:.2f} ms per task",
        ]
    return "\n".join(lines)


def _version(python: str) -> str:
    try:
        out = subprocess.run([python, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-n", "--invocations", type=int, default=300, help="sequential invocations (default 300)"
    )
    parser.add_argument(
        "--warmup", type=int, default=20, help="unmeasured invocations before those (default 20)"
    )
    parser.add_argument(
        "-m", "--tasks", type=int, default=600, help="tasks in the throughput run (default 600)"
    )
    parser.add_argument(
        "--window", type=int, default=10, help="throughput: most tasks in flight (default 10)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="throughput: rounds the tasks are split into, taking turns with the other "
        "systems (default 4)",
    )
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=25.0,
        help="pause between sequential invocations, so each finds the consumer idle in its "
        "long poll; 0 = back to back (default 25)",
    )
    parser.add_argument(
        "--warm", type=int, default=4, help="agent: warm python sandboxes (default 4)"
    )
    parser.add_argument(
        "--runner",
        choices=("process", "docker"),
        default="process",
        help="agent: the runner (default process; docker needs the engine and --image)",
    )
    parser.add_argument(
        "--image",
        default="nanogrid/python:3.11-bookworm",
        help="agent, docker runner: the runtime image (default the locally built one)",
    )
    parser.add_argument(
        "--node-image",
        default="nanogrid/node:18-bookworm",
        help="agent-node, docker runner: the node runtime image (default the locally built one)",
    )
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"which to measure, in this order, from {', '.join(SYSTEMS)} "
        f"(default {','.join(DEFAULT_SYSTEMS)})",
    )
    parser.add_argument(
        "--supervisor",
        action="store_true",
        help="also measure 1 and 2 workers, forked from here (bare) and by "
        "bin/nanogrid-supervisor: throughput only",
    )
    parser.add_argument(
        "--before",
        metavar="REF",
        help="also measure the agent of git revision REF (agent-before), in the same run",
    )
    parser.add_argument(
        "--own-module",
        action="store_true",
        help="hello with its greeting in a module of its own: the agents' import-warm sandboxes "
        "hold function code between runs (and are frozen then)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw numbers to this file")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, traces); say where"
    )
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(systems) - set(SYSTEMS):
        parser.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    if args.window < 2 or args.invocations < 2 or args.warmup < 0 or args.rounds < 1:
        parser.error("--window >= 2, --invocations >= 2, --warmup >= 0, --rounds >= 1")
    if args.tasks < args.rounds:
        parser.error("--tasks must be at least --rounds")
    if args.supervisor:
        if not supervisor_works():
            parser.error(f"--supervisor: {SUPERVISOR} is missing or refuses a minimal config")
        systems += list(SCALING)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="ngb-"))  # short: AF_UNIX paths under it
    os.chmod(workdir, 0o711)  # sandbox users pass through to their directories
    if args.before:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.before], capture_output=True, check=False
        )
        if archive.returncode != 0:
            shutil.rmtree(workdir, ignore_errors=True)
            parser.error(f"--before: cannot export {args.before}: {archive.stderr.decode()}")
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tree:
            tree.extractall(workdir / "before", filter="data")
        systems.insert(systems.index("agent") + 1 if "agent" in systems else 0, BEFORE)
    bench = Bench(args, workdir)
    reports: dict[str, Report] = {}
    started = time.monotonic()
    try:
        with bench.peers():
            print(f"[bench] measuring {', '.join(systems)} ...", file=sys.stderr, flush=True)
            reports = bench.measure(systems)
        print(f"[bench] done in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("[bench] interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"[bench] logs and traces kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(reports, args, bench.python, (load_before, os.getloadavg()[0])))
    if args.json:
        raw = {
            name: {
                "tasks_per_s": r.tasks_per_s,
                "e2e_ms": [s.e2e_ms for s in r.samples],
                "duration_ms": [s.duration_ms for s in r.samples],
                "cpu_ms_per_task": r.cpu_ms_per_task,
            }
            for name, r in reports.items()
        }
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
