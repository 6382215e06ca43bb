"""The Docker runner against the real engine: warm reuse, isolation, hardening, hostile code,
per-invocation peaks, cleanup and an engine that goes away.

Every test labels its containers with an agent id of its own, so the agent-wide cleanup
tested here never touches containers of anything else using the same engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import NotFound
from harness import agent_containers, scratch
from helpers import (
    RUNTIME_IMAGE,
    SIGNAL_FACTS,
    agent_config,
    assert_default_signals,
    frozen,
    put_code,
    release_settled,
    wait_until,
)

from nanogrid.common.config import Config
from nanogrid.common.errors import ConfigError, SandboxError
from nanogrid.runners.base import Invocation, RunOutcome
from nanogrid.runners.docker.cleanup import remove_agent_containers
from nanogrid.runners.docker.runner import DockerRunner
from nanogrid.runners.docker.sandbox import DockerSandbox

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("containers_agent")]

MiB = 2**20
MAX_PIDS = 32

PROBE = r"""
import json, os, socket
def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return type(exc).__name__
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines())
def connect():
    with socket.create_connection(("1.1.1.1", 53), timeout=2):
        pass
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(), "env": dict(os.environ),
    "cap_eff": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
    "interfaces": [l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]],
    "connect": attempt(connect),
    "write_etc": attempt(lambda: open("/etc/nanogrid", "w")),
    "write_usr": attempt(lambda: open("/usr/nanogrid", "w")),
    "write_code": attempt(lambda: open("main.py", "a")),
    "write_control": attempt(lambda: open("/nanogrid/control/x", "w")),
    "write_tmp": attempt(lambda: open("/tmp/nanogrid", "w")),
}))
"""


def make_config(warm: int = 1, pause_grace: float = 60.0, **docker_settings: Any) -> Config:
    return agent_config(
        scratch("ng-docker-"), "docker",
        runtimes={"python": {"image": RUNTIME_IMAGE, "warm": warm}},
        limits={"max_pids": MAX_PIDS},
        docker={"pause_grace_seconds": pause_grace, **docker_settings},
    )


@contextlib.contextmanager
def warm_runner(
    warm: int = 1, pause_grace: float = 60.0, **docker_settings: Any
) -> Iterator[DockerRunner]:
    """A runner whose pool is full (a first run during warm-up would be a cold start)."""
    r = DockerRunner(make_config(warm, pause_grace, **docker_settings), 0)
    try:
        wait_until(lambda: r.pool_stats()["python"]["warm"] == warm, timeout=20, what="warm pool")
        yield r
    finally:
        r.close()


@pytest.fixture
def runner(engine: docker.DockerClient) -> Iterator[DockerRunner]:
    with warm_runner() as r:
        yield r


def acquire(runner: DockerRunner, code: str, key: str) -> DockerSandbox:
    """Take a sandbox and put the code in as the worker does (replacing code_dir)."""
    sandbox = runner.acquire("python", key)
    assert isinstance(sandbox, DockerSandbox)
    put_code(sandbox, {"main.py": code}, key)
    return sandbox


def invocation(memory_mb: int = 128, timeout_ms: int = 5000, stdin: bytes = b"{}") -> Invocation:
    return Invocation(
        "req-1", "fn", ("python3", "main.py"), stdin, memory_mb, timeout_ms, 100_000, MAX_PIDS
    )


def run(
    runner: DockerRunner,
    code: str,
    key: str = "f@1",
    memory_mb: int = 128,
    timeout_ms: int = 5000,
    stdin: bytes = b"{}",
) -> tuple[RunOutcome, DockerSandbox]:
    sandbox = acquire(runner, code, key)
    try:
        return runner.run(sandbox, invocation(memory_mb, timeout_ms, stdin)), sandbox
    finally:
        release_settled(runner, sandbox)


def removed(engine: docker.DockerClient, sandbox: DockerSandbox) -> bool:
    """Wait (removal runs in the background) until the sandbox's container and dir are gone."""
    assert sandbox.container is not None

    def gone() -> bool:
        try:
            engine.containers.get(sandbox.container.id)
        except NotFound:
            return not sandbox.root.exists()
        return False

    return wait_until(gone, timeout=10, what=f"{sandbox.name} to be removed")


