#!/usr/bin/env python3
"""What a worker's waits cost at many runs in flight: a thread per run (nanogrid/worker/inflight.py:
each run's thread blocks on its sandbox's pipes) against one selector thread for them all.

Each of ``--runs`` runs in flight is a pipe a writer process (not measured) answers after
``--wait-ms``, the answers spread over ``--spread-ms``, as sandboxes end; the waiter reads
the answer and parses it (the result frame). The threads are started before the rounds, as a
worker's pool keeps them. Measured in this process only: CPU per run
(user + system, getrusage), and how late a heartbeat thread that ticks every 50 ms was at
worst (the worker's heartbeat and receive loop share the interpreter with the waits).
Rounds alternate the two ways; the median per way is reported.

    python bench/bench_waits.py            # --runs 1 200 --rounds 5 --wait-ms 1000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import selectors
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ANSWER = json.dumps({"exitCode": 0, "peak": 123456, "durationMs": 1000.0}).encode()


def writer(fds: list[int], wait_s: float, spread_s: float) -> int:
    """Fork a process that answers each pipe in ``fds`` after ``wait_s``, spread evenly."""
    pid = os.fork()
    if pid == 0:
        start = time.monotonic() + wait_s
        for i, fd in enumerate(fds):
            delay = start + spread_s * i / max(1, len(fds)) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            os.write(fd, ANSWER)
        os._exit(0)
    return pid


def by_threads(fds: list[int], timeout_s: float, pool: ThreadPoolExecutor) -> None:
    """Each wait on a thread of a pool that has them started already, as a worker's has."""
    def wait(fd: int) -> None:
        if select.select([fd], [], [], timeout_s)[0]:
            json.loads(os.read(fd, 65536))

    list(pool.map(wait, fds))


def by_selector(fds: list[int], timeout_s: float, pool: ThreadPoolExecutor) -> None:
    selector = selectors.DefaultSelector()
    for fd in fds:
        selector.register(fd, selectors.EVENT_READ)
    left = len(fds)
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        for key, _ in selector.select(deadline - time.monotonic()):
            json.loads(os.read(key.fd, 65536))
            selector.unregister(key.fd)
            left -= 1
    selector.close()


def heartbeat(stop: threading.Event, late: list[float]) -> None:
    due = time.monotonic() + 0.05
    while not stop.is_set():
        time.sleep(max(0.0, due - time.monotonic()))
        late.append(time.monotonic() - due)
        due += 0.05


def round_of(way: str, runs: int, args: argparse.Namespace, pool: ThreadPoolExecutor
             ) -> tuple[float, float]:
    """(CPU ms per run, worst heartbeat lateness ms) of one round."""
    pipes = [os.pipe() for _ in range(runs)]
    stop, late = threading.Event(), []  # type: ignore[var-annotated]
    beat = threading.Thread(target=heartbeat, args=(stop, late))
    beat.start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    pid = writer([w for _, w in pipes], args.wait_ms / 1000, args.spread_ms / 1000)
    (by_threads if way == "threads" else by_selector)([r for r, _ in pipes], 30.0, pool)
    after = resource.getrusage(resource.RUSAGE_SELF)
    stop.set()
    beat.join()
    os.waitpid(pid, 0)
    for r, w in pipes:
        os.close(r)
        os.close(w)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu * 1000 / runs, max(late) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 200])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--wait-ms", type=int, default=1000)
    parser.add_argument("--spread-ms", type=int, default=200)
    args = parser.parse_args()
    print("| runs in flight | way | CPU ms per run (median) | worst heartbeat lateness ms |")
    print("|---:|---|---:|---:|")
    for runs in args.runs:
        seen: dict[str, list[tuple[float, float]]] = {"threads": [], "selector": []}
        pool = ThreadPoolExecutor(max_workers=runs)
        round_of("threads", runs, args, pool)  # starts the pool's threads: not measured
        for _ in range(args.rounds):
            for way in seen:
                seen[way].append(round_of(way, runs, args, pool))
        pool.shutdown()
        for way, rounds in seen.items():
            cpu = statistics.median(r[0] for r in rounds)
            print(f"| {runs} | {way} | {cpu:.3f} | {max(r[1] for r in rounds):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
