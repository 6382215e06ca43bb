"""Process sandboxes forked from the worker's warm template (nanogrid/runners/process/template.py):
a cold sandbox is a fork, not an interpreter start, and keeps every isolation it had."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import agent_config, put_code, scratch_dir, wait_until

from nanogrid.runners import cgroups, freezer
from nanogrid.runners.base import Invocation
from nanogrid.runners.process.runner import ProcessRunner, ProcessSandbox

CGROUP = Path("/sys/fs/cgroup")
TEMPLATE = "nanogrid: sandbox template"
FREEZERS = [
    version
    for version, mounted in (
        ("v1", (CGROUP / "freezer" / "cgroup.procs").exists()),
        ("v2", any((t / "cgroup.controllers").exists() for t in (CGROUP, CGROUP / "unified"))),
    )
    if mounted
]
"""v2: the server is born in its cgroup2 directory (clone3's CLONE_INTO_CGROUP); v1 alone: it
is forked and joins each hierarchy itself. A hybrid host has both."""

PROBE = """import json, os, resource
found = os.path.exists('/tmp/mine')
open('/tmp/mine', 'w').write(os.environ['NANOGRID_FUNCTION_ID'])
print(json.dumps({
    'found': found,
    'uid': os.getuid(),
    'ns': {n: os.readlink(f'/proc/self/ns/{n}') for n in ('ipc', 'mnt', 'pid', 'net')},
    'nofile': resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    'tmpfs': any(line.split()[4] == '/tmp' and ' - tmpfs ' in line
                 for line in open('/proc/self/mountinfo')),
}))
"""


@pytest.fixture(params=FREEZERS)
def runner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[ProcessRunner]:
    """A runner with no warm sandboxes (each acquire is a cold create) and the freezer of
    ``request.param`` only, as on a host that has only it."""
    v2 = request.param == "v2"

    def only(paths: dict[str, str]) -> tuple[Path, bool] | None:
        return freezer.freezer_of({name: path for name, path in paths.items() if v2 == (not name)})

    monkeypatch.setattr(cgroups, "freezer_of", only)
    config = agent_config(scratch_dir("nanogrid-work-"), runtimes={"python": {"warm": 0}})
    made = ProcessRunner(config, 0)
    yield made
    made.close()


@contextlib.contextmanager
def cold(runner: ProcessRunner, key: str, files: dict[str, str] | None = None
         ) -> Iterator[ProcessSandbox]:
    """A new sandbox holding ``files`` (PROBE as main.py), released after the block."""
    sandbox = runner.acquire("python", key)
    assert isinstance(sandbox, ProcessSandbox)
    put_code(sandbox, files or {"main.py": PROBE}, key)
    try:
        yield sandbox
    finally:
        runner.release(sandbox)


def call(runner: ProcessRunner, sandbox: ProcessSandbox) -> str:
    """Run the sandbox's main.py; its stdout."""
    invocation = Invocation("r", sandbox.code_key.split("@")[0], ("python3", "main.py"), b"{}",
                            96, 5000, 10_000, 32)
    out = runner.run(sandbox, invocation)
    assert out.exit_code == 0, out.stderr.decode()
    return out.stdout.decode()


def template_of(sandbox: ProcessSandbox) -> psutil.Process:
    """The template the sandbox's server was forked from (one of its ancestors)."""
    found = [p for p in psutil.Process(sandbox.server_pid).parents()
             if p.cmdline()[:1] and p.cmdline()[0].startswith(TEMPLATE)]
    assert len(found) == 1, "the sandbox was not forked from a template"
    return found[0]


def cgroup_lines(pid: int) -> dict[str, str]:
    """Hierarchy ("" for cgroup2) -> the process's cgroup in it."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return {c: path for _, controllers, path in (line.split(":", 2) for line in lines)
            for c in (controllers.split(",") if controllers else [""])}


def test_cold_sandboxes_are_forks_of_one_template(runner: ProcessRunner) -> None:
    """Every cold sandbox of a worker comes from the same running interpreter: the template
    is this worker's child, started once, and no sandbox's server is a new program."""
    with cold(runner, "a@1") as a, cold(runner, "b@1") as b:
        call(runner, a)
        call(runner, b)
        template = template_of(a)
        assert template_of(b).pid == template.pid
        assert template.ppid() == os.getpid()
        for sandbox in (a, b):
            server = psutil.Process(sandbox.server_pid)
            assert server.exe() == template.exe()
            assert server.create_time() >= template.create_time()


def nspid(pid: int) -> list[int]:
    """The process's pid in each PID namespace it is in, the host's first."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("NSpid:"))
    return [int(n) for n in line.split()[1:]]


def test_a_sandbox_is_its_server_alone_pid_1_of_its_namespace(runner: ProcessRunner) -> None:
    """The template forks the sandbox's server as PID 1 of a new PID namespace: no process of
    the sandbox's stays outside it (a keeper, once), the worker's handle on the sandbox is
    its server, and killing that ends the sandbox."""
    assert os.geteuid() == 0, "sandboxes are isolated only when the agent runs as root (CI)"
    with cold(runner, "alone@1") as sandbox:
        call(runner, sandbox)
        server = psutil.Process(sandbox.server_pid)
        assert sandbox.process is not None and sandbox.process.pid == server.pid
        assert server.ppid() == template_of(sandbox).pid
        assert nspid(server.pid) == [server.pid, 1] and "pid" in sandbox.holds
        theirs = [p.pid for p in psutil.process_iter(["uids"])
                  if p.info["uids"] and p.info["uids"].real == sandbox.uid]
        assert theirs == [server.pid]
        sandbox.process.kill()
        assert sandbox.process.wait(5)  # its pidfd: the server has exited


def test_forked_sandboxes_keep_their_isolation(runner: ProcessRunner) -> None:
    """Two sandboxes forked from one template: a uid each, namespaces of their own (not the
    template's), their own cgroups in every hierarchy with their limits, the rlimits, and a
    private /tmp."""
    assert os.geteuid() == 0, "sandboxes are isolated only when the agent runs as root (CI)"
    with cold(runner, "a@1") as sa, cold(runner, "b@1") as sb:
        a, b = json.loads(call(runner, sa)), json.loads(call(runner, sb))
        template = template_of(sa)
        assert a["uid"] == sa.uid and b["uid"] == sb.uid and len({0, a["uid"], b["uid"]}) == 3
        for name in ("ipc", "mnt", "pid", "net"):
            theirs = os.readlink(f"/proc/{template.pid}/ns/{name}")
            assert len({theirs, a["ns"][name], b["ns"][name]}) == 3, name
        limit = runner.config.limits.max_open_files
        assert a["nofile"] == b["nofile"] == limit
        assert a["tmpfs"] and b["tmpfs"] and not a["found"] and not b["found"]
        for sandbox in (sa, sb):
            assert_in_its_cgroups(sandbox)


def assert_in_its_cgroups(sandbox: ProcessSandbox) -> None:
    """The sandbox's server is in its own cgroup in every hierarchy, with its memory limit."""
    cgroup = sandbox.cgroup
    assert cgroup is not None and cgroup.freezer is not None
    placed = cgroup_lines(sandbox.server_pid)
    for hierarchy, directory in (("memory", cgroup.memory_dir), ("pids", cgroup.pids_dir)):
        assert placed[hierarchy] == "/" + str(directory.relative_to(CGROUP / hierarchy))
    frozen_in = cgroup.freezer.directory
    if cgroup.cgroup2 is not None:  # born there (clone3), or moved there
        assert placed[""] == "/" + str(frozen_in.relative_to(CGROUP / "unified"))
    else:
        assert placed["freezer"] == "/" + str(frozen_in.relative_to(CGROUP / "freezer"))
    memory_limit = next(cgroup.memory_dir / name for name in ("memory.max",
                        "memory.limit_in_bytes") if (cgroup.memory_dir / name).exists())
    assert int(memory_limit.read_text()) == 96 * 2**20


def test_the_template_holds_no_function_code(runner: ProcessRunner) -> None:
    """What a sandbox imports or writes never reaches the template: it runs as root outside
    the sandboxes' namespaces, in /, maps and holds open nothing of the work directory, and
    the next sandbox starts without the last one's modules."""
    leaky = {"main.py": "import sys\nprint('leaky' in sys.modules)\nimport leaky\n",
             "leaky.py": "VALUE = 1\n"}
    modules = {"main.py": "import sys\nprint('leaky' in sys.modules)\n"}
    with cold(runner, "leak@1", leaky) as first:
        assert call(runner, first) == "False\n"
    with cold(runner, "other@1", modules) as other:
        assert call(runner, other) == "False\n"
        template = template_of(other)
        work = str(Path(runner.config.paths.work_dir).resolve())
        assert template.cwd() == "/" and template.uids().real == 0
        assert not [m.path for m in template.memory_maps() if m.path.startswith(work)]
        assert not [f.path for f in template.open_files() if f.path.startswith(work)]


def test_a_template_that_died_is_started_again(runner: ProcessRunner) -> None:
    """A template killed (by an operator, the OOM killer) costs its sandboxes, which die
    with it, but not the next create: a new template forks it."""
    with cold(runner, "a@1") as first:
        call(runner, first)
        template = template_of(first)
        template.send_signal(signal.SIGKILL)
        wait_until(lambda: not psutil.pid_exists(first.server_pid)
                   or psutil.Process(first.server_pid).status() == psutil.STATUS_ZOMBIE,
                   timeout=5, what="the template's sandboxes to die with it")
    with cold(runner, "b@1") as second:
        assert not json.loads(call(runner, second))["found"]
        assert template_of(second).pid != template.pid
        assert_in_its_cgroups(second)
