#!/usr/bin/env python3
"""What an idle node sandbox costs the host, with the Worker it keeps started for its next call
and once it ended it (``pool.node_worker_idle_seconds``), and what a call then waits for.

On each runner, ``--sandboxes`` node functions are called once each (one sandbox each, a
``main.js`` that requires a ``lib.js`` of its own, as most functions have code besides their
main script: such a sandbox is frozen while idle). Then, with every sandbox idle:

- PSS per sandbox (``/proc/PID/smaps_rollup`` of all its processes: a process sandbox's
  node server, PID 1 of its namespace, and whatever runs below it (a keeper outside the
  namespace and a python PID 1 above the server before); a shared page is counted once in
  all) and its
  anonymous memory, armed (as today's code keeps it, and as after a call);
- a call on each, armed: what the caller waits for (acquire -> run -> release);
- the same once every sandbox has ended its Worker (after ``--after-s``), and a call on each
  then (it starts a Worker and requires ``lib.js`` before the function runs).

Needs root; the Docker rows need a running engine and the node image (``dev/setup``).

    python bench/bench_node_idle.py [--sandboxes 10] [--after-s 5] [--no-docker]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench_import_warm  # noqa: E402
import psutil  # noqa: E402
from loguru import logger  # noqa: E402

from nanogrid.common.config import from_dict  # noqa: E402
from nanogrid.runners.base import Invocation, Sandbox  # noqa: E402
from nanogrid.runners.docker import DockerRunner  # noqa: E402
from nanogrid.runners.pooled import PooledRunner  # noqa: E402
from nanogrid.runners.process import ProcessRunner  # noqa: E402

FILES = {
    "main.js": "console.log(require('./lib').greet('ok'));\n",
    "lib.js": "exports.greet = (word) => word;\n",
}
INVOCATION = Invocation("bench", "fn", ("node", "main.js"), b"{}", 128, 10_000, 65536, 64)


def make_runner(kind: str, work: str, after_s: float) -> PooledRunner:
    settings: dict[str, Any] = {
        "runner": kind,
        "workers": 1,
        "runtimes": {"node": {"warm": 0, "command": ["node", "main.js"],
                              "image": "nanogrid/node:18-bookworm"}},
        "pool": {"node_worker_idle_seconds": after_s},
        "capacity": {"memory_mb": 4096, "max_concurrent": 64},  # the pool's bound
        "paths": {
            "work_dir": f"{work}/w", "code_cache_dir": f"{work}/c", "outbox_dir": f"{work}/o"
        },
        "docker": {"socket_dir": f"{work}/s", "pause_grace_seconds": 600},
    }
    config = from_dict(settings)
    return ProcessRunner(config, 0) if kind == "process" else DockerRunner(config, 0)


def call(runner: PooledRunner, key: str) -> tuple[Sandbox, float]:
    """One call of ``key`` as the worker makes it, then its sandbox back on the board; the
    sandbox and what the caller waited (ms)."""
    _, sandbox, waited = bench_import_warm.call(runner, "node", key, FILES, INVOCATION)
    deadline = time.monotonic() + 10
    while sandbox.settling and time.monotonic() < deadline:
        time.sleep(0.01)
    return sandbox, waited


def pids(sandbox: Any) -> set[int]:
    """Its processes: a container's, or a process sandbox's first process (the one its
    template forked) and every process below it."""
    processes = getattr(sandbox, "processes", None)
    if processes is not None:
        return {processes.init_pid, processes.server_pid, *processes.strays()}
    first = psutil.Process(sandbox.process.pid)
    return {first.pid, *(child.pid for child in first.children(recursive=True))}


def rollup_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(sandboxes: list[Sandbox]) -> tuple[float, float]:
    """Median PSS and anonymous memory per sandbox, MiB."""
    pss = [sum(rollup_kb(pid, "Pss") for pid in pids(s)) / 1024 for s in sandboxes]
    anon = [sum(rollup_kb(pid, "Anonymous") for pid in pids(s)) / 1024 for s in sandboxes]
    return statistics.median(pss), statistics.median(anon)


def all_shrunk(runner: PooledRunner, keys: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        shrunk = {e.code_key for e in runner.board.entries() if e.shrunk}
        if shrunk >= set(keys):
            return
        time.sleep(0.1)
    raise SystemExit("the idle sandboxes did not end their Workers in time")


def measure(kind: str, count: int, after_s: float) -> list[tuple[str, float, float, list[float]]]:
    work = tempfile.mkdtemp(prefix="ng-ni-")
    os.chmod(work, 0o711)
    runner = make_runner(kind, work, after_s)
    keys = [f"idle{i}@1" for i in range(count)]
    try:
        sandboxes = [call(runner, key)[0] for key in keys]  # each one's first call
        time.sleep(1.0)  # what the creates left (a container's start) is over
        rows = []
        armed_calls = [call(runner, key)[1] for key in keys]
        time.sleep(0.5)
        rows.append(("Worker kept (today)", *memory(sandboxes), armed_calls))
        all_shrunk(runner, keys, after_s + 30)
        time.sleep(0.5)
        pss, anon = memory(sandboxes)
        rows.append(("Worker ended", pss, anon, [call(runner, key)[1] for key in keys]))
        return rows
    finally:
        runner.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sandboxes", type=int, default=10, help="idle node sandboxes")
    parser.add_argument("--after-s", type=float, default=5.0,
                        help="pool.node_worker_idle_seconds for the bench")
    parser.add_argument("--no-docker", action="store_true", help="the process runner only")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    node = shutil.which("node")
    print(f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
          f"Linux {platform.release()}, load {os.getloadavg()[0]:.1f}; host node: {node}; "
          f"{args.sandboxes} idle sandboxes per runner")
    print("| runner | idle sandbox | PSS MiB p50 | anonymous MiB p50 | next call ms p50 | max |")
    print("|---|---|---:|---:|---:|---:|")
    for kind in ["process"] if args.no_docker else ["process", "docker"]:
        for what, pss, anon, calls in measure(kind, args.sandboxes, args.after_s):
            print(f"| {kind} | {what} | {pss:.1f} | {anon:.1f} | "
                  f"{statistics.median(calls):.1f} | {max(calls):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
