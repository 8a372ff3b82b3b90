"""Traces with OpenTelemetry, off unless an OTLP endpoint is configured.

On when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is set (not empty),
unless OTEL_SDK_DISABLED is `true` or OTEL_TRACES_EXPORTER is `none` (`configured`). Spans go
over OTLP/HTTP with protobuf (the only protocol spoken: gRPC's C core does not mix with
gevent). The SDK and its exporter read every other standard variable themselves:
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER and _ARG, OTEL_BSP_* (the
export queue and batches), OTEL_EXPORTER_OTLP_* (headers, timeout, compression, certificates).
Off, the app registers none of this module's hooks and its pools use the plain cursor: a
request creates no span and checks nothing.

What one request's trace holds (docs/operations.md); this module makes the request's span
and sets the tracer provider, service/db/tracing.py the database layer's spans:

* a SERVER span, `METHOD /route`, child of the caller's span when the request carries a W3C
  `traceparent` (OTEL_PROPAGATORS picks the propagators), with HTTP attributes and the status;
* `pool wait`: from asking for a connection to holding one (or to its 503);
* `batch wait`: a lookup's or write's time in a batch loader (service/db/batch.py), from
  being asked to being answered;
* a CLIENT span per statement, named after its first SQL keyword, with the parameterised SQL
  (never a parameter's value), `db.system.name` and the address of the server that answered
  (a replica's, for a read there). A batch's statement is a child of the request that sent it
  and links to the span of every request it answers: a slow request's trace shows its `batch
  wait`, and the statement's links lead from there to the trace that holds it.

The provider, its batch span processor and the processor's export thread (a greenlet, once
gevent has patched threading) start in each worker after fork (`start`, from gunicorn.conf.py's
`post_worker_init`), never in the master. Exporting never holds up a request: a span goes into
a bounded queue and the export runs in that thread; when the queue is full the span is dropped,
and counted in /metrics (`trace_spans_dropped_total`, by reason), as are the spans of an
export that failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar

import gevent
from flask import Flask, request
from opentelemetry import context, propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter

from service.observability import logs

ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
# The OpenTelemetry specification's default for OTEL_BSP_MAX_QUEUE_SIZE.
DEFAULT_MAX_QUEUE_SIZE = 2048
# How long a worker that exits spends sending the spans still queued, at most.
FLUSH_AT_EXIT_S = 2.0

DROPPED = Counter(
    "trace_spans_dropped",
    "Finished spans never exported: the export queue was full (queue_full), or the receiver "
    "did not take their batch (export_failed)",
    ["reason"],
)

# OpenTelemetry's global tracer: its spans record nothing until `start` sets the provider.
_tracer = trace.get_tracer("service")
_provider: TracerProvider | None = None
# The request span this greenlet serves, and the token that detaches it from the context.
_request: ContextVar[tuple[trace.Span, object] | None] = ContextVar("service_span", default=None)


def configured(environ: Mapping[str, str]) -> bool:
    """Whether `environ` turns tracing on (module doc). Raises ValueError, naming the variable,
    for an OTLP protocol other than http/protobuf or an OTEL_BSP_MAX_QUEUE_SIZE that is not a
    positive integer."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    for name in PROTOCOLS:
        protocol = environ.get(name, "").strip()
        if protocol and protocol != "http/protobuf":
            raise ValueError(f"{name}={protocol}: traces are exported with http/protobuf only")
    _max_queue_size(environ)
    return any(environ.get(name, "").strip() for name in ENDPOINTS)


def _max_queue_size(environ: Mapping[str, str]) -> int:
    raw = environ.get("OTEL_BSP_MAX_QUEUE_SIZE", "").strip()
    if not raw:
        return DEFAULT_MAX_QUEUE_SIZE
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"OTEL_BSP_MAX_QUEUE_SIZE={raw}: must be a positive integer")
    return int(raw)


def start(environ: Mapping[str, str]) -> None:
    """In a worker, after fork: the tracer provider and its export thread, configured by the
    OTEL_* variables (read by the SDK from the process environment)."""
    global _provider
    exporter = CountingExporter()
    max_queue_size = _max_queue_size(environ)
    _provider = TracerProvider(shutdown_on_exit=False)
    _provider.add_span_processor(BoundedSpanProcessor(exporter, max_queue_size))
    trace.set_tracer_provider(_provider)


def shutdown() -> None:
    """Send what is queued, for up to FLUSH_AT_EXIT_S, then stop the export thread. A receiver
    that does not answer costs the exiting worker that long, no more; its spans are lost."""
    if _provider is not None:
        with gevent.Timeout(FLUSH_AT_EXIT_S, False):
            _provider.shutdown()


class CountingExporter(OTLPSpanExporter):
    """The OTLP/HTTP exporter, counting the spans it was handed (`taken`) and those of a
    failed export (DROPPED)."""

    def __init__(self) -> None:
        super().__init__()
        self.taken = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.taken += len(spans)
        result = super().export(spans)
        if result is not SpanExportResult.SUCCESS:
            DROPPED.labels("export_failed").inc(len(spans))
        return result


class BoundedSpanProcessor(BatchSpanProcessor):
    """The SDK's batch span processor, dropping and counting a span that would not fit in its
    queue of `max_queue_size`.

    The SDK's own queue drops its oldest span when full, and tells only its own metrics. Here
    a span is handed on only while fewer than `max_queue_size` spans were handed on and not
    yet taken by the exporter, so the SDK's queue never overflows and every drop is counted.
    """

    def __init__(self, exporter: CountingExporter, max_queue_size: int) -> None:
        super().__init__(exporter, max_queue_size=max_queue_size)
        self._counting = exporter
        self._capacity = max_queue_size
        self._handed = 0

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        if self._handed - self._counting.taken >= self._capacity:
            DROPPED.labels("queue_full").inc()
            return
        self._handed += 1
        super().on_end(span)


def register(app: Flask) -> None:
    """Trace every request of `app` (after logs.register: the access line gets the trace id);
    service/db/tracing.py traces its waits and statements."""
    app.before_request(_begin)
    app.teardown_request(_end)


def _begin() -> None:
    environ = request.environ
    rule = request.url_rule
    method = request.method
    span = _tracer.start_span(
        f"{method} {rule.rule}" if rule is not None else method,
        context=propagate.extract(request.headers),
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "http.route": rule.rule if rule is not None else "",
            "client.address": request.remote_addr or "",
            "network.protocol.version": environ.get("SERVER_PROTOCOL", "").partition("/")[2],
        },
    )
    token = context.attach(trace.set_span_in_context(span))
    _request.set((span, token))
    current = logs.current_request()
    traced = span.get_span_context()
    if current is not None and traced.is_valid:  # sampled or not: the caller's logs have it
        current.trace_id = trace.format_trace_id(traced.trace_id)


def _end(exc: BaseException | None) -> None:
    begun = _request.get()
    if begun is None:
        return
    span, token = begun
    _request.set(None)
    current = logs.current_request()
    status = current.status if current is not None else 500
    span.set_attribute("http.response.status_code", status)
    if exc is not None:
        span.record_exception(exc)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
    context.detach(token)
