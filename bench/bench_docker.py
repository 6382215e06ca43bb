#!/usr/bin/env python3
"""Docker runner benchmark: warm and cold hello-world invocations vs ``docker run --rm``.

Measures, in one run on the same engine and image:

``warm``        DockerRunner, the function's container already warm (fork server inside):
                acquire -> run -> release, as the worker does for a repeat call.
``idle``        the same hello with its greeting in a module of its own, each call after the
                container idled 0.5 s: frozen through its cgroup as its run ended (paused
                through the engine, pause grace 0, where its freezer is out of reach), so
                the run thaws it (or acquire unpauses it) first.
``cold``        DockerRunner with an empty pool: acquire makes a container, the code goes in,
                run, release (which removes it, the pool having no room).
``docker exec`` ``docker exec -i`` of the same function into one running container.
``docker run``  ``docker run --rm -i --network none IMAGE python3 -c ...``: the naive baseline.

``function`` is durationMillis (the function's own run time, as the result reports it);
``end to end`` is what the worker waits for (acquire + code + run + release), or the whole
``docker`` command for the CLI rows. Needs root and a running engine (``dev/setup``).

    python bench/bench_docker.py [--warm 200] [--idle 20] [--cold 20] [--baseline 20]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loguru import logger  # noqa: E402

from nanogrid.common.config import Config, from_dict  # noqa: E402
from nanogrid.runners.base import Invocation  # noqa: E402
from nanogrid.runners.docker.runner import DockerRunner
from nanogrid.runners.docker.sandbox import DockerSandbox  # noqa: E402

HELLO = {"main.py": "import json, sys\nprint('Hello', json.load(sys.stdin)['name'])\n"}
HELLO_MODULE = {  # a function with code of its own: its container holds it between runs
    "main.py": "import json, sys, greeting\nprint(greeting.WORD, json.load(sys.stdin)['name'])\n",
    "greeting.py": "WORD = 'Hello'\n",
}
STDIN = b'{"name": "NanoGrid"}'
INVOCATION = Invocation("bench", "hello", ("python3", "main.py"), STDIN, 128, 10_000, 65536, 64)


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def make_config(work: str, image: str, warm: int, pause_grace: float) -> Config:
    return from_dict(
        {
            "runner": "docker",
            "workers": 1,
            "runtimes": {"python": {"image": image, "warm": warm}},
            "paths": {
                "work_dir": f"{work}/work",
                "code_cache_dir": f"{work}/cache",
                "outbox_dir": f"{work}/outbox",
            },
            "docker": {"socket_dir": f"{work}/s", "pause_grace_seconds": pause_grace},
        }
    )


def invoke(
    runner: DockerRunner, keep: bool = True, files: dict[str, str] = HELLO
) -> tuple[float, float, DockerSandbox]:
    """One invocation as the worker makes it: (durationMillis, end to end ms, sandbox).
    ``keep=False``: the container is removed after the run (the pool would keep it idle),
    so the next one is cold again."""
    started = time.perf_counter()
    sandbox = runner.acquire("python", "hello@1")
    assert isinstance(sandbox, DockerSandbox)
    try:
        if sandbox.code_key != "hello@1":
            shutil.rmtree(sandbox.code_dir, ignore_errors=True)
            sandbox.code_dir.mkdir()
            for name, text in files.items():
                (sandbox.code_dir / name).write_text(text)
            sandbox.code_key = "hello@1"
        out = runner.run(sandbox, INVOCATION)
    finally:
        sandbox.healthy = sandbox.healthy and keep
        runner.release(sandbox)
    elapsed = (time.perf_counter() - started) * 1000
    if out.exit_code != 0 or out.stdout != b"Hello NanoGrid\n":
        raise SystemExit(f"hello world failed: {out.exit_code} {out.stderr[-300:]!r}")
    return out.duration_ms, elapsed, sandbox


def bench_runner(
    image: str, warm: int, runs: int, pause: bool = False
) -> tuple[list[float], list[float]]:
    work = tempfile.mkdtemp(prefix="ng-bench-")
    runner = DockerRunner(make_config(work, image, warm, 0.0 if pause else 60.0), 0)
    try:
        deadline = time.monotonic() + 30
        while runner.pool_stats()["python"]["warm"] < warm and time.monotonic() < deadline:
            time.sleep(0.05)
        sandbox = None
        if warm:
            for _ in range(5):  # the first call puts the code in; a few more settle the caches
                _, _, sandbox = invoke(runner, files=HELLO_MODULE if pause else HELLO)
        durations, totals = [], []
        for _ in range(runs):
            if pause and not wait_idle(sandbox):
                raise SystemExit("the idle container was neither frozen nor paused")
            duration, total, sandbox = invoke(
                runner, keep=warm > 0, files=HELLO_MODULE if pause else HELLO
            )
            if sandbox.cold_start != (warm == 0):
                raise SystemExit(f"expected cold={warm == 0}, got cold={sandbox.cold_start}")
            durations.append(duration)
            totals.append(total)
        return durations, totals
    finally:
        runner.close()
        shutil.rmtree(work, ignore_errors=True)


def wait_idle(sandbox: DockerSandbox | None) -> bool:
    """Let the container idle 0.5 s; whether it was then frozen, or paused by the pool (it
    looks on a 0.25 s tick)."""
    time.sleep(0.5)
    if sandbox is None:
        return False
    if sandbox.cgroup is not None and sandbox.cgroup.freezer is not None:
        directory = sandbox.cgroup.freezer.directory
        if (directory / "freezer.state").exists():
            return (directory / "freezer.state").read_text().strip() == "FROZEN"
        return "frozen 1" in (directory / "cgroup.events").read_text()
    return sandbox.paused


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, input=STDIN, capture_output=True, timeout=60)
    elapsed = (time.perf_counter() - started) * 1000
    if proc.stdout != b"Hello NanoGrid\n":
        raise SystemExit(f"{' '.join(cmd[:3])} failed: {proc.stderr.decode()[-300:]}")
    return elapsed


def bench_docker_run(image: str, runs: int) -> list[float]:
    cmd = ["docker", "run", "--rm", "-i", "--network", "none", image, "python3", "-c",
           HELLO["main.py"]]
    timed(cmd)  # warm-up
    return [timed(cmd) for _ in range(runs)]


def bench_docker_exec(image: str, runs: int) -> list[float]:
    name = f"ng-bench-exec-{int(time.time())}"
    subprocess.run(
        ["docker", "run", "-d", "--init", "--network", "none", "--name", name, image]
        + ["sleep", "infinity"],
        check=True,
        capture_output=True,
    )
    try:
        cmd = ["docker", "exec", "-i", name, "python3", "-c", HELLO["main.py"]]
        timed(cmd)
        return [timed(cmd) for _ in range(runs)]
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    engine = subprocess.run(
        ["docker", "version", "-f", "{{.Server.Version}}"], capture_output=True, text=True
    ).stdout.strip()
    cgroup = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores, Linux {platform.release()}, "
        f"Docker Engine {engine}, cgroup {cgroup}, Python {platform.python_version()}"
    )


def row(name: str, function: list[float] | None, total: list[float]) -> str:
    fn = (
        f"{percentile(function, 50):8.1f} {percentile(function, 99):8.1f}"
        if function
        else (f"{'-':>8} {'-':>8}")
    )
    return (
        f"{name:<26} {len(total):>5} {fn} {percentile(total, 50):8.1f} {percentile(total, 99):8.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default="nanogrid/python:3.11-bookworm")
    parser.add_argument("--warm", type=int, default=200, help="warm invocations")
    parser.add_argument("--idle", type=int, default=20, help="invocations after 0.5 s idle")
    parser.add_argument("--cold", type=int, default=20, help="cold invocations")
    parser.add_argument("--baseline", type=int, default=20, help="docker run / exec invocations")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")

    warm_fn, warm_total = bench_runner(args.image, 1, args.warm)
    idle_fn, idle_total = bench_runner(args.image, 1, args.idle, pause=True)
    cold_fn, cold_total = bench_runner(args.image, 0, args.cold)
    exec_total = bench_docker_exec(args.image, args.baseline)
    run_total = bench_docker_run(args.image, args.baseline)

    print(machine())
    print(f"{'ms':<26} {'runs':>5} {'fn p50':>8} {'fn p99':>8} {'e2e p50':>8} {'e2e p99':>8}")
    print(row("warm (DockerRunner)", warm_fn, warm_total))
    print(row("warm, after 0.5 s idle", idle_fn, idle_total))
    print(row("cold (DockerRunner)", cold_fn, cold_total))
    print(row("docker exec -i", None, exec_total))
    print(row("docker run --rm (baseline)", None, run_total))
    base = percentile(run_total, 50)
    warm_x, cold_x = base / percentile(warm_total, 50), base / percentile(cold_total, 50)
    print(f"end-to-end p50 vs docker run --rm: warm {warm_x:.1f}x faster, cold {cold_x:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
