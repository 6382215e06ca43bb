"""The one run sequence of every runner (PooledRunner.run): its hooks in order, and how it
reads what a sandbox's server reported, with a fake server client and fake hooks."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import agent_config, scratch_dir

from nanogrid.common.errors import SandboxError, SandboxLost
from nanogrid.runners.base import Invocation
from nanogrid.runners.freezer import IdleFreezer
from nanogrid.runners.launch import Launch
from nanogrid.runners.lending import SandboxBoard
from nanogrid.runners.pooled import PooledRunner
from nanogrid.runners.sandboxclient import RawRun
from nanogrid.runners.serversandbox import Meter, ServerSandbox

OK = RawRun(status=0, timed_out=False, stdout=b"hi\n", stderr=b"", stdout_truncated=False,
            stderr_truncated=False, duration_ms=3.0, maxrss_bytes=5 << 20)


class Client:
    """A sandbox server's client that replies ``reply`` (or raises it)."""

    def __init__(self, calls: list[str], reply: RawRun | BaseException) -> None:
        self.calls, self.reply = calls, reply

    def run(self, **request: Any) -> RawRun:
        self.calls.append("run")
        self.request = request
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply

    def arm(self) -> None:
        self.calls.append("arm")


class Hooks(PooledRunner):
    """The run's hooks, each noting that it ran; no cgroup (the rusage path)."""

    def __init__(self) -> None:  # only what run() reads: no pools, no sandboxes
        self.config = agent_config(scratch_dir("ng-template-"))
        self.launches = {"python": Launch("/usr/bin/python3", True, ("python3", "main.py"))}
        self.board = SandboxBoard()
        self.idle = IdleFreezer()
        self.calls: list[str] = []
        self.clean = True

    def limit(self, sandbox: ServerSandbox, invocation: Invocation) -> Meter:
        self.calls.append("limit")
        return Meter(None, rlimits={"as": invocation.memory_mb << 20})

    def placement(self, sandbox: ServerSandbox, invocation: Invocation
                  ) -> tuple[str, dict[str, str]]:
        self.calls.append("placement")
        return "/var/task", {"NANOGRID_REQUEST_ID": invocation.request_id}

    def leftovers(self, sandbox: ServerSandbox, launch: Launch) -> bool:
        self.calls.append("leftovers")
        return self.clean

    def freezer(self, sandbox: ServerSandbox) -> None:
        return None

    def oom_without_cgroup(self, exit_code: int, raw: RawRun) -> bool:
        return exit_code == -signal.SIGKILL and not raw.timed_out


def invocation() -> Invocation:
    return Invocation("r1", "f", ("python3", "main.py"), b"{}", 64, 1000, 10_000, 32)


def sandbox(runner: Hooks, reply: RawRun | BaseException) -> ServerSandbox:
    box = ServerSandbox(runtime="python", name="python-w0-0", code_dir=Path("/nonexistent"))
    box.client = Client(runner.calls, reply)  # type: ignore[assignment]
    return box


def test_the_hooks_run_in_order_and_the_request_carries_theirs() -> None:
    runner = Hooks()
    box = sandbox(runner, OK)
    out = runner.run(box, invocation())
    assert runner.calls == ["limit", "placement", "run", "leftovers", "arm"]
    request = box.client.request  # type: ignore[union-attr]
    assert request["cwd"] == "/var/task" and request["env"] == {"NANOGRID_REQUEST_ID": "r1"}
    assert request["rlimits"] == {"as": 64 << 20} and request["timeout_s"] == 1.0
    assert request["preload"] is None  # no freezer: a sandbox that holds no code of its own
    assert out.stdout == b"hi\n" and out.exit_code == 0 and not out.oom_killed
    assert (out.peak_memory_bytes, out.peak_source) == (5 << 20, "rusage")
    assert box.healthy and box.runs == 1


