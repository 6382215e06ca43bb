"""What a result tells a function's author: its own error line, stable paths, the hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanogrid.runners.base import RunOutcome
from nanogrid.worker import diagnose, result

NODE_UNCAUGHT = """\
TypeError: Cannot read properties of null (reading 'y')
    at go (/srv/work/p1-w0/node-w0-1/code/main.js:2:26)
    at Object.<anonymous> (/srv/work/p1-w0/node-w0-1/code/main.js:3:1)
    at Module._compile (node:internal/modules/cjs/loader:1521:14)

Node.js v20.20.2
"""
PYTHON_CHAINED = """\
Traceback (most recent call last):
  File "main.py", line 3, in <module>
    int("x")
ValueError: invalid literal for int() with base 10: 'x'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "main.py", line 5, in <module>
    raise RuntimeError("could not parse the input")
RuntimeError: could not parse the input
cleanup done
"""
PYTHON_SYNTAX = """\
  File "main.py", line 1
    def (:
        ^
SyntaxError: invalid syntax
"""


@pytest.mark.parametrize(("stderr", "line"), [
    (NODE_UNCAUGHT, "TypeError: Cannot read properties of null (reading 'y')"),
    (PYTHON_CHAINED, "RuntimeError: could not parse the input"),
    (PYTHON_SYNTAX, "SyntaxError: invalid syntax"),
    ("Error: ENOENT: no such file or directory, open 'x.json'\n    at Object.openSync (fs:1)\n",
     "Error: ENOENT: no such file or directory, open 'x.json'"),
    ("warming up\nbad input: 'x'\n", "bad input: 'x'"),
    ("Uncaught 'a string'\n\nNode.js v20.20.2\n", "Uncaught 'a string'"),
    ("", None),
])
def test_the_error_line_is_the_functions_own(stderr: str, line: str | None) -> None:
    assert diagnose.error_line(stderr) == line


def outcome(stderr: bytes, **changes: object) -> RunOutcome:
    return RunOutcome(exit_code=1, timed_out=False, oom_killed=False, stdout=b"",
                      stderr=stderr, stdout_truncated=False, stderr_truncated=False,
                      duration_ms=1.0, peak_memory_bytes=0, peak_source="rusage", **changes)


def test_a_node_error_message_is_never_the_version_banner() -> None:
    r = result.ran(result.TaskIds("r"), outcome(NODE_UNCAUGHT.encode()), memory_mb=128,
                   recommended_mb=128, tip="t", tip_code="RIGHT_SIZED", tip_params={},
                   cold_start=False, attempt=1, worker_id="h:1",
                   timings=result.Timings())
    assert r.error_message == (
        "function exited with code 1: TypeError: Cannot read properties of null (reading 'y')")


def test_host_paths_become_var_task_and_var_runtime() -> None:
    agent_file = f"{diagnose.AGENT_ROOT}/forkserver/child.py"
    text = NODE_UNCAUGHT + f'  File "{agent_file}", line 9\n'
    hidden = diagnose.hide_paths(outcome(text.encode()), "/srv/work/p1-w0/node-w0-1/code/", 10**6)
    stderr = hidden.stderr.decode()
    assert "at go (/var/task/main.js:2:26)" in stderr
    assert '"/var/runtime/forkserver/child.py"' in stderr
    assert "/srv/work" not in stderr and diagnose.AGENT_ROOT not in stderr
    docker = diagnose.hide_paths(outcome(b"at f (/code/function/lib/a.js:1:1)"), "/code/function",
                                 10**6)
    assert docker.stderr == b"at f (/var/task/lib/a.js:1:1)"
    cut = diagnose.hide_paths(outcome(b"/x/code/a.py" * 4), "/x/code", 20)
    assert (cut.stderr, cut.stderr_truncated) == (b"/var/task/a.py/var/t", True)


@pytest.mark.parametrize(("name", "source", "command", "call"), [
    ("main.py", "import json\n\ndef handler(event, context):\n    return {'ok': True}\n",
     ("python3", "main.py"), "print(json.dumps(handler(json.load(sys.stdin), None)))"),
    ("main.py", "async def lambda_handler(event, ctx):\n    pass\n", ("python3", "main.py"),
     "lambda_handler("),
    ("main.js", "exports.handler = async (event) => ({ ok: true });\n", ("node", "main.js"),
     "exports.handler("),
    ("main.js", "module.exports = { handler, other };\n", ("node", "main.js"), "handler("),
])
def test_a_handler_nothing_called_gets_a_hint(tmp_path: Path, name: str, source: str,
                                              command: tuple[str, ...], call: str) -> None:
    (tmp_path / name).write_text(source)
    hint = diagnose.handler_hint(tmp_path, command)
    assert hint is not None and hint.startswith(f"{name} defines ")
    assert "printed nothing" in hint and call in hint and "docs/functions.md" in hint


def test_no_hint_without_a_handler(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("import sys\nsys.exit(0)\n")
    assert diagnose.handler_hint(tmp_path, ("python3", "main.py")) is None
    assert diagnose.handler_hint(tmp_path, ("node", "main.js")) is None  # no such file
