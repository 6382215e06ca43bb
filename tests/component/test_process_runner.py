"""The process runner's sandboxes on this host: limits, isolation, leftovers, failure modes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    SIGNAL_FACTS,
    agent_config,
    assert_default_signals,
    put_code,
    release_settled,
    scratch_dir,
    wait_until,
)

from nanogrid.common.config import Config, from_dict
from nanogrid.runners import cgroups
from nanogrid.runners.base import Invocation, RunOutcome
from nanogrid.runners.forkclient import FORKSERVER_SOURCE, ForkServerClient
from nanogrid.runners.process.runner import ProcessRunner, ProcessSandbox


def make_config(warm: int = 1, max_pids: int = 32, **process: Any) -> Config:
    return agent_config(
        scratch_dir("nanogrid-work-"), runtimes={"python": {"warm": warm}},
        limits={"max_pids": max_pids}, process=process,
    )


@pytest.fixture
def runner() -> Iterator[ProcessRunner]:
    r = ProcessRunner(make_config(), 0)
    yield r
    r.close()


def run(
    runner: ProcessRunner,
    code: str,
    key: str = "f@1",
    memory_mb: int = 128,
    timeout_ms: int = 5000,
    stdin: bytes = b"{}",
) -> tuple[RunOutcome, ProcessSandbox]:
    sandbox = runner.acquire("python", key)
    assert isinstance(sandbox, ProcessSandbox)
    put_code(sandbox, {"main.py": code}, key)
    invocation = Invocation(
        "r", "f", ("python3", "main.py"), stdin, memory_mb, timeout_ms, 10_000, 32
    )
    try:
        return runner.run(sandbox, invocation), sandbox
    finally:
        release_settled(runner, sandbox)


def test_sandboxes_have_their_own_cgroup_with_limits(runner: ProcessRunner) -> None:
    out, sandbox = run(runner, "print('hi')", memory_mb=96)
    assert out.stdout == b"hi\n" and out.peak_source.startswith("cgroup")
    assert sandbox.cgroup is not None
    assert int((sandbox.cgroup.pids_dir / "pids.max").read_text()) == 33
    limit = sandbox.cgroup.memory_dir / "memory.limit_in_bytes"
    if limit.exists():
        assert int(limit.read_text()) == 96 * 2**20


def test_peak_memory_is_per_invocation_in_one_sandbox(runner: ProcessRunner) -> None:
    code = (
        "import sys\n"
        "if sys.stdin.read() == 'big':\n"
        "    b = bytearray(100 * 2**20)\n"
        "    for i in range(0, len(b), 4096): b[i] = 1\n"
    )
    out_big, first = run(runner, code, key="peaks", memory_mb=512, stdin=b"big")
    out_small, second = run(runner, code, key="peaks", memory_mb=512, stdin=b"small")
    assert first is second  # the same sandbox, its cgroup files kept open between runs
    assert out_big.exit_code == 0 and out_small.exit_code == 0
    assert out_big.peak_source.startswith("cgroup") and out_big.peak_memory_bytes >= 100 * 2**20
    assert out_small.peak_memory_bytes < 32 * 2**20


def test_fork_bomb_is_contained(runner: ProcessRunner, pids_limited_tests: int) -> None:
    sandbox = runner.acquire("python", "probe")
    assert sandbox.cgroup is not None
    assert int((sandbox.cgroup.pids_dir / "pids.max").read_text()) <= 64  # limit holds first
    runner.release(sandbox)
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    started = time.monotonic()
    out, sandbox = run(runner, bomb, key="bomb", timeout_ms=1500)
    assert out.timed_out and time.monotonic() - started < 10
    assert not sandbox.healthy
    out, _ = run(runner, "print('still fine')", key="after")
    assert out.stdout == b"still fine\n"


def test_leftover_background_processes_are_killed(runner: ProcessRunner) -> None:
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
        "print(os.getpid())\n"
    )
    out, sandbox = run(runner, code, key="bg")
    assert out.exit_code == 0
    assert sandbox.cgroup is not None and sandbox.process is not None
    assert sandbox.cgroup.pids() == [sandbox.server_pid]


def test_leftovers_are_killed_by_the_agent_without_a_pid_namespace() -> None:
    """Without the namespace (whose PID 1 ends them itself) the agent kills what the run left
    in the sandbox's cgroup: here a process that left the run's process group."""
    r = ProcessRunner(make_config(warm=0), 0)
    r._as_root = False  # its sandboxes get no namespaces (and no uid of their own)
    try:
        code = (
            "import os, time\n"
            "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
            "print(os.getpid())\n"
        )
        out, sandbox = run(r, code, key="bg")
        assert out.exit_code == 0 and "pid" not in sandbox.holds
        assert sandbox.cgroup is not None
        assert sandbox.cgroup.pids() == [sandbox.server_pid]
    finally:
        r.close()


def test_functions_cannot_read_each_others_code(runner: ProcessRunner) -> None:
    assert os.geteuid() == 0, "sandbox users exist only when the agent runs as root (CI does)"
    out_a, a = run(runner, "import os\nprint(os.getcwd())\n", key="a")
    other = out_a.stdout.decode().strip()
    code = (
        f"import os\ntry:\n    os.listdir({other!r})\n    print('leak')\n"
        "except OSError:\n    print('denied')\n"
    )
    out_b, b = run(runner, code, key="b")
    assert a is not b and a.uid != b.uid
    assert out_b.stdout == b"denied\n"


def test_timeout_replaces_the_sandbox(runner: ProcessRunner) -> None:
    out, sandbox = run(runner, "import time\ntime.sleep(30)\n", key="slow", timeout_ms=300)
    assert out.timed_out and out.exit_code == -signal.SIGKILL
    assert sandbox.process is not None and sandbox.process.ended()


def test_memory_bomb_is_out_of_memory(runner: ProcessRunner) -> None:
    sandbox = runner.acquire("python", "probe")
    assert sandbox.cgroup is not None
    runner.release(sandbox)
    code = "b = []\nwhile True:\n    b.append(bytearray(8 * 2**20))\n"
    out, sandbox = run(runner, code, key="mem", memory_mb=64)
    assert out.oom_killed and not sandbox.healthy
    assert 56 * 2**20 <= out.peak_memory_bytes <= 64 * 2**20


def test_rlimit_fallback_without_cgroups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups.SandboxCgroups, "_prepare", lambda self: False)
    r = ProcessRunner(make_config(warm=0), 0)
    try:
        out, _ = run(
            r,
            "b = bytearray(100 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\n",
            key="big",
            memory_mb=512,
        )
        assert out.exit_code == 0 and out.peak_source == "rusage"
        assert 100 * 2**20 <= out.peak_memory_bytes <= 164 * 2**20
        out, _ = run(r, "b = bytearray(900 * 2**20)\n", key="oom", memory_mb=64)
        assert out.oom_killed and out.exit_code == 1
    finally:
        r.close()


def test_fork_servers_die_with_their_worker() -> None:
    """Sandboxes are forked by the worker's template, not by the worker: a worker killed
    still takes its template, and the template every sandbox. Each sandbox is its server
    alone: PID 1 of its namespace, with no keeper outside it."""
    config = make_config(warm=2)
    pid = os.fork()
    if pid == 0:
        ProcessRunner(config, 0)
        time.sleep(60)
        os._exit(0)

    two_serving = ["nanogrid: sandbox python"] * 2 + ["nanogrid: sandbox template"]

    def sandboxes() -> dict[psutil.Process, str]:
        """Each process below the worker and its title, once two sandboxes serve (and the
        empty run that primes each is over: its process has its server's title)."""
        found = {}
        for process in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error, IndexError):
                found[process] = process.cmdline()[0].split(" /")[0]
        return found if sorted(found.values()) == two_serving else {}

    try:
        processes = wait_until(sandboxes, timeout=10, what="two sandboxes serving")
    finally:  # the titles are read before: a process killed loses its command line
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    wait_until(
        lambda: not any(p.is_running() and p.status() != "zombie" for p in processes),
        timeout=5,
        what="the template and its sandboxes to exit",
    )
    assert Path(config.paths.work_dir).exists()


