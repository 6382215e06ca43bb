"""Import-warm node sandboxes on both runners: after a sandbox's first run, every Worker it
starts pre-requires the function's own files while it waits, so a call runs with them loaded,
yet in a fresh Worker (module state per call); a file that would not preload cleanly is left
to the call; the peak stays the call's own."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import MAX_PIDS
from harness import start_runner as start
from helpers import frozen, idle_cpu_seconds, put_code

from nanogrid.runners.base import Invocation, RunOutcome
from nanogrid.runners.nodeclient import NODESERVER_SOURCE, NodeServerClient
from nanogrid.runners.pooled import PooledRunner

pytestmark = pytest.mark.usefixtures("containers_agent")

MiB = 2**20
SETTLE_S = 1.0
"""Time between calls for the next Worker to boot and preload (~0.25 s of it needed here)."""
SLEEP = "Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, {ms});"
# Times are performance.timeOrigin + performance.now(): the epoch in ms, to the microsecond
# (two Date.now() a moment apart may be equal).
HEAVY = (  # a dependency that takes 200 ms to load and holds 24 MiB once loaded
    "const fs = require('fs');\n"
    f"{SLEEP.format(ms=200)}\n"
    "fs.appendFileSync('/tmp/heavy-loads', 'x');  // one mark per load, in this sandbox\n"
    "exports.loadedAt = performance.timeOrigin + performance.now();\n"
    "exports.blob = Buffer.alloc(24 * 2 ** 20, 1);\n"
    "let calls = 0;\n"
    "exports.call = () => ++calls;\n"
)
MAIN = """const started = performance.timeOrigin + performance.now();
const fs = require('fs');
const heavy = require('./heavy');
const input = JSON.parse(fs.readFileSync(0, 'utf8'));
const extra = Buffer.alloc((input.extra_mb || 0) * 2 ** 20, 1);
console.log(JSON.stringify({
  preloaded: heavy.loadedAt < started, calls: heavy.call(),
  loads: fs.readFileSync('/tmp/heavy-loads', 'utf8').length, extra: extra.length,
}));
"""
FILES = {"main.js": MAIN, "heavy.js": HEAVY}
LOADED_AT = "exports.loadedAt = performance.timeOrigin + performance.now();\n"
PICKY = {  # files that must not be preloaded: each would do what belongs to a call
    "noisy.js": "console.log('noisy at import');\n" + LOADED_AT,
    "picky.js": "if (!global.IN_CALL) throw new Error('only in a call');\n" + LOADED_AT,
    "envy.js": "exports.fn = process.env.NANOGRID_FUNCTION_ID;\n" + LOADED_AT,
    "slow.js": f"if (!global.IN_CALL) {SLEEP.format(ms=60_000)}\n" + LOADED_AT,
}
PICKY_MAIN = """global.IN_CALL = true;
const started = performance.timeOrigin + performance.now();
const mods = Object.fromEntries(
  ['noisy', 'picky', 'envy', 'heavy', 'slow'].map((name) => [name, require(`./${name}`)]));