# -- the basics -------------------------------------------------------------------------------


def test_hello_world_reads_stdin_and_is_measured_by_the_cgroup(runner: DockerRunner) -> None:
    code = "import json, sys\nprint('Hello', json.load(sys.stdin)['name'])\n"
    out, _ = run(runner, code, stdin=b'{"name": "NanoGrid"}')
    assert (out.exit_code, out.stdout, out.stderr) == (0, b"Hello NanoGrid\n", b"")
    assert out.peak_source == "cgroup-v1" or out.peak_source == "cgroup-v2"
    assert 1 * MiB < out.peak_memory_bytes < 48 * MiB
    assert 0 < out.duration_ms < 1000


def test_warm_reuse_serves_the_same_function_from_the_same_container(
    runner: DockerRunner,
) -> None:
    first, a = run(runner, "print(1)")
    ran = a.runs
    second, b = run(runner, "print(1)")
    assert a is b and not b.cold_start and b.runs == ran + 1
    assert first.stdout == second.stdout == b"1\n"


def test_a_function_exits_with_its_own_code_and_stderr(runner: DockerRunner) -> None:
    out, sandbox = run(runner, "import sys\nsys.stderr.write('bad input')\nsys.exit(3)\n")
    assert (out.exit_code, out.stderr, out.oom_killed) == (3, b"bad input", False)
    assert sandbox.healthy


def test_a_call_starts_with_the_default_signal_dispositions(runner: DockerRunner) -> None:
    """The fork server under docker-init (not PID 1: it handles SIGTERM itself)."""
    for _ in range(2):
        out, _ = run(runner, SIGNAL_FACTS, key="signals@1")
        assert_default_signals(out)


def test_an_idle_container_is_frozen_until_its_next_run(engine: docker.DockerClient) -> None:
    """A container whose function has code of its own (preloaded into its server) is frozen
    through its cgroup's files on the host as its run ends, with no engine call: nothing in
    it runs until the next run thaws it (see test_import_warm.py). One whose function is its
    main script alone holds nothing of it between runs, and is left running."""
    files = {"main.py": "import helper\nprint(helper.WORD)\n", "helper.py": "WORD = 'hi'\n"}
    with warm_runner(pause_grace=0.2) as r:
        used = []
        for _ in range(2):
            started = time.monotonic()
            sandbox = r.acquire("python", "own@1")
            try:
                put_code(sandbox, files, "own@1")
                out = r.run(sandbox, invocation())
            finally:
                r.release(sandbox)
            assert out.stdout == b"hi\n" and time.monotonic() - started < 1
            assert isinstance(sandbox, DockerSandbox) and sandbox.container is not None
            # FREEZING until each of its processes was scheduled once
            wait_until(lambda s=sandbox: frozen(s), timeout=2, what="the container to freeze")
            time.sleep(0.5)  # past the pause grace: the engine is not asked to pause it
            assert engine.containers.get(sandbox.container.id).status == "running"
            used.append(sandbox)
        assert used[0] is used[1]  # thawed for its second run
        _, alone = run(r, "print('hi')")
        time.sleep(0.5)
        assert not frozen(alone)
        assert engine.containers.get(alone.container.id).status == "running"


# -- per-invocation memory --------------------------------------------------------------------


def test_peak_memory_is_per_invocation(runner: DockerRunner) -> None:
    big = "b = bytearray(100 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
    out, first = run(runner, f"import sys\nif sys.stdin.read() == 'big':\n    {big}", key="m")
    out_big, _ = run(runner, "", key="m", stdin=b"big")
    out_small, second = run(runner, "", key="m", stdin=b"small")
    assert first is second
    assert 100 * MiB <= out_big.peak_memory_bytes <= 164 * MiB
    assert out_small.peak_memory_bytes < 32 * MiB