def test_sandboxes_made_on_demand_outlive_the_thread_that_made_them() -> None:
    """The kernel's parent-death signal follows the thread that started a fork server: a
    sandbox made for one run must still serve the next after its maker thread went idle."""
    runner = ProcessRunner(make_config(warm=0), 0)
    try:
        first, sandbox = run(runner, "print('ok')")
        time.sleep(0.3)
        again, same = run(runner, "print('ok')")
        assert first.stdout == again.stdout == b"ok\n" and same is sandbox
        assert sandbox.cold_start is False and again.exit_code == 0
    finally:
        runner.close()


def test_a_strict_umask_does_not_lock_sandboxes_out(tmp_path: Path) -> None:
    old = os.umask(0o027)  # systemd's UMask= in the unit file
    try:
        base = Path(tempfile.mkdtemp(prefix="nanogrid-umask-"))
        os.chmod(base, 0o711)
        config = from_dict(
            {
                "runner": "process",
                "workers": 1,
                "paths": {
                    "work_dir": str(base / "new" / "work"),
                    "code_cache_dir": str(tmp_path / "c"),
                    "outbox_dir": str(tmp_path / "o"),
                },
            }
        )
        r = ProcessRunner(config, 0)
        try:
            out, _ = run(r, "print('reachable')")
        finally:
            r.close()
    finally:
        os.umask(old)
    assert out.stdout == b"reachable\n"


