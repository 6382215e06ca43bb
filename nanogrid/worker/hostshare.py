"""What the workers of one host share: the capacity ledger (ledger.py) and the board of the
host's sandboxes (nanogrid/runners/lending.py).

Both are memfd pages the arbiter makes before it forks, so every worker inherits them; each
process then opens its own view of them (locks of its own). A worker on its own (tests,
benchmarks) makes its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanogrid.common.config import Config
from nanogrid.runners.lending import SandboxBoard

from .ledger import Ledger


@dataclass(frozen=True)
class HostShare:
    ledger: Ledger
    board: SandboxBoard

    @classmethod
    def create(cls, config: Config) -> HostShare:
        """New pages for a host whose capacity ``config`` has resolved (capacity.pin)."""
        capacity = config.capacity
        return cls(Ledger(capacity.memory_mb, capacity.max_concurrent), SandboxBoard())

    def reopened(self) -> HostShare:
        """The same pages with locks of this process's own (in a forked worker)."""
        ledger = self.ledger
        return HostShare(Ledger(ledger.memory_mb, ledger.max_concurrent, ledger.fd),
                         self.board.reopened())

    def resized(self, config: Config) -> HostShare:
        """The same pages under a reloaded config's budget: what runs stays counted."""
        capacity = config.capacity
        return HostShare(self.ledger.resize(capacity.memory_mb, capacity.max_concurrent),
                         self.board)

    def forget(self, index: int) -> None:
        """Worker ``index`` is gone: what it had running counts no more, and its sandboxes
        (they die with it, or are swept) are off the board."""
        self.ledger.reset(index)
        self.board.clear(index)
