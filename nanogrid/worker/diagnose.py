"""What a run tells the function's author beyond its exit code (docs/functions.md): its stderr
with the host's paths replaced by stable ones, the error line for ``errorMessage``, and a
``hint`` when a Lambda-style handler was defined but never called.

Paths: the function's code shows as ``/var/task`` (where the runner put it: a host
directory under ``paths.work_dir``, or ``/code/function`` in a container) and the agent's
own files as ``/var/runtime``, so a stack trace reads the same on every host and runner and
says nothing of the host's layout.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from nanogrid import runners
from nanogrid.runners.base import RunOutcome

TASK_ROOT = "/var/task"
RUNTIME_ROOT = "/var/runtime"
AGENT_ROOT = str(Path(runners.__file__).resolve().parent)
"""The agent's sandbox servers, as a traceback through them would name them."""
HINT_SOURCE_BYTES = 256 * 1024
"""How much of the entry file is read for a handler (only after a silent SUCCESS)."""

_TRACEBACK = "Traceback (most recent call last):"
_NODE_FRAME = re.compile(r"^\s+at \S")
_NODE_ERROR = re.compile(r"^(?:Uncaught )?[\w$.]*(?:Error|Exception)\b.*")
_NODE_BANNER = re.compile(r"^Node\.js v\d")
_HANDLERS = {
    ".py": re.compile(r"^\s*(?:async\s+)?def\s+(handler|lambda_handler)\s*\(", re.M),
    ".js": re.compile(
        r"\bexports\.(handler)\s*=|module\.exports\s*=\s*\{[^}]*\b(handler)\b"
        r"|export\s+(?:async\s+)?(?:function\s+|const\s+)(handler)\b"
    ),
}
_CALL = {
    ".py": "print(json.dumps(handler(json.load(sys.stdin), None)))",
    ".js": "console.log(JSON.stringify(await exports.handler("
           "JSON.parse(require('fs').readFileSync(0, 'utf8')))))",
}


def hide_paths(outcome: RunOutcome, code_path: str, cap: int) -> RunOutcome:
    """``outcome`` with the function's code dir (``code_path``, as the function saw it) and
    the agent's files named by their stable roots in its stderr, still within ``cap``."""
    stderr = outcome.stderr
    for host, shown in ((code_path.rstrip("/"), TASK_ROOT), (AGENT_ROOT, RUNTIME_ROOT)):
        stderr = stderr.replace(host.encode(), shown.encode())
    if stderr == outcome.stderr:
        return outcome
    truncated = outcome.stderr_truncated or len(stderr) > cap
    return dataclasses.replace(outcome, stderr=stderr[:cap], stderr_truncated=truncated)


def error_line(stderr: str) -> str | None:
    """The function's own error in one line: the last line of a python traceback (the
    exception), else the first ``...Error: ...`` line of a node stack (the line above its
    first ``at`` frame), else the last line that is not node's version banner."""
    lines = [line.rstrip() for line in stderr.splitlines()]
    if _TRACEBACK in lines:
        start = len(lines) - lines[::-1].index(_TRACEBACK)
        for line in lines[start:]:
            if line and not line[0].isspace():
                return line
    for above, below in zip(lines, lines[1:], strict=False):
        if _NODE_FRAME.match(below) and above.strip() and not _NODE_FRAME.match(above):
            return above.strip()
    for line in lines:
        if _NODE_ERROR.fullmatch(line.strip()):
            return line.strip()
    rest = [line.strip() for line in lines if line.strip() and not _NODE_BANNER.match(line)]
    return rest[-1] if rest else None


def handler_hint(code_dir: Path, command: tuple[str, ...]) -> str | None:
    """For a run that succeeded and printed nothing: a hint when its entry file defines a
    Lambda-style ``handler`` that nothing called (NanoGrid runs the file as a program)."""
    for arg in command[1:]:
        suffix = Path(arg).suffix
        if suffix not in _HANDLERS:
            continue
        try:
            with (code_dir / arg).open("rb") as f:
                source = f.read(HINT_SOURCE_BYTES).decode("utf-8", "replace")
        except OSError:
            return None
        found = _HANDLERS[suffix].search(source)
        if found is None:
            return None
        name = next(group for group in found.groups() if group)
        return (
            f"{arg} defines {name}() but printed nothing: NanoGrid runs {arg} as a program "
            f"(input JSON on stdin, output on stdout), it does not call a handler; call it "
            f"yourself, e.g. {_CALL[suffix].replace('handler', name)} (docs/functions.md)"
        )
    return None