const preloaded = Object.keys(mods).filter((name) => mods[name].loadedAt < started);
console.log(JSON.stringify({ preloaded, fn: mods.envy.fn }));
"""
BROKEN = {  # a dependency whose load fails in every call, too
    "main.js": "require('./heavy');\nrequire('./broken');\n",
    "heavy.js": HEAVY,
    "broken.js": "throw new Error('broken at import');\n",
}


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        request.getfixturevalue("node_image")
    return request.param


def make_runner(kind: str, preload: bool = True) -> PooledRunner:
    node = {"image": "nanogrid/node:18-bookworm", "warm": 1, "preload": preload}
    return start(kind, {"node": node})


@pytest.fixture
def runner(kind: str) -> Iterator[PooledRunner]:
    r = make_runner(kind)
    yield r
    r.close()


def run(runner: PooledRunner, files: dict[str, str], key: str = "f@1", **stdin: Any) -> RunOutcome:
    """One run as the worker makes it: acquire, code in unless there, run, release."""
    sandbox = runner.acquire("node", key)
    try:
        put_code(sandbox, files, key)
        return runner.run(sandbox, node_invocation(json.dumps(stdin).encode()))
    finally:
        runner.release(sandbox)


def node_invocation(stdin: bytes) -> Invocation:
    return Invocation("r", "fn", ("node", "main.js"), stdin, 256, 10_000, 10_000, MAX_PIDS)


def call(
    runner: PooledRunner, files: dict[str, str] = FILES, **stdin: Any
) -> tuple[RunOutcome, Any]:
    """One run of MAIN-like code; (outcome, the JSON line it printed last)."""
    out = run(runner, files, **stdin)
    assert out.exit_code == 0, out.stderr.decode()
    return out, json.loads(out.stdout.splitlines()[-1])


def test_a_heavy_module_loads_before_each_call_and_its_state_stays_per_call(
    runner: PooledRunner,
) -> None:
    first, seen = call(runner)
    assert seen == {"preloaded": False, "calls": 1, "loads": 1, "extra": 0}
    assert first.duration_ms >= 200  # required in the call
    for n in range(2, 5):
        time.sleep(SETTLE_S)
        out, seen = call(runner)
        # Loaded before the call began, once per call (the marks count every load in this
        # sandbox), and fresh: the module's counter starts over in every call.
        assert seen == {"preloaded": True, "calls": 1, "loads": n, "extra": 0}
        # Not heavy's load: that alone sleeps 200 ms (a loaded CI host took 174 for the rest).
        assert out.duration_ms < 200, out.duration_ms


def test_preload_off_requires_in_every_call(kind: str) -> None:
    runner = make_runner(kind, preload=False)
    try:
        for n in range(1, 4):
            out, seen = call(runner)
            assert seen == {"preloaded": False, "calls": 1, "loads": n, "extra": 0}
            assert out.duration_ms >= 200
            time.sleep(SETTLE_S)
    finally:
        runner.close()


def test_files_that_would_not_preload_cleanly_are_left_to_the_call(
    runner: PooledRunner,
) -> None:
    files = {"main.js": PICKY_MAIN, "heavy.js": HEAVY, **PICKY}
    deadline = time.monotonic() + 30  # the left-out files are found one Worker at a time
    preloaded = []
    while preloaded != ["heavy"]:
        assert time.monotonic() < deadline, "heavy.js was never preloaded"
        out = run(runner, files)
        # Every call, before and after the vetting, behaves as without preloading: noisy's
        # line printed once, the call's environment, nothing thrown or hung.
        assert out.exit_code == 0, out.stderr.decode()
        assert out.stdout.splitlines()[0] == b"noisy at import" and out.stderr == b""
        seen = json.loads(out.stdout.splitlines()[1])
        assert seen["fn"] == "fn"
        preloaded = seen["preloaded"]
        assert preloaded in ([], ["heavy"])
        time.sleep(SETTLE_S)


def test_a_file_that_fails_to_load_fails_the_call_as_without_preloading(kind: str) -> None:
    outs = []
    for preload in (True, False):
        runner = make_runner(kind, preload)
        try:
            for _ in range(3):
                outs.append(run(runner, BROKEN))
                time.sleep(SETTLE_S)
        finally:
            runner.close()
    first = outs[0]
    assert (first.exit_code, first.stdout) == (1, b"")
    assert first.stderr.startswith(b"Error: broken at import\n") and b"broken.js:1" in first.stderr
    for out in outs[1:]:  # heavy preloaded or not: the same failure, word for word
        assert (out.exit_code, out.stdout, code_dir(out.stderr)) == (1, b"", code_dir(first.stderr))


def code_dir(text: bytes) -> bytes:
    """``text`` with the sandbox's code directory (one per runner) named CODE."""
    return re.sub(rb"/\S*/code(/function)?/", b"CODE/", text)


