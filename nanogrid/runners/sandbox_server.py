"""Which long-lived server runs inside a sandbox, chosen by the runtime's command: the
registry of server kinds, each saying what it means for a runner as attributes.

``fork``: nanogrid/runners/forkserver/ (python), a directory python runs. A ``python3 main.py``
runtime is run in a fork of the warm interpreter; any other command (``./main``,
``node --flag x.js``) is exec'd per call by a fork of it, which inside a container needs a
python3 in the image.
``node``: nanogrid/runners/nodeserver/ (node), a directory node runs, for ``node script.js``
runtimes: a worker thread started and waiting before the call; a node image needs nothing
but node.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from nanogrid.common.config import Config

from .base import Sandbox
from .forkclient import FORKSERVER_SOURCE, ForkServerClient
from .nodeclient import NODE_SOCKET_NAME, NODESERVER_SOURCE, NodeServerClient, is_node_command
from .sandboxclient import SandboxClient


@dataclass(frozen=True)
class ServerKind:
    """One kind of in-sandbox server: its directory, its socket, how it is started and what it
    does with a run."""

    name: str
    source: Path
    socket_name: str
    interpreter_flags: tuple[str, ...]
    """Flags between the interpreter and the server's directory on its command line."""
    client: Callable[[str | os.PathLike[str], float], SandboxClient]
    runs_functions_itself: bool
    """The function runs inside the server's own process (a node Worker thread), not in a
    forked child: no per-run rlimits, what a run leaves lives in the server's process group,
    and the server writes into its control directory during runs (its staged stdin)."""
    started_by_fork_server: bool
    """A process sandbox's fork server sets the sandbox up (namespaces, cgroups, rlimits,
    uid) and then exec's this server; the fork server itself serves otherwise."""
    keeps_worker: bool
    """It keeps a Worker started for the next call (~8 MiB), which it drops when asked
    (``SandboxClient.shrink``) after its sandbox idled ``pool.node_worker_idle_seconds``."""

    def command(self, interpreter: str, source: str, socket_path: str) -> list[str]:
        """The server's command line, given where its directory and socket are."""
        return [interpreter, *self.interpreter_flags, source, socket_path]

    def copy_to(self, directory: Path) -> Path:
        """Copy the server's directory into ``directory``, readable by any uid (a sandbox runs
        as its own); returns the copy. It keeps its ``__pycache__`` and the files' times: the
        fork server's modules need not compile again in every read-only sandbox."""
        target = directory / self.source.name
        shutil.copytree(self.source, target)
        for path in [target, *target.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        return target

    def connect(self, socket_path: str | os.PathLike[str], timeout_s: float = 10.0
                ) -> SandboxClient:
        """A client of this server, once its socket answers (within ``timeout_s``)."""
        return self.client(socket_path, timeout_s)


FORK = ServerKind(
    "fork", FORKSERVER_SOURCE, "forkserver.sock", ("-I", "-S"), ForkServerClient,
    runs_functions_itself=False, started_by_fork_server=False, keeps_worker=False,
)
NODE = ServerKind(
    "node", NODESERVER_SOURCE, NODE_SOCKET_NAME, (), NodeServerClient,
    runs_functions_itself=True, started_by_fork_server=True, keeps_worker=True,
)
SERVERS = {server.name: server for server in (FORK, NODE)}


def server_for(command: tuple[str, ...]) -> ServerKind:
    """The server that runs ``command``."""
    return NODE if is_node_command(command) else FORK


def preload_key(config: Config, sandbox: Sandbox) -> str | None:
    """What the runners pass as ``preload``: the code_key, unless the runtime turned it off."""
    return sandbox.code_key if config.runtimes[sandbox.runtime].preload else None


def log_preload(marker: str, sandbox: Sandbox, report: dict | None) -> None:
    """One debug line when a sandbox's server preloaded its function's imports (``report``:
    what it said of them)."""
    if report is not None:
        left_out = report.get("left_out") or {}
        logger.debug(
            f"{marker} {sandbox.name} preloaded {len(report.get('preloaded', []))} "
            f"module(s) of {sandbox.code_key}"
            + (f"; left out: {left_out}" if left_out else "")
        )
