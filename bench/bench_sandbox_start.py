#!/usr/bin/env python3
"""What the process runner's namespaces cost a cold sandbox: fork-server start to ready.

Starts ``runners/forkserver/`` as ``ProcessRunner.create`` does (as root, under a sandbox
uid, on the functions' python3, ``-I -S``), N times with the options the runner passes today
(mount, IPC, network and PID namespaces, the work dir and this host's world-writable paths
under read-only mounts, rlimits) and N times without the namespaces, taking turns, and
reports the time from spawn to the server's ready line. The difference is the namespace
setup a cold sandbox pays once (unshare, the private mounts, bringing up lo, the keeper
fork, a fresh /proc); a warm call pays nothing of it. Also times ``kill`` to reaped.
``--before CHECKOUT`` adds a third mode, taking turns with the others: that checkout's fork
server with the same options (the sandbox start before a change).

Needs root (``dev/setup``'s machine); ~10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORKSERVER = ROOT / "runners" / "forkserver"
FUNCTIONS_PATH = "/usr/local/bin:/usr/bin:/bin"
UID = 61999
"""A sandbox uid of the default range that no test or agent here uses."""
sys.path.insert(0, str(ROOT))
from runners.process.hostpaths import world_writable  # noqa: E402


def start_once(python: str, base: Path, n: int, isolate: bool, cover: tuple[str, ...],
               forkserver: Path = FORKSERVER) -> tuple[float, float]:
    """(ms from spawn to ready, ms from kill to reaped) for one fork server."""
    root = base / "work" / f"sb-{n}"
    control = root / "control"
    root.mkdir(mode=0o750)
    control.mkdir(mode=0o700)
    os.chown(root, 0, UID)
    os.chown(control, UID, UID)
    ready_r, ready_w = os.pipe()
    options: dict[str, object] = {
        "uid": UID,
        "gid": UID,
        "pdeathsig": True,
        "ready_fd": ready_w,
        "rlimits": {"nofile": 1024, "fsize": 64 * 2**20, "core": 0},
    }
    if isolate:
        options["isolate"] = {"network": True, "tmpfs_mb": 64, "root": str(root),
                              "work_dir": str(base / "work"), "cover": cover}
    started = time.perf_counter()
    server = subprocess.Popen(
        [python, "-I", "-S", str(forkserver), str(control / "forkserver.sock"),
         json.dumps(options)],
        cwd=root,
        env={"PATH": FUNCTIONS_PATH, "LANG": "C.UTF-8"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        pass_fds=(ready_w,),
    )
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        report = json.loads(ready.readline())
    ready_ms = (time.perf_counter() - started) * 1000
    expected = {"mount", "network", "pid"} if isolate else set()
    if not expected <= set(report["holds"]) or report["missing"]:
        raise SystemExit(f"expected {sorted(expected)} to hold, got {report}")
    killed = time.perf_counter()
    server.kill()
    server.wait()
    return ready_ms, (time.perf_counter() - killed) * 1000


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=40, help="starts per mode (default 40)")
    parser.add_argument("--before", type=Path, help="a checkout whose fork server to time too")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: the namespaces and the sandbox uid")
    python = os.path.realpath(shutil.which("python3", path=FUNCTIONS_PATH) or "")
    base = Path(tempfile.mkdtemp(prefix="ngs-", dir="/var/lib"))  # as a work dir: not in /tmp
    os.chmod(base, 0o711)
    (base / "work").mkdir(mode=0o711)
    cover = world_writable()
    modes = [("without namespaces", False, FORKSERVER), ("with namespaces", True, FORKSERVER)]
    if args.before:
        modes.append(("with namespaces, before", True, args.before / "runners" / "forkserver"))
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode, _, _ in modes}
    try:
        for i in range(args.n + 2):
            for k, (mode, isolate, server) in enumerate(modes):
                sample = start_once(python, base, len(modes) * i + k, isolate, cover, server)
                if i >= 2:  # the first starts warm the page cache
                    times[mode].append(sample)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{args.n} fork-server starts per mode, taking turns; {python}; "
          f"load {os.getloadavg()[0]:.2f}; covered: {', '.join(cover) or 'none'}\n")
    print("| ms | start p50 | start p99 | kill -> reaped p50 |")
    print("|---|---:|---:|---:|")
    for mode, samples in times.items():
        ready = [r for r, _ in samples]
        gone = [k for _, k in samples]
        print(f"| {mode} | {statistics.median(ready):.1f} | {p(ready, 99):.1f} "
              f"| {statistics.median(gone):.1f} |")
    cost = statistics.median(r for r, _ in times["with namespaces"]) - statistics.median(
        r for r, _ in times["without namespaces"])
    print(f"\nnamespace setup per cold sandbox (p50 difference): {cost:+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
