#!/usr/bin/env python3
"""Host capacity benchmark: a burst of I/O-bound tasks through the real supervisor.

Starts its own redis-server and moto_server on free loopback ports, then, for each runner
asked for, runs ``bin/nanogrid-supervisor`` with 2 workers twice, one after the other:

``one-at-a-time``  ``capacity.max_concurrent: 2``, what the agent did before host capacity
                   (each of the 2 workers ran one invocation at a time): the baseline.
``capacity``       ``capacity`` left ``auto`` (computed from the host), or as
                   ``--capacity-memory-mb`` and ``--max-concurrent`` set it.
``before``         ``capacity`` as above, with ``--before REF``'s code (a commit, or a
                   checkout's directory): its own ``bin/nanogrid-supervisor``.

``--systems`` picks which. For each: a burst of ``--tasks`` tasks of a function that sleeps
``--sleep-ms`` (``memoryMb`` ``--memory-mb``), sent at once with ``send_message_batch``; the
time from the first send to the last result, and the most invocations that ran at once (from
the results' ``finishedAt`` and ``durationMillis``). The burst runs twice: cold (the pools
grow) and warm (they have grown). Then ``--hello`` sequential hello-world invocations for the
end-to-end latency.

``--emulator moto-constant-time`` runs moto_server without its per-message pass over the
whole queue (``moto_constant_time.py``): a burst of hundreds otherwise measures moto.

Issue 23's burst: ``--runners process --tasks 500 --sleep-ms 1000 --memory-mb 32
--capacity-memory-mb 16384 --max-concurrent 500 --systems capacity before --before REF
--hello 0 --emulator moto-constant-time``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import yaml  # noqa: E402
from benchpeers import EMULATORS, Peers, zipped  # noqa: E402

from nanogrid.devtools.embedded import free_port, wait_until  # noqa: E402
from nanogrid.devtools.overlap import most_at_once, started_at  # noqa: E402

DOCKER_IMAGE = "nanogrid/python:3.11-bookworm"
HELLO = 'print("Hello from NanoGrid!")\n'


def sleeper(ms: int) -> str:
    return f"import time\ntime.sleep({ms / 1000})\nprint('slept')\n"


def spinner(ms: int) -> str:
    """CPU-bound: spins for ``ms`` of its own CPU time."""
    return (
        f"import time\nend = time.process_time() + {ms / 1000}\n"
        "while time.process_time() < end: pass\n"
    )


class Bench(Peers):
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(workdir, emulator=args.emulator)
        self.args = args

    def __enter__(self) -> Bench:
        super().__enter__()
        self.keys = {}
        burst = spinner(self.args.cpu_ms) if self.args.cpu_ms else sleeper(self.args.sleep_ms)
        for name, code in (("sleep", burst), ("hello", HELLO)):
            self.keys[name] = f"functions/{name}/v1.zip"
            self.s3.put_object(Bucket=self.bucket, Key=self.keys[name], Body=zipped(code))
        return self

    def system(self, runner: str, name: str, code: Path = ROOT) -> dict[str, Any]:
        queue = self.sqs.create_queue(
            QueueName=f"bench-{uuid.uuid4().hex[:8]}",
            Attributes={"VisibilityTimeout": "30"},
        )["QueueUrl"]
        port = free_port()
        work = self.agent_workdir()
        settings: dict[str, Any] = {
            "workers": 2,
            "runner": runner,
            "drain_timeout_seconds": 10,
            "queue": {"url": queue, "wait_time_seconds": 1, "visibility_timeout_seconds": 30},
            "redis": {"url": self.redis_server.url},
            "http": {"host": "127.0.0.1", "port": port},
            "runtimes": {"python": {"warm": 4, "image": DOCKER_IMAGE}},
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
        if name == "one-at-a-time":
            settings["capacity"] = {"max_concurrent": 2}
        else:
            settings["capacity"] = {
                "memory_mb": self.args.capacity_memory_mb or "auto",
                "max_concurrent": self.args.max_concurrent or "auto",
            }
        config = work / "agent.yaml"
        config.write_text(yaml.safe_dump(settings))
        agent = subprocess.Popen(
            [sys.executable, str(code / "bin" / "nanogrid-supervisor"), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=open(work / "stderr.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        try:
            status = wait_until(
                lambda: self._warm(port), timeout=60, what=f"{runner} agent's pools to be warm"
            )
            report: dict[str, Any] = {
                "runner": runner,
                "system": name,
                "maxConcurrent": status["capacity"]["maxConcurrent"],
            }
            for burst in ("cold", "warm"):
                before = tree_cpu(agent.pid)
                report[burst] = self.burst(queue)
                after = tree_cpu(agent.pid)
                report[burst].update({
                    f"{part}CpuMs": (after[part] - before[part]) * 1000 / self.args.tasks
                    for part in ("agent", "sandboxes")
                })
            report["hello"] = self.hello(queue)
            return report
        finally:
            agent.terminate()
            agent.wait(30)

    @staticmethod
    def _warm(port: int) -> dict[str, Any] | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as reply:
            status = json.loads(reply.read())
        warm = sum(p.get("warm", 0) for p in status["pools"].values())
        alive = sum(1 for w in status["workers"] if w["alive"])
        return status if alive == 2 and warm >= 4 else None

    def task(self, function: str) -> dict[str, Any]:
        return {
            "requestId": f"bench-{uuid.uuid4().hex}",
            "functionId": f"bench-{function}",
            "runtime": "python",
            "s3Bucket": self.bucket,
            "s3Key": self.keys[function],
            "memoryMb": self.args.memory_mb,
        }

    def burst(self, queue: str) -> dict[str, float]:
        tasks = [self.task("sleep") for _ in range(self.args.tasks)]
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.psubscribe("result:bench-*")
        wanted = {t["requestId"] for t in tasks}
        results: list[dict[str, Any]] = []
        started, started_wall = time.monotonic(), time.time()

        def send(i: int) -> None:
            self.sqs.send_message_batch(
                QueueUrl=queue,
                Entries=[
                    {"Id": str(n), "MessageBody": json.dumps(t)}
                    for n, t in enumerate(tasks[i : i + 10])
                ],
            )

        with ThreadPoolExecutor(8) as senders:  # at once: a burst, not a trickle
            list(senders.map(send, range(0, len(tasks), 10)))
        sent = time.monotonic() - started
        deadline = started + 300
        while len(results) < len(tasks) and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1)
            if message and message["type"] == "pmessage":
                result = json.loads(message["data"])
                if result["requestId"] in wanted:
                    results.append(result)
        took = time.monotonic() - started
        pubsub.close()
        if len(results) < len(tasks):
            raise RuntimeError(f"only {len(results)} of {len(tasks)} results within 300 s")
        failed = [r for r in results if r["status"] != "SUCCESS"]
        if failed:
            raise RuntimeError(f"{len(failed)} failed, e.g. {failed[0]['errorMessage']}")
        starts = sorted(started_at(r) - started_wall for r in results)
        return {
            "seconds": took,
            "atOnce": most_at_once(results),
            "sent": sent,
            "firstStart": starts[0],
            "medianStart": statistics.median(starts),
            "lastStart": starts[-1],
        }

    def hello(self, queue: str) -> dict[str, float] | None:
        if not self.args.hello:
            return None
        samples = []
        for _ in range(self.args.hello + 5):
            task = self.task("hello")
            channel = f"result:{task['requestId']}"
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(channel)
            began = time.perf_counter()
            self.sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(task))
            while pubsub.get_message(timeout=5) is None:
                pass
            samples.append((time.perf_counter() - began) * 1000)
            pubsub.close()
            time.sleep(0.02)
        samples = samples[5:]
        p99 = statistics.quantiles(samples, n=100, method="inclusive")[98]
        return {"p50": statistics.median(samples), "p99": p99}


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of the agent at ``pid``: ``agent``, the supervisor's and workers'
    own (user + system); ``sandboxes``, the rest of its tree with what its processes reaped
    (templates, sandboxes, their calls)."""
    ticks = {"agent": 0, "sandboxes": 0}
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            title = process.cmdline()[:1]
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (psutil.Error, OSError):
            continue
        own, reaped = int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])
        if title and title[0].startswith(("nanogrid: supervisor", "nanogrid: worker")):
            ticks["agent"] += own
            ticks["sandboxes"] += reaped
        else:
            ticks["sandboxes"] += own + reaped
    return {part: n / os.sysconf("SC_CLK_TCK") for part, n in ticks.items()}


