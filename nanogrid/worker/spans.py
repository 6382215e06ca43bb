"""Spans of each invocation, exported over OTLP/HTTP: a hook (imported only when
``tracing.otlp_endpoint`` is set: tracing.py).

One ``{queue} process`` span per message (OpenTelemetry's messaging conventions: a CONSUMER
span from the receive to the message's end), a child of the producer's context when the
message carried one, which it also links: the controller's ``POST /run``, the queue wait, a
cold start and the run are one trace. Its children are the pipeline's stages (claim, fetch,
sandbox, unpack, run, end). Attributes: ``faas.invocation_id`` (the requestId),
``faas.coldstart``, ``faas.max_memory`` and ``faas.mem_usage`` (the peak), both in bytes.
The function's ``TRACEPARENT`` names the process span, so its own spans join the trace.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from loguru import logger
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from nanogrid.common.config import MiB

from .hooks import Hook, MessageRun
from .tracecontext import TraceContext

_KEY = "spans"
"""This hook's entry in ``MessageRun.notes``: (process span, {stage: its child span})."""


class _TraceIds(RandomIdGenerator):
    """The SDK's random ids, except a root span's trace id when the message named its trace
    but no parent span (X-Ray's header may carry only a Root): set per thread around it."""

    def __init__(self) -> None:
        self.given = threading.local()

    def generate_trace_id(self) -> int:
        given = getattr(self.given, "trace_id", None)
        return given if given is not None else super().generate_trace_id()


class SpanHook(Hook):
    """Makes each message's spans with ``provider``'s tracer."""

    def __init__(self, provider: TracerProvider, queue: str, ids: _TraceIds) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("nanogrid.worker")
        self._queue = queue
        self._ids = ids

    @classmethod
    def exporting(cls, endpoint: str, queue: str, exporter: SpanExporter | None = None
                  ) -> SpanHook:
        """Spans go to the OTLP/HTTP collector at ``endpoint`` (``/v1/traces`` added unless
        there) in batches, from a thread of the SDK's; ``exporter`` replaces it (tests)."""
        url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else (
            endpoint.rstrip("/") + "/v1/traces"
        )
        host = socket.gethostname()
        resource = Resource.create({
            "service.name": "nanogrid-worker",
            "service.instance.id": f"{host}:{os.getpid()}",
            "host.name": host,
        })
        ids = _TraceIds()
        provider = TracerProvider(resource=resource, id_generator=ids)
        provider.add_span_processor(BatchSpanProcessor(exporter or OTLPSpanExporter(endpoint=url)))
        logger.info(f"[TRACE] spans of each invocation go to {url}")
        return cls(provider, queue, ids)

    def before(self, stage: str, run: MessageRun) -> None:
        if stage == "message":
            self._start(run)
            return
        held = run.notes.get(_KEY)
        if held is not None:
            parent = trace.set_span_in_context(held[0])
            held[1][stage] = self._tracer.start_span(stage, context=parent)

    def after(self, stage: str, run: MessageRun, error: BaseException | None) -> None:
        held = run.notes.get(_KEY)
        if held is None:
            return
        span = held[0] if stage == "message" else held[1].pop(stage, None)
        if span is None:
            return
        if stage == "message":
            _describe(span, run)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()

    def close(self) -> None:
        self._provider.shutdown()  # sends what the batch still holds

    def _start(self, run: MessageRun) -> None:
        message, t = run.message, run.task
        producer = message.trace
        context, links = None, []
        if producer is not None and producer.span_id is not None:
            remote = _span_context(producer)
            context = trace.set_span_in_context(trace.NonRecordingSpan(remote))
            links = [Link(remote)]
        attributes: dict[str, Any] = {
            "messaging.system": "aws_sqs",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": self._queue,
            "messaging.message.id": message.message_id,
            "faas.trigger": "pubsub",
        }
        if t is not None:
            attributes.update({
                "faas.invocation_id": t.request_id,
                "faas.name": t.function_id,
                "faas.max_memory": t.memory_mb * MiB,
                "nanogrid.runtime": t.runtime,
            })
        root_of = producer.trace_id if producer is not None and context is None else None
        self._ids.given.trace_id = int(root_of, 16) if root_of is not None else None
        try:
            span = self._tracer.start_span(
                f"{self._queue} process", context=context, kind=SpanKind.CONSUMER, links=links,
                attributes=attributes, start_time=int(message.received_at * 1e9),
            )
        finally:
            self._ids.given.trace_id = None
        run.notes[_KEY] = (span, {})
        own = span.get_span_context()
        if own.is_valid:
            run.trace = TraceContext(
                f"{own.trace_id:032x}", f"{own.span_id:016x}", own.trace_flags.sampled,
                producer.tracestate if producer is not None else None,
            )


def _describe(span: Any, run: MessageRun) -> None:
    """What the run came to, on its process span."""
    res = run.result
    if res is None:
        return
    span.set_attribute("faas.coldstart", res.cold_start)
    span.set_attribute("faas.mem_usage", res.peak_memory_bytes)
    span.set_attribute("nanogrid.status", res.status)
    if res.error_type is not None:
        span.set_attribute("error.type", res.error_type)
        span.set_status(Status(StatusCode.ERROR, res.error_message or res.error_type))


def _span_context(producer: TraceContext) -> SpanContext:
    state = TraceState.from_header([producer.tracestate]) if producer.tracestate else None
    return SpanContext(
        trace_id=int(producer.trace_id, 16),
        span_id=int(producer.span_id or "0", 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if producer.sampled else TraceFlags.DEFAULT),
        trace_state=state,
    )
