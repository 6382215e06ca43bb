"""The node runtime on both runners, on the real engine and host: the python contract (stdin,
argv, environment, exit codes, caps, timeout, OOM, per-invocation peaks), warm calls, reuse,
hardening, a node image without python, and runtimes that cannot start."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import MAX_PIDS
from harness import runner_config as make_config
from harness import start_runner as start
from helpers import put_code

from nanogrid.common.errors import RuntimeUnavailable
from nanogrid.runners.base import Invocation, RunOutcome, Sandbox
from nanogrid.runners.docker.runner import DockerRunner
from nanogrid.runners.docker.sandbox import DockerSandbox
from nanogrid.runners.pooled import PooledRunner
from nanogrid.runners.process.runner import ProcessRunner, ProcessSandbox

MiB = 2**20
pytestmark = pytest.mark.usefixtures("containers_agent")
CONTRACT_ENV = {
    "NANOGRID_REQUEST_ID",
    "NANOGRID_FUNCTION_ID",
    "NANOGRID_MEMORY_MB",
    "PATH",
    "HOME",
    "LANG",
}

ECHO = """
const fs = require('fs');
const input = JSON.parse(fs.readFileSync(0, 'utf8'));
console.log(JSON.stringify({
  input, argv: process.argv.slice(1), env: process.env, cwd: process.cwd(),
  main: require.main === module,
}));
if (input.stderr) process.stderr.write(input.stderr);
if (input.exit !== undefined) process.exit(input.exit);
if (input.throw) throw new Error(input.throw);
if (input.exitCode !== undefined) process.exitCode = input.exitCode;
"""

@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        request.getfixturevalue("node_image")
    return request.param


@pytest.fixture
def runner(kind: str) -> Iterator[PooledRunner]:
    r = start(kind, {"node": {"image": "nanogrid/node:18-bookworm", "warm": 1}})
    yield r
    r.close()


def acquire(runner: PooledRunner, code: str, key: str, runtime: str = "node") -> Sandbox:
    """Take a sandbox and put the code in as the worker does (replacing code_dir)."""
    sandbox = runner.acquire(runtime, key)
    put_code(sandbox, {"main.js": code}, key)
    return sandbox


def run(
    runner: PooledRunner,
    code: str,
    stdin: Any = None,
    key: str = "f@1",
    memory_mb: int = 256,
    timeout_ms: int = 5000,
    max_output: int = 100_000,
) -> tuple[RunOutcome, Sandbox]:
    sandbox = acquire(runner, code, key)
    data = json.dumps({} if stdin is None else stdin).encode()
    invocation = Invocation(
        "req-1", "fn", ("node", "main.js"), data, memory_mb, timeout_ms, max_output, MAX_PIDS
    )
    try:
        return runner.run(sandbox, invocation), sandbox
    finally:
        runner.release(sandbox)


def test_stdin_argv_environment_and_cwd_follow_the_contract(
    runner: PooledRunner, kind: str
) -> None:
    out, sandbox = run(runner, ECHO, {"name": "NanoGrid"}, memory_mb=192)
    assert (out.exit_code, out.stderr, out.timed_out, out.oom_killed) == (0, b"", False, False)
    seen = json.loads(out.stdout)
    assert seen["input"] == {"name": "NanoGrid"} and seen["main"] is True
    workdir = str(sandbox.code_dir) if kind == "process" else "/code/function"
    assert seen["argv"] == [f"{workdir}/main.js"]  # as `node main.js` sets it: absolute
    assert set(seen["env"]) == CONTRACT_ENV and seen["env"]["NANOGRID_MEMORY_MB"] == "192"
    assert seen["cwd"] == workdir
    assert out.peak_source.startswith("cgroup")


def test_process_stdin_stream_reads_the_input_too(runner: PooledRunner) -> None:
    code = (
        "let d = ''; process.stdin.setEncoding('utf8');\n"
        "process.stdin.on('data', (c) => d += c);\n"
        "process.stdin.on('end', () => console.log('got', JSON.parse(d).n));\n"
    )
    out, _ = run(runner, code, {"n": 41})
    assert out.stdout == b"got 41\n"
    out, _ = run(runner, code, {"n": 42})  # a second call reads its own input, not the first
    assert out.stdout == b"got 42\n"


def test_exit_codes_stderr_and_uncaught_errors(runner: PooledRunner) -> None:
    out, sandbox = run(runner, ECHO, {"exit": 3, "stderr": "bad input"})
    assert (out.exit_code, out.stderr) == (3, b"bad input") and sandbox.healthy
    out, _ = run(runner, ECHO, {"exitCode": 5})
    assert out.exit_code == 5
    out, _ = run(runner, ECHO, {"throw": "boom"})
    assert out.exit_code == 1
    assert out.stderr.startswith(b"Error: boom\n    at ") and b"main.js:" in out.stderr
    assert b"nodeserver" not in out.stderr.split(b"\n")[1]
    out, _ = run(runner, "Promise.reject(new Error('async boom'));\n", key="p@1")
    assert out.exit_code == 1 and b"async boom" in out.stderr


def node_start_ms() -> float:
    """The median of three starts of ``node -e 0`` on this host."""
    node = shutil.which("node")
    assert node is not None, "node is not installed: run dev/setup"
    took = []
    for _ in range(3):
        began = time.perf_counter()
        subprocess.run([node, "-e", "0"], check=True)
        took.append((time.perf_counter() - began) * 1000)
    return sorted(took)[1]


def test_warm_calls_reuse_the_sandbox_only_for_the_same_function(runner: PooledRunner) -> None:
    durations = []
    first = None
    for _ in range(5):
        out, sandbox = run(runner, 'console.log("Hello from NanoGrid!")\n')
        assert out.stdout == b"Hello from NanoGrid!\n"
        assert first is None or (sandbox is first and not sandbox.cold_start)
        first = sandbox
        durations.append(out.duration_ms)
    # Node's own start is not in a warm call: its median stays below what starting node
    # costs on this machine right now (measured here, so a loaded machine slows both).
    assert sorted(durations)[2] < node_start_ms()
    _, other = run(runner, "console.log(1)\n", key="g@1")
    assert other is not first


def test_output_is_capped(runner: PooledRunner) -> None:
    code = (
        "for (let i = 0; i < 20000; i++) process.stdout.write('x'.repeat(99) + '\\n');\n"
        "process.stderr.write('e'.repeat(5000));\n"
    )
    out, _ = run(runner, code, max_output=1000)
    assert out.exit_code == 0
    assert len(out.stdout) == 1000 and out.stdout_truncated
    assert len(out.stderr) == 1000 and out.stderr_truncated


def test_timeout_kills_and_replaces_the_sandbox(runner: PooledRunner) -> None:
    out, sandbox = run(runner, "for (;;) {}\n", key="spin@1", timeout_ms=300)
    assert out.timed_out and out.exit_code == -signal.SIGKILL and not sandbox.healthy
    out, fresh = run(runner, "console.log('next')\n", key="next@1")
    assert out.stdout == b"next\n" and fresh is not sandbox


def test_peak_memory_is_per_invocation(runner: PooledRunner) -> None:
    code = (
        "const mb = JSON.parse(require('fs').readFileSync(0)).mb;\n"
        "const b = Buffer.alloc(mb * 2 ** 20, 1);\n"
        "console.log(b.length);\n"
    )
    big, first = run(runner, code, {"mb": 100}, key="m@1", memory_mb=512)
    small, second = run(runner, code, {"mb": 0}, key="m@1", memory_mb=512)
    assert first is second and big.exit_code == 0
    assert 100 * MiB <= big.peak_memory_bytes <= 200 * MiB, big.peak_memory_bytes
    assert small.peak_memory_bytes < 64 * MiB


def test_out_of_memory(runner: PooledRunner) -> None:
    code = "const b = [];\nfor (;;) b.push(Buffer.alloc(8 * 2 ** 20, 1));\n"
    out, sandbox = run(runner, code, key="oom@1", memory_mb=96)
    assert out.oom_killed and not out.timed_out and not sandbox.healthy
    assert out.exit_code == -signal.SIGKILL
    out, _ = run(runner, "console.log('after')\n", key="after@1")
    assert out.stdout == b"after\n"


@pytest.mark.docker
def test_a_container_killed_for_memory_is_out_of_memory_with_its_cgroup_gone(
    node_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's OOM kill ends a container's node server, so the container stops, and its
    cgroup may be removed before the agent reads the OOM count (here: never readable). The
    engine recorded the kill: the run is OUT_OF_MEMORY, not a sandbox failure."""
    runner = start("docker", {"node": {"image": node_image, "warm": 1}})
    try:
        monkeypatch.setattr(PooledRunner, "_read", staticmethod(
            lambda sandbox, meter, *, killed: (None, 0)))
        code = "const b = [];\nfor (;;) b.push(Buffer.alloc(8 * 2 ** 20, 1));\n"
        out, sandbox = run(runner, code, key="oom-gone@1", memory_mb=96)
        assert out.oom_killed and out.exit_code == -signal.SIGKILL and not sandbox.healthy
        out, _ = run(runner, "console.log('after')\n", key="after@1")
        assert out.stdout == b"after\n"
    finally:
        runner.close()


