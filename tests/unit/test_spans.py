"""The span hook on stub services: the process span joins the producer's trace (a child and a
link), the stages are its children, and the function is given the process span as parent."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from nanogrid.runners.base import Invocation, RunOutcome, Sandbox
from nanogrid.worker.loop import Worker
from nanogrid.worker.spans import SpanHook
from nanogrid.worker.sqs import Message
from nanogrid.worker.stubs import StubRunner, Stubs
from nanogrid.worker.tracecontext import TraceContext

TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


class SeeingRunner(StubRunner):
    """Keeps the invocations it ran (their trace context)."""

    def __init__(self, exit_code: int = 0) -> None:
        super().__init__()
        self.seen: list[Invocation] = []
        self.exit_code = exit_code

    def run(self, sandbox: Sandbox, invocation: Invocation) -> RunOutcome:
        self.seen.append(invocation)
        return RunOutcome(self.exit_code, False, False, b"", b"", False, False, 1.0, 2**20, "x")


@pytest.fixture
def traced(make_stubs: Callable[..., Stubs]) -> Callable[..., Any]:
    """(stubs, a worker with the span hook, its finished spans once it stops, the runner)."""

    def make(exit_code: int = 0) -> tuple[Stubs, Worker, Callable[[], Any], SeeingRunner]:
        exporter, runner = InMemorySpanExporter(), SeeingRunner(exit_code)
        stubs = make_stubs(runner=runner)
        hook = SpanHook.exporting("http://127.0.0.1:4318", "tasks", exporter)

        def finished() -> Any:
            hook.close()  # as the worker's drain does: the batch goes out
            return exporter.get_finished_spans()

        return stubs, Worker(stubs.services, 0, hooks=[hook]), finished, runner

    return make


def message(trace: TraceContext | None) -> Message:
    body = {"requestId": "r1", "functionId": "f", "runtime": "python", "s3Bucket": "b",
            "s3Key": "k", "memoryMb": 128}
    return Message("m1", "rh", json.dumps(body), 1, trace=trace)


def test_the_process_span_is_a_child_of_the_producer_and_links_it(traced: Any) -> None:
    stubs, worker, finished, runner = traced()
    worker.handle(message(TraceContext(TRACE, PARENT, True, "k=v")))
    spans = {s.name: s for s in finished()}
    process = spans["tasks process"]
    assert process.kind is SpanKind.CONSUMER
    assert f"{process.context.trace_id:032x}" == TRACE
    assert f"{process.parent.span_id:016x}" == PARENT and process.parent.is_remote
    assert [f"{link.context.span_id:016x}" for link in process.links] == [PARENT]
    assert process.attributes["faas.invocation_id"] == "r1"
    assert process.attributes["faas.max_memory"] == 128 * 2**20
    assert process.attributes["faas.mem_usage"] == 2**20
    assert process.attributes["faas.coldstart"] is False
    assert process.status.status_code is StatusCode.UNSET
    for stage in ("claim", "fetch", "sandbox", "run", "end"):
        assert spans[stage].parent.span_id == process.context.span_id, stage
    own = f"{process.context.span_id:016x}"
    assert runner.seen[0].traceparent == f"00-{TRACE}-{own}-01"
    assert runner.seen[0].tracestate == "k=v"
    assert stubs.store.published[0]["traceId"] == TRACE


def test_a_root_only_aws_trace_header_keeps_its_trace_id(traced: Any) -> None:
    _, worker, finished, runner = traced()
    worker.handle(message(TraceContext(TRACE, None)))
    (process,) = [s for s in finished() if s.name == "tasks process"]
    assert f"{process.context.trace_id:032x}" == TRACE and process.parent is None
    assert process.links == ()
    assert runner.seen[0].traceparent == f"00-{TRACE}-{process.context.span_id:016x}-01"


def test_a_message_without_a_trace_starts_one_and_its_result_says_none(traced: Any) -> None:
    stubs, worker, finished, runner = traced()
    worker.handle(message(None))
    worker.handle(message(None))
    roots = [s for s in finished() if s.name == "tasks process"]
    assert len({s.context.trace_id for s in roots}) == 2 and all(s.parent is None for s in roots)
    assert runner.seen[0].traceparent is not None  # the function still joins the span's trace
    assert [r["traceId"] for r in stubs.store.published] == [None, None]


def test_a_failed_run_marks_its_span(traced: Any) -> None:
    _, worker, finished, _ = traced(exit_code=3)
    worker.handle(message(TraceContext(TRACE, PARENT)))
    (process,) = [s for s in finished() if s.name == "tasks process"]
    assert process.status.status_code is StatusCode.ERROR
    assert process.attributes["error.type"] == "FUNCTION_ERROR"
