"""The pipeline bench's systems under test: their names, and what runs in each one's process.

The entry points are the targets of the processes bench_pipeline forks (multiprocessing's
fork context: nothing is pickled), or, for ``agent-before``, of ``BEFORE_RUNNER``.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from typing import Any

import boto3
import redis

FUNCTIONS_PATH = "/usr/local/bin:/usr/bin:/bin"
"""The agent's default ``process.path``: the baseline resolves python3 on it as the agent does."""
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
"""Runs ``agent-before``: through bench_pipeline, where every revision has ``_agent_main``."""
AGENTS = ("agent", "agent-node", BEFORE)
"""Systems that are one traced nanogrid.worker.loop.Worker."""
SCALING = ("bare-1w", "bare-2w", "supervisor-1w", "supervisor-2w")
MULTI = ("bare", "supervisor")
"""Systems of N workers: forked from here (bare) or by bin/nanogrid-supervisor."""
_PR_SET_PDEATHSIG = 1


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
