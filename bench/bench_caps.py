#!/usr/bin/env python3
"""What a per-function cap costs: N messages of a function at cap C through one agent.

Starts its own redis-server and moto_server, and between the agent and moto_server a
forwarder that counts the agent's SQS calls by operation (``X-Amz-Target``), then runs
``bin/nanogrid-supervisor`` (one worker, process runner) once per system asked for:

``plain``    the task queue has no redrive policy.
``redrive``  the task queue has a ``RedrivePolicy`` (``--max-receives``) to a dead-letter queue.
``before``   ``redrive`` with ``--before REF``'s code (a commit, or a checkout's directory).

Each sends ``--tasks`` messages of a function that sleeps ``--sleep-ms``, capped at ``--cap``
(``nanogrid:concurrency``), at once, and reports: deferrals per message (``/metrics``), the
agent's SQS calls per message by operation, messages sent again, messages SQS moved to the
dead-letter queue, the most runs at once (from the results), and the time from the first
send to the last result against the ideal ``tasks / cap x sleep`` (plus ``--hold-s``, a
first while at a cap of 0: a long wait's cost in SQS calls).

    python bench/bench_caps.py                  # --tasks 30 --cap 3 --sleep-ms 500
    python bench/bench_caps.py --systems plain redrive before --before main
    python bench/bench_caps.py --hold-s 120 --systems redrive before --before main
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import yaml  # noqa: E402
from bench_capacity import checkout, sleeper  # noqa: E402
from benchpeers import Peers, zipped  # noqa: E402

from nanogrid.devtools.embedded import free_port, wait_until  # noqa: E402
from nanogrid.devtools.overlap import most_at_once  # noqa: E402

FUNCTION = "bench-capped"
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class CountingForwarder:
    """An HTTP forwarder to ``backend`` that counts the SQS operations passing through."""

    def __init__(self, backend: str) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        target = urllib.parse.urlsplit(backend)
        forwarder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                forwarder.count(self.headers.get("X-Amz-Target"), body)
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                try:
                    upstream.request(self.command, self.path, body or None, headers)
                    reply = upstream.getresponse()
                    data = reply.read()
                except (OSError, http.client.HTTPException):  # moto stopped under a long poll
                    self.send_error(502)
                    return
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in HOP_HEADERS:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _forward  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a long poll cut off when the agent or moto_server stops

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def count(self, target: str | None, body: bytes) -> None:
        if target and target.startswith("AmazonSQS."):
            operation = target.split(".", 1)[1]
        elif match := re.search(rb"(?:^|&)Action=(\w+)", body):  # the query protocol
            operation = match.group(1).decode()
        else:
            return
        with self._lock:
            self.calls[operation] += 1

    def take(self) -> Counter[str]:
        """The counts so far, and start again from zero."""
        with self._lock:
            calls, self.calls = self.calls, Counter()
        return calls

    def close(self) -> None:
        self._server.shutdown()


class Bench(Peers):
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(workdir)
        self.args = args

    def __enter__(self) -> Bench:
        super().__enter__()
        self.forwarder = CountingForwarder(self.moto.endpoint)
        self.key = "functions/capped/v1.zip"
        self.s3.put_object(Bucket=self.bucket, Key=self.key,
                           Body=zipped(sleeper(self.args.sleep_ms)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.forwarder.close()
        super().__exit__(*exc)

    def queues(self, redrive: bool) -> tuple[str, str]:
        dlq = self.sqs.create_queue(QueueName=f"dlq-{uuid.uuid4().hex[:8]}")["QueueUrl"]
        attributes = {"VisibilityTimeout": "30"}
        if redrive:
            arn = self.sqs.get_queue_attributes(
                QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            attributes["RedrivePolicy"] = json.dumps(
                {"deadLetterTargetArn": arn, "maxReceiveCount": str(self.args.max_receives)})
        queue = self.sqs.create_queue(QueueName=f"bench-{uuid.uuid4().hex[:8]}",
                                      Attributes=attributes)["QueueUrl"]
        return queue, dlq

    def system(self, name: str, code: Path = ROOT) -> dict[str, Any]:
        queue, dlq = self.queues(redrive=name != "plain")
        port = free_port()
        work = self.agent_workdir()
        settings: dict[str, Any] = {
            "workers": 1,
            "runner": "process",
            "drain_timeout_seconds": 10,
            "queue": {"url": queue, "wait_time_seconds": 20, "visibility_timeout_seconds": 30},
            "redis": {"url": self.redis_server.url},
            "http": {"host": "127.0.0.1", "port": port},
            "runtimes": {"python": {"warm": self.args.cap}},
            "paths": {"code_cache_dir": str(work / "cache"), "work_dir": str(work / "work"),
                      "outbox_dir": str(work / "outbox")},
            "aws": {"region": os.environ["AWS_DEFAULT_REGION"]},
            "cloudwatch": {"enabled": False},
            "log": {"level": "INFO", "file": str(work / "agent.log")},
        }
        config = work / "agent.yaml"
        config.write_text(yaml.safe_dump(settings))
        self.redis.hset("nanogrid:concurrency", FUNCTION, 0 if self.args.hold_s else self.args.cap)
        agent = subprocess.Popen(
            [sys.executable, str(code / "bin" / "nanogrid-supervisor"), "-c", str(config)],
            stdout=subprocess.DEVNULL, stderr=open(work / "stderr.log", "wb"),  # noqa: SIM115
            env={**os.environ, "AWS_ENDPOINT_URL": self.forwarder.endpoint},
        )
        try:
            wait_until(lambda: self._warm(port), timeout=60, what="the agent's warm pool")
            self.forwarder.take()  # the boot's calls are not the burst's
            report = {"system": name, **self.burst(queue, dlq)}
            time.sleep(1)  # the last deletes linger up to 0.5 s
            calls = self.forwarder.take()
            metrics = self._get(port, "/metrics").decode()
            report["calls"] = {op: n / self.args.tasks for op, n in sorted(calls.items())}
            report["callsPerMessage"] = sum(calls.values()) / self.args.tasks
            report["deferralsPerMessage"] = _metric(
                metrics, f'nanogrid_function_deferrals_total{{function_id="{FUNCTION}"}}'
            ) / self.args.tasks
            report["resent"] = _metric(metrics, "nanogrid_messages_resent_total")
            return report
        finally:
            agent.terminate()
            agent.wait(30)

    @staticmethod
    def _get(port: int, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return bytes(reply.read())

    def _warm(self, port: int) -> bool:
        status = json.loads(self._get(port, "/status"))
        return sum(p.get("warm", 0) for p in status["pools"].values()) >= self.args.cap

    def burst(self, queue: str, dlq: str) -> dict[str, Any]:
        tasks = [{"requestId": f"bench-{uuid.uuid4().hex}", "functionId": FUNCTION,
                  "runtime": "python", "s3Bucket": self.bucket, "s3Key": self.key,
                  "memoryMb": 64} for _ in range(self.args.tasks)]
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.psubscribe("result:bench-*")
        wanted = {t["requestId"] for t in tasks}
        results: list[dict[str, Any]] = []
        started = time.monotonic()

        def send(i: int) -> None:
            self.sqs.send_message_batch(QueueUrl=queue, Entries=[
                {"Id": str(n), "MessageBody": json.dumps(t)}
                for n, t in enumerate(tasks[i:i + 10])])

        with ThreadPoolExecutor(4) as senders:
            list(senders.map(send, range(0, len(tasks), 10)))
        if self.args.hold_s:  # capped at 0 for a while, then the cap is lifted to --cap
            time.sleep(self.args.hold_s)
            self.redis.hset("nanogrid:concurrency", FUNCTION, self.args.cap)
        dead = 0
        deadline = started + self.args.timeout
        while len(results) + dead < len(tasks) and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1)
            if message and message["type"] == "pmessage":
                result = json.loads(message["data"])
                if result["requestId"] in wanted:
                    results.append(result)
            dead = int(self.sqs.get_queue_attributes(
                QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"]
            )["Attributes"]["ApproximateNumberOfMessages"])
        took = time.monotonic() - started
        pubsub.close()
        ok = [r for r in results if r["status"] == "SUCCESS"]
        return {
            "seconds": took,
            "ideal": self.args.hold_s + len(tasks) / self.args.cap * self.args.sleep_ms / 1000,
            "success": len(ok), "firstAttempt": sum(1 for r in ok if r["attempt"] == 1),
            "deadLettered": dead, "atOnce": most_at_once(results) if results else 0,
        }


def _metric(text: str, series: str) -> float:
    """A series' value in Prometheus text, 0 when absent (an agent from before it)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def render(reports: list[dict[str, Any]], args: argparse.Namespace) -> str:
    operations = sorted({op for r in reports for op in r["calls"]})
    lines = [
        f"{args.tasks} messages of a function sleeping {args.sleep_ms} ms at cap {args.cap}"
        + (f" after {args.hold_s:g} s at a cap of 0" if args.hold_s else "") + ", "
        f"one agent (1 worker, process runner); redrive: maxReceiveCount {args.max_receives}; "
        f"nproc={os.cpu_count()}",
        "",
        "| system | SUCCESS (attempt 1) | dead-lettered | at once | seconds | ideal s | x ideal "
        "| deferrals/msg | SQS calls/msg | " + " | ".join(operations) + " | re-sent |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(operations) + "---:|",
    ]
    for r in reports:
        lines.append(
            f"| {r['system']} | {r['success']} ({r['firstAttempt']}) | {r['deadLettered']} "
            f"| {r['atOnce']} | {r['seconds']:.1f} | {r['ideal']:.1f} "
            f"| {r['seconds'] / r['ideal']:.1f} | {r['deferralsPerMessage']:.2f} "
            f"| {r['callsPerMessage']:.2f} | "
            + " | ".join(f"{r['calls'].get(op, 0):.2f}" for op in operations)
            + f" | {r['resent']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30)
    parser.add_argument("--cap", type=int, default=3)
    parser.add_argument("--sleep-ms", type=int, default=500)
    parser.add_argument("--max-receives", type=int, default=5,
                        help="the redrive policy's maxReceiveCount (systems redrive, before)")
    parser.add_argument("--hold-s", type=float, default=0,
                        help="hold the function at a cap of 0 this long first, then --cap")
    parser.add_argument("--systems", nargs="+", default=["plain", "redrive"],
                        choices=["plain", "redrive", "before"])
    parser.add_argument("--before", metavar="REF", help="code of the 'before' system")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    if "before" in args.systems and not args.before:
        parser.error("--systems before needs --before REF")
    reports = []
    with tempfile.TemporaryDirectory(prefix="bench-caps-") as tmp, Bench(args, Path(tmp)) as bench:
        for name in args.systems:
            code = checkout(args.before, Path(tmp) / "before") if name == "before" else ROOT
            reports.append(bench.system(name, code))
            print(json.dumps(reports[-1]), file=sys.stderr)
    print(render(reports, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