def test_leftover_child_processes_are_killed(runner: PooledRunner, kind: str) -> None:
    """What a run leaves behind is killed. On the process runner the node server is PID 1 of
    its sandbox and reaps only the children it waits for: a sandbox whose run left a process
    is not kept (a killed orphan would hold one of its pids for good); one whose run waited
    for its child is."""
    code = (
        "const { spawn } = require('child_process');\n"
        "spawn('sleep', ['60'], { detached: true, stdio: 'ignore' }).unref();\n"
        "console.log('spawned');\n"
    )
    out, sandbox = run(runner, code, key="bg@1")
    assert out.stdout == b"spawned\n"
    if kind == "process":
        assert isinstance(sandbox, ProcessSandbox) and sandbox.process is not None
        assert not sandbox.healthy and sandbox.process.wait(5)
        assert not [p for p in psutil.process_iter(["cmdline", "uids"])
                    if p.info["cmdline"] == ["sleep", "60"]
                    and p.info["uids"] and p.info["uids"].real == sandbox.uid]
        waited = "require('child_process').execFileSync('true');\nconsole.log('waited');\n"
        out, first = run(runner, waited, key="wait@1")
        out, second = run(runner, waited, key="wait@1")
        assert out.stdout == b"waited\n" and second is first and first.healthy
    else:
        assert isinstance(sandbox, DockerSandbox) and sandbox.processes is not None
        assert sandbox.processes.strays() == [] and sandbox.healthy


