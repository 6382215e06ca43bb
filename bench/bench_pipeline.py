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
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline_bench import ROOT, SUPERVISOR, Bench, refill_batch, supervisor_works
from pipeline_consumers import (
    BEFORE,
    DEFAULT_SYSTEMS,
    SCALING,
    SYSTEMS,
    _agent_main,  # noqa: F401 - BEFORE_RUNNER calls bench_pipeline._agent_main in any revision
)
from pipeline_report import Report, render


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
    load = (load_before, os.getloadavg()[0])
    print(render(reports, args, bench.python, load, refill_batch(args.window)))
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
