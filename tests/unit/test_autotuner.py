"""The auto-tuner's recommendation and the exact tip sentences the platform shows."""

from __future__ import annotations

import dataclasses

import pytest

from nanogrid.common.config import AutotunerConfig
from nanogrid.worker import tips
from nanogrid.worker.autotuner import PeakHistory, recommend
from nanogrid.worker.result import Result

MB = 2**20
CFG = AutotunerConfig()

CASES = [
    pytest.param(
        6 * MB, 256, False, [], CFG,
        (
            32,
            "💡 Tip: current memory setting (256MB) is far above the peak (6MB); "
            "32MB would cut cost by 87%",
            1,
            "OVER_PROVISIONED",
        ),
        id="far-above-design-example",
    ),
    pytest.param(
        6 * MB, 256, False, [6 * MB, 180 * MB, 10 * MB], CFG,
        (
            256, "✅ Memory setting (256MB) fits the peak (180MB) (based on the last 3 runs)", 3,
            "RIGHT_SIZED",
        ),
        id="history-prevents-downsize",
    ),
    pytest.param(
        6 * MB, 256, False, [6 * MB, 90 * MB], CFG,
        (
            128,
            "💡 Tip: current memory setting (256MB) is far above the peak (90MB); "
            "128MB would cut cost by 50% (based on the last 2 runs)",
            2,
            "OVER_PROVISIONED",
        ),
        id="history-limits-downsize",
    ),
    pytest.param(
        6 * MB, 256, False, [6 * MB], CFG,
        (
            32,
            "💡 Tip: current memory setting (256MB) is far above the peak (6MB); "
            "32MB would cut cost by 87%",
            1,
            "OVER_PROVISIONED",
        ),
        id="history-of-one-run-has-no-suffix",
    ),
    pytest.param(
        128 * MB, 128, True, [], CFG,
        (
            256, "⚠️ Tip: the function ran out of memory at 128MB; raise memory to 256MB", 1,
            "OUT_OF_MEMORY",
        ),
        id="oom",
    ),
    pytest.param(
        20 * MB, 128, True, [20 * MB, 10 * MB], CFG,
        (
            256, "⚠️ Tip: the function ran out of memory at 128MB; raise memory to 256MB", 2,
            "OUT_OF_MEMORY",
        ),
        id="oom-with-low-measured-peak-still-steps-up",
    ),
    pytest.param(
        700 * MB, 512, True, [], CFG,
        (
            1024, "⚠️ Tip: the function ran out of memory at 512MB; raise memory to 1024MB", 1,
            "OUT_OF_MEMORY",
        ),
        id="oom-with-peak-above-limit",
    ),
    pytest.param(
        120 * MB, 128, False, [], CFG,
        (
            256,
            "⚠️ Tip: the peak (120MB) is near the current limit (128MB); "
            "raise memory to 256MB to avoid out-of-memory failures",
            1,
            "NEAR_LIMIT",
        ),
        id="near-limit",
    ),
    pytest.param(
        116 * MB, 128, False, [], dataclasses.replace(CFG, headroom_percent=0),
        (
            256,
            "⚠️ Tip: the peak (116MB) is near the current limit (128MB); "
            "raise memory to 256MB to avoid out-of-memory failures",
            1,
            "NEAR_LIMIT",
        ),
        id="near-limit-without-headroom",
    ),
    pytest.param(
        110 * MB, 128, False, [], dataclasses.replace(CFG, headroom_percent=0),
        (128, "✅ Memory setting (128MB) fits the peak (110MB)", 1, "RIGHT_SIZED"),
        id="below-near-limit-without-headroom",
    ),
    pytest.param(
        10 * MB, 128, False, [10 * MB, 200 * MB], CFG,
        (
            256,
            "⚠️ Tip: the peak (200MB) is above the current limit (128MB); "
            "raise memory to 256MB to avoid out-of-memory failures (based on the last 2 runs)",
            2,
            "ABOVE_LIMIT",
        ),
        id="history-peak-above-limit",
    ),
    pytest.param(
        70 * MB, 128, False, [], CFG,
        (128, "✅ Memory setting (128MB) fits the peak (70MB)", 1, "RIGHT_SIZED"),
        id="well-sized",
    ),
    pytest.param(
        6 * MB, 512, False, [], dataclasses.replace(CFG, floor_mb=128),
        (
            128,
            "💡 Tip: current memory setting (512MB) is far above the peak (6MB); "
            "128MB would cut cost by 75%",
            1,
            "OVER_PROVISIONED",
        ),
        id="floor",
    ),
    pytest.param(
        6 * MB, 512, False, [], dataclasses.replace(CFG, floor_mb=100),
        (
            128,
            "💡 Tip: current memory setting (512MB) is far above the peak (6MB); "
            "128MB would cut cost by 75%",
            1,
            "OVER_PROVISIONED",
        ),
        id="floor-between-steps",
    ),
    pytest.param(
        50 * MB, 200, False, [], CFG,
        (
            64,
            "💡 Tip: current memory setting (200MB) is far above the peak (50MB); "
            "64MB would cut cost by 68%",
            1,
            "OVER_PROVISIONED",
        ),
        id="current-setting-not-a-step",
    ),
    pytest.param(
        2500 * MB, 2048, False, [], CFG,
        (
            3008,
            "⚠️ Tip: the peak (2500MB) is above the current limit (2048MB); "
            "raise memory to 3008MB to avoid out-of-memory failures",
            1,
            "ABOVE_LIMIT",
        ),
        id="no-step-big-enough-gives-largest",
    ),
    pytest.param(
        2900 * MB, 3008, False, [], CFG,
        (
            3008,
            "⚠️ Tip: the peak (2900MB) is near the current limit (3008MB), the largest setting; "
            "reduce the function's memory use to avoid out-of-memory failures",
            1,
            "NEAR_LIMIT_AT_MAX",
        ),
        id="near-limit-at-largest-step",
    ),
    pytest.param(
        3008 * MB, 3008, True, [], CFG,
        (
            3008,
            "⚠️ Tip: the function ran out of memory at 3008MB, the largest setting; "
            "reduce its memory use",
            1,
            "OUT_OF_MEMORY_AT_MAX",
        ),
        id="oom-at-largest-step",
    ),
]