def test_memory_limit_follows_each_invocation(runner: DockerRunner) -> None:
    _, sandbox = run(runner, "print(1)", memory_mb=64)
    assert sandbox.cgroup is not None
    directory = sandbox.cgroup.memory.directory
    limits = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
    if (directory / "memory.max").exists():
        limits = ["memory.max"]
    for name in limits:
        assert int((directory / name).read_text()) == 64 * MiB, name
    run(runner, "print(1)", memory_mb=160)
    for name in limits:
        assert int((directory / name).read_text()) == 160 * MiB, name


# -- isolation and hardening ------------------------------------------------------------------


def test_container_is_hardened(runner: DockerRunner, engine: docker.DockerClient) -> None:
    out, sandbox = run(runner, PROBE, memory_mb=96)
    seen = json.loads(out.stdout)
    assert seen["uid"] != 0 and seen["gid"] != 0
    assert seen["cap_eff"] == "0000000000000000" and seen["no_new_privs"] == "1"
    assert seen["interfaces"] == ["lo"] and seen["connect"] != "ok"
    assert seen["write_etc"] == seen["write_usr"] == "OSError"  # EROFS
    assert seen["write_code"] != "ok" and seen["write_control"] != "ok"
    assert seen["write_tmp"] == "ok"
    assert seen["cwd"] == "/code/function"
    assert set(seen["env"]) == {
        "NANOGRID_REQUEST_ID",
        "NANOGRID_FUNCTION_ID",
        "NANOGRID_MEMORY_MB",
        "PATH",
        "HOME",
        "LANG",
    }
    assert sandbox.container is not None
    attrs = engine.containers.get(sandbox.container.id).attrs
    host = attrs["HostConfig"]
    assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"] and host["Init"]
    assert "no-new-privileges" in host["SecurityOpt"] and host["NetworkMode"] == "none"
    assert host["PidsLimit"] == MAX_PIDS + 2 and host["NanoCpus"] == 10**9
    assert not host.get("Binds") and len(host["Mounts"]) == 3
    assert attrs["Config"]["Labels"]["nanogrid.worker"] == "0"
    assert not any(v.startswith(("AWS_", "DOCKER_")) for v in attrs["Config"]["Env"])


SECCOMP_PROBE = r"""
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines())
# keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 1) and unshare(CLONE_NEWUSER):
# allowed to any user by the kernel, refused by the engine's default seccomp profile.
keyctl = libc.syscall(250, 0, -3, 1)
keyctl_errno = ctypes.get_errno()
userns = libc.unshare(0x10000000)
print(json.dumps({"seccomp": status["Seccomp"].strip(), "keyctl": [keyctl, keyctl_errno],
                  "unshare": [userns, ctypes.get_errno()]}))
"""


def test_the_engines_default_seccomp_profile_holds(
    runner: DockerRunner, engine: docker.DockerClient
) -> None:
    out, sandbox = run(runner, SECCOMP_PROBE)
    seen = json.loads(out.stdout)
    assert seen["seccomp"] == "2"  # a filter is installed
    assert seen["keyctl"] == [-1, 1] and seen["unshare"] == [-1, 1]  # EPERM
    assert sandbox.container is not None
    host = engine.containers.get(sandbox.container.id).attrs["HostConfig"]
    assert not any("unconfined" in option for option in host["SecurityOpt"])


def test_ulimits_and_runtime_reach_the_engine(engine: docker.DockerClient) -> None:
    DockerRunner.check_config(make_config(runtime="runc"))  # the engine knows runc
    with warm_runner(runtime="runc") as r:
        out, sandbox = run(r, "import resource as r\nprint([r.getrlimit(getattr(r, n)) for n in "
                              "('RLIMIT_NOFILE', 'RLIMIT_FSIZE', 'RLIMIT_CORE')])\n")
        assert sandbox.container is not None
        host = engine.containers.get(sandbox.container.id).attrs["HostConfig"]
    assert out.stdout == b"[(1024, 1024), (67108864, 67108864), (0, 0)]\n"
    assert host["Runtime"] == "runc"
    assert {u["Name"]: u["Hard"] for u in host["Ulimits"]} == {
        "nofile": 1024, "fsize": 64 * MiB, "core": 0}


