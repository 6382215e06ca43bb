"""What the ``nanogrid-local`` modules share: paths, limits, exit codes and the one-line
errors and messages the operator sees."""

from __future__ import annotations

import signal
from pathlib import Path

PROG = "nanogrid-local"
REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_CONFIG = REPO / "conf" / "local.yaml"
SUPERVISOR_BIN = REPO / "bin" / "nanogrid-supervisor"
INVOKE_BIN = REPO / "bin" / "nanogrid-invoke"
EXAMPLES = REPO / "examples"
BUCKET = "nanogrid-functions"
"""The bucket nanogrid-invoke deploys to by default."""
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

BRING_UP_TIMEOUT_S = 60.0
"""Peers started, queues made and the agent's /health UP within this, or the run fails."""
INVOKE_WAIT_S = 30.0
"""How long the demo waits for each result."""
WARM_UP_TIMEOUT_S = 10.0
"""How long the demo waits for the warm pools before its first call (not a failure)."""
STOP_MARGIN_S = 15.0
"""Beyond the agent's drain timeout, before its SIGKILL (the arbiter's own kill wait is 5 s)."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class LocalError(Exception):
    """An expected failure; the message is the one line the operator sees."""


class Interrupted(Exception):  # noqa: N818 - it is a stop request, not an error
    """SIGINT, SIGTERM or SIGHUP arrived: stop everything."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def shown(path: Path) -> str:
    """A path of this checkout relative to the working directory when that is the checkout
    (as the README's commands are typed), else absolute."""
    path = path.resolve()
    if Path.cwd().resolve() == REPO and path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return str(path)


def one_line(text: str) -> str:
    return " ".join(text.split())
