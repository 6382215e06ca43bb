#!/usr/bin/env python3
"""CPU and page faults per warm hello run of a process-runner sandbox, and the agent's own CPU
per run, this tree against a git revision, taking turns run by run.

Each side is a whole tree, this one and ``--before REF`` (exported with ``git archive``): its
agent's side (runner, client, cgroups, freezer) runs in a driver process of its own, on that
tree's code, and its sandbox runs that tree's fork server. Each round: N runs on each,
alternating one by one (the bench asks a driver for one run and waits for it), then the CPU
(user + system) and minor faults of each sandbox's processes, its reaped children included,
and the CPU of each driver (its runs and the bench's one-line request per run, the same for
both), from /proc. Taking turns run by run keeps the machine's drift (steal time, frequency)
out of the comparison: two copies of one tree agree within ~1%, while the same tree's absolute
numbers move by 30% between minutes on this machine.

Needs root (``dev/setup``'s machine); ~1 min for the defaults.

    python bench/bench_sandbox_cpu.py --before REF [-n 2000] [--rounds 3] [--own-module]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DRIVER = r"""
import json, sys
from pathlib import Path
tree, work, index, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
sys.path.insert(0, tree)
from loguru import logger
logger.remove()
from nanogrid.common.config import from_dict
from nanogrid.runners.base import Invocation
from nanogrid.runners.process import ProcessRunner

INVOCATION = Invocation("bench", "fn", ("python3", "main.py"), b"{}", 128, 10_000, 65536, 64)
config = from_dict({
    "runner": "process",
    "workers": 1,
    "runtimes": {"python": {"warm": 1, "command": ["python3", "main.py"]}},
    "paths": {"work_dir": f"{work}/w{index}", "code_cache_dir": f"{work}/c{index}",
              "outbox_dir": f"{work}/o{index}"},
})
runner = ProcessRunner(config, index)

def call():
    sandbox = runner.acquire("python", "hello")
    try:
        if sandbox.code_key != "hello":
            for name, text in files.items():
                (Path(sandbox.code_dir) / name).write_text(text)
            sandbox.code_key = "hello"
        out = runner.run(sandbox, INVOCATION)
    finally:
        runner.release(sandbox)
    if out.exit_code != 0 or out.stdout != b"Hello from NanoGrid!\n":
        raise SystemExit(f"hello failed: {out.exit_code} {out.stderr[-400:]!r}")

try:
    for _ in range(20):  # makes the sandbox and warms it up
        call()
    print("ready", flush=True)
    for _ in sys.stdin:
        call()
        print("", flush=True)
finally:
    runner.close()
"""


HELLO = {"main.py": 'print("Hello from NanoGrid!")\n'}
HELLO_MODULE = {  # --own-module: its sandbox holds function code between runs (frozen then)
    "main.py": "import greeting\nprint(greeting.TEXT)\n",
    "greeting.py": 'TEXT = "Hello from NanoGrid!"\n',
}


class Driver:
    """One tree's agent side, in a process of its own, making one run per request."""

    def __init__(self, tree: Path, work: Path, index: int, files: dict[str, str]) -> None:
        self.tree = tree
        self.process = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(tree), str(work), str(index), json.dumps(files)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=tree,
        )
        assert self.process.stdout is not None and self.process.stdin is not None
        self._in, self._out = self.process.stdin, self.process.stdout
        if self._out.readline().strip() != "ready":
            raise SystemExit(f"the agent of {tree} did not start")
        self.sandbox = sandbox_pids(work, index)

    def call(self) -> None:
        self._in.write("\n")
        self._in.flush()
        if self._out.readline() != "\n":
            raise SystemExit(f"the agent of {self.tree} failed")

    def close(self) -> None:
        self._in.close()
        self.process.wait(timeout=30)


def export(ref: str, into: Path) -> Path:
    """The tree of git revision ``ref``, as a directory under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def sandbox_pids(work: Path, index: int) -> list[int]:
    """The sandbox's processes (its fork server, and a keeper before) of driver ``index``:
    forked from the tree's template, each titled with its socket's path in the work dir."""
    found = subprocess.run(
        ["pgrep", "-f", "--", f"^nanogrid: sandbox .* {work}/w{index}/"],
        capture_output=True,
        text=True,
    ).stdout.split()
    if not found:
        raise SystemExit(f"no sandbox of driver {index} found under {work}")
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
    parser.add_argument("--own-module", action="store_true",
                        help="the hello's greeting in a module of its own (its sandbox is frozen)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: the sandboxes' namespaces, cgroups and uids")
    work = Path(tempfile.mkdtemp(prefix="ngsc-"))
    os.chmod(work, 0o755)  # sandbox uids traverse it
    drivers: dict[str, Driver] = {}
    rows: dict[str, list[tuple[float, float, float]]] = {}
    try:
        trees = {"this tree": ROOT, args.before: export(args.before, work / "before")}
        for index, (name, tree) in enumerate(trees.items()):
            drivers[name] = Driver(tree, work, index, HELLO_MODULE if args.own_module else HELLO)
            rows[name] = []
        for _ in range(args.rounds):
            start = {n: (usage(d.sandbox), usage([d.process.pid])) for n, d in drivers.items()}
            for _ in range(args.n):
                for driver in drivers.values():
                    driver.call()
            for name, driver in drivers.items():
                (cpu, faults), (agent, _) = usage(driver.sandbox), usage([driver.process.pid])
                (cpu0, faults0), (agent0, _) = start[name]
                rows[name].append(
                    ((cpu - cpu0) * 1000 / args.n, (faults - faults0) / args.n,
                     (agent - agent0) * 1000 / args.n)
                )
    finally:
        for driver in drivers.values():
            driver.close()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{args.rounds} rounds of {args.n} warm hello runs per sandbox, taking turns run by "
        f"run; load {os.getloadavg()[0]:.2f}\n"
    )
    print("| tree | " + " | ".join(f"round {i + 1}" for i in range(args.rounds))
          + " | median | faults per run | agent ms per run |")
    print("|---|" + "---:|" * (args.rounds + 3))
    for name, samples in rows.items():
        cpus = [cpu for cpu, _, _ in samples]
        faults = statistics.median(f for _, f, _ in samples)
        agent = statistics.median(a for _, _, a in samples)
        rounds = " | ".join(f"{cpu:.3f}" for cpu in cpus)
        print(f"| {name} | {rounds} | {statistics.median(cpus):.3f} | {faults:.0f} "
              f"| {agent:.3f} |")
    mine, theirs = ([cpu for cpu, _, _ in samples] for samples in rows.values())
    ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
    print(f"\nsandbox CPU ms per run; this tree / {args.before} per round: "
          f"{', '.join(f'{r:.3f}' for r in ratios)} (median {statistics.median(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