def checkout(ref: str, into: Path) -> Path:
    """A checkout of ``ref``: a directory as it is, else a git revision extracted."""
    if Path(ref).is_dir():
        return Path(ref).resolve()
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def render(reports: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"burst: {args.tasks} tasks "
        + (f"spinning {args.cpu_ms} ms of CPU" if args.cpu_ms else f"sleeping {args.sleep_ms} ms")
        + f" (memoryMb {args.memory_mb}), 2 workers; "
        f"hello: {args.hello} sequential invocations; emulator {args.emulator}; "
        f"nproc={os.cpu_count()}",
        "",
        "| runner | system | maxConcurrent | cold burst s | at once | warm burst s | at once "
        "| warm agent CPU ms/task | warm sandboxes CPU ms/task "
        "| hello e2e p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        lines.append(
            f"| {r['runner']} | {r['system']} | {r['maxConcurrent']} "
            f"| {r['cold']['seconds']:.2f} | {r['cold']['atOnce']} "
            f"| {r['warm']['seconds']:.2f} | {r['warm']['atOnce']} "
            f"| {r['warm']['agentCpuMs']:.2f} | {r['warm']['sandboxesCpuMs']:.2f} "
            + (f"| {r['hello']['p50']:.1f} | {r['hello']['p99']:.1f} |" if r["hello"] else "| | |")
        )
    lines += [
        "",
        "the burst's last send returned, and its runs' starts, s after its first send:",
        "",
        "| runner | system | burst | all sent | first | median | last |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in reports:
        for burst in ("cold", "warm"):
            b = r[burst]
            lines.append(
                f"| {r['runner']} | {r['system']} | {burst} | {b['sent']:.2f} "
                f"| {b['firstStart']:.2f} "
                f"| {b['medianStart']:.2f} | {b['lastStart']:.2f} |"
            )
    by = {(r["runner"], r["system"]): r for r in reports}
    for runner in args.runners:
        base, new = by.get((runner, "one-at-a-time")), by.get((runner, "capacity"))
        if base and new:
            speedup = base["warm"]["seconds"] / new["warm"]["seconds"]
            hello = new["hello"]["p50"] - base["hello"]["p50"] if new["hello"] else 0.0
            lines.append(
                f"{runner}: warm burst {speedup:.1f}x faster with capacity; hello p50 "
                f"{hello:+.1f} ms"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", nargs="+", default=["process", "docker"])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--sleep-ms", type=int, default=500)
    parser.add_argument("--hello", type=int, default=100)
    parser.add_argument(
        "--cpu-ms", type=int, default=0, help="burst of CPU-bound tasks spinning this long instead"
    )
    parser.add_argument("--memory-mb", type=int, default=128, help="each task's memoryMb")
    parser.add_argument("--capacity-memory-mb", type=int, help="capacity.memory_mb (auto)")
    parser.add_argument("--max-concurrent", type=int, help="capacity.max_concurrent (auto)")
    parser.add_argument("--systems", nargs="+", default=["one-at-a-time", "capacity"],
                        choices=["one-at-a-time", "capacity", "before"])
    parser.add_argument(
        "--emulator", choices=EMULATORS, default="moto",
        help="moto-constant-time: moto_server without its per-message pass over the queue",
    )
    parser.add_argument("--before", help="the code of the 'before' system: a commit or a checkout")
    args = parser.parse_args()
    if "before" in args.systems and not args.before:
        parser.error("the 'before' system needs --before REF")
    reports = []
    with tempfile.TemporaryDirectory(prefix="nanogrid-bench-") as tmp, Bench(args, Path(tmp)) as b:
        before = checkout(args.before, Path(tmp) / "before") if args.before else ROOT
        for runner in args.runners:
            for name in args.systems:
                print(f"[bench] {runner} {name} ...", file=sys.stderr, flush=True)
                reports.append(b.system(runner, name, before if name == "before" else ROOT))
    print(render(reports, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
