"""Fixtures of the e2e tier."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from supervised import Agent


@pytest.fixture
def agents(aws: Any, redis_url: str) -> Iterator[Any]:
    made: list[Agent] = []

    def make(**settings: Any) -> Agent:
        made.append(Agent(aws, redis_url, **settings))
        return made[-1]

    yield make
    for agent in made:
        agent.close()