def test_peak_memory_stays_per_invocation(kind: str) -> None:
    peaks: dict[bool, list[int]] = {}
    for preload in (True, False):
        runner = make_runner(kind, preload)
        try:
            peaks[preload] = []
            for extra_mb in (0, 0, 48, 0):
                out, _ = call(runner, extra_mb=extra_mb)
                peaks[preload].append(out.peak_memory_bytes)
                time.sleep(SETTLE_S)
        finally:
            runner.close()
    first, warm, big, after = peaks[True]
    # heavy's 24 MiB are in every call's peak, loaded in the call or before it; the next
    # Worker starts (and preloads) only once the agent has read the peak.
    assert first >= 24 * MiB and warm >= 24 * MiB
    assert abs(warm - first) < 12 * MiB, peaks
    assert big >= warm + 44 * MiB and after < warm + 12 * MiB, peaks
    # As much as requiring in the call: compared with each sandbox's first call (the same in
    # both), as two sandboxes' peaks may differ by the page cache of node's own files, charged
    # to the first sandbox that reads them back after they were evicted (~40 MiB in Docker).
    first_off, warm_off = peaks[False][:2]
    assert abs((warm - first) - (warm_off - first_off)) < 8 * MiB, peaks


LINGERING = {  # files that pass the vetting but leave code running in the waiting Worker
    "main.js": "global.IN_CALL = true;\n"
    "const started = performance.timeOrigin + performance.now();\n"
    "const deps = ['interval', 'nested', 'spin'].map((name) => require(`./${name}`));\n"
    "console.log(JSON.stringify(deps.map((dep) => [dep.answer, dep.loadedAt < started])));\n",
    # an unref'd interval through the timers module (not the global the vetting watches)
    "interval.js": "if (!global.IN_CALL) require('timers').setInterval(() => {\n"
    "  const until = Date.now() + 20; while (Date.now() < until);\n}, 25).unref();\n"
    "exports.answer = 42;\n" + LOADED_AT,
    # a Worker of its own that spins
    "nested.js": "const { Worker } = require('worker_threads');\n"
    "if (!global.IN_CALL) new Worker('for (;;);', { eval: true }).unref();\n"
    "exports.answer = 43;\n" + LOADED_AT,
    # spins at require time outside a call: cut at the preload budget (2 s), then left out
    "spin.js": "while (!global.IN_CALL);\nexports.answer = 44;\n" + LOADED_AT,
}


def test_files_that_leave_code_running_use_no_cpu_while_the_sandbox_is_idle(
    runner: PooledRunner,
) -> None:
    """What a preloaded file left running in the Worker that waits for the next call stops
    once that Worker is ready: the sandbox is frozen until its next call. A file that spins
    while it loads runs for the preload budget once, and is then left to the calls."""
    for n in range(3):
        sandbox = runner.acquire("node", "f@1")
        try:
            put_code(sandbox, LINGERING, "f@1")
            out = runner.run(sandbox, node_invocation(b"{}"))
        finally:
            runner.release(sandbox)
        assert out.exit_code == 0, out.stderr.decode()
        # Preloaded from the second call on: they ran in the Worker that waited for it.
        assert json.loads(out.stdout) == [[42, n > 0], [43, n > 0], [44, False]]
        # Frozen once the next Worker is ready (its server says so): after the first call,
        # once spin.js was cut at the budget and a Worker booted without it; later, well
        # before the agent's deadline of 3 s, which these 2 s of idling cover.
        time.sleep(SETTLE_S if n else 2 + SETTLE_S)
        assert idle_cpu_seconds(sandbox) < 0.05, f"the sandbox ran while idle (call {n + 1})"
        assert frozen(sandbox)


def node_client(tmp_path: Path) -> Iterator[NodeServerClient]:
    """A node server on this host, without a runner around it."""
    socket_path = tmp_path / "control" / "nodeserver.sock"
    socket_path.parent.mkdir()
    server = subprocess.Popen(["node", str(NODESERVER_SOURCE), str(socket_path)])
    client = NodeServerClient(socket_path)
    try:
        yield client
    finally:
        client.close()
        server.kill()
        server.wait()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[NodeServerClient]:
    yield from node_client(tmp_path)


def once(
    client: NodeServerClient, code: Path, key: str | None, settle_s: float = SETTLE_S
) -> tuple[bytes, dict | None]:
    """One run as a runner makes it (then the next Worker is armed); (stdout, its report)."""
    env = {"NANOGRID_FUNCTION_ID": "fn", "PATH": "/usr/bin:/bin"}
    raw = client.run(argv=["node", "main.js"], cwd=str(code), env=env, stdin=b"",
                     timeout_s=10, max_output_bytes=1000, preload=key)
    assert raw.status == 0, raw.stderr.decode()
    client.arm()
    time.sleep(settle_s)
    return raw.stdout, raw.preload


