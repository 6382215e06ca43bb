"""How each runtime's command starts from a process sandbox's server, resolved once per worker:
the real interpreter behind a shim, whether the forked interpreter runs it, which server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from nanogrid.common.config import Config, RuntimeConfig
from nanogrid.common.errors import ConfigError

from .sandbox_server import FORK, ServerKind, server_for


@dataclass(frozen=True)
class Launch:
    """How one runtime's command is started from a fork server."""

    interpreter: str
    """The real interpreter the fork server runs on (no shims: resolved once)."""
    python: bool
    """The command is ``python3 script.py ...``: run it in the forked interpreter."""
    argv: tuple[str, ...]
    server: ServerKind = FORK
    """The in-sandbox server that runs the command."""

    @property
    def script(self) -> str | None:
        """The main script whose imports its server preloads (import-warm): a python script
        the fork server runs, a script a server runs itself; None for a command exec'd per
        call."""
        runs_it = self.python or self.server.runs_functions_itself
        return os.path.basename(self.argv[1]) if runs_it else None


def resolve_launch(runtime: RuntimeConfig, path: str) -> Launch:
    """Find the runtime's program on the functions' PATH; see through interpreter shims."""
    if "/" in runtime.command[0] and not os.path.isabs(runtime.command[0]):
        # A program in the function's own code (``./main``): exec'd per call from its cwd.
        return Launch(interpreter=sys.executable, python=False, argv=runtime.command)
    program = shutil.which(runtime.command[0], path=path)
    if program is None:
        raise ConfigError(f"runtime command {runtime.command[0]!r} not found on PATH {path}")
    name = os.path.basename(program)
    is_python = name.startswith("python") and len(runtime.command) >= 2
    if is_python and not runtime.command[1].startswith("-"):
        probe = subprocess.run(
            [program, "-I", "-S", "-c", "import sys; print(sys.executable)"],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": path},
        )
        real = probe.stdout.strip()
        if probe.returncode != 0 or not real:
            raise ConfigError(f"runtime command {program} does not start: {probe.stderr.strip()}")
        return Launch(interpreter=real, python=True, argv=(real, *runtime.command[1:]))
    server = server_for(runtime.command)
    if server.runs_functions_itself:
        probe = subprocess.run(
            [program, "-e", "require('worker_threads')"],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": path},
        )
        if probe.returncode != 0:
            raise ConfigError(f"runtime command {program} does not start: {probe.stderr.strip()}")
        real = os.path.realpath(program)
        return Launch(
            interpreter=real, python=False, argv=(real, *runtime.command[1:]), server=server
        )
    return Launch(interpreter=sys.executable, python=False, argv=(program, *runtime.command[1:]))


def resolve_launches(config: Config) -> tuple[dict[str, Launch], dict[str, str]]:
    """How each runtime starts, and the runtimes that cannot start here -> why."""
    launches, problems = {}, {}
    for name, runtime in config.runtimes.items():
        try:
            launches[name] = resolve_launch(runtime, config.process.path)
        except (ConfigError, OSError, subprocess.TimeoutExpired) as exc:
            problems[name] = str(exc)
    return launches, problems
