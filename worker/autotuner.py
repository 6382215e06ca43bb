"""Memory auto-tuner: turns measured peaks into a recommended memory setting and a tip.

``recommend`` is pure. The basis is the highest peak of this run and the recent history, so
one light run does not talk a function into an out-of-memory failure. ``PeakHistory`` keeps
the last ``history_size`` peaks per function in Redis.

Choices worth knowing:
- the recommendation is the smallest ``step_mb`` entry that holds basis + headroom and is at
  least ``floor_mb``; when no step is big enough it is the largest step (the platform's
  settings are the steps, so a number above them could not be applied);
- after an OOM, or a peak at/above ``near_limit_percent`` of the limit, it is at least the
  next step strictly above the current setting; at the largest step the tip says so;
- the cost saving shown is rounded down (256MB -> 32MB is 87.5%, shown as 87%), so a tip
  never overstates it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.config import AutotunerConfig, MiB

from . import rediskeys
from .result import Result


@dataclass(frozen=True)
class Recommendation:
    recommended_mb: int
    tip: str
    based_on_runs: int


def recommend(
    peak_bytes: int,
    memory_mb: int,
    cfg: AutotunerConfig,
    *,
    oom: bool,
    history_peaks: list[int],
) -> Recommendation:
    """Recommend a memory setting for a function that peaked at ``peak_bytes`` under ``memory_mb``.

    ``history_peaks`` are the recent peaks as ``PeakHistory.with_run`` returns them (this
    run included); ``based_on_runs`` is their count (at least 1).
    """
    runs = max(1, len(history_peaks))
    basis = max([peak_bytes, *history_peaks])
    basis_mb = basis // MiB
    suffix = f" (based on the last {runs} runs)" if runs > 1 else ""
    fitted = _fit(basis, cfg)
    near_limit = peak_bytes * 100 >= cfg.near_limit_percent * memory_mb * MiB

    if oom or near_limit or fitted > memory_mb:
        above = [s for s in cfg.step_mb if s > memory_mb]
        if not above:
            tip = (
                f"⚠️ Tip: the function ran out of memory at {memory_mb}MB, the largest setting; "
                "reduce its memory use"
                if oom
                else f"⚠️ Tip: the peak ({basis_mb}MB) is near the current limit ({memory_mb}MB), "
                f"the largest setting; reduce the function's memory use to avoid out-of-memory "
                f"failures{suffix}"
            )
            return Recommendation(memory_mb, tip, runs)
        rec = max(fitted, above[0])
        if oom:
            tip = f"⚠️ Tip: the function ran out of memory at {memory_mb}MB; raise memory to {rec}MB"
        else:
            where = "above" if basis > memory_mb * MiB else "near"
            tip = (
                f"⚠️ Tip: the peak ({basis_mb}MB) is {where} the current limit ({memory_mb}MB); "
                f"raise memory to {rec}MB to avoid out-of-memory failures{suffix}"
            )
        return Recommendation(rec, tip, runs)

    if fitted < memory_mb:
        saving = int((1 - fitted / memory_mb) * 100)
        tip = (
            f"💡 Tip: current memory setting ({memory_mb}MB) is far above the peak ({basis_mb}MB); "
            f"{fitted}MB would cut cost by {saving}%{suffix}"
        )
        return Recommendation(fitted, tip, runs)

    return Recommendation(
        memory_mb, f"✅ Memory setting ({memory_mb}MB) fits the peak ({basis_mb}MB){suffix}", runs
    )


def _fit(basis_bytes: int, cfg: AutotunerConfig) -> int:
    """Smallest step holding basis + headroom and >= floor, else the largest step."""
    needed = basis_bytes * (100 + cfg.headroom_percent)  # in bytes * 100, to stay in integers
    for step in cfg.step_mb:
        if step >= cfg.floor_mb and step * MiB * 100 >= needed:
            return step
    return cfg.step_mb[-1]


class PeakHistory:
    """The last ``history_size`` peaks per function, in the Redis list ``autotuner:peaks:{id}``.

    It costs no round trip of its own: the task's claim reads it (claim.py) and its result's
    publish records the run's peak (resultstore.py), each in the same script. Without Redis
    neither happens (the task goes back to the queue, or its result into the outbox, whose
    re-send records the peak then).
    """

    def __init__(self, cfg: AutotunerConfig) -> None:
        self._cfg = cfg

    key = staticmethod(rediskeys.peaks)

    @property
    def depth(self) -> int:
        """How many recent peaks a run reads: with its own, ``history_size``."""
        return self._cfg.history_size - 1

    def with_run(self, peak_bytes: int, recent: Sequence[int]) -> list[int]:
        """This run's peak and the recent ones, newest first (what ``recommend`` takes)."""
        return [peak_bytes, *recent[: self.depth]]

    def reading(self, function_id: str) -> tuple[str, int] | None:
        """The key and the last index (LRANGE) of the recent peaks a run of ``function_id``
        reads; None when the history holds the run's own peak only."""
        return (self.key(function_id), self.depth - 1) if self.depth > 0 else None

    def entry(self, result: Result) -> tuple[str, list[int]] | None:
        """The key and the arguments (peak, last index kept, TTL) that record ``result``'s
        peak; None for a task that never ran (its result has no recommendation)."""
        if result.function_id is None or result.recommended_memory_mb is None:
            return None
        return self.key(result.function_id), [
            result.peak_memory_bytes, self.depth, self._cfg.history_ttl_seconds,
        ]

    @staticmethod
    def parse(raw: Sequence[Any]) -> tuple[int, ...]:
        """Peaks as Redis returns them; anything not a number is skipped."""
        return tuple(p for p in (_as_int(v) for v in raw) if p is not None)


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None