def test_a_run_that_left_something_behind_spoils_its_sandbox() -> None:
    runner = Hooks()
    runner.clean = False
    box = sandbox(runner, OK)
    assert runner.run(box, invocation()).exit_code == 0
    assert not box.healthy


@pytest.mark.parametrize("timed_out", [True, False])
def test_a_kill_is_a_timeout_or_the_memory_limit_and_spoils_the_sandbox(timed_out: bool) -> None:
    runner = Hooks()
    killed = RawRun(**{**OK.__dict__, "status": signal.SIGKILL, "timed_out": timed_out})
    box = sandbox(runner, killed)
    out = runner.run(box, invocation())
    assert out.timed_out is timed_out and out.oom_killed is not timed_out
    assert "leftovers" not in runner.calls and not box.healthy


def test_a_reply_of_the_wrong_shape_is_a_sandbox_error() -> None:
    runner = Hooks()
    box = sandbox(runner, KeyError("status"))
    with pytest.raises(SandboxError, match="server misbehaved"):
        runner.run(box, invocation())
    assert not box.healthy


def test_a_broken_sandbox_of_this_worker_is_a_sandbox_error_not_a_lost_one() -> None:
    runner = Hooks()
    box = sandbox(runner, SandboxError("the server died"))
    with pytest.raises(SandboxError, match="the server died") as raised:
        runner.run(box, invocation())
    assert not isinstance(raised.value, SandboxLost) and not box.healthy


def test_a_lent_sandbox_whose_owner_is_gone_is_lost_not_broken() -> None:
    runner = Hooks()
    ticket = runner.board.put(1, "python", None, {}, 0, 0, taken=True)
    assert ticket is not None
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    box = sandbox(runner, SandboxError("the server died"))
    box.borrowed = True
    box.ticket = ticket.__class__(**{**ticket.__dict__, "owner_pid": gone})
    with pytest.raises(SandboxLost, match="died during the run"):
        runner.run(box, invocation())


class LateCountingMemory:
    """A sandbox cgroup whose OOM kill is counted ``late_s`` after the run ended, as the
    kernel counts it after sending the kill."""

    source = "cgroup-v1"

    def __init__(self, late_s: float) -> None:
        self.counted_at = time.monotonic() + late_s

    def peak_bytes(self) -> int:
        return 96 << 20

    def oom_kills(self) -> int:
        return int(time.monotonic() >= self.counted_at)


class MeteredHooks(Hooks):
    """Hooks whose runs are measured by a cgroup that counts an OOM kill late."""

    def __init__(self, late_s: float) -> None:
        super().__init__()
        self.late_s = late_s

    def limit(self, sandbox: ServerSandbox, invocation: Invocation) -> Meter:
        self.calls.append("limit")
        return Meter(LateCountingMemory(self.late_s), oom_before=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("died", [False, True], ids=["run killed", "server killed"])
def test_an_oom_kill_the_kernel_counts_after_the_kill_is_still_the_memory_limit(
    died: bool,
) -> None:
    """The run's reply (its child reaped by the server) or the server's death (a node
    function runs inside it) may come before the cgroup counts the OOM kill."""
    runner = MeteredHooks(late_s=0.05)
    killed = RawRun(**{**OK.__dict__, "status": signal.SIGKILL})
    box = sandbox(runner, SandboxError("sandbox node server died during the run") if died
                  else killed)
    out = runner.run(box, invocation())
    assert out.oom_killed and out.exit_code == -signal.SIGKILL and not out.timed_out
    assert (out.peak_memory_bytes, out.peak_source) == (96 << 20, "cgroup-v1")
    assert not box.healthy


def test_a_server_that_died_with_no_oom_kill_counted_is_a_sandbox_error() -> None:
    runner = MeteredHooks(late_s=60.0)  # never counted within the grace
    box = sandbox(runner, SandboxError("sandbox node server died during the run"))
    with pytest.raises(SandboxError, match="died during the run"):
        runner.run(box, invocation())