def test_a_runtime_the_engine_does_not_know_is_a_config_error(
    engine: docker.DockerClient,
) -> None:
    config = make_config(runtime="runsc")
    with pytest.raises(ConfigError, match=r"^docker.runtime: the Docker engine has no runtime "
                                          r"'runsc' \(it has: .*runc"):
        DockerRunner.check_config(config)


def test_functions_never_share_a_container(engine: docker.DockerClient) -> None:
    code_a = (
        "import os, time\n"
        "print(open('/tmp/a-secret').read() if os.path.exists('/tmp/a-secret') else 'new')\n"
        "open('/tmp/a-secret', 'w').write('s3cr3t')\n"
        "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
    )
    code_b = (
        "import json, os\n"
        "procs = [open(f'/proc/{p}/cmdline').read().replace('\\0', ' ').strip()\n"
        "         for p in os.listdir('/proc') if p.isdigit()]\n"
        "print(json.dumps({'tmp': os.listdir('/tmp'), 'code': os.listdir('.'),\n"
        "                  'procs': procs}))\n"
    )
    with warm_runner(warm=2) as runner:
        out_a, a = run(runner, code_a, key="a@1")
        out_b, b = run(runner, code_b, key="b@1")
        again, a2 = run(runner, code_a, key="a@1")
    assert out_a.stdout == b"new\n" and a is not b
    assert a.container is not None and b.container is not None
    assert a.container.id != b.container.id
    seen = json.loads(out_b.stdout)
    assert seen["tmp"] == [] and seen["code"] == ["main.py"]
    assert len(seen["procs"]) == 3, seen["procs"]  # docker-init, the fork server, itself
    assert not any("sleep" in p or "a@1" in p for p in seen["procs"])
    assert a2 is a and again.stdout == b"s3cr3t\n"  # the same function keeps its /tmp


def test_processes_left_behind_are_killed_after_the_run(runner: DockerRunner) -> None:
    code = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('done')\n"
    )
    out, sandbox = run(runner, code, key="bg")
    assert out.exit_code == 0 and sandbox.healthy
    assert sandbox.processes is not None and sandbox.processes.strays() == []


# -- hostile code -----------------------------------------------------------------------------


def test_fork_bomb_is_contained(
    runner: DockerRunner, engine: docker.DockerClient, pids_limited_tests: int
) -> None:
    sandbox = runner.acquire("python", "probe")
    assert isinstance(sandbox, DockerSandbox) and sandbox.cgroup is not None
    assert int((sandbox.cgroup.pids_dir / "pids.max").read_text()) == MAX_PIDS + 2
    runner.release(sandbox)
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    started = time.monotonic()
    out, sandbox = run(runner, bomb, key="bomb", timeout_ms=1500)
    assert out.timed_out and time.monotonic() - started < 10
    assert removed(engine, sandbox)
    assert subprocess.run(["true"], timeout=10).returncode == 0  # the host can still fork
    after, fresh = run(runner, "print('still fine')", key="after")
    assert after.stdout == b"still fine\n" and fresh is not sandbox


def test_memory_bomb_is_out_of_memory(runner: DockerRunner, engine: docker.DockerClient) -> None:
    code = (
        "import sys\nif sys.stdin.read() == 'bomb':\n    b = []\n"
        "    while True:\n        b.append(bytearray(8 * 2**20))\n"
    )
    _, sandbox = run(runner, code, key="mem", memory_mb=64)
    assert sandbox.cgroup is not None
    limit = sandbox.cgroup.memory.directory / "memory.limit_in_bytes"
    if not limit.exists():
        limit = sandbox.cgroup.memory.directory / "memory.max"
    assert int(limit.read_text()) == 64 * MiB  # the limit holds before the bomb goes off
    out, bombed = run(runner, code, key="mem", memory_mb=64, stdin=b"bomb")
    assert bombed is sandbox
    assert out.oom_killed and out.exit_code == -signal.SIGKILL and not out.timed_out
    assert 56 * MiB <= out.peak_memory_bytes <= 64 * MiB
    assert removed(engine, sandbox)


