"""The Prometheus text exposition of counters, gauges and histograms."""

from __future__ import annotations

import re
import threading

import pytest

from nanogrid.supervisor.prometheus import Registry

SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? (-?[0-9.e+]+|\+Inf)$')


def lines(registry: Registry) -> list[str]:
    text = registry.render()
    assert text.endswith("\n")
    out = text.splitlines()
    for line in out:
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or SAMPLE.match(line), line
    return out


def test_counter_with_labels_and_escaping() -> None:
    registry = Registry()
    calls = registry.counter("calls_total", "Calls made.", ("status", "error_type"))
    calls.inc(status="SUCCESS", error_type="")
    calls.inc(2, status="FAILED", error_type='a"b\\c\nd')
    assert lines(registry) == [
        "# HELP calls_total Calls made.",
        "# TYPE calls_total counter",
        'calls_total{status="FAILED",error_type="a\\"b\\\\c\\nd"} 2',
        'calls_total{status="SUCCESS",error_type=""} 1',
    ]


def test_unlabelled_metrics_show_zero_before_any_sample() -> None:
    registry = Registry()
    registry.counter("restarts_total", "Restarts.")
    registry.histogram("latency_seconds", "Latency.", (0.5,))
    assert lines(registry)[2:] == [
        "restarts_total 0",
        "# HELP latency_seconds Latency.",
        "# TYPE latency_seconds histogram",
        'latency_seconds_bucket{le="0.5"} 0',
        'latency_seconds_bucket{le="+Inf"} 0',
        "latency_seconds_sum 0",
        "latency_seconds_count 0",
    ]


def test_histogram_buckets_are_cumulative() -> None:
    registry = Registry()
    latency = registry.histogram("latency_seconds", "Latency.", (1, 0.1, 10))
    for value in (0.05, 0.1, 0.5, 20):
        latency.observe(value)
    assert lines(registry)[2:] == [
        'latency_seconds_bucket{le="0.1"} 2',
        'latency_seconds_bucket{le="1"} 3',
        'latency_seconds_bucket{le="10"} 3',
        'latency_seconds_bucket{le="+Inf"} 4',
        "latency_seconds_sum 20.65",
        "latency_seconds_count 4",
    ]


def test_gauge_replace_drops_label_sets_not_given() -> None:
    registry = Registry()
    sandboxes = registry.gauge("sandboxes", "Sandboxes.", ("runtime", "state"))
    sandboxes.set(3, runtime="node", state="warm")
    sandboxes.replace({("python", "busy"): 1, ("python", "warm"): 2})
    assert lines(registry)[2:] == [
        'sandboxes{runtime="python",state="busy"} 1',
        'sandboxes{runtime="python",state="warm"} 2',
    ]


def test_wrong_labels_are_refused() -> None:
    calls = Registry().counter("calls_total", "Calls.", ("status",))
    with pytest.raises(ValueError, match="labels must be"):
        calls.inc(state="x")


def test_render_while_other_threads_observe() -> None:
    registry = Registry()
    latency = registry.histogram("latency_seconds", "Latency.", (0.1, 1), ("worker",))

    def observe(worker: str) -> None:
        for _ in range(2000):
            latency.observe(0.5, worker=worker)

    threads = [threading.Thread(target=observe, args=(str(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        lines(registry)
    for thread in threads:
        thread.join()
    counts = [line for line in lines(registry) if line.startswith("latency_seconds_count")]
    assert counts == [f'latency_seconds_count{{worker="{i}"}} 2000' for i in range(4)]
