"""Removing one worker's containers: in the background, so no worker waits ~100 ms for a
removal, and again later when the engine was away and refused one."""

from __future__ import annotations

import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import docker
from docker.errors import NotFound
from loguru import logger

from nanogrid.common.errors import SandboxError

from .cleanup import UNREACHABLE, describe, remove_orphans

MARKER = "[DOCKER]"


class Reaper:
    """Removes containers and their host directories on a thread of its own."""

    def __init__(self, api: Callable[[], docker.DockerClient]) -> None:
        self._api = api
        self._unremoved: set[str] = set()
        """Containers (ids or names) whose removal failed (engine away); retried before each
        create and on close."""
        self._doomed: queue.SimpleQueue[tuple[str | None, Path] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._reap, name="docker-reaper", daemon=True)
        self._thread.start()

    def later(self, container: str | None, root: Path) -> None:
        """Remove the container (by id) and its host directory in the background."""
        self._doomed.put((container, root))

    def remove(self, container: str) -> None:
        """Force-remove a container by id or name; remember it for a retry if that fails."""
        try:
            self._api().api.remove_container(container, force=True)
            self._unremoved.discard(container)
        except NotFound:
            self._unremoved.discard(container)
        except (SandboxError, *UNREACHABLE) as exc:
            self._unremoved.add(container)
            logger.warning(
                f"{MARKER} cannot remove container {container[:40]} now "
                f"({describe(exc)}); will retry"
            )

    def retry(self) -> None:
        """Retry the removals the engine refused."""
        for container in list(self._unremoved):
            self.remove(container)

    def remove_dead_workers_containers(self) -> None:
        """Remove containers of this agent whose worker process is gone (e.g. SIGKILLed)."""
        try:
            removed = remove_orphans(self._api())
        except UNREACHABLE as exc:
            raise SandboxError(describe(exc)) from None
        if removed:
            logger.info(f"{MARKER} removed {removed} container(s) of exited workers")

    def close(self) -> None:
        """Finish the background removals; retry the refused ones once more."""
        self._doomed.put(None)
        self._thread.join()
        self.retry()

    def _reap(self) -> None:
        while (doomed := self._doomed.get()) is not None:
            container, root = doomed
            if container is not None:
                self.remove(container)
            shutil.rmtree(root, ignore_errors=True)
