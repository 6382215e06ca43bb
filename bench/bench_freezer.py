#!/usr/bin/env python3
"""What freezing an idle sandbox costs: one freeze and one thaw per run
(nanogrid/runners/freezer.py).

A process that echoes on a socket is moved into a fresh cgroup of each freezer this host
mounts (v1's freezer hierarchy, a cgroup2 tree); then, N times: thaw, one round trip, freeze,
with ``--gap-ms`` between (a call's idle time). Reports the thaw and freeze writes and the
round trip (p50, p90 in microseconds) and the bench's own CPU per cycle, next to the round
trip alone. On v1 the cost depends on whether another cgroup of the host is frozen (the
kernel's freezer switch): ``nanogrid.runners.freezer.anchor`` keeps one frozen; ``--no-anchor``
measures without it (only meaningful when nothing else on the host is frozen).

Needs root. ~10 s for the defaults.

    python bench/bench_freezer.py [-n 2000] [--gap-ms 0] [--no-anchor]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanogrid.runners.freezer import ANCHOR, Freezer, anchor  # noqa: E402

CGROUP = Path("/sys/fs/cgroup")
ECHO = """import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
while True:
    s.send(s.recv(16))
"""


def trees() -> dict[str, tuple[Path, bool]]:
    found = {}
    if (CGROUP / "freezer" / "cgroup.procs").exists():
        found["v1"] = (CGROUP / "freezer", False)
    for root in (CGROUP, CGROUP / "unified"):
        if (root / "cgroup.controllers").exists():
            found.setdefault("v2", (root, True))
    return found


def measure(root: Path | None, v2: bool, n: int, gap: float) -> dict[str, list[float]]:
    """Microseconds per cycle: thaw, round trip, freeze, the bench's CPU (root None: the
    round trip alone, nothing frozen)."""
    ours, theirs = socket.socketpair()
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(theirs.fileno())],
                            pass_fds=[theirs.fileno()])
    theirs.close()
    directory = root / f"nanogrid-bench-{uuid.uuid4().hex[:8]}" if root else None
    freezer = None
    if directory is not None:
        directory.mkdir()
        (directory / "cgroup.procs").write_text(str(echo.pid))
        freezer = Freezer(directory, v2)
    samples: dict[str, list[float]] = {"thaw": [], "round trip": [], "freeze": [], "cpu": []}
    try:
        for _ in range(n):
            cpu = time.thread_time()
            t0 = time.perf_counter()
            if freezer is not None:
                freezer.thaw()
            t1 = time.perf_counter()
            ours.send(b"x")
            ours.recv(16)
            t2 = time.perf_counter()
            if freezer is not None:
                freezer.freeze()
            t3 = time.perf_counter()
            samples["cpu"].append(time.thread_time() - cpu)
            for name, took in (("thaw", t1 - t0), ("round trip", t2 - t1), ("freeze", t3 - t2)):
                samples[name].append(took)
            if gap:
                time.sleep(gap)
    finally:
        echo.kill()
        if freezer is not None:
            freezer.thaw()
            freezer.close()
        echo.wait()
        if directory is not None:
            directory.rmdir()
    return {name: [x * 1e6 for x in values] for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="cycles per freezer")
    parser.add_argument("--gap-ms", type=float, default=0, help="idle time between cycles")
    parser.add_argument("--no-anchor", action="store_true", help="v1 without the anchor")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: cgroups")
    found = trees()
    v1_anchor = found["v1"][0] / "nanogrid" / ANCHOR if "v1" in found else None
    if v1_anchor is not None:
        if args.no_anchor:
            if v1_anchor.exists():
                v1_anchor.rmdir()
        else:
            anchor(v1_anchor.parent)
    systems = {"round trip alone": (None, False), **found}
    print(f"{args.n} cycles, {args.gap_ms} ms apart; v1 anchor "
          f"{'removed' if args.no_anchor else 'held'}; load {os.getloadavg()[0]:.2f}\n")
    print("| freezer | thaw p50 | thaw p90 | round trip p50 | freeze p50 | freeze p90 | "
          "bench CPU per cycle (mean) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (root, v2) in systems.items():
        us = measure(root, v2, args.n, args.gap_ms / 1000)

        def q(values: list[float], at: int) -> float:
            return statistics.quantiles(values, n=10)[at // 10 - 1]

        thaw = f"{q(us['thaw'], 50):.1f} | {q(us['thaw'], 90):.1f}" if root else "- | -"
        freeze = f"{q(us['freeze'], 50):.1f} | {q(us['freeze'], 90):.1f}" if root else "- | -"
        print(f"| {name} | {thaw} | {q(us['round trip'], 50):.1f} | {freeze} | "
              f"{statistics.mean(us['cpu']):.1f} us |")
    if v1_anchor is not None and args.no_anchor:
        anchor(v1_anchor.parent)  # as the agent keeps it
    return 0


if __name__ == "__main__":
    sys.exit(main())