def test_a_fork_server_the_kernel_refuses_namespaces_still_serves() -> None:
    """A server whose every unshare is refused (here: it is not root) says so and serves."""
    directory = Path(tempfile.mkdtemp(prefix="nanogrid-refused-"))  # not pytest's 0700 tmp
    os.chmod(directory, 0o777)
    python = shutil.which("python3", path="/usr/bin:/bin")  # not the agent's, under /root
    assert python is not None
    socket_path = directory / "forkserver.sock"
    ready_r, ready_w = os.pipe()
    settings = {"network": True, "tmpfs_mb": 16, "root": str(directory)}
    options = {"ready_fd": ready_w, "isolate": settings, "rlimits": {"core": 0}}
    server = subprocess.Popen(
        [python, "-I", "-S", str(FORKSERVER_SOURCE), str(socket_path), json.dumps(options)],
        pass_fds=(ready_w,), user=65534, group=65534, extra_groups=[],
    )
    os.close(ready_w)
    try:
        with os.fdopen(ready_r, "rb") as ready:
            report = json.loads(ready.readline())
        assert report["holds"] == []
        refused = "the kernel refused the namespace: Operation not permitted"
        assert report["missing"] == {
            "mount": refused, "ipc": refused, "network": refused,
            "pid": "needs the mount namespace"}
        client = ForkServerClient(socket_path)
        raw = client.run(argv=[python, "-c", "print('served')"], cwd=str(directory),
                         env={}, python=False, stdin=b"", timeout_s=10, max_output_bytes=100)
        client.close()
        assert raw.status == 0 and raw.stdout == b"served\n"
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(directory)


def test_not_root_every_namespace_is_named_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    found = ProcessRunner.isolation(make_config())
    assert set(found.missing) >= {"uid", "mount", "ipc", "network", "pid", "metadata service"}
    assert "rlimits" in found.holds
    warning = found.warning("process")
    assert warning is not None and "\n" not in warning
    assert "pid (the agent does not run as root)" in warning


def test_network_host_opts_out_of_the_network_namespace() -> None:
    r = ProcessRunner(make_config(network="host"), 0)
    try:
        out, sandbox = run(r, "print(open('/proc/net/dev').read().count(':'))")
    finally:
        r.close()
    assert "network" not in sandbox.holds and {"mount", "pid"} <= set(sandbox.holds)
    assert int(out.stdout) > 1  # the host's interfaces, not only lo


MAIN_SEMANTICS = """\
import sys
me = sys.modules['__main__']
print(__name__, __file__, sys.argv, __spec__, __package__, me.__dict__ is globals())
def fail():
    raise ValueError('boom')
fail()
"""


def test_a_warm_call_runs_its_compiled_script_as_python_would(runner: ProcessRunner) -> None:
    """The server compiles main.py once; every call still sees what ``python3 main.py`` gives,
    and code put in anew is compiled anew."""
    calls = [run(runner, MAIN_SEMANTICS, key="sem@1")[0] for _ in range(2)]
    for out in calls:
        assert out.exit_code == 1
        assert out.stdout == b"__main__ main.py ['main.py'] None  True\n"
        assert b'File "main.py", line 5, in fail' in out.stderr
        assert out.stderr.rstrip().endswith(b"ValueError: boom")
    warned = [run(runner, "print(1 is 1)\n", key="warn@1")[0] for _ in range(2)]
    for out in warned:  # compile-time warnings stay the call's own
        assert out.stdout == b"True\n" and b"SyntaxWarning" in out.stderr
    quiet = [run(runner, 'print("\\d")\n', key="escape@1")[0] for _ in range(2)]
    for out in quiet:  # a DeprecationWarning python3 does not show at all
        assert (out.stdout, out.stderr) == (b"\\d\n", b"")
    broken = [run(runner, "def (:\n", key="syntax@1")[0] for _ in range(2)]
    for out in broken:
        assert out.exit_code == 1 and b"SyntaxError" in out.stderr
    late = (
        "import threading, time\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('late'))).start()\n"
    )
    for out in [run(runner, late, key="thread@1")[0] for _ in range(2)]:
        assert out.stdout == b"late\n"  # python waits for non-daemon threads at exit
    _, sandbox = run(runner, "print('v1')\n", key="new@1")
    (sandbox.code_dir / "main.py").write_text("print('version two')\n")
    again, same = run(runner, "", key="new@1")
    assert same is sandbox and again.stdout == b"version two\n"


