"""A sandbox with a server inside that takes its calls (the pooled runners' sandboxes,
pooled.py): the client of its server, its cgroup's files, and a run's memory meter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .base import Sandbox
from .freezer import Freezer
from .memory import CgroupMemory
from .sandboxclient import SandboxClient


@dataclass(eq=False)
class ServerSandbox(Sandbox):
    """A sandbox with a server inside that takes the calls."""

    client: SandboxClient | None = None
    cgroup: SandboxFiles | None = None
    """Its cgroup's files (None without one)."""


class SandboxFiles(Protocol):
    """What the run template reads of a sandbox's cgroup: its memory and its freezer."""

    @property
    def memory(self) -> CgroupMemory: ...

    @property
    def freezer(self) -> Freezer | None: ...


@dataclass
class Meter:
    """One run's memory as its runner measures it: the sandbox cgroup's reader (None without
    one) and its OOM kills before the run; without a cgroup, the rlimits the run gets."""

    memory: CgroupMemory | None
    oom_before: int = 0
    rlimits: dict[str, int] | None = None