def test_out_of_memory_is_reported_when_the_fork_server_is_the_victim(
    runner: DockerRunner, engine: docker.DockerClient
) -> None:
    code = "import time\ntime.sleep(0.5)\nb = []\nwhile True:\n    b.append(bytearray(2**20))\n"
    sandbox = acquire(runner, code, "m")
    assert sandbox.processes is not None
    outcomes: list[RunOutcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(runner.run(sandbox, invocation(64))))
    thread.start()
    try:
        wait_until(sandbox.processes.strays, timeout=5, what="the function to start")
        # Only the server, not the function it already forked, becomes the OOM killer's pick.
        Path(f"/proc/{sandbox.processes.server_pid}/oom_score_adj").write_text("1000")
        thread.join(10)
        # The server's socket closes a moment before its pidfd reports the exit.
        wait_until(lambda: select.select([sandbox.server_fd], [], [], 0)[0], timeout=5)
    finally:
        runner.release(sandbox)
    (out,) = outcomes
    assert out.oom_killed and out.exit_code == -signal.SIGKILL and out.stdout == b""
    assert removed(engine, sandbox)


def test_timeout_is_quick_and_replaces_the_container(
    runner: DockerRunner, engine: docker.DockerClient
) -> None:
    started = time.monotonic()
    out, sandbox = run(runner, "import time\ntime.sleep(30)\n", key="slow", timeout_ms=300)
    assert out.timed_out and out.exit_code == -signal.SIGKILL
    assert time.monotonic() - started < 3
    assert removed(engine, sandbox)


def test_a_function_that_kills_its_fork_server_fails_and_is_replaced(
    runner: DockerRunner, engine: docker.DockerClient
) -> None:
    sandbox = acquire(runner, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "k")
    try:
        with pytest.raises(SandboxError, match="fork server"):
            runner.run(sandbox, invocation())
    finally:
        runner.release(sandbox)
    assert removed(engine, sandbox)
    out, _ = run(runner, "print('ok')", key="next")
    assert out.stdout == b"ok\n"


def test_a_dead_idle_container_is_replaced_at_acquire(
    runner: DockerRunner, engine: docker.DockerClient
) -> None:
    """Killed through the engine, as an idle container dies (docker kill, an engine restart;
    the OOM killer also ends a frozen one); a bare SIGKILL to its frozen server would wait for
    the thaw of its next run, which then fails as a sandbox error."""
    _, sandbox = run(runner, "print(1)")
    assert sandbox.container is not None
    engine.containers.get(sandbox.container.id).kill()
    wait_until(lambda: select.select([sandbox.server_fd], [], [], 0)[0], timeout=5)
    out, fresh = run(runner, "print(1)")
    assert fresh is not sandbox and fresh.cold_start and out.stdout == b"1\n"


# -- lifecycle --------------------------------------------------------------------------------


def test_close_removes_containers_and_host_dirs(
    engine: docker.DockerClient, containers_agent: str
) -> None:
    config = make_config(warm=2)
    r = DockerRunner(config, 0)
    wait_until(lambda: r.pool_stats()["python"]["warm"] == 2, timeout=20)
    assert len(agent_containers(engine, containers_agent)) == 2
    r.close()
    assert agent_containers(engine, containers_agent) == []
    assert list(Path(config.docker.socket_dir).iterdir()) == []


def test_agent_cleanup_spares_a_live_workers_containers(
    engine: docker.DockerClient, containers_agent: str
) -> None:
    r = DockerRunner(make_config(warm=2), 0)
    try:
        wait_until(lambda: r.pool_stats()["python"]["warm"] == 2, timeout=20)
        dirs = [c.labels["nanogrid.dir"] for c in agent_containers(engine, containers_agent)]
        assert remove_agent_containers() == 0  # another agent's cleanup must not break us
        assert len(agent_containers(engine, containers_agent)) == 2
        assert all(os.path.exists(d) for d in dirs)
    finally:
        r.close()
    assert agent_containers(engine, containers_agent) == []


