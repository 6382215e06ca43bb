"""Node calls back to back on both runners: a call runs in the Worker the previous call ran
in (no Worker start on its path), yet from a fresh module registry and the globals of a new
one; what a call leaves that the Worker cannot take back ends that Worker; each call's peak
is its own, an idle sandbox does not grow with the calls it served, and one idle long ends its
Worker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from harness import MAX_PIDS
from harness import start_runner as start
from helpers import put_code, sandbox_pids, wait_until

from nanogrid.runners.base import Invocation, RunOutcome
from nanogrid.runners.pooled import PooledRunner

pytestmark = pytest.mark.usefixtures("containers_agent")

MiB = 2**20
COUNTER = (
    "let calls = 0;\nexports.call = () => ++calls;\n"
    "exports.loadedAt = performance.timeOrigin + performance.now();\n"
)
MAIN = """const started = performance.timeOrigin + performance.now();
const { threadId } = require('worker_threads');
const fs = require('fs');
const input = JSON.parse(fs.readFileSync(0, 'utf8'));
// Thread ids count per process: the sandbox's own /tmp names the sandbox.
if (!fs.existsSync('/tmp/sandbox')) fs.writeFileSync('/tmp/sandbox', String(Math.random()));
const seen = {
  thread: `${fs.readFileSync('/tmp/sandbox', 'utf8')}/${threadId}`,
  calls: require('./counter').call(), global: globalThis.leftover ?? null,
  exitListeners: process.listenerCount('exit'), exitCode: process.exitCode,
  preloaded: require('./counter').loadedAt < started,
};
globalThis.leftover = 'from an earlier call';
process.on('exit', () => {});
console.log(JSON.stringify(seen));
const blob = Buffer.alloc((input.mb || 0) * 2 ** 20, 1);
if (input.leave === 'exit') process.exit(3);
if (input.leave === 'throw') throw new Error('thrown');
if (input.leave === 'interval') setInterval(() => console.log('tick'), 2).unref();
if (input.leave === 'fixed') Object.defineProperty(globalThis, 'fixed', { value: 1 });
if (input.leave === 'esm') import('./module.mjs').then((m) => m.answer);
if (input.leave === 'code') process.exitCode = 5;
if (input.sleep) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, input.sleep);
"""
FILES = {"main.js": MAIN, "counter.js": COUNTER, "module.mjs": "export const answer = 42;\n"}


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def runner(request: pytest.FixtureRequest) -> Iterator[PooledRunner]:
    if request.param == "docker":
        request.getfixturevalue("node_image")
    r = start(request.param, {"node": {"image": "nanogrid/node:18-bookworm", "warm": 1}})
    yield r
    r.close()


def call(runner: PooledRunner, stdin: dict[str, Any], key: str = "b2b@1",
         settle: bool = False) -> RunOutcome:
    """One call as the worker makes it (acquire, run, release), right after the last one;
    ``settle``: then wait until its sandbox is idle again (while its server gets the next
    Worker ready, a call takes another idle sandbox of the host)."""
    return called(runner, stdin, key, settle)[0]


def called(runner: PooledRunner, stdin: dict[str, Any], key: str, settle: bool
           ) -> tuple[RunOutcome, Any]:
    """``call``, and the sandbox it ran in."""
    sandbox = runner.acquire("node", key)
    put_code(sandbox, FILES, key)
    data = json.dumps(stdin).encode()
    invocation = Invocation("req", "fn", ("node", "main.js"), data, 256, 10_000, 100_000, MAX_PIDS)
    try:
        return runner.run(sandbox, invocation), sandbox
    finally:
        runner.release(sandbox)
        if settle:
            wait_until(lambda: not sandbox.settling, timeout=5, what="the sandbox to settle")


def seen(out: RunOutcome) -> dict[str, Any]:
    assert out.stderr == b"", out.stderr
    return json.loads(out.stdout.splitlines()[0])


def test_back_to_back_calls_share_a_worker_but_no_module_state(runner: PooledRunner) -> None:
    outs = [call(runner, {}) for _ in range(8)]
    views = [seen(out) for out in outs]
    assert all(out.exit_code == 0 for out in outs)
    # One Worker served them all (the first call's is the one that learned the key)...
    assert len({view["thread"] for view in views[1:]}) == 1, views
    # ...and each call found what a fresh `node main.js` finds.
    listeners = views[0]["exitListeners"]
    for view in views:
        assert view == {**view, "calls": 1, "global": None, "exitListeners": listeners}
        assert "exitCode" not in view


SLOW = {  # a dependency that takes 150 ms to load: preloading it is most of a 200 ms gap
    "main.js": "const started = performance.timeOrigin + performance.now();\n"
    "const slow = require('./slow');\n"
    "console.log(JSON.stringify({ preloaded: slow.loadedAt < started,"
    " thread: require('worker_threads').threadId }));\n",
    "slow.js": "Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 150);\n"
    "exports.loadedAt = performance.timeOrigin + performance.now();\n",
}


def test_a_worker_that_goes_on_preloads_before_every_call(runner: PooledRunner) -> None:
    """Past the preload budget's time (2 s) too: each readying has a budget of its own."""
    invocation = Invocation("req", "fn", ("node", "main.js"), b"{}", 256, 10_000, 1000, MAX_PIDS)
    views = []
    for _ in range(20):
        sandbox = runner.acquire("node", "slow@1")
        put_code(sandbox, SLOW, "slow@1")
        try:
            views.append(seen(runner.run(sandbox, invocation)))
        finally:
            runner.release(sandbox)
        time.sleep(0.2)
    assert all(view["preloaded"] for view in views[1:]), views
    assert len({view["thread"] for view in views[1:]}) < len(views) - 1, views