def test_the_server_says_what_it_preloaded_and_why_it_left_files_out(
    client: NodeServerClient, tmp_path: Path
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    files = {
        **{name: text for name, text in PICKY.items() if name != "slow.js"},
        "stdin.js": "exports.data = require('fs').readFileSync('/dev/stdin', 'utf8');\n",
        "timer.js": "setTimeout(() => {}, 1).unref();\n",
        "exits.js": "if (!global.IN_CALL) process.exit(3);\n",
        # reads a name the call's environment lacks: undefined here and in the call alike
        "fine.js": "exports.fine = require('path').join('a', process.env.DEBUG || 'b');\n",
        "later.js": "Promise.resolve().then(() => process.stdout.write('later\\n'));\n",
    }
    for name, text in files.items():
        (code / name).write_text(text)
    names = [name.removesuffix(".js") for name in files]
    (code / "main.js").write_text(
        f"global.IN_CALL = true;\nfor (const n of {json.dumps(names)}) require(`./${{n}}`);\n"
    )
    first, report = once(client, code, "f@1", settle_s=5)  # one Worker per file left out
    assert report is None  # the first run only learns what it loaded
    second, report = once(client, code, "f@1")
    assert first == second == b"noisy at import\nlater\n"
    assert report == {
        "preloaded": ["fine.js"],
        "left_out": {
            "noisy.js": "it writes to stdout or stderr",
            "picky.js": "its require threw",
            "envy.js": "it reads the call's environment",
            "stdin.js": "it reads stdin",
            "timer.js": "it starts a timer",
            "exits.js": "it ended its Worker (process.exit or an uncaught error)",
            "later.js": "it writes to stdout or stderr",
        },
    }
    assert once(client, code, "f@1")[1] is None  # said once


def test_a_file_over_the_budget_is_left_out(client: NodeServerClient, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "slow.js").write_text(PICKY["slow.js"])
    (code / "after.js").write_text(LOADED_AT)
    (code / "main.js").write_text("global.IN_CALL = true;\nrequire('./slow');\nrequire('./after');")
    once(client, code, "f@1", settle_s=3)  # the budget is 2 s
    _, report = once(client, code, "f@1")
    assert report == {
        "preloaded": [],
        "left_out": {
            "slow.js": "the preloads took longer than 2000 ms",
            "after.js": "not tried",
        },
    }


def test_a_server_never_lends_one_keys_files_to_another(
    client: NodeServerClient, tmp_path: Path
) -> None:
    """The runners keep one function per sandbox; the server holds to it on its own, too."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "main.js").write_text("console.log(require('./shared').who);\n")
    (code / "shared.js").write_text("exports.who = 'f';\n")
    assert once(client, code, "f@1")[0] == b"f\n"
    assert once(client, code, "f@1") == (b"f\n", {"preloaded": ["shared.js"], "left_out": {}})
    (code / "shared.js").write_text("exports.who = 'g';\n")
    assert once(client, code, "g@1")[0] == b"g\n"
    assert once(client, code, None)[0] == b"g\n"


def test_a_functions_module_named_like_the_servers_is_its_own(
    client: NodeServerClient, tmp_path: Path
) -> None:
    """The Workers run the server's code as source, not from its files: a function's own
    ``worker.js`` or ``server.js`` is the one it requires, preloaded or not."""
    code = tmp_path / "code"
    code.mkdir()
    names = sorted(path.stem for path in NODESERVER_SOURCE.glob("*.js"))
    assert {"index", "worker", "server"} <= set(names)
    for name in names:
        (code / f"{name}.js").write_text(f"exports.who = 'function {name}';\n")
    (code / "main.js").write_text(
        f"const who = {json.dumps(names)}.map((name) => require(`./${{name}}`).who);\n"
        "const server = Object.keys(require.cache).filter((f) => f.includes('nodeserver'));\n"
        "console.log(JSON.stringify({ who, server }));\n"
    )
    seen = [once(client, code, "f@1") for _ in range(2)]
    for out, _ in seen:
        assert json.loads(out) == {"who": [f"function {name}" for name in names], "server": []}
    assert seen[1][1] == {"preloaded": [f"{name}.js" for name in names], "left_out": {}}
