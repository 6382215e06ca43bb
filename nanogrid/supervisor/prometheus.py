"""Counters, gauges and histograms in the Prometheus text exposition format (version 0.0.4).

Just what /metrics needs, without a dependency: the arbiter's loop updates the metrics and
the HTTP thread renders them, so every metric takes the registry's lock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LabelValues = tuple[str, ...]


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str], lock: threading.Lock):
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        self._lock = lock

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: labels must be {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> Iterable[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str], lock: threading.Lock):
        super().__init__(name, help_text, labels, lock)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def set(self, value: float, **labels: str) -> None:
        """A gauge's value, or a counter kept elsewhere (a process's CPU time) mirrored."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = value

    def replace(self, values: Mapping[LabelValues, float]) -> None:
        """Set every labelled value at once; label sets not given disappear."""
        with self._lock:
            self._values = dict(values)

    def samples(self) -> Iterable[str]:
        if not self._values and not self.label_names:
            yield f"{self.name} 0"
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{_labels(self.label_names, key)} {_number(value)}"


class Gauge(Counter):
    kind = "gauge"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str], lock: threading.Lock,
                 buckets: Sequence[float]) -> None:
        super().__init__(name, help_text, labels, lock)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * len(self.buckets), [0.0]))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            total[0] += value

    def samples(self) -> Iterable[str]:
        series = dict(self._series)
        if not series and not self.label_names:  # an unlabelled histogram shows its zeros
            series[()] = ([0] * len(self.buckets), [0.0])
        for key, (counts, total) in sorted(series.items()):
            for bound, count in zip(self.buckets, counts, strict=True):
                names, values = (*self.label_names, "le"), (*key, _number(bound))
                yield f"{self.name}_bucket{_labels(names, values)} {count}"
            suffix = _labels(self.label_names, key)
            yield f"{self.name}_sum{suffix} {_number(total[0])}"
            yield f"{self.name}_count{suffix} {counts[-1]}"


M = TypeVar("M", bound=_Metric)


class Registry:
    """The metrics of one process, rendered together."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: list[_Metric] = []

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, labels, self._lock))

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, labels, self._lock))

    def histogram(self, name: str, help_text: str, buckets: Sequence[float],
                  labels: Sequence[str] = ()) -> Histogram:
        return self._add(Histogram(name, help_text, labels, self._lock, buckets))

    def _add(self, metric: M) -> M:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        with self._lock:
            lines = [line for m in self._metrics for line in (*m.header(), *m.samples())]
        return "\n".join(lines) + "\n"
