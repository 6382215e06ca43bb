"""Memory auto-tuner: turns measured peaks into a recommended memory setting and a tip.

``recommend`` is pure. The basis is the highest peak of this run and the recent history, so
one light run does not talk a function into an out-of-memory failure. ``PeakHistory`` keeps
the last ``history_size`` peaks per function and runtime in Redis. The tip is a code and its
numbers, with the sentence in ``autotuner.language`` (tips.py).

Choices worth knowing:
- the recommendation is the smallest ``step_mb`` entry that holds basis + headroom and is at
  least ``floor_mb``; when no step is big enough it is the largest step (the platform's
  settings are the steps, so a number above them could not be applied);
- after an OOM, or a peak at/above ``near_limit_percent`` of the limit, it is at least the
  next step strictly above the current setting; at the largest step the tip says so;
- the cost saving shown is rounded down (256MB -> 32MB is 87.5%, shown as 87%), so a tip
  never overstates it;
- a run that timed out or was killed never gets a smaller setting (its peak is of a part of
  the run only), but a peak near the limit still recommends more;
- the history is per function and runtime: a function moved to another runtime starts anew.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nanogrid.common.config import AutotunerConfig, MiB

from . import rediskeys, tips
from .result import Result


@dataclass(frozen=True)
class Recommendation:
    recommended_mb: int
    tip: str
    based_on_runs: int
    code: str
    """The tip's code (tips.py); ``params`` its numbers."""
    params: Mapping[str, int]


def recommend(
    peak_bytes: int,
    memory_mb: int,
    cfg: AutotunerConfig,
    *,
    oom: bool,
    history_peaks: list[int],
    unfinished: bool = False,
) -> Recommendation:
    """Recommend a memory setting for a function that peaked at ``peak_bytes`` under ``memory_mb``.

    ``history_peaks`` are the recent peaks as ``PeakHistory.with_run`` returns them (this
    run included); ``based_on_runs`` is their count (at least 1). ``unfinished``: the run
    timed out or was killed, so it may say to raise memory, never to cut it.
    """
    runs = max(1, len(history_peaks))
    basis = max([peak_bytes, *history_peaks])
    fitted = _fit(basis, cfg)
    near_limit = peak_bytes * 100 >= cfg.near_limit_percent * memory_mb * MiB
    numbers = {"currentMb": memory_mb, "peakMb": basis // MiB, "runs": runs}

    def tip(code: str, recommended_mb: int, **more: int) -> Recommendation:
        params = {**numbers, **more}
        text = tips.render(code, params, cfg.language)
        return Recommendation(recommended_mb, text, runs, code, params)

    if oom or near_limit or fitted > memory_mb:
        above = [s for s in cfg.step_mb if s > memory_mb]
        if not above:
            if oom:
                return tip(tips.OUT_OF_MEMORY_AT_MAX, memory_mb)
            return tip(tips.NEAR_LIMIT_AT_MAX, memory_mb)
        rec = max(fitted, above[0])
        if oom:
            return tip(tips.OUT_OF_MEMORY, rec, recommendedMb=rec)
        code = tips.ABOVE_LIMIT if basis > memory_mb * MiB else tips.NEAR_LIMIT
        return tip(code, rec, recommendedMb=rec)
    if unfinished:
        return tip(tips.UNFINISHED_RUN, memory_mb)
    if fitted < memory_mb:
        saving = int((1 - fitted / memory_mb) * 100)
        return tip(tips.OVER_PROVISIONED, fitted, recommendedMb=fitted, savingPercent=saving)
    return tip(tips.RIGHT_SIZED, memory_mb)


def _fit(basis_bytes: int, cfg: AutotunerConfig) -> int:
    """Smallest step holding basis + headroom and >= floor, else the largest step."""
    needed = basis_bytes * (100 + cfg.headroom_percent)  # in bytes * 100, to stay in integers
    for step in cfg.step_mb:
        if step >= cfg.floor_mb and step * MiB * 100 >= needed:
            return step
    return cfg.step_mb[-1]


class PeakHistory:
    """The last ``history_size`` peaks per function and runtime, in the Redis list
    ``autotuner:peaks:{functionId}:{runtime}``.

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

    def reading(self, function_id: str, runtime: str) -> tuple[str, int] | None:
        """The key and the last index (LRANGE) of the recent peaks a run of ``function_id``
        on ``runtime`` reads; None when the history holds the run's own peak only."""
        return (self.key(function_id, runtime), self.depth - 1) if self.depth > 0 else None

    def entry(self, result: Result) -> tuple[str, list[int]] | None:
        """The key and the arguments (peak, last index kept, TTL) that record ``result``'s
        peak; None for a task that never ran (its result has no recommendation)."""
        if (
            result.function_id is None
            or result.runtime is None
            or result.recommended_memory_mb is None
        ):
            return None
        return self.key(result.function_id, result.runtime), [
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