def _start_worker_process(config: Config) -> tuple[int, int]:
    """Fork a child that makes a runner, says when its pool is warm, then waits for SIGTERM."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            r = DockerRunner(config, 0)
            wait_until(lambda: r.pool_stats()["python"]["warm"] == 2, timeout=20)
            os.write(ready_w, b"1")
            stop.wait(60)
            r.close()
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    return pid, ready_r


def _sigkill_when_warm(config: Config) -> None:
    """Start a worker process, SIGKILL it once its pool is warm: nothing runs to clean up."""
    pid, ready = _start_worker_process(config)
    try:
        assert os.read(ready, 1) == b"1"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready)


def test_a_sigkilled_workers_containers_are_removed(
    engine: docker.DockerClient, containers_agent: str
) -> None:
    config = make_config(warm=2)
    _sigkill_when_warm(config)
    assert len(agent_containers(engine, containers_agent)) == 2  # nothing ran to remove them
    replacement = DockerRunner(make_config(warm=0), 0)  # a new worker removes dead ones'
    replacement.close()
    assert agent_containers(engine, containers_agent) == []
    assert list(Path(config.docker.socket_dir).iterdir()) == []
    _sigkill_when_warm(config)
    assert remove_agent_containers() == 2  # and so does the agent at start
    assert agent_containers(engine, containers_agent) == []


def test_a_sigtermed_worker_removes_its_containers(
    engine: docker.DockerClient, containers_agent: str
) -> None:
    pid, ready = _start_worker_process(make_config(warm=2))
    try:
        assert os.read(ready, 1) == b"1"
        assert len(agent_containers(engine, containers_agent)) == 2
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(ready)
    assert os.waitstatus_to_exitcode(status) == 0
    assert agent_containers(engine, containers_agent) == []


# -- the engine going away --------------------------------------------------------------------


class EngineProxy:
    """A unix socket in front of the Docker engine that can be taken away and brought back,
    so the engine 'goes away' for one runner without disturbing anyone else's."""

    def __init__(self, path: str, target: str) -> None:
        self.path, self.target = path, target
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def start(self) -> None:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(16)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def stop(self) -> None:
        assert self._listener is not None
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the old thread
        self._listener.close()
        os.unlink(self.path)
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_engine_away_fails_clearly_and_recovers(
    engine: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy_dir = tempfile.mkdtemp(prefix="ng-proxy-")
    proxy = EngineProxy(f"{proxy_dir}/docker.sock", "/var/run/docker.sock")
    proxy.start()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{proxy.path}")
    r = DockerRunner(make_config(warm=1), 0)
    try:
        # Warm first: a warm-up still creating its container when the engine goes away
        # would race the cold start below.
        wait_until(lambda: r.pool_stats()["python"]["warm"] == 1, timeout=20, what="warm pool")
        warm = acquire(r, "print('warm')", "a")
        proxy.stop()
        out = r.run(warm, invocation())  # a warm run needs no engine at all
        assert out.stdout == b"warm\n"
        with pytest.raises(SandboxError, match="cannot start a python container: Docker engine"):
            r.acquire("python", "b")  # the only warm one is busy: a cold start is needed
        r.release(warm)
        proxy.start()
        out, sandbox = run(r, "print('back')", key="b")
        assert out.stdout == b"back\n" and sandbox.cold_start
    finally:
        r.close()
        shutil.rmtree(proxy_dir, ignore_errors=True)


def test_no_engine_at_all_is_a_sandbox_error_not_a_crash(
    engine: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    r = DockerRunner(make_config(warm=1), 0)
    try:
        with pytest.raises(SandboxError, match="Docker engine unreachable"):
            r.acquire("python", "f@1")
        assert r.pool_stats() == {"python": {"warm": 0, "busy": 0}}
    finally:
        r.close()
    assert remove_agent_containers() == 0