def test_each_warm_call_has_its_own_environment_and_nothing_else(runner: ProcessRunner) -> None:
    """The server sets each run's environment before it forks (only what changed): a call
    sees its own request id in os.environ and in the C environ, and no key of another's."""
    code = (
        "import ctypes, json, os\n"
        "c = ctypes.CDLL(None).getenv\n"
        "c.restype = ctypes.c_char_p\n"
        "print(json.dumps([dict(os.environ), c(b'NANOGRID_REQUEST_ID').decode(),"
        " c(b'NANOGRID_MEMORY_MB').decode()]))\n"
    )
    seen = []
    for request_id, memory_mb in (("first", 128), ("second", 256), ("third", 128)):
        sandbox = runner.acquire("python", "env@1")
        put_code(sandbox, {"main.py": code}, "env@1")
        invocation = Invocation(
            request_id, "f", ("python3", "main.py"), b"{}", memory_mb, 5000, 10_000, 32
        )
        try:
            out = runner.run(sandbox, invocation)
        finally:
            runner.release(sandbox)
        assert out.exit_code == 0, out.stderr
        environ, c_request_id, c_memory = json.loads(out.stdout)
        assert environ == invocation.environment(environ["PATH"], environ["HOME"])
        assert (c_request_id, c_memory) == (request_id, str(memory_mb))
        seen.append(sandbox)
    assert seen[0] is seen[1] is seen[2]  # one warm sandbox served all three


STDIO_FACTS = """\
import json, sys
facts = {}
for name in ("stdin", "stdout", "stderr"):
    s = getattr(sys, name)
    facts[name] = [s.fileno(), s.encoding, s.errors, s.line_buffering, s.seekable(),
                   s.isatty(), s is getattr(sys, "__" + name + "__")]
facts["in"] = sys.stdin.read()
print(json.dumps(facts))
"""


def test_a_warm_call_has_the_stdio_of_python3_main_py(runner: ProcessRunner) -> None:
    """The server makes the run's stdin/stdout/stderr objects before the fork; each call's
    are as ``python3 main.py`` with a pipe on each fd makes them (UTF-8, as the sandbox's
    C.UTF-8 locale gives python)."""
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "main.py").write_text(STDIO_FACTS)
        plain = subprocess.run(
            [runner.launches["python"].interpreter, "main.py"], cwd=directory, input=b"{}",
            capture_output=True, env={"LANG": "C.UTF-8"}, check=True,
        )
    expected = json.loads(plain.stdout)
    for _ in range(3):
        out, _ = run(runner, STDIO_FACTS, key="stdio@1")
        assert json.loads(out.stdout) == expected


def test_a_call_starts_with_the_default_signal_dispositions(runner: ProcessRunner) -> None:
    """Whatever the server handles or ignores itself (SIGCHLD as PID 1, SIGINT and SIGPIPE
    as Python leaves them), a call starts as a process spawned fresh (``signal_facts``)."""
    for _ in range(2):
        out, _ = run(runner, SIGNAL_FACTS, key="signals@1")
        assert_default_signals(out)


def test_a_call_starts_with_the_default_signals_whatever_its_agent_ignores() -> None:
    """SIG_IGN survives exec: a signal the agent's own starter ignored (a shell's nohup, a
    test runner) must not reach the functions through the sandboxes' servers."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    runner = ProcessRunner(make_config(), 0)
    try:
        out, _ = run(runner, SIGNAL_FACTS, key="signals@1")
        assert_default_signals(out)
    finally:
        signal.signal(signal.SIGHUP, previous)
        runner.close()


def test_a_call_that_misuses_its_stdio_leaves_the_next_call_new_ones(
    runner: ProcessRunner,
) -> None:
    """The stdio objects are made once in the server; each call gets them as new, whatever
    the call before did to its own: read part of stdin, left output unflushed, closed them."""
    code = (
        "import sys\n"
        "if sys.stdin.read(4) == 'mess':\n"
        "    sys.stdout.write('half a line')\n"
        "    sys.stderr.write('no newline')\n"
        "    sys.stdout.close()\n"
        "    sys.stdin.close()\n"
        "    raise SystemExit(0)\n"
        + STDIO_FACTS.replace("facts['in'] = sys.stdin.read()", "")
    )
    messy, first = run(runner, code, key="stdio-mess@1", stdin=b"mess and more")
    assert (messy.exit_code, messy.stdout, messy.stderr) == (0, b"half a line", b"no newline")
    out, second = run(runner, code, key="stdio-mess@1", stdin=b"calm, and the rest")
    assert second is first and out.exit_code == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["in"] == ", and the rest"  # "calm": read by the check above
    assert [facts[name][1:] for name in ("stdin", "stdout", "stderr")] == [
        ["utf-8", "surrogateescape", False, False, False, True],
        ["utf-8", "surrogateescape", False, False, False, True],
        ["utf-8", "backslashreplace", True, False, False, True],
    ]
