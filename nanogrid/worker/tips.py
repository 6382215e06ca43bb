"""The auto-tuner's tip as a code, its numbers, and its sentence in each language.

A result carries all three: ``tipCode`` and ``tipParams`` (the contract a controller
renders in its users' language) and ``optimizationTip``, rendered here in
``autotuner.language``. Every code has a sentence in every language (tests hold it); the
Korean ones are written for Korean readers, not word for word from the English.

Params (all integers): ``currentMb`` the setting the run had, ``peakMb`` the highest peak
of the run and the recent ones (MiB, rounded down), ``recommendedMb``, ``savingPercent``
(rounded down: a tip never overstates it), ``runs`` how many runs the basis covers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

OVER_PROVISIONED = "OVER_PROVISIONED"
"""The setting is well above what the function needs: a smaller step would do."""
RIGHT_SIZED = "RIGHT_SIZED"
NEAR_LIMIT = "NEAR_LIMIT"
"""The peak came near the limit: the next step up."""
ABOVE_LIMIT = "ABOVE_LIMIT"
"""Recent runs peaked above this run's limit (the setting was lowered meanwhile)."""
NEAR_LIMIT_AT_MAX = "NEAR_LIMIT_AT_MAX"
OUT_OF_MEMORY = "OUT_OF_MEMORY"
OUT_OF_MEMORY_AT_MAX = "OUT_OF_MEMORY_AT_MAX"
UNFINISHED_RUN = "UNFINISHED_RUN"
"""A run that timed out or was killed: its peak says nothing of what the function needs
(it may have stopped before its heaviest part), so no smaller setting is suggested."""
CODES = (
    OVER_PROVISIONED, RIGHT_SIZED, NEAR_LIMIT, ABOVE_LIMIT, NEAR_LIMIT_AT_MAX, OUT_OF_MEMORY,
    OUT_OF_MEMORY_AT_MAX, UNFINISHED_RUN,
)
LANGUAGES = ("en", "ko")

_TEXT: Mapping[str, Mapping[str, str]] = {
    "en": {
        OVER_PROVISIONED: "💡 Tip: current memory setting ({currentMb}MB) is far above the peak "
        "({peakMb}MB); {recommendedMb}MB would cut cost by {savingPercent}%{runs_note}",
        RIGHT_SIZED: "✅ Memory setting ({currentMb}MB) fits the peak ({peakMb}MB){runs_note}",
        NEAR_LIMIT: "⚠️ Tip: the peak ({peakMb}MB) is near the current limit ({currentMb}MB); "
        "raise memory to {recommendedMb}MB to avoid out-of-memory failures{runs_note}",
        ABOVE_LIMIT: "⚠️ Tip: the peak ({peakMb}MB) is above the current limit ({currentMb}MB); "
        "raise memory to {recommendedMb}MB to avoid out-of-memory failures{runs_note}",
        NEAR_LIMIT_AT_MAX: "⚠️ Tip: the peak ({peakMb}MB) is near the current limit "
        "({currentMb}MB), the largest setting; reduce the function's memory use to avoid "
        "out-of-memory failures{runs_note}",
        OUT_OF_MEMORY: "⚠️ Tip: the function ran out of memory at {currentMb}MB; raise memory "
        "to {recommendedMb}MB",
        OUT_OF_MEMORY_AT_MAX: "⚠️ Tip: the function ran out of memory at {currentMb}MB, the "
        "largest setting; reduce its memory use",
        UNFINISHED_RUN: "ℹ️ No memory tip: the run did not finish, so its peak ({peakMb}MB) "
        "may be short of what the function needs; keeping {currentMb}MB",
    },
    "ko": {
        OVER_PROVISIONED: "💡 Tip: 현재 메모리 설정({currentMb}MB)에 비해 실제 최대 사용량"
        "({peakMb}MB)이 훨씬 적습니다. {recommendedMb}MB로 줄이면 비용을 {savingPercent}% "
        "절감할 수 있습니다{runs_note}",
        RIGHT_SIZED: "✅ 메모리 설정({currentMb}MB)이 최대 사용량({peakMb}MB)에 알맞습니다"
        "{runs_note}",
        NEAR_LIMIT: "⚠️ Tip: 최대 사용량({peakMb}MB)이 현재 메모리 한도({currentMb}MB)에 "
        "가깝습니다. 메모리 부족으로 실패하지 않도록 {recommendedMb}MB로 늘리세요{runs_note}",
        ABOVE_LIMIT: "⚠️ Tip: 최대 사용량({peakMb}MB)이 현재 메모리 한도({currentMb}MB)를 "
        "넘었습니다. 메모리 부족으로 실패하지 않도록 {recommendedMb}MB로 늘리세요{runs_note}",
        NEAR_LIMIT_AT_MAX: "⚠️ Tip: 최대 사용량({peakMb}MB)이 설정할 수 있는 가장 큰 값인 "
        "현재 한도({currentMb}MB)에 가깝습니다. 메모리 부족으로 실패하지 않도록 함수의 메모리 "
        "사용을 줄이세요{runs_note}",
        OUT_OF_MEMORY: "⚠️ Tip: 함수가 {currentMb}MB에서 메모리 부족으로 종료되었습니다. "
        "메모리를 {recommendedMb}MB로 늘리세요",
        OUT_OF_MEMORY_AT_MAX: "⚠️ Tip: 함수가 설정할 수 있는 가장 큰 값인 {currentMb}MB에서도 "
        "메모리 부족으로 종료되었습니다. 함수의 메모리 사용을 줄이세요",
        UNFINISHED_RUN: "ℹ️ 메모리 추천 없음: 실행이 끝나지 않아 측정된 최대 사용량"
        "({peakMb}MB)이 실제 필요량보다 적을 수 있습니다. 현재 설정({currentMb}MB)을 "
        "유지합니다",
    },
}
_RUNS_NOTE = {"en": " (based on the last {runs} runs)", "ko": " (최근 {runs}회 실행 기준)"}


def render(code: str, params: Mapping[str, Any], language: str = "en") -> str:
    """The sentence of ``code`` in ``language``; the runs note only when more than one run
    is behind it."""
    runs = params.get("runs", 1)
    note = _RUNS_NOTE[language].format(runs=runs) if runs > 1 else ""
    return _TEXT[language][code].format(runs_note=note, **params)
