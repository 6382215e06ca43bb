#!/usr/bin/env python3
"""Warmth benchmark: how often calls start cold under a realistic mix, and what a new
function's first call costs on a warm host, through the real supervisor.

Starts its own redis-server and moto_server on free loopback ports, then for each runner
asked for and each system (this tree, and with ``--before REF`` the agent of git revision
REF, exported to a temporary directory), runs ``bin/nanogrid-supervisor`` with 2 workers and
the default warm pools, waits for its pools, and measures:

``mix``    ``--functions`` functions (each its own zip), called ``--calls`` times at
           ``--rate`` per second, function k drawn with weight 1/k (Zipf-like). Reported:
           cold calls beyond each function's first (% of all calls: the host had the function
           warm somewhere already), all cold calls, and end-to-end p50/p99 (send to result,
           as the controller sees it).
``first``  ``--new`` functions never seen before, one call each, ``--gap`` seconds apart:
           end to end and the result's ``sandboxMs`` (a warm host should give a new function
           a ready sandbox, not an interpreter start or a container create).
``floor``  the same first calls served by no agent: a thread of this bench does only what
           the peers must (long-poll receive, GET the zip, SET + PUBLISH a stub result,
           delete). No agent's first call can be faster on this host than its end to end.

Reproduce: ``python bench/bench_warm_mix.py --before REF`` (root; Docker runner: dev/setup).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import boto3  # noqa: E402
import redis  # noqa: E402
import yaml  # noqa: E402
from benchpeers import Peers, zipped  # noqa: E402

from nanogrid.devtools.embedded import free_port, wait_until  # noqa: E402

DOCKER_IMAGE = "nanogrid/python:3.11-bookworm"


def function_code(n: int, imports: str = "") -> str:
    """Function n's main.py; ``imports``: more modules it imports (comma-separated)."""
    more = f"import {imports}\n" if imports else ""
    return f"import json, sys\n{more}d = json.load(sys.stdin)\nprint('fn{n}', d.get('x'))\n"


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class Bench(Peers):
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(workdir)
        self.args = args

    def deploy(self, tag: str, count: int) -> list[str]:
        """``count`` functions of their own; their S3 keys."""
        keys = []
        for n in range(count):
            key = f"functions/{tag}-{n}/v1.zip"
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=zipped(
                function_code(n, self.args.imports)))
            keys.append(key)
        return keys

    def system(self, runner: str, name: str, tree: Path) -> dict[str, Any]:
        queue = self.sqs.create_queue(
            QueueName=f"bench-{uuid.uuid4().hex[:8]}", Attributes={"VisibilityTimeout": "30"}
        )["QueueUrl"]
        port = free_port()
        work = self.agent_workdir()
        settings: dict[str, Any] = {
            "workers": 2,
            "runner": runner,
            "drain_timeout_seconds": 10,
            "queue": {"url": queue, "wait_time_seconds": 1},
            "redis": {"url": self.redis_server.url},
            "http": {"host": "127.0.0.1", "port": port},
            "runtimes": {"python": {"image": DOCKER_IMAGE,
                                    **({"warm": self.args.warm} if self.args.warm else {})}},
            "paths": {
                "code_cache_dir": str(work / "cache"),
                "work_dir": str(work / "work"),
                "outbox_dir": str(work / "outbox"),
            },
            "docker": {"socket_dir": str(work / "sockets")},
            "aws": {"region": os.environ["AWS_DEFAULT_REGION"]},
            "cloudwatch": {"enabled": False},
            "log": {"level": "WARNING", "file": str(work / "agent.log")},
        }
        config = work / "agent.yaml"
        config.write_text(yaml.safe_dump(settings))
        agent = subprocess.Popen(
            [sys.executable, str(tree / "bin" / "nanogrid-supervisor"), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=open(work / "stderr.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        try:
            wait_until(lambda: self._warm(port, max(4, self.args.warm)), timeout=180,
                       what=f"{name}'s pools warm")
            tag = f"{name.split()[0]}-{runner}-{uuid.uuid4().hex[:6]}"
            return {
                "runner": runner,
                "system": name,
                "mix": self.mix(queue, self.deploy(f"{tag}-mix", self.args.functions)),
                "first": self.first(queue, self.deploy(f"{tag}-new", self.args.new)),
            }
        finally:
            agent.terminate()
            agent.wait(60)

    @staticmethod
    def _warm(port: int, at_least: int) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as reply:
            status = json.loads(reply.read())
        warm = sum(p.get("warm", 0) for p in status["pools"].values())
        alive = sum(1 for w in status["workers"] if w["alive"])
        return alive == 2 and warm >= at_least

    def task(self, key: str, n: int) -> dict[str, Any]:
        return {
            "requestId": f"bench-{uuid.uuid4().hex}",
            "functionId": key.split("/")[1],
            "runtime": "python",
            "s3Bucket": self.bucket,
            "s3Key": key,
            "memoryMb": 128,
            "inputData": {"x": n},
        }

    def call_all(self, queue: str, schedule: list[tuple[float, dict[str, Any]]]
                 ) -> list[tuple[dict[str, Any], float]]:
        """Send each task at its offset (seconds); (result, end-to-end ms) of each."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.psubscribe("result:bench-*")
        sent: dict[str, float] = {}
        got: dict[str, tuple[dict[str, Any], float]] = {}

        def collect() -> None:
            deadline = time.monotonic() + schedule[-1][0] + 120
            while len(got) < len(schedule) and time.monotonic() < deadline:
                message = pubsub.get_message(timeout=0.5)
                if message and message["type"] == "pmessage":
                    arrived = time.perf_counter()
                    result = json.loads(message["data"])
                    request_id = result["requestId"]
                    if request_id in sent:
                        got[request_id] = (result, (arrived - sent[request_id]) * 1000)

        collector = threading.Thread(target=collect)
        collector.start()
        began = time.perf_counter()
        for offset, task in schedule:
            time.sleep(max(0.0, began + offset - time.perf_counter()))
            sent[task["requestId"]] = time.perf_counter()
            self.sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(task))
        collector.join()
        pubsub.close()
        missing = [t for _, t in schedule if t["requestId"] not in got]
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(schedule)} calls got no result")
        return [got[t["requestId"]] for _, t in schedule]

    def mix(self, queue: str, keys: list[str]) -> dict[str, float]:
        rng = random.Random(self.args.seed)
        weights = [1 / (k + 1) for k in range(len(keys))]
        calls = rng.choices(range(len(keys)), weights=weights, k=self.args.calls)
        schedule = [(i / self.args.rate, self.task(keys[k], i)) for i, k in enumerate(calls)]
        done = self.call_all(queue, schedule)
        bad = [r for r, _ in done if r["status"] != "SUCCESS"]
        if bad:
            raise RuntimeError(f"{len(bad)} failed, e.g. {bad[0]['errorMessage']}")
        seen: set[str] = set()
        cold_again = cold = 0
        for result, _ in done:
            if result["coldStart"]:
                cold += 1
                cold_again += result["functionId"] in seen
            seen.add(result["functionId"])
        e2e = [ms for _, ms in done]
        for result, ms in sorted(done, key=lambda d: -d[1])[:3]:  # where the tail's time went
            print(f"[bench] slow: {ms:.0f} ms, timings {result['timings']}", file=sys.stderr)
        return {
            "coldAgainPercent": 100 * cold_again / len(done),
            "coldPercent": 100 * cold / len(done),
            "p50": statistics.median(e2e),
            "p99": percentile(e2e, 99),
        }

    def first(self, queue: str, keys: list[str]) -> dict[str, float]:
        schedule = [(i * self.args.gap, self.task(key, i)) for i, key in enumerate(keys)]
        done = self.call_all(queue, schedule)
        e2e = [ms for _, ms in done]
        sandbox = [result["timings"]["sandboxMs"] for result, _ in done]
        phases = {name: statistics.median(r["timings"][name] for r, _ in done)
                  for name in done[0][0]["timings"]}
        print(f"[bench] first calls' phases, p50 ms: {phases}", file=sys.stderr)
        return {
            "p50": statistics.median(e2e),
            "max": max(e2e),
            "sandboxP50": statistics.median(sandbox),
            "cold": sum(r["coldStart"] for r, _ in done),
        }


    def floor(self) -> dict[str, float]:
        """``first``'s calls (new functions of their own) served by ``serve_floor``."""
        queue = self.sqs.create_queue(QueueName=f"floor-{uuid.uuid4().hex[:8]}")["QueueUrl"]
        keys = self.deploy(f"floor-{uuid.uuid4().hex[:6]}", self.args.new)
        stop = threading.Event()
        server = threading.Thread(target=serve_floor, args=(queue, self.redis_server.url, stop))
        server.start()
        try:
            schedule = [(i * self.args.gap, self.task(key, i)) for i, key in enumerate(keys)]
            e2e = [ms for _, ms in self.call_all(queue, schedule)]
        finally:
            stop.set()
            server.join()
        return {"p50": statistics.median(e2e), "max": max(e2e)}


def serve_floor(queue: str, redis_url: str, stop: threading.Event) -> None:
    """A worker that does nothing but the peers' part of a call (its own clients)."""
    sqs, s3, store = boto3.client("sqs"), boto3.client("s3"), redis.Redis.from_url(redis_url)
    while not stop.is_set():
        reply = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in reply.get("Messages", []):
            task = json.loads(message["Body"])
            s3.get_object(Bucket=task["s3Bucket"], Key=task["s3Key"])["Body"].read()
            data = json.dumps({"requestId": task["requestId"], "status": "SUCCESS"})
            channel = f"result:{task['requestId']}"
            store.pipeline().set(channel, data, ex=600).publish(channel, data).execute()
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
    store.close()


def render(reports: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"mix: {args.functions} functions, Zipf-like weights, {args.calls} calls at "
        f"{args.rate}/s; first: {args.new} new functions {args.gap} s apart; 2 workers, "
        f"default warm pools; nproc={os.cpu_count()}"
        + (f"; every function also imports {args.imports}" if args.imports else ""),
        "",
        "| runner | system | cold beyond first % | cold % | mix e2e p50 ms | p99 ms "
        "| new fn e2e p50 ms | max ms | its sandboxMs p50 | cold |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        m, f = r["mix"], r["first"]
        lines.append(
            f"| {r['runner']} | {r['system']} | {m['coldAgainPercent']:.1f} "
            f"| {m['coldPercent']:.1f} | {m['p50']:.1f} | {m['p99']:.1f} | {f['p50']:.1f} "
            f"| {f['max']:.1f} | {f['sandboxP50']:.1f} | {f['cold']} |"
        )
    return "\n".join(lines)


def render_floor(floor: dict[str, float], args: argparse.Namespace) -> str:
    return (f"floor of a new function's first call on this host's peers ({args.new} calls, no "
            f"agent: receive, GET, SET + PUBLISH, delete): e2e p50 {floor['p50']:.1f} ms, "
            f"max {floor['max']:.1f} ms")


def export(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True,
                             check=False)
    if archive.returncode != 0:
        raise SystemExit(f"--before: cannot export {ref}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tree:
        tree.extractall(into, filter="data")
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", nargs="+", default=["process", "docker"])
    parser.add_argument("--before", metavar="REF", help="also measure git revision REF")
    parser.add_argument("--functions", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--new", type=int, default=8)
    parser.add_argument("--gap", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--warm", type=int, default=0,
                        help="runtimes.python.warm (default: the agent's default)")
    parser.add_argument("--imports", default="", metavar="MODULES",
                        help="modules every function imports besides json and sys (a,b,c)")
    args = parser.parse_args()
    reports = []
    with tempfile.TemporaryDirectory(prefix="nanogrid-bench-") as tmp, Bench(args, Path(tmp)) as b:
        systems = [("now", ROOT)]
        if args.before:
            before = export(args.before, Path(tmp) / "before")
            systems.insert(0, (f"before ({args.before})", before))
        for runner in args.runners:
            for name, tree in systems:
                print(f"[bench] {runner} {name} ...", file=sys.stderr, flush=True)
                reports.append(b.system(runner, name, tree))
        print("[bench] floor ...", file=sys.stderr, flush=True)
        floor = b.floor()
    print(render(reports, args))
    print()
    print(render_floor(floor, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
