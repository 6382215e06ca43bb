#!/usr/bin/env python3
"""CPU and page faults per warm hello run of a process-runner sandbox, this tree's fork
server against a git revision's, taking turns run by run.

Two ProcessRunners, one whose sandbox runs this tree's ``runners/forkserver`` and one whose
runs the fork server of ``--before REF`` (exported with ``git archive``); the agent's side
(client, pools, cgroups) is this tree's for both. Each round: N runs on each, alternating one
by one, then the CPU (user + system) and minor faults of each sandbox's processes, its
reaped children included, from /proc. Taking turns run by run keeps the machine's drift
(steal time, frequency) out of the comparison: two copies of one tree agree within ~1%,
while the same tree's absolute numbers move by 30% between minutes on this machine.

Needs root (``dev/setup``'s machine); ~1 min for the defaults.

    python bench/bench_sandbox_cpu.py --before REF [-n 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loguru import logger  # noqa: E402

from common.config import from_dict  # noqa: E402
from runners import sandbox_server  # noqa: E402
from runners.base import Invocation, Runner  # noqa: E402
from runners.process import ProcessRunner  # noqa: E402

HELLO = 'print("Hello from NanoGrid!")\n'
PRINTED = b"Hello from NanoGrid!\n"
INVOCATION = Invocation("bench", "fn", ("python3", "main.py"), b"{}", 128, 10_000, 65536, 64)


def export(ref: str, into: Path) -> Path:
    """The fork server of git revision ``ref``, as a directory under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "runners/forkserver"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "runners" / "forkserver"


def make_runner(source: Path, work: Path, index: int) -> Runner:
    """A runner whose sandboxes run the fork server in ``source``; its sandbox made now."""
    sandbox_server.SERVERS["fork"] = dataclasses.replace(
        sandbox_server.SERVERS["fork"], source=source
    )
    config = from_dict(
        {
            "runner": "process",
            "workers": 1,
            "runtimes": {"python": {"warm": 1, "command": ["python3", "main.py"]}},
            "paths": {
                "work_dir": f"{work}/w{index}",
                "code_cache_dir": f"{work}/c{index}",
                "outbox_dir": f"{work}/o{index}",
            },
        }
    )
    runner = ProcessRunner(config, index)
    for _ in range(20):  # makes the sandbox (with this source) and warms it up
        call(runner)
    return runner


def call(runner: Runner) -> None:
    sandbox = runner.acquire("python", "hello")
    try:
        if sandbox.code_key != "hello":
            (Path(sandbox.code_dir) / "main.py").write_text(HELLO)
            sandbox.code_key = "hello"
        out = runner.run(sandbox, INVOCATION)
    finally:
        runner.release(sandbox)
    if out.exit_code != 0 or out.stdout != PRINTED:
        raise SystemExit(f"hello failed: {out.exit_code} {out.stderr[-400:]!r}")


def sandbox_pids(source: Path, work: Path, index: int) -> list[int]:
    """The sandbox's fork server (and its keeper) of runner ``index``."""
    found = subprocess.run(
        ["pgrep", "-f", "--", f"-I -S {source} {work}/w{index}/"],
        capture_output=True,
        text=True,
    ).stdout.split()
    if not found:
        raise SystemExit(f"no fork server of {source} found")
    return [int(pid) for pid in found]


def usage(pids: list[int]) -> tuple[float, int]:
    """(CPU seconds, minor faults) of these processes and their reaped children."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu, faults = 0.0, 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        faults += int(fields[7]) + int(fields[8])
        cpu += sum(int(x) for x in fields[11:15]) / tick
    return cpu, faults


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="REF", required=True, help="git revision to compare")
    parser.add_argument("-n", type=int, default=2000, help="runs per sandbox per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: the sandboxes' namespaces, cgroups and uids")
    logger.remove()
    work = Path(tempfile.mkdtemp(prefix="ngsc-"))
    os.chmod(work, 0o755)  # sandbox uids traverse it
    systems: dict[str, Any] = {}
    try:
        sources = {
            "this tree": ROOT / "runners" / "forkserver",
            args.before: export(args.before, work / "before"),
        }
        for index, (name, source) in enumerate(sources.items()):
            runner = make_runner(source, work, index)
            systems[name] = (runner, sandbox_pids(source, work, index))
        rows: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}
        for _ in range(args.rounds):
            start = {name: usage(pids) for name, (_, pids) in systems.items()}
            for _ in range(args.n):
                for runner, _ in systems.values():
                    call(runner)
            for name, (_, pids) in systems.items():
                cpu, faults = usage(pids)
                rows[name].append(
                    ((cpu - start[name][0]) * 1000 / args.n, (faults - start[name][1]) / args.n)
                )
    finally:
        for runner, _ in systems.values():
            runner.close()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{args.rounds} rounds of {args.n} warm hello runs per sandbox, taking turns run by "
        f"run; load {os.getloadavg()[0]:.2f}\n"
    )
    print("| fork server | " + " | ".join(f"round {i + 1}" for i in range(args.rounds))
          + " | median | faults per run |")
    print("|---|" + "---:|" * (args.rounds + 2))
    for name, samples in rows.items():
        cpus = [cpu for cpu, _ in samples]
        faults = statistics.median(f for _, f in samples)
        rounds = " | ".join(f"{cpu:.3f}" for cpu in cpus)
        print(f"| {name} | {rounds} | {statistics.median(cpus):.3f} | {faults:.0f} |")
    mine, theirs = ([cpu for cpu, _ in samples] for samples in rows.values())
    ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
    print(f"\nsandbox CPU ms per run; this tree / {args.before} per round: "
          f"{', '.join(f'{r:.3f}' for r in ratios)} (median {statistics.median(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
