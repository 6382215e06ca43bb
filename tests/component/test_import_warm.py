"""Import-warm sandboxes on both runners: after a sandbox's first run its server holds the
function's imports, so later calls do not pay for them; module state stays per call; what
would not import cleanly in the server is left out; the peak stays the run's own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    RUNTIME_IMAGE,
    agent_config,
    idle_cpu_seconds,
    put_code,
    release_settled,
    wait_settled,
    wait_until,
)

from nanogrid.common.errors import SandboxError
from nanogrid.runners import cgroups, freezer
from nanogrid.runners.base import Invocation, Runner, RunOutcome, Sandbox
from nanogrid.runners.cgroups import SandboxCgroups
from nanogrid.runners.docker import DockerRunner
from nanogrid.runners.docker import cgroup as container_cgroup
from nanogrid.runners.forkclient import FORKSERVER_SOURCE, ForkServerClient
from nanogrid.runners.process import ProcessRunner

pytestmark = pytest.mark.usefixtures("containers_agent")

MiB = 2**20

HEAVY = (  # a dependency that takes a while to import and holds 24 MiB once imported
    "import os, time\n"
    "time.sleep(0.3)\n"
    "PID = os.getpid()\n"
    "BLOB = bytearray(24 * 2**20)\n"
    "for i in range(0, len(BLOB), 4096):\n    BLOB[i] = 1\n"
)
STATE = "CALLS = []\n"
PICKY = (
    "import os, sys\nif sys.argv[0] != 'main.py':\n    raise RuntimeError('only in a call')\n"
    "PID = os.getpid()\n"
)
THREADED = (
    "import os, threading\nthreading.Thread(target=lambda: None, daemon=True).start()\n"
    "PID = os.getpid()\n"
)
ENVY = "import os\nFUNCTION = os.environ.get('NANOGRID_FUNCTION_ID')\nPID = os.getpid()\n"
SLOW = "import os, sys, time\nif sys.argv[0] != 'main.py':\n    time.sleep(60)\nPID = os.getpid()\n"
MAIN = """import json, os, sys
import heavy, state, picky, threaded, envy, slow
state.CALLS.append(1)
extra = bytearray(json.load(sys.stdin).get("extra_mb", 0) * 2**20)
for i in range(0, len(extra), 4096):
    extra[i] = 1
me = os.getpid()
print(json.dumps({
    "heavy": heavy.PID, "me": me, "calls": len(state.CALLS),
    "per_call": [m.PID == me for m in (picky, threaded, envy, slow)], "env": envy.FUNCTION,
}))
"""
FILES = {
    "main.py": MAIN, "heavy.py": HEAVY, "state.py": STATE, "picky.py": PICKY,
    "threaded.py": THREADED, "envy.py": ENVY, "slow.py": SLOW,
}

SHADOWS = ("_nanogrid_forkserver", "child", "preload", "reaping", "sandbox", "server")
"""The fork server's modules, by the names they have in a sandbox and in
nanogrid/runners/forkserver/."""
SHADOWING = {
    "main.py": f"""import json, os, sys
