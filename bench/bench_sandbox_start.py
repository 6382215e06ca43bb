#!/usr/bin/env python3
"""What a cold process sandbox costs: ``ProcessRunner.create`` to ready (the ``Init
Duration`` a cold start logs), the CPU it takes, and the memory an idle one holds.

Each tree measured (this one, and with ``--before REF`` a commit's or a checkout's) runs in
a process of its own, as a worker runs it: root, the sandbox uids, cgroups, namespaces, the
functions' python3, the options the runner passes. The bench asks them for one sandbox at
a time, taking turns, and times ``create``; then each holds ``--idle`` sandboxes and the
bench reads their PSS (``/proc/PID/smaps_rollup``: each shared page counted once in all)
and the CPU time of every process that made them (the agent's own, the sandboxes', and,
where there is one, the template's, whose PSS is shown shared among them too); then it
times ``destroy``.

Needs root (``dev/setup``'s machine); ~20 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# -- the measured side: one tree's ProcessRunner, driven over stdin ----------------------------


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid: int) -> float:
    """The CPU time of a live process's threads, in seconds, to the nanosecond
    (``/proc/PID/task/*/schedstat``): its utime + stime in ``/proc/PID/stat`` are whole clock
    ticks (10 ms), while a sandbox's own set-up takes a few milliseconds, so a sum of them
    over many sandboxes is mostly rounding."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                total += int(schedstat.read().split()[0])
    except OSError:
        pass
    return total / 1e9


def serve(tree: Path, index: int) -> int:
    """``--serve TREE``: make and remove sandboxes with TREE's runner as told on stdin."""
    sys.path.insert(0, str(tree))
    from loguru import logger

    from nanogrid.common import capacity
    from nanogrid.common.config import from_dict
    from nanogrid.runners.base import Invocation
    from nanogrid.runners.process.runner import ProcessRunner

    logger.remove()  # its debug line per sandbox

    base = Path(tempfile.mkdtemp(prefix="ngs-", dir="/var/lib"))  # a work dir, not in /tmp
    os.chmod(base, 0o711)
    config = from_dict({
        "profile": "local", "runner": "process", "workers": 1,
        "runtimes": {"python": {"warm": 0}},
        "capacity": {"memory_mb": 16384, "max_concurrent": 500},  # the pools' bound
        "log": {"level": "WARNING"},
        "paths": {"work_dir": str(base / "w"), "code_cache_dir": str(base / "c"),
                  "outbox_dir": str(base / "o")},
    })
    config = capacity.pin(config, capacity.resolve(config))
    runner = ProcessRunner(config, index)
    live: list[Any] = []

    def processes(sandbox: Any) -> list[int]:
        return sorted({sandbox.process.pid, sandbox.server_pid})

    try:
        for line in sys.stdin:
            what = line.split()
            reply: dict[str, Any] = {}
            if what[0] == "create":
                started = time.perf_counter()
                sandbox = runner.create("python")
                reply["ms"] = (time.perf_counter() - started) * 1000
                if what[1:] == ["keep"]:
                    live.append(sandbox)
                else:
                    runner.destroy(sandbox)
            elif what[0] == "measure":
                descendants = {p.pid for p in psutil.Process().children(recursive=True)}
                others = descendants - {pid for s in live for pid in processes(s)}
                own = resource.getrusage(resource.RUSAGE_SELF)
                reply = {
                    "pss_kb": [sum(pss_kb(pid) for pid in processes(s)) for s in live],
                    "template_pss_kb": sum(pss_kb(pid) for pid in others),
                    "cpu_s": own.ru_utime + own.ru_stime
                    + sum(cpu_s(pid) for pid in descendants),
                }
            elif what[0] == "burst":
                reply = burst(runner, Invocation, int(what[1]), float(what[2]))
            elif what[0] == "destroy":
                started = time.perf_counter()
                runner.destroy(live.pop())
                reply["ms"] = (time.perf_counter() - started) * 1000
            print(json.dumps(reply), flush=True)
    finally:
        for sandbox in live:
            runner.destroy(sandbox)
        runner.close()
        shutil.rmtree(base, ignore_errors=True)
    return 0


def burst(runner: Any, invocation: Any, calls: int, sleep_s: float) -> dict[str, Any]:
    """``calls`` calls of one function that sleeps ``sleep_s`` at once, each from a thread
    of its own as a worker's runs: acquire (a cold create for each: all are busy), code in,
    run, release. Each call's start, and its run's start and end (this host's clock)."""
    code = f"import time\ntime.sleep({sleep_s})\n"
    gate = threading.Barrier(calls)

    def call(_: int) -> tuple[float, float, float]:
        gate.wait()
        started = time.time()
        sandbox = runner.acquire("python", "sleep@1")
        try:
            if sandbox.code_key != "sleep@1":
                sandbox.code_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
                (sandbox.code_dir / "main.py").write_text(code)
                (sandbox.code_dir / "main.py").chmod(0o644)
                sandbox.code_key = "sleep@1"
            running = time.time()
            ran = runner.run(sandbox, invocation("r", "sleep", ("python3", "main.py"), b"{}",
                                                 32, 30_000, 10_000, 32))
            ended = time.time()
        finally:
            runner.release(sandbox)
        if ran.exit_code != 0:
            raise RuntimeError(ran.stderr.decode(errors="replace")[-300:])
        return started, running, ended

    with ThreadPoolExecutor(calls) as threads:
        spans = list(threads.map(call, range(calls)))
    return {"spans": spans}


# -- the bench: the trees taking turns ----------------------------------------------------------


class Tree:
    def __init__(self, name: str, root: Path, index: int) -> None:
        self.name = name
        self.root = root
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(root), "--index", str(index)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root,
        )

    def ask(self, command: str) -> dict[str, Any]:
        self.send(command)
        return self.receive()

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name}: the measured runner exited")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        self.process.wait(60)


def burst_on_two(tree: Tree, calls: int) -> tuple[float, int]:
    """``calls`` sleep(1 s) calls at once on two runners of ``tree``'s code (two workers):
    (first call to last end in seconds, most runs at once)."""
    workers = [Tree(tree.name, tree.root, index) for index in (2, 3)]
    try:
        for worker in workers:
            worker.send(f"burst {calls // 2} 1.0")
        spans = [span for worker in workers for span in worker.receive()["spans"]]
    finally:
        for worker in workers:
            worker.close()
    edges = sorted([(run, 1) for _, run, _ in spans] + [(end, -1) for _, _, end in spans])
    at_once = most = 0
    for _, step in edges:
        at_once += step
        most = max(most, at_once)
    return max(end for *_, end in spans) - min(start for start, *_ in spans), most


def checkout(ref: str, into: Path) -> Path:
    """A checkout of ``ref``: a directory as it is, else a git revision extracted."""
    if Path(ref).is_dir():
        return Path(ref).resolve()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=40, help="timed creates per tree (default 40)")
    parser.add_argument("--idle", type=int, default=20,
                        help="idle sandboxes held per tree for memory and CPU (default 20)")
    parser.add_argument("--before", help="a commit (or a checkout's directory) to measure too")
    parser.add_argument("--burst", type=int, default=0,
                        help="then this many calls of a sleep(1 s) function at once on 2 "
                        "workers, per tree (issue 23: 500)")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.index)
    if os.geteuid() != 0:
        parser.error("needs root: the namespaces, cgroups and sandbox uids")
    scratch = Path(tempfile.mkdtemp(prefix="ngs-before-"))
    trees = [Tree("this tree", ROOT, 0)]
    if args.before:
        trees.append(Tree(f"before ({args.before})", checkout(args.before, scratch), 1))
    try:
        creates: dict[str, list[float]] = {t.name: [] for t in trees}
        for i in range(args.n + 3):
            for tree in trees:
                ms = tree.ask("create")["ms"]
                if i >= 3:  # the first start the template and warm the page cache
                    creates[tree.name].append(ms)
        held: dict[str, dict[str, Any]] = {}
        for tree in trees:
            before = tree.ask("measure")["cpu_s"]
            for _ in range(args.idle):
                tree.ask("create keep")
            time.sleep(0.5)  # settled: idle as in a pool
            held[tree.name] = tree.ask("measure")
            held[tree.name]["cpu_ms_per_create"] = (
                (held[tree.name]["cpu_s"] - before) * 1000 / args.idle)
            held[tree.name]["destroy"] = [tree.ask("destroy")["ms"] for _ in range(args.idle)]
        for tree in trees:
            tree.close()
        bursts = {tree.name: burst_on_two(tree, args.burst) for tree in trees if args.burst}
    finally:
        for tree in trees:
            tree.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{args.n} creates per tree, taking turns; {args.idle} idle sandboxes held per tree; "
          f"load {os.getloadavg()[0]:.2f}\n")
    print("| tree | create p50 ms | p90 | p99 | CPU per create ms | idle PSS per sandbox MiB "
          "| with the template's share | destroy p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for tree in trees:
        ms, h = creates[tree.name], held[tree.name]
        per = statistics.median(h["pss_kb"]) / 1024
        shared = (sum(h["pss_kb"]) + h["template_pss_kb"]) / len(h["pss_kb"]) / 1024
        print(f"| {tree.name} | {statistics.median(ms):.1f} | {p(ms, 90):.1f} | {p(ms, 99):.1f} "
              f"| {h['cpu_ms_per_create']:.1f} | {per:.2f} | {shared:.2f} "
              f"| {statistics.median(h['destroy']):.1f} |")
    if bursts:
        print(f"\n{args.burst} calls of sleep(1 s) at once, 2 workers (runners) of "
              f"{args.burst // 2} threads, all cold (warm: 0)\n")
        print("| tree | first call to last end s | most runs at once |")
        print("|---|---:|---:|")
        for name, (seconds, at_once) in bursts.items():
            print(f"| {name} | {seconds:.2f} | {at_once} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
