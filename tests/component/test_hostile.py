"""Hostile functions against both runners: every probe asserts that a limit holds.

Each test runs on the process runner (the agent is root here, as in CI: uids, cgroups and
namespaces) and on the Docker runner. A missing limit fails the test; nothing is skipped.
The bombs go off only after the test has checked that the sandbox has its pids or memory
limit, and the whole test process is confined to a pids cgroup (``pids_limited_tests``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from harness import (
    CONTRACT_ENV,
    MAX_FILE_BYTES,
    MAX_OPEN_FILES,
    MAX_OUTPUT,
    MAX_PIDS,
    SECRET,
    MiB,
    hostile_config,
)
from helpers import RedisServer, put_code, release_settled, unreached_listener, wait_until

from nanogrid.common.config import Config
from nanogrid.runners.base import Invocation, Runner, RunOutcome, Sandbox
from nanogrid.runners.docker import cleanup as container_cleanup
from nanogrid.runners.docker.runner import DockerRunner
from nanogrid.runners.docker.sandbox import DockerSandbox
from nanogrid.runners.process.runner import ProcessRunner, ProcessSandbox

pytestmark = pytest.mark.usefixtures("pids_limited_tests")


class Harness:
    """One runner with two warm sandboxes, used as a worker uses it."""

    def __init__(self, kind: str, runner: Runner, config: Config) -> None:
        self.kind = kind
        self.runner = runner
        self.config = config

    def run(
        self,
        code: str,
        key: str = "f@1",
        memory_mb: int = 128,
        timeout_ms: int = 5000,
        stdin: bytes = b"{}",
    ) -> tuple[RunOutcome, Sandbox]:
        sandbox = self.acquire(code, key)
        try:
            return self.runner.run(sandbox, invocation(memory_mb, timeout_ms, stdin)), sandbox
        finally:
            release_settled(self.runner, sandbox)

    def acquire(self, code: str, key: str) -> Sandbox:
        """Take a sandbox for ``key`` and put the code in as the worker does."""
        sandbox = self.runner.acquire("python", key)
        put_code(sandbox, {"main.py": code}, key)
        return sandbox

    def probe(self, code: str, key: str = "probe", **kw: Any) -> Any:
        """Run a probe that prints one JSON document; return it."""
        out, _ = self.run(code, key, **kw)
        assert out.exit_code == 0, out.stderr.decode()
        return json.loads(out.stdout)

    @property
    def sandbox_uid(self) -> int:
        return int(self.config.docker.user.split(":")[0]) if self.kind == "docker" else -1

    @property
    def tmpfs_mb(self) -> int:
        settings = self.config.docker if self.kind == "docker" else self.config.process
        return settings.tmpfs_mb

    @staticmethod
    def limits(sandbox: Sandbox) -> tuple[int, int]:
        """(pids.max, memory limit in bytes) of the sandbox's cgroup, read on the host."""
        assert isinstance(sandbox, ProcessSandbox | DockerSandbox)
        cgroup = sandbox.cgroup
        assert cgroup is not None, "the sandbox has no cgroup: no pids or memory limit"
        memory_dir = cgroup.memory.directory
        memory_file = memory_dir / "memory.limit_in_bytes"
        if not memory_file.exists():
            memory_file = memory_dir / "memory.max"
        return int((cgroup.pids_dir / "pids.max").read_text()), int(memory_file.read_text())

    @staticmethod
    def left_behind(sandbox: Sandbox) -> list[int]:
        """Processes in the sandbox besides its fork server (and docker-init)."""
        if isinstance(sandbox, DockerSandbox):
            assert sandbox.processes is not None
            return sandbox.processes.strays()
        assert isinstance(sandbox, ProcessSandbox) and sandbox.cgroup is not None
        return [pid for pid in sandbox.cgroup.pids() if pid != sandbox.server_pid]


def invocation(memory_mb: int, timeout_ms: int, stdin: bytes) -> Invocation:
    return Invocation(
        "req-hostile", "fn", ("python3", "main.py"), stdin, memory_mb, timeout_ms, MAX_OUTPUT,
        MAX_PIDS,
    )