import {", ".join(SHADOWS)}
shipped = ({", ".join(SHADOWS)})
print(json.dumps({{
    "who": [m.WHO for m in shipped], "preloaded": [m.PID != os.getpid() for m in shipped],
    "cwd": os.getcwd(), "path": sys.path,
    "named": {{n: getattr(m, "__file__", None)
               for n, m in sys.modules.items() if "forkserver" in n}},
}}))
""",
    **{f"{name}.py": "import os\nWHO = 'function'\nPID = os.getpid()\n" for name in SHADOWS},
}

def config_for(kind: str, work: str, preload: bool) -> Any:
    return agent_config(
        work, kind, runtimes={"python": {"image": RUNTIME_IMAGE, "warm": 1, "preload": preload}},
        limits={"max_pids": 32},
    )


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        request.getfixturevalue("engine")
    return request.param


def make_runner(kind: str, preload: bool = True) -> Iterator[Runner]:
    work = tempfile.mkdtemp(prefix="ng-iw-")  # short: socket paths have 107 bytes
    os.chmod(work, 0o711)
    config = config_for(kind, work, preload)
    runner = ProcessRunner(config, 0) if kind == "process" else DockerRunner(config, 0)
    try:
        yield runner
    finally:
        runner.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def runner(kind: str) -> Iterator[Runner]:
    yield from make_runner(kind)


def call(
    runner: Runner, files: dict[str, str], key: str = "f@1", **stdin: Any
) -> tuple[RunOutcome, Any]:
    """One call of MAIN-like code; (outcome, the function's JSON line)."""
    out = run(runner, files, key, json.dumps(stdin).encode())
    assert out.exit_code == 0, out.stderr.decode()
    return out, json.loads(out.stdout)


def run(runner: Runner, files: dict[str, str], key: str, stdin: bytes) -> RunOutcome:
    """One run as the worker makes it; then the sandbox settles (its server preloads after a
    first run) before the next call comes."""
    out, sandbox, _ = released(runner, files, key, stdin)
    wait_settled(sandbox)
    return out


def released(
    runner: Runner, files: dict[str, str], key: str, stdin: bytes
) -> tuple[RunOutcome, Sandbox, float]:
    """One run as the worker makes it: acquire, code in unless there, run, release as the
    result is in. (outcome, its sandbox, seconds the run took to return)."""
    sandbox = runner.acquire("python", key)
    try:
        put_code(sandbox, files, key)
        invocation = Invocation("r", "fn", ("python3", "main.py"), stdin, 256, 10_000, 10_000, 32)
        started = time.monotonic()
        out = runner.run(sandbox, invocation)
        return out, sandbox, time.monotonic() - started
    finally:
        runner.release(sandbox)


def test_a_first_call_does_not_wait_for_its_imports_to_be_preloaded(runner: Runner) -> None:
    """Its result is in as its run ends; the preload (heavy's import: 0.3 s in the vetting
    helper, 0.3 s in the server) follows, with the sandbox off the board until it is done,
    and does not count in the run's peak."""
    out, sandbox, took_s = released(runner, FILES, "f@1", b"{}")
    assert out.exit_code == 0, out.stderr.decode()
    assert took_s - out.duration_ms / 1000 < 0.25  # not the preload's 0.6 s
    assert sandbox.settling  # its server preloads heavy: no call may take it yet
    wait_settled(sandbox)
    assert sandbox.healthy
    warm, seen = call(runner, FILES)
    assert seen["heavy"] != seen["me"] and warm.duration_ms < 300  # heavy's import sleeps 0.3 s
    assert out.peak_memory_bytes < warm.peak_memory_bytes + 12 * MiB


def test_a_first_run_with_nothing_new_to_preload_does_not_settle(runner: Runner) -> None:
    """What it imported the server holds already (the template's modules): the sandbox is
    back for the next call as its result is, with no word to wait for."""
    main = {"main.py": "import json, os, sys\nprint(len(sys.argv))\n"}
    out, sandbox, _ = released(runner, main, "plain@1", b"")
    assert out.exit_code == 0 and out.stdout == b"1\n"
    assert not sandbox.settling and sandbox.healthy


def test_imports_are_paid_once_per_sandbox_and_state_stays_per_call(runner: Runner) -> None:
    first, seen = call(runner, FILES)
    assert seen["heavy"] == seen["me"] and first.duration_ms >= 300  # imported in the run
    importers = set()
    for _ in range(3):
        out, again = call(runner, FILES)
        assert again["heavy"] != again["me"]  # imported by the server, not by this call
        importers.add(again["heavy"])
        assert out.duration_ms < 300  # not heavy's import: that alone sleeps 300 ms
        assert again["calls"] == 1  # a fresh copy of the module every call
    assert len(importers) == 1  # once per sandbox


def test_modules_that_would_not_import_cleanly_in_the_server_stay_per_call(
    runner: Runner,
) -> None:
    call(runner, FILES)
    for _ in range(2):
        _, seen = call(runner, FILES)
        # failing, thread-starting, environment-reading and hanging imports: in every call
        assert seen["per_call"] == [True, True, True, True]
        assert seen["env"] == "fn"


def test_peak_memory_stays_per_invocation(runner: Runner) -> None:
    first, _ = call(runner, FILES)
    warm, _ = call(runner, FILES)
    big, _ = call(runner, FILES, extra_mb=48)
    after, _ = call(runner, FILES)
    assert first.peak_memory_bytes >= 24 * MiB and warm.peak_memory_bytes >= 24 * MiB
    assert abs(warm.peak_memory_bytes - first.peak_memory_bytes) < 12 * MiB
    assert big.peak_memory_bytes >= warm.peak_memory_bytes + 44 * MiB
    assert after.peak_memory_bytes < warm.peak_memory_bytes + 12 * MiB


def test_preload_off_imports_in_every_call(kind: str) -> None:
    for runner in make_runner(kind, preload=False):
        for _ in range(3):
            out, seen = call(runner, FILES)
            assert seen["heavy"] == seen["me"] and out.duration_ms >= 300


def test_another_function_never_sees_the_first_ones_modules(runner: Runner) -> None:
    files = {"main.py": "import shared\nprint(shared.WHO)\n", "shared.py": "WHO = 'f'\n"}
    for _ in range(2):
        assert call_text(runner, files, "f@1") == "f"
    other = {**files, "shared.py": "WHO = 'g'\n"}
    assert call_text(runner, other, "g@1") == "g"
    assert call_text(runner, files, "f@1") == "f"


def test_a_functions_module_named_like_the_servers_is_its_own(runner: Runner) -> None:
    """The server's modules are off the function's sys.path and out of its sys.modules, and
    preloading takes the function's modules of those names for what they are."""
    for preloaded in ([False] * 6, [True] * 6):
        _, seen = call(runner, SHADOWING)
        assert seen["who"] == ["function"] * 6
        assert seen["preloaded"] == preloaded
        assert seen["path"][0] == seen["cwd"] and len(seen["path"]) == 4  # + the stdlib's 3
        assert [entry for entry in seen["path"] if "forkserver" in entry] == []
        assert seen["named"] == {
            "_nanogrid_forkserver": os.path.join(seen["cwd"], "_nanogrid_forkserver.py")}

SPINNER = """import os, threading
def spin():
    while True:
        pass
# What the vetting helper never sees: it is neither PID 1 of its namespace (process runner)
# nor docker-init's child (Docker); the server is.
IN_SERVER = {in_server}
if IN_SERVER:
    threading.Thread(target=spin, daemon=True).start()
ANSWER = 42
"""
SPINNING = {
    "main.py": "import json, sys, spinner\n"
    "print(json.dumps({'answer': spinner.ANSWER * json.load(sys.stdin)['times'],"
    " 'in_server': spinner.IN_SERVER}))\n",
}


CGROUP = Path("/sys/fs/cgroup")
FREEZERS = [
    version
    for version, mounted in (
        ("v1", (CGROUP / "freezer" / "cgroup.procs").exists()),
        ("v2", any((t / "cgroup.controllers").exists() for t in (CGROUP, CGROUP / "unified"))),
    )
    if mounted
]
"""The freezers this host has: v1's freezer hierarchy (what a host that mounts it uses) and a
cgroup2 tree (what a v2 host uses); a hybrid host has both."""


@pytest.fixture(params=FREEZERS)
def freezing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Sandboxes made from now on get this freezer (as on a host that has only it)."""
    v2 = request.param == "v2"

    def only(paths: dict[str, str]) -> tuple[Path, bool] | None:
        return freezer.freezer_of({name: path for name, path in paths.items() if v2 == (not name)})

    monkeypatch.setattr(cgroups, "freezer_of", only)
    monkeypatch.setattr(container_cgroup, "freezer_of", only)
    return request.param


def test_a_module_that_spins_only_in_the_server_uses_no_cpu_while_idle(
    freezing: str, kind: str
) -> None:
    """Its thread runs only while a run of its function is in flight: the sandbox is frozen
    between runs, and its later calls are still right."""
    in_server = "os.getpid() == 1" if kind == "process" else "os.getppid() == 1"
    files = {**SPINNING, "spinner.py": SPINNER.format(in_server=in_server)}
    seen = []
    for runner in make_runner(kind):  # made after ``freezing`` chose the freezer
        for times in (1, 2, 3):
            sandbox = runner.acquire("python", "spin@1")
            try:
                put_code(sandbox, files, "spin@1")
                stdin = json.dumps({"times": times}).encode()
                invocation = Invocation("r", "fn", ("python3", "main.py"), stdin, 256, 10_000,
                                        10_000, 32)
                out = runner.run(sandbox, invocation)
            finally:
                release_settled(runner, sandbox)  # idle once back on the board, frozen
            assert out.exit_code == 0, out.stderr.decode()
            seen.append(json.loads(out.stdout))
            assert idle_cpu_seconds(sandbox) < 0.05, "the sandbox ran while idle"
    # The first call imported it itself; the server then did, and started the thread there.
    assert seen == [{"answer": 42 * n, "in_server": n > 1} for n in (1, 2, 3)]


AGENT = """import json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
from loguru import logger
logger.remove()
from nanogrid.common.config import from_dict
from nanogrid.runners import cgroups, freezer
from nanogrid.runners.base import Invocation
from nanogrid.runners.process import ProcessRunner
work = sys.argv[1]
v2 = sys.argv[3] == "v2"  # as the freezing fixture does
cgroups.freezer_of = lambda paths: freezer.freezer_of(
    {name: path for name, path in paths.items() if v2 == (not name)})
config = from_dict({"runner": "process", "workers": 1, "runtimes": {"python": {"warm": 1}},
    "paths": {"work_dir": f"{work}/w", "code_cache_dir": f"{work}/c", "outbox_dir": f"{work}/o"}})
runner = ProcessRunner(config, 0)
sandbox = runner.acquire("python", "spin@1")
for name, text in json.loads(sys.argv[2]).items():
    (sandbox.code_dir / name).write_text(text)
sandbox.code_key = "spin@1"
invocation = Invocation("r", "fn", ("python3", "main.py"), b'{"times": 1}', 256, 10_000, 10_000, 32)
assert runner.run(sandbox, invocation).exit_code == 0
runner.release(sandbox)
while sandbox.settling:  # its server preloads (a vetting helper comes and goes), then freezes
    time.sleep(0.01)
print(json.dumps(sandbox.cgroup.pids()), flush=True)
sys.stdin.read()
"""


def test_a_frozen_sandbox_dies_with_its_agent(freezing: str) -> None:
    """A worker killed with SIGKILL leaves no sandbox behind, frozen ones included: each dies
    of its death signal (v2's freezer lets a SIGKILL through), or, frozen by v1's, is killed
    and thawed by the guard the worker left (nanogrid.runners.freezer.thaw_guard)."""
    files = {**SPINNING, "spinner.py": SPINNER.format(in_server="os.getpid() == 1")}
    work = tempfile.mkdtemp(prefix="ng-iw-")  # sandbox users traverse it
    os.chmod(work, 0o711)
    worker = subprocess.Popen(
        [sys.executable, "-c", AGENT, work, json.dumps(files), freezing],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).parents[2],
    )
    try:
        assert worker.stdout is not None
        pids = json.loads(worker.stdout.readline())
        assert pids and all(Path(f"/proc/{pid}").exists() for pid in pids)
    finally:
        worker.kill()
        worker.wait()
    try:
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), timeout=5,
                   what="the frozen sandbox to die with its agent")
    finally:
        SandboxCgroups.remove_stale()  # its cgroups, made by a worker that is gone
        shutil.rmtree(work, ignore_errors=True)


FORGER = """import os, socket, threading, time
def forge():
    time.sleep(0.5)  # past the first call, which then ends as it should
    while True:  # on every socket of the server: the agent's connection is one
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{{fd}}").startswith("socket:"):
                    with socket.socket(fileno=os.dup(int(fd))) as sock:
                        sock.send({packet!r})
            except OSError:
                pass
        time.sleep(0.001)
if {in_server}:
    threading.Thread(target=forge, daemon=True).start()
"""


@pytest.mark.parametrize("packet", [b"\xff" * 100, b'{"forged": true}'], ids=["junk", "json"])
def test_a_reply_forged_by_a_preloaded_module_ends_its_run_as_a_sandbox_error(
    kind: str, runner: Runner, packet: bytes
) -> None:
    """A module in the server may write on the agent's connection while a run of its function
    is in flight: any packet but the run's reply ends that run, and the sandbox is replaced."""
    in_server = "os.getpid() == 1" if kind == "process" else "os.getppid() == 1"
    files = {
        "main.py": "import time, forger\ntime.sleep(0.2)\nprint('done')\n",
        "forger.py": FORGER.format(in_server=in_server, packet=packet),
    }
    assert call_text(runner, files, "forge@1") == "done"  # then the server imports forger
    time.sleep(0.6)  # its thread's sleep is over by the next run
    sandbox = runner.acquire("python", "forge@1")
    try:
        invocation = Invocation("r", "fn", ("python3", "main.py"), b"", 256, 10_000, 10_000, 32)
        started = time.monotonic()
        with pytest.raises(SandboxError, match="a message it never sends"):
            runner.run(sandbox, invocation)
        assert time.monotonic() - started < 5
    finally:
        runner.release(sandbox)
    assert not sandbox.healthy
    assert call_text(runner, files, "forge@1") == "done"  # in a new sandbox


def call_text(runner: Runner, files: dict[str, str], key: str) -> str:
    out = run(runner, files, key, b"{}")
    assert out.exit_code == 0, out.stderr.decode()
    return out.stdout.decode().strip()


def test_a_server_never_lends_one_keys_modules_to_another(tmp_path: Path) -> None:
    """The runners keep one function per sandbox; the server holds to it on its own, too."""
    (tmp_path / "main.py").write_text("import shared\nprint(shared.WHO)\n")
    (tmp_path / "shared.py").write_text("WHO = 'f'\n")
    socket_path = tmp_path / "forkserver.sock"
    server = subprocess.Popen(
        [sys.executable, "-I", "-S", str(FORKSERVER_SOURCE), str(socket_path)]
    )
    try:
        client = ForkServerClient(socket_path)

        def once(key: str) -> bytes:
            raw = client.run(argv=["python3", "main.py"], cwd=str(tmp_path), env={},
                             python=True, stdin=b"", timeout_s=10, max_output_bytes=100,
                             preload=key)
            return raw.stdout

        assert once("f@1") == b"f\n" and once("f@1") == b"f\n"  # the second one preloaded
        (tmp_path / "shared.py").write_text("WHO = 'g'  # a new size: the pyc is stale\n")
        assert once("g@1") == b"g\n"
        client.close()
    finally:
        server.kill()
        server.wait()
