"""Whether and how this worker makes spans: ``tracing.otlp_endpoint`` (config.py).

The OpenTelemetry SDK is an optional extra (``pip install 'nanogrid-worker[tracing]'``): it
is imported (spans.py) only when an endpoint is configured, so without one no span hook
exists and a task costs nothing more (bench/README.md). The trace id itself (result, logs,
the function's ``TRACEPARENT``) is propagated either way (tracecontext.py, pipeline.py).
"""

from __future__ import annotations

from nanogrid.common.config import Config

from .hooks import Hook

SDK_MISSING = (
    "tracing.otlp_endpoint is set but the OpenTelemetry SDK is not installed "
    "(pip install 'nanogrid-worker[tracing]')"
)


def sdk_installed() -> bool:
    """True when the SDK and its OTLP/HTTP exporter import."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


def configured_hooks(config: Config) -> list[Hook]:
    """The hooks ``config.tracing`` asks for: none without an endpoint. Called in the
    worker, after the fork (the SDK's export thread is the worker's)."""
    endpoint = config.tracing.otlp_endpoint
    if endpoint is None:
        return []
    from .spans import SpanHook

    return [SpanHook.exporting(endpoint, queue_name(config.queue.url or ""))]


def queue_name(url: str) -> str:
    """The queue's name, the last part of its URL (spans are named after it)."""
    return url.rstrip("/").rsplit("/", 1)[-1]