@pytest.mark.parametrize(("peak", "memory_mb", "oom", "history", "cfg", "expected"), CASES)
def test_recommend(
    peak: int,
    memory_mb: int,
    oom: bool,
    history: list[int],
    cfg: AutotunerConfig,
    expected: tuple[int, str, int, str],
) -> None:
    rec = recommend(peak, memory_mb, cfg, oom=oom, history_peaks=history)
    assert (rec.recommended_mb, rec.tip, rec.based_on_runs, rec.code) == expected


def test_recommendation_is_never_below_floor_or_peak() -> None:
    for peak_mb in range(0, 3000, 7):
        for memory_mb in CFG.step_mb:
            rec = recommend(peak_mb * MB, memory_mb, CFG, oom=False, history_peaks=[])
            assert rec.recommended_mb >= CFG.floor_mb
            assert rec.recommended_mb * MB >= min(peak_mb * MB, CFG.step_mb[-1] * MB)


def test_peak_history_takes_this_run_and_the_recent_ones_up_to_its_size() -> None:
    history = PeakHistory(dataclasses.replace(CFG, history_size=3))
    assert history.depth == 2
    assert history.reading("fn", "python") == ("autotuner:peaks:fn:python", 1)
    assert PeakHistory(dataclasses.replace(CFG, history_size=1)).reading("fn", "node") is None
    assert history.with_run(5 * MB, ()) == [5 * MB]
    assert history.with_run(5 * MB, (7 * MB, 6 * MB, 1 * MB)) == [5 * MB, 7 * MB, 6 * MB]
    assert history.parse([b"7", b"x", "6", None]) == (7, 6)


