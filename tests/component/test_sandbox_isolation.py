"""What keeps process sandboxes apart from each other and from the host beyond their
namespaces: a uid no other live sandbox has, only their own directory of the work dir, no
world-writable host path, and the instance metadata service named where it is reachable.

The work dirs here lie below /var/lib, not /tmp: a sandbox's private /tmp would hide
everything below /tmp anyway, and production work dirs are not there either.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import agent_config, put_code

from nanogrid.common.config import Config
from nanogrid.runners import cgroups
from nanogrid.runners.base import Invocation, RunOutcome
from nanogrid.runners.process.runner import ProcessRunner, ProcessSandbox
from nanogrid.runners.process.uids import SandboxUids

PROBE_PATHS = r"""
import json, os, sys
found = {}
for name, path in json.load(sys.stdin).items():
    try:
        found[name] = sorted(os.listdir(path)) if os.path.isdir(path) else open(path).read()
    except OSError as exc:
        found[name] = type(exc).__name__
print(json.dumps(found))
"""
MAIN = {"python": ("python3", "main.py"), "node": ("node", "main.js")}
STUCK = {
    "python": "import os, time\nif os.fork() == 0:\n    os.setsid()\ntime.sleep(30)\n",
    "node": "const { spawn } = require('child_process');\n"
            "spawn('sleep', ['30'], { detached: true, stdio: 'ignore' }).unref();\n"
            "setTimeout(() => {}, 30000);\n",
}
"""A function that starts a process of its own, out of its process group, and hangs."""


@pytest.fixture(autouse=True)
def as_root() -> None:
    assert os.geteuid() == 0, "sandbox uids and namespaces need root (CI runs as root)"


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory below /var/lib that sandbox users may pass through."""
    path = Path(tempfile.mkdtemp(prefix="ng-iso-", dir="/var/lib"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_config(base: Path, runtime: str = "python", **process: Any) -> Config:
    """One worker, no warm sandboxes, and sandbox uids no other agent or test run on this
    host uses (they share the default range; what is checked here is the uid's own)."""
    uid_base = 1_000_000_000 + 1000 * int(uuid.uuid4().hex[:5], 16)
    return agent_config(
        base, runtimes={runtime: {"warm": 0}},
        process={"sandbox_uid_base": uid_base, **process},
    )


@pytest.fixture
def runner(base: Path) -> Iterator[ProcessRunner]:
    r = ProcessRunner(make_config(base), 0)
    yield r
    r.close()


def hold(runner: ProcessRunner, key: str, code: str = "print('hi')",
         runtime: str = "python") -> ProcessSandbox:
    """A sandbox of ``key`` with its code in, busy (not released) until the test ends."""
    sandbox = runner.acquire(runtime, key)
    assert isinstance(sandbox, ProcessSandbox)
    put_code(sandbox, {MAIN[runtime][1]: code}, key)
    return sandbox


def run_in(runner: ProcessRunner, sandbox: ProcessSandbox, stdin: bytes) -> RunOutcome:
    invocation = Invocation("r", "f", ("python3", "main.py"), stdin, 128, 5000, 100_000, 32)
    out = runner.run(sandbox, invocation)
    assert out.exit_code == 0, out.stderr.decode()
    return out


# -- uids -------------------------------------------------------------------------------------


def test_live_sandboxes_never_share_a_uid_past_a_workers_1000th(runner: ProcessRunner) -> None:
    """Sandbox 1000 of a worker used to get sandbox 0's uid (base + seq % 1000) while 0 was
    still live, and with it 0's code, control directory and (node) staged stdin."""
    a = hold(runner, "a@1", "print('the code of a')\n")
    runner._seq = itertools.count(1000)  # as after 1000 sandboxes made on timeouts and expiry
    b = hold(runner, "b@1", PROBE_PATHS)
    try:
        assert a.uid != b.uid and a.uid >= 0 and b.uid >= 0
        (a.root / "control" / "stdin").write_text("the input of a")
        os.chown(a.root / "control" / "stdin", a.uid, a.uid)
        paths = {"code": str(a.code_dir / "main.py"), "control": str(a.root / "control"),
                 "stdin": str(a.root / "control" / "stdin")}
        seen = json.loads(run_in(runner, b, json.dumps(paths).encode()).stdout)
        assert set(seen.values()) <= {"FileNotFoundError", "PermissionError"}, seen
    finally:
        runner.release(b)
        runner.release(a)


def test_a_destroyed_sandboxs_uid_comes_back_last(runner: ProcessRunner) -> None:
    """A uid goes back to the end of the worker's free uids: the next sandboxes get others."""
    a = hold(runner, "a@1")
    a.healthy = False  # released unhealthy: destroyed
    runner.release(a)
    fresh = [hold(runner, f"f{i}@1") for i in range(3)]
    try:
        assert a.uid not in {s.uid for s in fresh} and len({s.uid for s in fresh}) == 3
    finally:
        for sandbox in fresh:
            runner.release(sandbox)


def test_a_uid_whose_sandbox_had_no_cgroup_comes_back_only_with_its_processes_ended() -> None:
    """Without a cgroup to tell, every process of the uid is killed before it is free again
    (here one started outside any sandbox, as a leftover would be)."""
    uid = 3_900_000 + int(uuid.uuid4().hex[:4], 16)  # a range no agent or test here uses
    uids = SandboxUids(range(uid, uid + 1), worker=0)
    assert uids.take() == uid
    leftover = subprocess.Popen(["sleep", "60"], user=uid, group=uid, extra_groups=[],
                                start_new_session=True)
    try:
        uids.give_back(uid, ended=False)
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert uids.take() == uid
    finally:
        leftover.kill()
        leftover.wait()


def running_as(uid: int) -> list[int]:
    """Pids of the processes (zombies aside) whose real uid is ``uid``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            text = Path(f"/proc/{pid}/status").read_text()
            fields = dict(line.split(":", 1) for line in text.splitlines())
        except OSError:
            continue
        if fields["Uid"].split()[0] == str(uid) and fields["State"].split()[0] not in "ZX":
            found.append(int(pid))
    return found


@pytest.mark.parametrize("runtime", ["python", "node"])
def test_a_destroyed_sandbox_without_a_cgroup_leaves_nothing_of_its_uid_running(
    base: Path, monkeypatch: pytest.MonkeyPatch, runtime: str
) -> None:
    """No cgroup to kill and count them: the sandbox's uid is free again once its PID 1,
    and so every process of its namespace, is gone (here a run and its child on a timeout)."""
    monkeypatch.setattr(cgroups.SandboxCgroups, "_prepare", lambda self: False)
    r = ProcessRunner(make_config(base, runtime), 0)
    try:
        sandbox = hold(r, "stuck@1", STUCK[runtime], runtime)
        assert sandbox.cgroup is None and "pid" in sandbox.holds
        invocation = Invocation("r", "f", MAIN[runtime], b"", 128, 500, 1000, 32)
        out = r.run(sandbox, invocation)
        running = running_as(sandbox.uid)
        assert out.timed_out and sandbox.server_pid in running
        if runtime == "node":  # a python server, PID 1, ended the run's child itself
            assert len(running) >= 2  # the server, the child
        r.release(sandbox)  # timed out: destroyed
        assert running_as(sandbox.uid) == []
    finally:
        r.close()


# -- the work dir -----------------------------------------------------------------------------


WORK_DIR_VIEW = r"""
import json, os, sys
paths = json.load(sys.stdin)
def mkdir(path):
    try:
        os.mkdir(path)
        return "made"
    except OSError as exc:
        return type(exc).__name__
print(json.dumps({"exists": {name: os.path.exists(path) for name, path in paths.items()},
                  "mkdir": mkdir(paths["work"] + "/new"), "cwd": os.getcwd()}))
"""


def test_a_sandbox_sees_only_its_own_directory_of_the_work_dir(runner: ProcessRunner) -> None:
    """With the mount namespace: an empty read-only tmpfs over paths.work_dir, the sandbox's
    own directory bound back below it; another live sandbox's directory is not there."""
    a = hold(runner, "a@1")
    b = hold(runner, "b@1", WORK_DIR_VIEW)
    try:
        assert "mount" in b.holds
        paths = {"work": runner.config.paths.work_dir, "group": str(a.root.parent),
                 "a": str(a.root), "a_code": str(a.code_dir), "own": str(b.root)}
        seen = json.loads(run_in(runner, b, json.dumps(paths).encode()).stdout)
        assert seen["exists"] == {"work": True, "group": True, "a": False, "a_code": False,
                                  "own": True}
        assert seen["mkdir"] in ("OSError", "PermissionError")  # read-only tmpfs (EROFS)
        assert seen["cwd"] == str(b.code_dir)
        assert (a.code_dir / "main.py").exists()  # still there, outside
    finally:
        runner.release(b)
        runner.release(a)


def test_without_a_mount_namespace_other_sandbox_uids_are_kept_out(
    runner: ProcessRunner,
) -> None:
    """Where the kernel refuses the mount namespace, the permissions alone keep a sandbox's
    uid out of another's directory: a process of b's uid on the host's own mounts."""
    a = hold(runner, "a@1")
    b = hold(runner, "b@1")
    try:
        (a.root / "control" / "stdin").write_text("the input of a")
        os.chown(a.root / "control" / "stdin", a.uid, a.uid)
        paths = {"code": str(a.code_dir / "main.py"), "listing": str(a.code_dir),
                 "control": str(a.root / "control"), "stdin": str(a.root / "control" / "stdin"),
                 "home": str(a.home)}
        python = shutil.which("python3", path="/usr/bin:/bin")
        assert python is not None
        done = subprocess.run(
            [python, "-c", PROBE_PATHS], input=json.dumps(paths), capture_output=True,
            text=True, timeout=30, user=b.uid, group=b.uid, extra_groups=[], cwd="/",
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == dict.fromkeys(paths, "PermissionError")
    finally:
        runner.release(b)
        runner.release(a)


# -- world-writable host paths ----------------------------------------------------------------

WRITE_HOST = r"""
import json, os, sys
def attempt(action):
    try:
        action()
        return "written"
    except OSError as exc:
        return exc.strerror
paths = json.load(sys.stdin)
print(json.dumps({
    "lock": attempt(lambda: open(paths["lock"], "w").write("x")),
    "dir": attempt(lambda: open(paths["dir"] + "/new", "w").write("x")),
    "file": attempt(lambda: open(paths["file"], "a").write("x")),
    "listing": os.listdir(paths["dir"]),
}))
"""


def test_world_writable_host_paths_are_read_only_to_a_sandbox(base: Path) -> None:
    """/run/lock, and a world-writable directory and file made here before the runner
    starts: a function writes to none of them, sees nothing in the directory, and the
    host's paths are unchanged."""
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    (shared / "host-file").write_text("the host's")
    loose = base / "loose.log"
    loose.write_text("the host's log\n")
    os.chmod(loose, 0o666)
    lock = Path(f"/run/lock/ng-{uuid.uuid4().hex[:8]}")
    assert Path("/run/lock").stat().st_mode & 0o002, "this host's /run/lock is world-writable"
    r = ProcessRunner(make_config(base), 0)
    try:
        sandbox = hold(r, "w@1", WRITE_HOST)
        try:
            paths = {"lock": str(lock), "dir": str(shared), "file": str(loose)}
            seen = json.loads(run_in(r, sandbox, json.dumps(paths).encode()).stdout)
        finally:
            r.release(sandbox)
    finally:
        r.close()
    assert seen == {"lock": "Read-only file system", "dir": "Read-only file system",
                    "file": "Read-only file system", "listing": []}
    assert not lock.exists()
    assert os.listdir(shared) == ["host-file"]
    assert loose.read_text() == "the host's log\n"


# -- the instance metadata service ------------------------------------------------------------


@pytest.mark.parametrize(("network", "setting", "named"), [
    ("none", None, False),
    ("host", "blocked", False),
    ("host", "allowed", True),
])
def test_the_metadata_service_is_named_missing_where_sandboxes_reach_it(
    base: Path, network: str, setting: str | None, named: bool
) -> None:
    found = ProcessRunner.isolation(make_config(base, network=network, metadata_service=setting))
    assert ("metadata service" in found.missing) is named
    if named:
        assert found.missing["metadata service"] == (
            "functions can reach 169.254.169.254: process.metadata_service is allowed")
        warning = found.warning("process")
        assert warning is not None and "metadata service (functions can reach" in warning