def test_what_a_call_leaves_behind_ends_its_worker(runner: PooledRunner) -> None:
    call(runner, {}, settle=True)
    thread = seen(call(runner, {}, settle=True))["thread"]
    for leave, code in (("exit", 3), ("throw", 1), ("interval", 0), ("fixed", 0), ("esm", 0)):
        out = call(runner, {"leave": leave}, settle=True)
        assert out.exit_code == code, (leave, out.stderr)
        after = call(runner, {"sleep": 40}, settle=True)
        view = seen(after)
        assert b"tick" not in after.stdout, leave  # the interval ended with its Worker
        assert view["thread"] != thread and view["calls"] == 1 and view["global"] is None, leave
        thread = view["thread"]
    # An exit code set without leaving anything keeps the Worker, and is not the next one's.
    assert call(runner, {"leave": "code"}, settle=True).exit_code == 5
    out = call(runner, {})
    assert out.exit_code == 0 and seen(out)["thread"] == thread


def test_each_back_to_back_call_has_its_own_peak(runner: PooledRunner) -> None:
    call(runner, {})
    peaks = [call(runner, {"mb": mb}).peak_memory_bytes for mb in (0, 24, 0, 64, 0, 0)]
    small, big, after, huge, after_huge, last = peaks
    assert big >= small + 22 * MiB and huge >= small + 60 * MiB, peaks
    for peak in (after, after_huge, last):  # neither the buffers nor their pages linger
        assert peak < small + 8 * MiB, peaks


def anonymous_bytes(pids: list[int]) -> int:
    """The anonymous memory (heaps, malloc) of processes ``pids`` (/proc/PID/smaps_rollup):
    unlike their PSS or private pages, it does not move as other sandboxes that map node's
    files come and go."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Anonymous:"):
                    total += int(line.split()[1]) * 1024
    return total


def test_an_idle_sandbox_does_not_grow_with_the_calls_it_served(runner: PooledRunner) -> None:
    sandbox = runner.acquire("node", "b2b@1")
    runner.release(sandbox)
    sizes = []
    for calls in (10, 60):
        for _ in range(calls):
            call(runner, {"mb": 4})
        time.sleep(0.5)
        sizes.append(anonymous_bytes(sandbox_pids(sandbox)))
    # A Worker that kept what its calls made would grow by 60 calls' worth (240 MiB); one that
    # grew 8 MiB past its first call is replaced, and malloc keeps some of its freed pages.
    assert sizes[1] < sizes[0] + 16 * MiB, sizes


@pytest.mark.parametrize("kind", ["process", pytest.param("docker", marks=pytest.mark.docker)])
def test_a_sandbox_idle_long_ends_its_worker_and_its_next_call_starts_one(
        kind: str, request: pytest.FixtureRequest) -> None:
    if kind == "docker":
        request.getfixturevalue("node_image")
    runner = start(kind, {"node": {"image": "nanogrid/node:18-bookworm", "warm": 1}},
                   pool={"node_worker_idle_seconds": 1})
    try:
        def ran(stdin: dict[str, Any]) -> tuple[dict[str, Any], Any]:
            outcome, sandbox = called(runner, stdin, "idle@1", settle=True)
            assert outcome.exit_code == 0, outcome.stderr
            return json.loads(outcome.stdout.decode().splitlines()[0]), sandbox

        def record() -> Any:
            return next(e for e in runner.board.entries() if e.code_key == "idle@1")

        first, sandbox = ran({})
        armed = anonymous_bytes(sandbox_pids(sandbox))
        assert not record().shrunk
        wait_until(lambda: record().shrunk, timeout=10, what="the idle sandbox to shrink")
        assert record().frozen  # it holds code of its function's: frozen again
        shrunk = anonymous_bytes(sandbox_pids(sandbox))
        assert shrunk < armed - 4 * MiB, (armed, shrunk)
        assert record().memory_bytes < armed  # what the host's idle bound counts

        second, again = ran({})
        assert again is sandbox and second["thread"] != first["thread"]  # a new Worker
        assert second["calls"] == 1 and second["preloaded"]  # its files required before
        assert not record().shrunk
        assert anonymous_bytes(sandbox_pids(sandbox)) > shrunk + 4 * MiB  # armed again
    finally:
        runner.close()