def test_peak_history_records_runs_only() -> None:
    history = PeakHistory(dataclasses.replace(CFG, history_size=3, history_ttl_seconds=60))
    run = Result("r", "fn", "python", "FAILED", peak_memory_bytes=9 * MB, recommended_memory_mb=64)
    assert history.entry(run) == ("autotuner:peaks:fn:python", [9 * MB, 2, 60])
    assert history.entry(Result("r", "fn", "python", "FAILED", error_type="CODE_NOT_FOUND")) is None
    assert history.entry(Result(None, None, None, "FAILED")) is None


def test_the_design_example_as_code_and_params() -> None:
    rec = recommend(6 * MB, 256, CFG, oom=False, history_peaks=[6 * MB, 5 * MB])
    assert rec.code == "OVER_PROVISIONED"
    assert rec.params == {
        "currentMb": 256, "peakMb": 6, "recommendedMb": 32, "savingPercent": 87, "runs": 2,
    }


def test_the_tip_in_korean_reads_as_the_integration_checklist_expects() -> None:
    ko = dataclasses.replace(CFG, language="ko")
    rec = recommend(6 * MB, 256, ko, oom=False, history_peaks=[6 * MB, 5 * MB])
    assert rec.tip == (
        "💡 Tip: 현재 메모리 설정(256MB)에 비해 실제 최대 사용량(6MB)이 훨씬 적습니다. "
        "32MB로 줄이면 비용을 87% 절감할 수 있습니다 (최근 2회 실행 기준)"
    )
    assert rec.code == "OVER_PROVISIONED" and rec.recommended_mb == 32


PARAMS = {"currentMb": 256, "peakMb": 230, "recommendedMb": 512, "savingPercent": 50, "runs": 3}


@pytest.mark.parametrize("language", tips.LANGUAGES)
@pytest.mark.parametrize("code", tips.CODES)
def test_every_tip_code_has_a_sentence_in_every_language(code: str, language: str) -> None:
    text = tips.render(code, PARAMS, language)
    assert "{" not in text and "256MB" in text
    if language == "ko":
        assert any("\uac00" <= ch <= "\ud7a3" for ch in text), text  # Hangul
        assert ("최근 3회" in text) == ("runs_note" in tips._TEXT["ko"][code])
    else:
        assert text.isascii() or text[0] in "💡✅⚠ℹ"


def test_every_code_is_reachable_and_rendered_in_each_language() -> None:
    """Each code comes out of ``recommend`` for some run, in both languages, with the
    numbers its sentence names."""
    seen = set()
    for language in tips.LANGUAGES:
        cfg = dataclasses.replace(CFG, language=language)
        for peak_mb, memory_mb, oom, unfinished in [
            (6, 256, False, False), (70, 128, False, False), (120, 128, False, False),
            (2500, 2048, False, False), (2900, 3008, False, False), (128, 128, True, False),
            (3008, 3008, True, False), (6, 256, False, True),
        ]:
            rec = recommend(peak_mb * MB, memory_mb, cfg, oom=oom, history_peaks=[],
                            unfinished=unfinished)
            assert rec.tip == tips.render(rec.code, rec.params, language)
            assert f"{memory_mb}MB" in rec.tip
            seen.add((rec.code, language))
    assert seen == {(code, language) for code in tips.CODES for language in tips.LANGUAGES}


@pytest.mark.parametrize("history", [[], [6 * MB, 5 * MB]])
def test_no_cut_memory_tip_after_a_run_that_did_not_finish(history: list[int]) -> None:
    rec = recommend(6 * MB, 256, CFG, oom=False, history_peaks=history, unfinished=True)
    assert rec.code == "UNFINISHED_RUN" and rec.recommended_mb == 256
    assert "cut" not in rec.tip and "32MB" not in rec.tip
    assert rec.params == {"currentMb": 256, "peakMb": 6, "runs": max(1, len(history))}


def test_a_run_that_did_not_finish_near_its_limit_still_says_raise() -> None:
    rec = recommend(120 * MB, 128, CFG, oom=False, history_peaks=[], unfinished=True)
    assert rec.code == "NEAR_LIMIT" and rec.recommended_mb == 256
