"""Fixtures of the unit tier: a worker's stubs (nanogrid/worker/stubs.py), closed after the test."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nanogrid.common.config import from_dict
from nanogrid.worker.stubs import StubCodes, StubRunner, Stubs

MakeStubs = Callable[..., Stubs]


@pytest.fixture
def make_stubs() -> Iterator[MakeStubs]:
    """Makes a worker's stubs, on a config of max_attempts 3 (``sections`` change it); their
    threads are closed after the test."""
    made: list[Stubs] = []

    def make(
        codes: StubCodes | None = None, runner: StubRunner | None = None, **sections: Any
    ) -> Stubs:
        settings: dict[str, Any] = {
            "queue": {"url": "http://127.0.0.1:1/000000000000/tasks", "max_attempts": 3,
                      "visibility_timeout_seconds": 4},
        }
        settings.update(sections)
        made.append(Stubs.make(from_dict(settings), codes=codes, runner=runner))
        return made[-1]

    yield make
    for stubs in made:
        stubs.services.close()


@pytest.fixture
def leftover() -> Iterator[int]:
    """A real process for a sandbox's kills to reach (a run's leftover)."""
    process = subprocess.Popen(["sleep", "60"])
    yield process.pid
    process.kill()
    process.wait()