def test_a_process_node_sandbox_is_its_node_server_alone() -> None:
    """On the process runner the node server is exec'd as PID 1 of its sandbox's namespace,
    the template's child: no python process (keeper, PID 1) stays beside it."""
    runner = start("process", {"node": {"warm": 1}})
    try:
        out, sandbox = run(runner, "console.log(process.pid);\n", key="alone@1")
        assert isinstance(sandbox, ProcessSandbox) and sandbox.process is not None
        assert out.stdout == b"1\n"
        server = psutil.Process(sandbox.server_pid)
        assert sandbox.process.pid == server.pid and server.exe().endswith("/node")
        assert server.parent().cmdline()[0].startswith("nanogrid: sandbox template")
        status = Path(f"/proc/{server.pid}/status").read_text()
        assert f"NSpid:\t{server.pid}\t1\n" in status
        assert server.children() == []
    finally:
        runner.close()


# -- Docker: an image with node only, hardened as for python -----------------------------------


PROBE = """
const fs = require('fs');
const attempt = (f) => { try { f(); return 'ok'; } catch (e) { return e.code; } };
const status = fs.readFileSync('/proc/self/status', 'utf8');
const field = (k) => status.match(new RegExp(k + ':\\\\s+(\\\\S+)'))[1];
console.log(JSON.stringify({
  uid: process.getuid(), cap_eff: field('CapEff'), no_new_privs: field('NoNewPrivs'),
  interfaces: fs.readFileSync('/proc/net/dev', 'utf8').split('\\n').slice(2)
    .filter(Boolean).map((l) => l.split(':')[0].trim()),
  python: ['/usr/bin/python3', '/usr/local/bin/python3'].some((p) => fs.existsSync(p)),
  write_etc: attempt(() => fs.writeFileSync('/etc/nanogrid', 'x')),
  write_code: attempt(() => fs.writeFileSync('main.js', 'x')),
  write_tmp: attempt(() => fs.writeFileSync('/tmp/nanogrid', 'x')),
}));
"""


