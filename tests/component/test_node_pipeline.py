"""The node runtime end to end through one worker, on both runners: SQS (moto_server) -> S3 ->
sandbox -> Redis, and a runtime that cannot start failing its tasks with a clear message."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Agent, make_zip
from helpers import NODE_IMAGE, RUNTIME_IMAGE, wait_until

from nanogrid.devtools.invoke import zip_function

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def node_agent(aws: Any, redis_url: str, tmp: Path, runner: str, **overrides: Any) -> Agent:
    runtimes = {
        "python": {"warm": 1, "image": RUNTIME_IMAGE},
        "node": {"warm": 1, "image": NODE_IMAGE},
    }
    settings: dict[str, Any] = {"runtimes": runtimes, **overrides}
    if runner == "docker":
        socket_dir = tempfile.mkdtemp(prefix="ng-np-")  # short: socket paths have 107 bytes
        settings["docker"] = {"socket_dir": f"{socket_dir}/s"}
    agent = Agent(aws, redis_url, tmp, **settings)
    agent.config = dataclasses.replace(agent.config, runner=runner)  # not a section to merge
    return agent


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def agent(
    request: pytest.FixtureRequest, aws: Any, redis_url: str, tmp_path: Path
) -> Iterator[Agent]:
    if request.param == "docker":
        request.getfixturevalue("node_image")
        request.getfixturevalue("runtime_image")
    running = node_agent(aws, redis_url, tmp_path, request.param).start()
    yield running
    assert running.stop() == 0


def test_hello_node_is_warm_and_follows_the_contract(agent: Agent) -> None:
    key = agent.upload(zip_function(EXAMPLES / "hello-node"))
    # The first call may come before the pool is warm (a container takes ~0.5 s): a cold
    # start the pool does not keep; the third finds the function's warm sandbox, its next
    # Worker armed by then (calls back to back: test_node_back_to_back.py).
    results = []
    for _ in range(3):
        results.append(agent.call(agent.task(key, runtime="node", memoryMb=256)))
        time.sleep(0.2)
    for result in results:
        assert result["status"] == "SUCCESS", result
        assert result["stdout"] == "Hello from NanoGrid!\n" and result["exitCode"] == 0
        assert result["runtime"] == "node" and result["errorType"] is None
        assert 0 < result["peakMemoryBytes"] < 128 * 2**20
        assert result["peakMemoryMB"] == result["peakMemoryBytes"] // 2**20
        assert "256MB" in result["optimizationTip"] and result["recommendedMemoryMb"] < 256
    assert results[2]["coldStart"] is False and results[2]["durationMillis"] < 50


def test_echo_node_reads_input_data(agent: Agent) -> None:
    key = agent.upload(zip_function(EXAMPLES / "echo-node"))
    task = agent.task(key, runtime="node", inputData={"name": "Ada", "numbers": [1, 2, 3]})
    result = agent.call(task)
    assert result["status"] == "SUCCESS", result
    answer = json.loads(result["stdout"])
    assert answer["greeting"] == "Hello, Ada!" and answer["sum"] == 6
    assert answer["requestId"] == task["requestId"]


def test_failures_timeouts_and_out_of_memory(agent: Agent) -> None:
    code = (
        "const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
        "if (input.fail) { console.error('oops'); process.exit(3); }\n"
        "if (input.spin) for (;;) {}\n"
        "if (input.mb) { const b = []; for (let i = 0; i < input.mb; i++)"
        " b.push(Buffer.alloc(2 ** 20, 1)); console.log(b.length); }\n"
    )
    key = agent.upload(make_zip({"main.js": code}))
    failed = agent.call(agent.task(key, runtime="node", inputData={"fail": True}))
    assert (failed["status"], failed["errorType"], failed["exitCode"]) == (
        "FAILED",
        "FUNCTION_ERROR",
        3,
    )
    assert failed["stderr"] == "oops\n" and "exited with code 3" in failed["errorMessage"]
    big = agent.call(agent.task(key, runtime="node", inputData={"mb": 100}, memoryMb=512))
    assert big["status"] == "SUCCESS" and 100 <= big["peakMemoryMB"] <= 200, big
    slow = agent.call(agent.task(key, runtime="node", inputData={"spin": True}, timeoutMs=500))
    assert (slow["status"], slow["errorType"]) == ("TIMEOUT", "TIMEOUT")
    oom = agent.call(agent.task(key, runtime="node", inputData={"mb": 400}, memoryMb=128))
    assert (oom["status"], oom["errorType"]) == ("FAILED", "OUT_OF_MEMORY"), oom
    assert oom["recommendedMemoryMb"] > 128


def test_python_and_node_side_by_side(agent: Agent) -> None:
    python = agent.call(agent.task(agent.upload(zip_function(EXAMPLES / "hello-python"))))
    node = agent.call(
        agent.task(agent.upload(zip_function(EXAMPLES / "hello-node")), runtime="node")
    )
    assert python["stdout"] == node["stdout"] == "Hello from NanoGrid!\n"
    assert (python["runtime"], node["runtime"]) == ("python", "node")


def test_a_runtime_that_cannot_start_fails_its_tasks_clearly(
    aws: Any, redis_url: str, tmp_path: Path
) -> None:
    agent = node_agent(
        aws,
        redis_url,
        tmp_path,
        "process",
        runtimes={"python": {"warm": 1}, "node": {"command": ["nanogrid-no-node", "main.js"]}},
    ).start()
    try:
        assert "runtime 'node' cannot start here" in agent.log.read_text()
        key = agent.upload(zip_function(EXAMPLES / "hello-node"))
        result = agent.call(agent.task(key, runtime="node"))
        python = agent.call(agent.task(agent.upload(zip_function(EXAMPLES / "hello-python"))))
        letters = agent.dead_letters()
    finally:
        assert agent.stop() == 0
    assert (result["status"], result["errorType"]) == ("FAILED", "RUNTIME_NOT_SUPPORTED")
    assert result["errorMessage"] == (
        "runtime 'node' cannot start on this host: runtime command 'nanogrid-no-node' "
        "not found on PATH /usr/local/bin:/usr/bin:/bin"
    )
    assert result["exitCode"] is None
    assert [json.loads(m["Body"])["requestId"] for m in letters] == [result["requestId"]]
    assert python["status"] == "SUCCESS"
    wait_until(lambda: agent.queue_depth() == 0, timeout=5, what="the messages to be deleted")


def test_an_error_reads_the_same_on_every_runner_without_host_paths(agent: Agent) -> None:
    # issue 24: node's errorMessage was its version banner, and host paths (the work dir,
    # the agent's own forkserver/child.py) reached the caller's stderr.
    host = [str(agent.config.paths.work_dir), agent.config.docker.socket_dir,
            str(Path(__file__).resolve().parents[2])]
    node = agent.call(agent.task(agent.upload(make_zip({"main.js": (
        "const x = null;\nfunction go() { return x.y; }\ngo();\n")})), runtime="node"))
    assert node["errorMessage"] == (
        "function exited with code 1: TypeError: Cannot read properties of null (reading 'y')")
    assert "at go (/var/task/main.js:2:" in node["stderr"], node["stderr"]
    helper = agent.call(agent.task(agent.upload(make_zip({
        "main.py": "import helper\nhelper.boom()\n",
        "helper.py": "def boom():\n    raise ValueError('bad input')\n"}))))
    assert helper["errorMessage"] == "function exited with code 1: ValueError: bad input"
    assert 'File "/var/task/helper.py", line 2, in boom' in helper["stderr"], helper["stderr"]
    syntax = agent.call(agent.task(agent.upload(make_zip({"main.py": "def (:\n"}))))
    assert syntax["errorMessage"] == "function exited with code 1: SyntaxError: invalid syntax"
    assert syntax["stderr"].startswith('  File "main.py", line 1\n'), syntax["stderr"]
    missing = agent.call(agent.task(agent.upload(make_zip({"other.py": ""}))))
    assert (missing["exitCode"], missing["stderr"]) == (2, (
        "python3: can't open file '/var/task/main.py': [Errno 2] No such file or directory\n"))
    for result in (node, helper, syntax, missing):
        assert not any(path in result["stderr"] for path in host), result["stderr"]
        assert "forkserver" not in result["stderr"] and "Node.js v" not in result["errorMessage"]


def test_a_handler_that_nothing_calls_gets_a_hint(agent: Agent) -> None:
    python = agent.call(agent.task(agent.upload(make_zip({
        "main.py": "def handler(event, context):\n    return {'ok': True}\n"}))))
    node = agent.call(agent.task(agent.upload(make_zip({
        "main.js": "exports.handler = async (event) => ({ ok: true });\n"})), runtime="node"))
    for result, name in ((python, "main.py"), (node, "main.js")):
        assert (result["status"], result["stdout"], result["errorMessage"]) == ("SUCCESS", "", None)
        assert result["hint"].startswith(f"{name} defines handler() but printed nothing"), result
    hello = agent.call(agent.task(agent.upload(zip_function(EXAMPLES / "hello-node")),
                                  runtime="node"))
    assert hello["hint"] is None


def test_sandboxes_are_named_by_runtime_and_function_in_ps(agent: Agent) -> None:
    # The warm pools' generic sandboxes first (named by runtime, their socket under this
    # agent's directory), then each as the function it ran.
    sockets = (agent.config.paths.work_dir, agent.config.docker.socket_dir, "/nanogrid/")
    for runtime in ("python", "node"):
        wait_until(lambda runtime=runtime: [
            t for t in process_titles()
            if re.fullmatch(rf"nanogrid: sandbox {runtime} /\S+", t) and any(
                t.split(" ")[-1].startswith(str(s)) for s in sockets)],
            timeout=20, what=f"a generic {runtime} sandbox named as one")
    titles = {}
    unique = uuid.uuid4().hex[:8]  # other agents on this host run sandboxes too
    for runtime, example in (("python", "hello-python"), ("node", "hello-node")):
        function_id = f"titled-{runtime}-{unique}"
        task = agent.task(agent.upload(zip_function(EXAMPLES / example)), runtime=runtime,
                          functionId=function_id)
        assert agent.call(task)["status"] == "SUCCESS"
        prefix = f"nanogrid: sandbox {runtime} {function_id}@"
        titles[runtime] = wait_until(
            lambda prefix=prefix: [t for t in process_titles() if t.startswith(prefix)],
            timeout=5, what=f"a process titled {prefix}...")
    for runtime, found in titles.items():
        (title,) = set(found)  # the server, and a fork of it (a run, a preload trial) at times
        assert re.fullmatch(
            rf"nanogrid: sandbox {runtime} titled-{runtime}-{unique}@[0-9a-f]{{8}} \S+", title
        ), title



def process_titles() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit():
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                found.append(cmdline[0].decode(errors="replace").strip())
    return found