@pytest.fixture(params=["process", "docker"])
def hostile(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    """A warm runner of each kind, started by an agent whose environment holds AWS secrets."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    base = tempfile.mkdtemp(prefix="ng-hostile-")  # short: Docker socket paths have 107 bytes
    os.chmod(base, 0o711)  # sandbox users must reach work_dir
    config = hostile_config(request.param, base)
    runner: Runner
    if request.param == "docker":
        request.getfixturevalue("runtime_image")
        agent = f"test-{uuid.uuid4().hex[:10]}"
        monkeypatch.setattr(container_cleanup, "agent_id", lambda: agent)
        runner = DockerRunner(config, 0)
    else:
        runner = ProcessRunner(config, 0)
    try:
        wait_until(
            lambda: runner.pool_stats()["python"]["warm"] == 2, timeout=30, what="warm pool"
        )
        yield Harness(request.param, runner, config)
    finally:
        runner.close()
        shutil.rmtree(base, ignore_errors=True)


# -- the network ------------------------------------------------------------------------------

CONNECT = r"""
import json, socket, sys
def attempt(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return "connected"
    except OSError as exc:
        return type(exc).__name__
print(json.dumps({str(port): attempt(port) for port in json.load(sys.stdin)}))
"""


def test_host_loopback_and_the_agents_redis_are_unreachable(
    hostile: Harness, redis_server: RedisServer
) -> None:
    with unreached_listener() as port:
        ports = [port, redis_server.port]
        seen = hostile.probe(CONNECT, stdin=json.dumps(ports).encode())
    assert seen == {str(port): "ConnectionRefusedError" for port in ports}


EGRESS = r"""
import errno, json, socket
interfaces = [line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]]
routes = [line.split() for line in open("/proc/net/route").readlines()[1:]]
sock = socket.socket()
sock.settimeout(0.2)
code = sock.connect_ex(("192.0.2.1", 9))  # TEST-NET-1: never a real host
print(json.dumps({"interfaces": interfaces, "routes": routes, "connect": code}))
"""


def test_no_interface_or_route_leads_out(hostile: Harness) -> None:
    seen = hostile.probe(EGRESS)
    assert seen["interfaces"] == ["lo"] and seen["routes"] == []
    assert seen["connect"] == errno.ENETUNREACH


# -- what other processes hold ----------------------------------------------------------------

ENVIRON = r"""
import json, os
scanned, leaked = 0, []
for pid in filter(str.isdigit, os.listdir("/proc")):
    scanned += 1
    try:
        data = open(f"/proc/{pid}/environ", "rb").read()
    except OSError:
        continue
    if b"AWS_" in data or b"nanogrid-hostile" in data:
        leaked.append(pid)
print(json.dumps({"scanned": scanned, "leaked": leaked, "own": sorted(os.environ)}))
"""


def test_no_readable_environ_holds_aws_credentials(hostile: Harness) -> None:
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET  # the agent has them
    seen = hostile.probe(ENVIRON)
    assert seen["scanned"] >= 2 and seen["leaked"] == []
    assert set(seen["own"]) == CONTRACT_ENV


PROCESSES = r"""
import json, os
pids = [p for p in os.listdir("/proc") if p.isdigit()]
print(json.dumps([open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace") for p in pids]))
"""


def test_proc_shows_only_the_sandboxes_own_processes(hostile: Harness) -> None:
    seen = hostile.probe(PROCESSES)
    # process: the fork server (PID 1) and the run; docker: docker-init, the server, the run.
    assert len(seen) == (3 if hostile.kind == "docker" else 2), seen
    assert not any("pytest" in cmdline for cmdline in seen)


SIGNAL = r"""
import json, os, signal, sys
victim = json.load(sys.stdin)
try:
    os.kill(victim, signal.SIGKILL)
    print(json.dumps("killed"))
except OSError as exc:
    print(json.dumps(type(exc).__name__))
"""


def test_processes_outside_the_sandbox_cannot_be_signalled(hostile: Harness) -> None:
    sandbox = hostile.acquire(SIGNAL, "signal")
    hostile.runner.release(sandbox)
    uid = sandbox.uid if isinstance(sandbox, ProcessSandbox) else hostile.sandbox_uid
    assert uid > 0
    # The worst case: a process outside that runs as the sandbox's own uid.
    victim = subprocess.Popen(["sleep", "60"], user=uid, group=uid, extra_groups=[])
    try:
        seen = hostile.probe(SIGNAL, "signal", stdin=json.dumps(victim.pid).encode())
        time.sleep(0.1)
        assert victim.poll() is None, "the sandbox killed a process outside it"
    finally:
        victim.kill()
        victim.wait()
    assert seen == "ProcessLookupError"


OTHERS = r"""
import json, os, sys
paths = json.load(sys.stdin)
found = {}
for name, path in paths.items():
    try:
        found[name] = os.listdir(path) if name == "listing" else open(path).read()
    except OSError as exc:
        found[name] = type(exc).__name__
print(json.dumps(found))
"""


def test_another_functions_code_and_tmp_are_out_of_reach(hostile: Harness) -> None:
    code_a = (
        "import os\nopen('/tmp/a-secret', 'w').write('tmp of a')\nprint(os.getcwd())\n"
        "# the code of a\n"
    )
    out_a, a = hostile.run(code_a, key="a@1")
    paths = {
        "code": f"{out_a.stdout.decode().strip()}/main.py",  # where a sees its code
        "host_code": str(a.code_dir / "main.py"),  # where the agent put it
        "listing": str(a.code_dir),
        "tmp": "/tmp/a-secret",
    }
    out_b, b = hostile.run(OTHERS, key="b@1", stdin=json.dumps(paths).encode())
    seen = json.loads(out_b.stdout)
    assert a is not b and out_a.exit_code == 0
    assert "the code of a" not in json.dumps(seen) and "tmp of a" not in json.dumps(seen)
    assert seen["tmp"] == "FileNotFoundError"
    assert seen["host_code"] in ("PermissionError", "FileNotFoundError")
    assert seen["listing"] in ("PermissionError", "FileNotFoundError")


# -- files ------------------------------------------------------------------------------------

WRITE_CODE = r"""
import json, os
def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno_name(exc)
def errno_name(exc):
    import errno
    return errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps({
    "append": attempt(lambda: open("main.py", "a").write("#")),
    "create": attempt(lambda: open("new.py", "w")),
    "chmod": attempt(lambda: os.chmod("main.py", 0o777)),
    "remove": attempt(lambda: os.unlink("main.py")),
}))
"""


def test_the_code_dir_is_read_only(hostile: Harness) -> None:
    seen, sandbox = hostile.run(WRITE_CODE, key="ro")
    result = json.loads(seen.stdout)
    assert all(outcome in ("EROFS", "EACCES", "EPERM") for outcome in result.values()), result
    assert (sandbox.code_dir / "main.py").read_text() == WRITE_CODE
    assert sorted(os.listdir(sandbox.code_dir)) == ["main.py"]


FILL_TMP = r"""
import errno, json, os
written, error, n = 0, None, 0
chunk = b"x" * 2**20
try:
    while written < 256 * 2**20:
        with open(f"/tmp/fill-{n}", "wb") as f:
            for _ in range(4):  # 4 MiB per file: under RLIMIT_FSIZE
                f.write(chunk)
                f.flush()
                written += len(chunk)
        n += 1
except OSError as exc:
    error = errno.errorcode[exc.errno]
st = os.statvfs("/tmp")
print(json.dumps({"written": written, "error": error, "size": st.f_blocks * st.f_frsize}))
"""


def test_filling_tmp_stops_at_its_cap(hostile: Harness) -> None:
    seen = hostile.probe(FILL_TMP, timeout_ms=20_000)
    cap = hostile.tmpfs_mb * MiB
    assert seen["error"] == "ENOSPC" and seen["size"] <= cap
    assert seen["written"] <= cap


HUGE_FILE = r"""
import errno, json, os
error = None
try:
    with open("/tmp/huge", "wb", buffering=0) as f:
        while True:
            f.write(b"x" * 2**20)
except OSError as exc:
    error = errno.errorcode[exc.errno]
print(json.dumps({"error": error, "size": os.path.getsize("/tmp/huge")}))
"""


def test_a_huge_file_stops_at_rlimit_fsize(hostile: Harness) -> None:
    seen = hostile.probe(HUGE_FILE)
    assert seen == {"error": "EFBIG", "size": MAX_FILE_BYTES}


OPEN_FILES = r"""
import errno, json, os
fds, error = [], None
try:
    while len(fds) < 1_000_000:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as exc:
    error = errno.errorcode[exc.errno]
print(json.dumps({"error": error, "opened": len(fds)}))
"""


def test_file_descriptors_stop_at_rlimit_nofile(hostile: Harness) -> None:
    seen = hostile.probe(OPEN_FILES)
    assert seen["error"] == "EMFILE" and seen["opened"] < MAX_OPEN_FILES


RLIMITS = r"""
import json, resource
def raise_limit(name):
    limit = getattr(resource, name)
    try:
        resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        return "raised"
    except (OSError, ValueError) as exc:
        return type(exc).__name__
print(json.dumps({
    "core": resource.getrlimit(resource.RLIMIT_CORE),
    "raise": {n: raise_limit(n) for n in ("RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_NOFILE")},
}))
"""


def test_no_core_dumps_and_the_rlimits_cannot_be_raised(hostile: Harness) -> None:
    seen = hostile.probe(RLIMITS)
    assert seen["core"] == [0, 0]
    assert seen["raise"] == dict.fromkeys(("RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_NOFILE"),
                                          "ValueError")


ROOT = r"""
import json, os
try:
    os.setuid(0)
    print(json.dumps("root"))
except OSError as exc:
    print(json.dumps([os.getuid(), type(exc).__name__]))
"""


def test_a_function_cannot_become_root(hostile: Harness) -> None:
    seen = hostile.probe(ROOT)
    assert seen != "root" and seen[0] != 0 and seen[1] == "PermissionError"


# -- processes and memory ---------------------------------------------------------------------

FORK_BOMB = (
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
)


def test_a_fork_bomb_is_contained(hostile: Harness) -> None:
    sandbox = hostile.acquire(FORK_BOMB, "bomb")
    hostile.runner.release(sandbox)
    pids_max, _ = hostile.limits(sandbox)
    assert pids_max <= MAX_PIDS + 2  # the limit holds before the bomb goes off
    started = time.monotonic()
    out, bombed = hostile.run(FORK_BOMB, "bomb", timeout_ms=1500)
    assert bombed is sandbox and out.timed_out and time.monotonic() - started < 10
    assert not bombed.healthy
    assert subprocess.run(["true"], timeout=10).returncode == 0  # the host can still fork
    after, fresh = hostile.run("print('still fine')", key="after")
    assert after.stdout == b"still fine\n" and fresh is not sandbox


MEMORY_BOMB = (
    "import sys\nif sys.stdin.read() == 'bomb':\n    b = []\n"
    "    while True:\n        b.append(bytearray(8 * 2**20))\n"
)


def test_a_memory_bomb_is_out_of_memory(hostile: Harness) -> None:
    _, sandbox = hostile.run(MEMORY_BOMB, key="mem", memory_mb=64)
    assert hostile.limits(sandbox)[1] == 64 * MiB  # the limit holds before the bomb goes off
    out, bombed = hostile.run(MEMORY_BOMB, key="mem", memory_mb=64, stdin=b"bomb")
    assert bombed is sandbox and out.oom_killed and not out.timed_out
    assert out.peak_memory_bytes <= 64 * MiB and not bombed.healthy


DAEMON = r"""
import os, signal, sys, time
if sys.stdin.read() == "check":
    before = os.path.getsize("/tmp/beat")
    time.sleep(0.3)
    print(before, os.path.getsize("/tmp/beat"))
    sys.exit()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        while True:
            with open("/tmp/beat", "a") as f:
                f.write(".")
            time.sleep(0.01)
    os._exit(0)
time.sleep(0.1)
print("started")
"""


def test_a_daemon_does_not_outlive_its_run(hostile: Harness) -> None:
    out, sandbox = hostile.run(DAEMON, key="daemon")
    assert out.stdout == b"started\n" and sandbox.healthy
    assert hostile.left_behind(sandbox) == []
    check, again = hostile.run(DAEMON, key="daemon", stdin=b"check")
    before, after = map(int, check.stdout.split())
    assert again is sandbox and before > 0 and before == after  # nothing beats any more


FLOOD = (
    "import sys\nchunk = b'x' * 2**16\nfor _ in range(1024):\n    sys.stdout.buffer.write(chunk)\n"
)


def test_a_stdout_flood_is_cut_at_the_cap(hostile: Harness) -> None:
    started = time.monotonic()
    out, sandbox = hostile.run(FLOOD, key="flood", timeout_ms=20_000)
    assert out.exit_code == 0 and not out.timed_out
    assert out.stdout_truncated and len(out.stdout) == MAX_OUTPUT
    assert time.monotonic() - started < 15 and sandbox.healthy


STUBBORN = (
    "import signal, time\n"
    "for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
    "    signal.signal(sig, signal.SIG_IGN)\n"
    "while True:\n    time.sleep(0.01)\n"
)


def test_ignoring_sigterm_does_not_outlast_the_timeout(hostile: Harness) -> None:
    started = time.monotonic()
    out, sandbox = hostile.run(STUBBORN, key="stubborn", timeout_ms=500)
    assert out.timed_out and out.exit_code == -signal.SIGKILL
    assert time.monotonic() - started < 3 and not sandbox.healthy


CGROUP = r"""
import json, os, sys
if sys.stdin.read() == "noop":
    sys.exit()
paths = {}
for line in open("/proc/self/cgroup").read().splitlines():
    _, controllers, path = line.split(":", 2)
    for controller in controllers.split(",") if controllers else [""]:
        paths[controller] = path
targets = []
for controller, files in (("memory", ["memory.limit_in_bytes", "memory.max", "cgroup.procs"]),
                          ("pids", ["pids.max", "cgroup.procs"]), ("", ["memory.max", "pids.max"])):
    top = "/sys/fs/cgroup/" + controller
    for base in {top, top + paths.get(controller, "/")}:
        targets += [os.path.join(base, name) for name in files]
outcomes = {}
for target in targets:
    if not os.path.exists(target):
        continue
    try:
        with open(target, "w") as f:
            f.write(str(os.getpid()) if target.endswith("procs") else "max")
        outcomes[target] = "written"
    except OSError as exc:
        outcomes[target] = type(exc).__name__
print(json.dumps(outcomes))
"""


def test_a_function_cannot_change_its_own_cgroup_limits(hostile: Harness) -> None:
    _, sandbox = hostile.run(CGROUP, key="cgroup", memory_mb=64, stdin=b"noop")
    before = hostile.limits(sandbox)
    seen = hostile.probe(CGROUP, key="cgroup", memory_mb=64)
    assert seen and "written" not in seen.values(), seen
    assert hostile.limits(sandbox) == before == (before[0], 64 * MiB)



# -- SysV IPC ---------------------------------------------------------------------------------

SYSV = r"""
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmat.restype = ctypes.c_void_p
seen = {kind: len(open(f"/proc/sysvipc/{kind}").readlines()) - 1 for kind in ("shm", "sem", "msg")}
key = int(sys.stdin.read())
flags = 0o1000 | 0o2000 | 0o600  # IPC_CREAT | IPC_EXCL, rw for its owner
size = 48 * 2**20
made = [libc.shmget(key, size, flags), libc.semget(key, 1, flags), libc.msgget(key, flags)]
address = libc.shmat(made[0], None, 0)
if min(made) < 0 or address in (None, 2**64 - 1):
    sys.exit(f"errno {ctypes.get_errno()}")
ctypes.memset(address, 1, size)  # 48 MB charged to the sandbox's memory
print(json.dumps({"before": seen, "made": made}))
"""

IN_NAMESPACE = r"""
import ctypes, json, os, sys
fd = os.open(f"/proc/{sys.argv[1]}/ns/ipc", os.O_RDONLY)
if ctypes.CDLL(None, use_errno=True).setns(fd, 0x08000000) != 0:  # CLONE_NEWIPC
    sys.exit(f"setns: errno {ctypes.get_errno()}")
print(json.dumps({kind: open(f"/proc/sysvipc/{kind}").readlines()[1:]
                  for kind in ("shm", "sem", "msg")}))
"""
"""The SysV objects of the IPC namespace of the process ``argv[1]``, read from the host."""


def host_ipc_keys() -> set[int]:
    """The keys of the SysV objects in the host's own IPC namespace (this test's)."""
    return {
        int(line.split()[0])
        for kind in ("shm", "sem", "msg")
        for line in open(f"/proc/sysvipc/{kind}").readlines()[1:]
    }


def test_sysv_ipc_a_run_leaves_is_gone_after_it(hostile: Harness) -> None:
    """A run's SysV shared memory (48 MB, touched), semaphores and message queues do not
    outlive it: the next run in the same sandbox finds none and has its whole memory limit
    (3 runs of 48 MB at 96 MB), none is left in the sandbox's namespace, and the host's own
    namespace never sees them."""
    first_key = 0x4E470000 + int(uuid.uuid4().hex[:4], 16)
    keys = set(range(first_key, first_key + 3))
    first = None
    for key in sorted(keys):
        out, sandbox = hostile.run(SYSV, key="sysv", memory_mb=96, stdin=str(key).encode())
        assert out.exit_code == 0 and not out.oom_killed, out.stderr.decode()
        seen = json.loads(out.stdout)
        assert seen["before"] == {"shm": 0, "sem": 0, "msg": 0}  # nothing of the run before
        assert out.peak_memory_bytes >= 48 * MiB
        first = first or sandbox
        assert sandbox is first and sandbox.healthy  # one warm sandbox ran all three
    if isinstance(sandbox, ProcessSandbox):
        pid = sandbox.server_pid
    else:
        assert isinstance(sandbox, DockerSandbox) and sandbox.container is not None
        pid = sandbox.container.attrs["State"]["Pid"]
    assert os.readlink(f"/proc/{pid}/ns/ipc") != os.readlink("/proc/self/ns/ipc")
    looked = subprocess.run(["python3", "-c", IN_NAMESPACE, str(pid)], capture_output=True,
                            text=True, timeout=30)
    assert looked.returncode == 0, looked.stderr
    assert json.loads(looked.stdout) == {"shm": [], "sem": [], "msg": []}
    assert not keys & host_ipc_keys()
