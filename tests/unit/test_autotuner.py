"""The auto-tuner's recommendation and the exact tip sentences the platform shows."""

from __future__ import annotations

import dataclasses

import pytest

from common.config import AutotunerConfig
from worker.autotuner import PeakHistory, Recommendation, recommend
from worker.result import Result

MB = 2**20
CFG = AutotunerConfig()

CASES = [
    pytest.param(
        6 * MB, 256, False, [], CFG,
        Recommendation(
            32,
            "💡 Tip: current memory setting (256MB) is far above the peak (6MB); "
            "32MB would cut cost by 87%",
            1,
        ),
        id="far-above-design-example",
    ),
    pytest.param(
        6 * MB, 256, False, [6 * MB, 180 * MB, 10 * MB], CFG,
        Recommendation(
            256, "✅ Memory setting (256MB) fits the peak (180MB) (based on the last 3 runs)", 3
        ),
        id="history-prevents-downsize",
    ),
    pytest.param(
        6 * MB, 256, False, [6 * MB, 90 * MB], CFG,
        Recommendation(
            128,
            "💡 Tip: current memory setting (256MB) is far above the peak (90MB); "
            "128MB would cut cost by 50% (based on the last 2 runs)",
            2,
        ),
        id="history-limits-downsize",
    ),
    pytest.param(
        6 * MB, 256, False, [6 * MB], CFG,
        Recommendation(
            32,
            "💡 Tip: current memory setting (256MB) is far above the peak (6MB); "
            "32MB would cut cost by 87%",
            1,
        ),
        id="history-of-one-run-has-no-suffix",
    ),
    pytest.param(
        128 * MB, 128, True, [], CFG,
        Recommendation(
            256, "⚠️ Tip: the function ran out of memory at 128MB; raise memory to 256MB", 1
        ),
        id="oom",
    ),
    pytest.param(
        20 * MB, 128, True, [20 * MB, 10 * MB], CFG,
        Recommendation(
            256, "⚠️ Tip: the function ran out of memory at 128MB; raise memory to 256MB", 2
        ),
        id="oom-with-low-measured-peak-still-steps-up",
    ),
    pytest.param(
        700 * MB, 512, True, [], CFG,
        Recommendation(
            1024, "⚠️ Tip: the function ran out of memory at 512MB; raise memory to 1024MB", 1
        ),
        id="oom-with-peak-above-limit",
    ),
    pytest.param(
        120 * MB, 128, False, [], CFG,
        Recommendation(
            256,
            "⚠️ Tip: the peak (120MB) is near the current limit (128MB); "
            "raise memory to 256MB to avoid out-of-memory failures",
            1,
        ),
        id="near-limit",
    ),
    pytest.param(
        116 * MB, 128, False, [], dataclasses.replace(CFG, headroom_percent=0),
        Recommendation(
            256,
            "⚠️ Tip: the peak (116MB) is near the current limit (128MB); "
            "raise memory to 256MB to avoid out-of-memory failures",
            1,
        ),
        id="near-limit-without-headroom",
    ),
    pytest.param(
        110 * MB, 128, False, [], dataclasses.replace(CFG, headroom_percent=0),
        Recommendation(128, "✅ Memory setting (128MB) fits the peak (110MB)", 1),
        id="below-near-limit-without-headroom",
    ),
    pytest.param(
        10 * MB, 128, False, [10 * MB, 200 * MB], CFG,
        Recommendation(
            256,
            "⚠️ Tip: the peak (200MB) is above the current limit (128MB); "
            "raise memory to 256MB to avoid out-of-memory failures (based on the last 2 runs)",
            2,
        ),
        id="history-peak-above-limit",
    ),
    pytest.param(
        70 * MB, 128, False, [], CFG,
        Recommendation(128, "✅ Memory setting (128MB) fits the peak (70MB)", 1),
        id="well-sized",
    ),
    pytest.param(
        6 * MB, 512, False, [], dataclasses.replace(CFG, floor_mb=128),
        Recommendation(
            128,
            "💡 Tip: current memory setting (512MB) is far above the peak (6MB); "
            "128MB would cut cost by 75%",
            1,
        ),
        id="floor",
    ),
    pytest.param(
        6 * MB, 512, False, [], dataclasses.replace(CFG, floor_mb=100),
        Recommendation(
            128,
            "💡 Tip: current memory setting (512MB) is far above the peak (6MB); "
            "128MB would cut cost by 75%",
            1,
        ),
        id="floor-between-steps",
    ),
    pytest.param(
        50 * MB, 200, False, [], CFG,
        Recommendation(
            64,
            "💡 Tip: current memory setting (200MB) is far above the peak (50MB); "
            "64MB would cut cost by 68%",
            1,
        ),
        id="current-setting-not-a-step",
    ),
    pytest.param(
        2500 * MB, 2048, False, [], CFG,
        Recommendation(
            3008,
            "⚠️ Tip: the peak (2500MB) is above the current limit (2048MB); "
            "raise memory to 3008MB to avoid out-of-memory failures",
            1,
        ),
        id="no-step-big-enough-gives-largest",
    ),
    pytest.param(
        2900 * MB, 3008, False, [], CFG,
        Recommendation(
            3008,
            "⚠️ Tip: the peak (2900MB) is near the current limit (3008MB), the largest setting; "
            "reduce the function's memory use to avoid out-of-memory failures",
            1,
        ),
        id="near-limit-at-largest-step",
    ),
    pytest.param(
        3008 * MB, 3008, True, [], CFG,
        Recommendation(
            3008,
            "⚠️ Tip: the function ran out of memory at 3008MB, the largest setting; "
            "reduce its memory use",
            1,
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
    expected: Recommendation,
) -> None:
    assert recommend(peak, memory_mb, cfg, oom=oom, history_peaks=history) == expected


def test_recommendation_is_never_below_floor_or_peak() -> None:
    for peak_mb in range(0, 3000, 7):
        for memory_mb in CFG.step_mb:
            rec = recommend(peak_mb * MB, memory_mb, CFG, oom=False, history_peaks=[])
            assert rec.recommended_mb >= CFG.floor_mb
            assert rec.recommended_mb * MB >= min(peak_mb * MB, CFG.step_mb[-1] * MB)


def test_peak_history_takes_this_run_and_the_recent_ones_up_to_its_size() -> None:
    history = PeakHistory(dataclasses.replace(CFG, history_size=3))
    assert history.depth == 2
    assert history.reading("fn") == ("autotuner:peaks:fn", 1)
    assert PeakHistory(dataclasses.replace(CFG, history_size=1)).reading("fn") is None
    assert history.with_run(5 * MB, ()) == [5 * MB]
    assert history.with_run(5 * MB, (7 * MB, 6 * MB, 1 * MB)) == [5 * MB, 7 * MB, 6 * MB]
    assert history.parse([b"7", b"x", "6", None]) == (7, 6)


def test_peak_history_records_runs_only() -> None:
    history = PeakHistory(dataclasses.replace(CFG, history_size=3, history_ttl_seconds=60))
    run = Result("r", "fn", "python", "FAILED", peak_memory_bytes=9 * MB, recommended_memory_mb=64)
    assert history.entry(run) == ("autotuner:peaks:fn", [9 * MB, 2, 60])
    assert history.entry(Result("r", "fn", "python", "FAILED", error_type="CODE_NOT_FOUND")) is None
    assert history.entry(Result(None, None, None, "FAILED")) is None
