#!/usr/bin/env python3
"""Import-warm benchmark: warm durationMillis of functions with imports, preload on and off.

Three functions, each on both runners (process, Docker), with ``runtimes.python.preload``
true and false, in one run:

``hello``   prints one line (no imports).
``stdlib``  imports asyncio, email.mime.multipart, http.client, decimal,
            xml.etree.ElementTree, sqlite3, uuid, logging, urllib.request, ssl, argparse,
            dataclasses and typing, then prints one line.
``package`` imports ``bigpkg`` from its own zip: a generated pure-Python package of
            ``--modules`` modules (its import time is measured and printed: >= 50 ms).

Each system calls the function once (cold: the code goes in), then ``--runs`` warm calls as
the worker makes them (acquire -> run -> release); durationMillis is the function's own run
time as the result reports it. Needs root; the Docker rows need a running engine and the
image (``dev/setup``).

    python bench/bench_import_warm.py [--runs 100] [--modules 40] [--no-docker]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loguru import logger  # noqa: E402

from common.config import from_dict  # noqa: E402
from runners.base import Invocation, Runner  # noqa: E402
from runners.docker import DockerRunner  # noqa: E402
from runners.process import ProcessRunner  # noqa: E402

IMAGE = "nanogrid/python:3.11-bookworm"
STDLIB = (
    "import asyncio, email.mime.multipart, http.client, decimal, xml.etree.ElementTree, "
    "sqlite3, uuid, logging, urllib.request, ssl, argparse, dataclasses, typing\n"
    "print('ok')\n"
)
HELLO = "print('ok')\n"
PACKAGE_MAIN = "import bigpkg\nprint('ok' if bigpkg.TOTAL else 'no')\n"
INVOCATION = Invocation("bench", "fn", ("python3", "main.py"), b"{}", 256, 10_000, 65536, 64)


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


def make_runner(kind: str, work: str, preload: bool) -> Runner:
    python: dict[str, Any] = {"warm": 1, "preload": preload}
    settings: dict[str, Any] = {
        "runner": kind,
        "workers": 1,
        "runtimes": {"python": python},
        "paths": {
            "work_dir": f"{work}/w", "code_cache_dir": f"{work}/c", "outbox_dir": f"{work}/o"
        },
    }
    if kind == "docker":
        python["image"] = IMAGE
        settings["docker"] = {"socket_dir": f"{work}/s", "pause_grace_seconds": 600}
    config = from_dict(settings)
    return ProcessRunner(config, 0) if kind == "process" else DockerRunner(config, 0)


def measure(runner: Runner, key: str, files: dict[str, str], runs: int) -> list[float]:
    durations = []
    for i in range(runs + 1):
        sandbox = runner.acquire("python", key)
        try:
            if sandbox.code_key != key:
                write(sandbox.code_dir, files)
                sandbox.code_key = key
            out = runner.run(sandbox, INVOCATION)
        finally:
            runner.release(sandbox)
        if out.exit_code != 0 or out.stdout != b"ok\n":
            raise SystemExit(f"{key} failed: {out.exit_code} {out.stderr[-400:]!r}")
        if i > 0:  # the first call puts the code in (and, preloading, is the one that imports)
            durations.append(out.duration_ms)
    return durations


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="warm calls per function")
    parser.add_argument("--modules", type=int, default=40, help="modules in the package")
    parser.add_argument("--no-docker", action="store_true", help="the process runner only")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    package = {"main.py": PACKAGE_MAIN, **big_package(args.modules)}
    functions = {"hello": {"main.py": HELLO}, "stdlib": {"main.py": STDLIB}, "package": package}
    kinds = ["process"] if args.no_docker else ["process", "docker"]
    rows = []
    for kind in kinds:
        for preload in (True, False):
            work = tempfile.mkdtemp(prefix="ng-iw-")
            os.chmod(work, 0o711)
            runner = make_runner(kind, work, preload)
            try:
                time.sleep(1)  # let the pool fill
                for name, files in functions.items():
                    found = measure(runner, f"{name}@1", files, args.runs)
                    rows.append((kind, preload, name, found))
            finally:
                runner.close()
                shutil.rmtree(work, ignore_errors=True)
    python = shutil.which("python3.11", path="/usr/bin") or sys.executable
    print(
        f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
        f"Linux {platform.release()}; package: {args.modules} modules, "
        f"import {import_ms(package, python):.0f} ms in a fresh {python}"
    )
    print("| runner | preload | function | runs | durationMillis p50 | p99 |")
    print("|---|---|---|---:|---:|---:|")
    for kind, preload, name, found in rows:
        print(
            f"| {kind} | {str(preload).lower()} | {name} | {len(found)} "
            f"| {percentile(found, 50):.1f} | {percentile(found, 99):.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