@pytest.mark.docker
def test_node_image_has_no_python_and_the_container_is_hardened(node_image: str) -> None:
    r = start("docker", {"node": {"image": node_image, "warm": 1}})
    try:
        out, sandbox = run(r, PROBE)
    finally:
        r.close()
    seen = json.loads(out.stdout)
    assert seen["python"] is False
    assert seen["uid"] != 0 and seen["cap_eff"] == "0000000000000000"
    assert seen["no_new_privs"] == "1" and seen["interfaces"] == ["lo"]
    assert seen["write_etc"] == "EROFS" and seen["write_code"] in ("EROFS", "EACCES")
    assert seen["write_tmp"] == "ok"
    assert isinstance(sandbox, DockerSandbox) and sandbox.container is not None
    assert sandbox.container.attrs["HostConfig"]["ReadonlyRootfs"]


# -- runtimes that cannot start ----------------------------------------------------------------


def test_process_runner_names_a_runtime_whose_interpreter_is_missing() -> None:
    runtimes = {"python": {"warm": 1}, "node": {"command": ["nanogrid-no-node", "main.js"]}}
    assert ProcessRunner.runtime_problems(make_config("process", runtimes)) == {
        "node": "runtime command 'nanogrid-no-node' not found on PATH /usr/local/bin:/usr/bin:/bin"
    }
    r = start("process", runtimes)
    try:
        with pytest.raises(
            RuntimeUnavailable,
            match="runtime 'node' cannot start on this host: "
            "runtime command 'nanogrid-no-node' not found",
        ):
            r.acquire("node", "f@1")
        assert set(r.pool_stats()) == {"python"}  # python is unaffected
        sandbox = r.acquire("python", "p@1")
        r.release(sandbox)
    finally:
        r.close()


@pytest.mark.docker
def test_docker_runner_names_a_missing_image(node_image: str) -> None:
    runtimes = {"node": {"image": "nanogrid/no-such-image:1", "warm": 1}}
    assert (
        "not on this host" in DockerRunner.runtime_problems(make_config("docker", runtimes))["node"]
    )
    r = start("docker", runtimes)
    try:
        with pytest.raises(RuntimeUnavailable, match="image nanogrid/no-such-image:1 is not on"):
            r.acquire("node", "f@1")
    finally:
        r.close()


@pytest.mark.docker
def test_docker_runner_names_an_image_without_the_interpreter(runtime_image: str) -> None:
    runtimes = {"node": {"image": runtime_image, "warm": 0}}  # the python image: no node
    r = start("docker", runtimes)
    try:
        with pytest.raises(RuntimeUnavailable, match=f"image {runtime_image} has no node"):
            r.acquire("node", "f@1")
        assert "has no node" in r.unavailable_runtimes()["node"]
        with pytest.raises(RuntimeUnavailable):  # from now on without a container start
            r.acquire("node", "f@1")
    finally:
        r.close()


def test_a_command_only_runtime_is_exec_d_per_call() -> None:
    r = start("process", {"binary": {"command": ["./main"], "warm": 1}})
    try:
        sandbox = r.acquire("binary", "b@1")
        main = sandbox.code_dir / "main"
        main.write_text('#!/bin/sh\nread line\necho "got $line"\nexit 4\n')
        main.chmod(0o755)
        invocation = Invocation(
            "req-1", "fn", ("./main",), b'{"a": 1}\n', 128, 5000, 10_000, MAX_PIDS
        )
        out = r.run(sandbox, invocation)
        r.release(sandbox)
    finally:
        r.close()
    assert (out.exit_code, out.stdout) == (4, b'got {"a": 1}\n')
