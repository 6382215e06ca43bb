#!/usr/bin/env python3
"""Import-warm benchmark: warm durationMillis of functions with imports, preload on and off.

Functions on both runners (process, Docker), with ``runtimes.NAME.preload`` true and false,
in one run. Python:

``hello``   prints one line (no imports).
``stdlib``  imports asyncio, email.mime.multipart, http.client, decimal,
            xml.etree.ElementTree, sqlite3, uuid, logging, urllib.request, ssl, argparse,
            dataclasses and typing, then prints one line.
``package`` imports ``bigpkg`` from its own zip: a generated pure-Python package of
            ``--modules`` modules (its import time is measured and printed: >= 50 ms).

Node (calls ``--gap-ms`` apart: a node sandbox preloads before every call, between calls):

``hello``   prints one line; once more with no gap between calls (back to back: a call
            must not wait for a Worker to start).
``heavy``   requires ``./heavy.js`` from its zip, whose top level builds a 60,000-entry Map
            (its load time is measured and printed: >= 50 ms), then prints one line; once
            more with no gap between calls (back to back: the call waits for its preload).

Each system calls the function once (cold: the code goes in), then ``--runs`` warm calls as
the worker makes them (acquire -> run -> release); durationMillis is the function's own run
time as the result reports it, the peak its peakMemoryBytes. Needs root; the Docker rows
need a running engine and the images (``dev/setup``).

    python bench/bench_import_warm.py [--runs 100] [--modules 40] [--gap-ms 200] [--no-docker]
        [--before REF]

``call ms`` is what the caller waits for (acquire -> run -> release), which durationMillis
leaves out when a call waits for its sandbox (a node Worker's start); ``--before REF`` runs
the same rows on git revision REF's code first (its tree exported, this script run on it).
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if "--tree" in sys.argv:  # the agent's code of another revision (--before REF runs it so)
    ROOT = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()
sys.path.insert(0, str(ROOT))

from loguru import logger  # noqa: E402

from nanogrid.common.config import from_dict  # noqa: E402
from nanogrid.runners.base import Invocation, Runner, RunOutcome, Sandbox  # noqa: E402
from nanogrid.runners.docker import DockerRunner  # noqa: E402
from nanogrid.runners.process import ProcessRunner  # noqa: E402

IMAGES = {"python": "nanogrid/python:3.11-bookworm", "node": "nanogrid/node:18-bookworm"}
COMMANDS = {"python": ("python3", "main.py"), "node": ("node", "main.js")}
STDLIB = (
    "import asyncio, email.mime.multipart, http.client, decimal, xml.etree.ElementTree, "
    "sqlite3, uuid, logging, urllib.request, ssl, argparse, dataclasses, typing\n"
    "print('ok')\n"
)
HELLO = "print('ok')\n"
PACKAGE_MAIN = "import bigpkg\nprint('ok' if bigpkg.TOTAL else 'no')\n"
NODE_HELLO = "console.log('ok');\n"
NODE_HEAVY = (
    "const table = new Map();\n"
    "for (let i = 0; i < 60000; i++) {\n"
    "  table.set(`k${i}`, { i, square: i * i, text: String(i).padStart(8, '0') });\n"
    "}\n"
    "exports.size = table.size;\n"
)
NODE_HEAVY_MAIN = "console.log(require('./heavy').size ? 'ok' : 'no');\n"


def big_package(modules: int) -> dict[str, str]:
    """A pure-Python package whose import compiles and runs ``modules`` modules."""
    files = {}
    body = "".join(
        f"def f{i}(x, y=1):\n    return [x * y + {i} for _ in range(3)]\n\n"
        f"class C{i}:\n    A = {i}\n    def m(self):\n        return f{i}(self.A)\n\n"
        for i in range(40)
    )
    for n in range(modules):
        table = "TABLE = {i: str(i) for i in range(200)}\n"
        files[f"bigpkg/m{n}.py"] = f'"""Module {n}."""\n{table}{body}'
    files["bigpkg/__init__.py"] = (
        "".join(f"from . import m{n}\n" for n in range(modules))
        + f"TOTAL = sum(len(m.TABLE) for m in ({', '.join(f'm{n}' for n in range(modules))},))\n"
    )
    return files


def import_ms(files: dict[str, str], python: str) -> float:
    """How long ``import bigpkg`` takes in a fresh interpreter, without pyc files (as in a
    sandbox, whose code directory is read-only)."""
    with tempfile.TemporaryDirectory() as directory:
        write(Path(directory), files)
        code = "import time; t = time.perf_counter(); import bigpkg; print(time.perf_counter() - t)"
        done = subprocess.run(
            [python, "-I", "-S", "-B", "-c", f"import sys; sys.path.insert(0, '.'); {code}"],
            cwd=directory, capture_output=True, text=True, check=True,
        )
        return float(done.stdout) * 1000


def write(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o755)
        path.write_text(text)
        path.chmod(0o644)


def node_load_ms() -> float:
    """How long requiring heavy.js takes in a fresh node on this host."""
    with tempfile.TemporaryDirectory() as directory:
        write(Path(directory), {"heavy.js": NODE_HEAVY})
        code = (
            "const t = process.hrtime.bigint(); require('./heavy.js');"
            "console.log(Number(process.hrtime.bigint() - t) / 1e6)"
        )
        node = shutil.which("node") or "node"
        done = subprocess.run(
            [node, "-e", code], cwd=directory, capture_output=True, text=True, check=True
        )
        return float(done.stdout)


def make_runner(kind: str, work: str, preload: bool, index: int) -> Runner:
    """A runner as worker ``index`` makes it (two at once must not share one's sandboxes)."""
    runtimes: dict[str, Any] = {
        name: {"warm": 1, "preload": preload, "command": list(command)}
        for name, command in COMMANDS.items()
    }
    settings: dict[str, Any] = {
        "runner": kind,
        "workers": 1,
        "runtimes": runtimes,
        "paths": {
            "work_dir": f"{work}/w", "code_cache_dir": f"{work}/c", "outbox_dir": f"{work}/o"
        },
    }
    if kind == "docker":
        for name, image in IMAGES.items():
            runtimes[name]["image"] = image
        settings["docker"] = {"socket_dir": f"{work}/s", "pause_grace_seconds": 600}
    config = from_dict(settings)
    return ProcessRunner(config, index) if kind == "process" else DockerRunner(config, index)


def measure(
    runner: Runner, runtime: str, key: str, files: dict[str, str], runs: int, gap_s: float
) -> list[tuple[float, int, float]]:
    """(durationMillis, peak bytes, call ms) of ``runs`` warm calls, ``gap_s`` apart; the call
    is acquire -> run -> release as the worker makes it, what a caller waits for."""
    found = []
    invocation = Invocation("bench", "fn", COMMANDS[runtime], b"{}", 256, 10_000, 65536, 64)
    for i in range(runs + 1):
        out, _, call_ms = call(runner, runtime, key, files, invocation)
        if i > 0:  # the first call puts the code in (and, preloading, is the one that imports)
            found.append((out.duration_ms, out.peak_memory_bytes, call_ms))
        time.sleep(gap_s)
    return found


def call(runner: Runner, runtime: str, key: str, files: dict[str, str], invocation: Invocation
         ) -> tuple[RunOutcome, Sandbox, float]:
    """One call of ``key`` as the worker makes it (acquire -> code in -> run -> release),
    which must print "ok": its outcome, its sandbox, and what the caller waited (ms)."""
    began = time.perf_counter()
    sandbox = runner.acquire(runtime, key)
    try:
        if sandbox.code_key != key:
            write(sandbox.code_dir, files)
            sandbox.code_key = key
        out = runner.run(sandbox, invocation)
    finally:
        runner.release(sandbox)
    call_ms = (time.perf_counter() - began) * 1000
    if out.exit_code != 0 or out.stdout != b"ok\n":
        raise SystemExit(f"{key} failed: {out.exit_code} {out.stderr[-400:]!r}")
    return out, sandbox, call_ms


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="warm calls per function")
    parser.add_argument("--modules", type=int, default=40, help="modules in the package")
    parser.add_argument("--gap-ms", type=int, default=200, help="idle time between node calls")
    parser.add_argument("--no-docker", action="store_true", help="the process runner only")
    parser.add_argument(
        "--before", metavar="REF", help="also measure git revision REF's agent (first), same rows"
    )
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--label", default="this", help=argparse.SUPPRESS)
    args = parser.parse_args()
    before = run_before(args) if args.before else []
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    package = {"main.py": PACKAGE_MAIN, **big_package(args.modules)}
    heavy = {"main.js": NODE_HEAVY_MAIN, "heavy.js": NODE_HEAVY}
    gap_s = args.gap_ms / 1000
    functions = [  # runtime, name, files, seconds between calls
        ("python", "hello", {"main.py": HELLO}, 0.0),
        ("python", "stdlib", {"main.py": STDLIB}, 0.0),
        ("python", "package", package, 0.0),
        ("node", "hello", {"main.js": NODE_HELLO}, gap_s),
        ("node", "hello", {"main.js": NODE_HELLO}, 0.0),
        ("node", "heavy", heavy, gap_s),
        ("node", "heavy", heavy, 0.0),
    ]
    kinds = ["process"] if args.no_docker else ["process", "docker"]
    rows = []
    for kind in kinds:
        # Preload on and off side by side, one function after the other: what else runs on
        # the machine weighs on both alike.
        works = {preload: tempfile.mkdtemp(prefix="ng-iw-") for preload in (True, False)}
        runners = {}
        try:
            for preload, work in works.items():
                os.chmod(work, 0o711)
                runners[preload] = make_runner(kind, work, preload, len(runners))
            time.sleep(1)  # let the pools fill
            for runtime, name, files, gap in functions:
                for preload, runner in runners.items():
                    key = f"{runtime}-{name}-{gap}@1"
                    found = measure(runner, runtime, key, files, args.runs, gap)
                    rows.append((kind, preload, runtime, name, gap, found))
        finally:
            for runner in runners.values():
                runner.close()
            for work in works.values():
                shutil.rmtree(work, ignore_errors=True)
    python = shutil.which("python3.11", path="/usr/bin") or sys.executable
    print(
        f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
        f"Linux {platform.release()}; package: {args.modules} modules, "
        f"import {import_ms(package, python):.0f} ms in a fresh {python}; node heavy.js: "
        f"{node_load_ms():.0f} ms to require in a fresh node"
    )
    lines = before + [table_row(args.label, *row) for row in rows]
    if args.tree is not None:  # a --before child: its rows, for the parent's table
        print("\n".join(lines))
        return 0
    columns = ("code", "runner", "preload", "function", "gap ms", "runs", "durationMillis p50",
               "p99", "call ms p50", "peak MiB p50")
    print(f"| {' | '.join(columns)} |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(sorted(lines, key=lambda line: line.split("|")[2:6])))
    return 0


def table_row(
    label: str, kind: str, preload: bool, runtime: str, name: str, gap: float,
    found: list[tuple[float, int, float]],
) -> str:
    durations = [duration for duration, _, _ in found]
    peak = percentile([peak for _, peak, _ in found], 50) / 2**20
    call = percentile([call for _, _, call in found], 50)
    return (
        f"| {label} | {kind} | {str(preload).lower()} | {runtime} {name} | {gap * 1000:.0f} "
        f"| {len(found)} | {percentile(durations, 50):.1f} | {percentile(durations, 99):.1f} "
        f"| {call:.1f} | {peak:.1f} |"
    )


def run_before(args: argparse.Namespace) -> list[str]:
    """The rows of git revision ``args.before``: its tree exported, this script run on it."""
    with tempfile.TemporaryDirectory(prefix="ng-iw-before-") as tree:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.before], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
        argv = [sys.executable, __file__, "--tree", tree, "--label", args.before,
                "--runs", str(args.runs), "--modules", str(args.modules),
                "--gap-ms", str(args.gap_ms)] + (["--no-docker"] if args.no_docker else [])
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if line.startswith(f"| {args.before} ")]


if __name__ == "__main__":
    sys.exit(main())
