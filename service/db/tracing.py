"""Spans of the database layer, made with OpenTelemetry's API: a `pool wait` per wait for a
connection, a `batch wait` per lookup in a batch loader, a CLIENT span per statement, linked,
for a batch's statement, to every request it answers (docs/operations.md).

The tracer is OpenTelemetry's global one: its spans record nothing until the app sets the
tracer provider (service/observability/tracing.py). With tracing off nothing here is used: the
pools get the plain `Cursor` and their own listener (`service.db.TRACING`), and the batch
loaders no `Tracing`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from service.db.pool import Cursor, PoolEvents

_tracer = trace.get_tracer("service.db")
# The request spans a batch's statements answer, in the sender's context (`serving`).
_SERVING = context.create_key("service.db.batch.serving")


class BatchTracing:
    """What a batch loader (service/db/batch.py) asks of tracing: each lookup's `batch wait`
    span, and the request spans its batch's statements must link to."""

    @contextmanager
    def lookup(self) -> Iterator[trace.SpanContext]:
        """Around one lookup, in its greenlet: its `batch wait` span; yields the span context
        of the request it serves, for its batch's statement to link to."""
        serves = trace.get_current_span().get_span_context()
        with _tracer.start_as_current_span("batch wait", record_exception=False):
            yield serves

    @contextmanager
    def serving(self, requests: list[trace.SpanContext]) -> Iterator[None]:
        """Around a batch's query, in its sender's greenlet: its statements link to every span
        context in `requests`, read as each statement starts (lookups join until it is sent)."""
        token = context.attach(context.set_value(_SERVING, requests))
        try:
            yield
        finally:
            context.detach(token)


BATCHES = BatchTracing()


class TracedCursor(Cursor):
    """The pool's cursor when tracing is on: each statement a CLIENT span, named after its first
    SQL keyword, with the SQL as written (placeholders, never a value), `db.system.name`, and
    the address of the server that answered (a replica's, for a read there)."""

    def execute(self, query, vars=None):
        info = self.connection.info
        attributes = {
            "db.system.name": "postgresql",
            "db.namespace": info.dbname,
            "server.address": info.host,
            "server.port": info.port,
        }
        # The SQL as written, placeholders and all. A `psycopg2.sql` composition is left out:
        # as a string it would hold the literals composed into it.
        text = query.decode() if isinstance(query, bytes) else query
        if isinstance(text, str):
            attributes["db.query.text"] = text
        words = text.split(None, 1) if isinstance(text, str) else None
        serving = context.get_value(_SERVING)
        with _tracer.start_as_current_span(
            words[0].upper() if words else "statement",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            links=[Link(served) for served in serving] if serving else None,
        ):
            return super().execute(query, vars)


class PoolWaits:
    """A pool's `PoolEvents` listener when tracing is on: a `pool wait` span for each wait for
    a connection, ending when it is lent (or refused), then the pool's own listener, if any."""

    def __init__(self, inner: PoolEvents | None) -> None:
        self._inner = inner

    def checked_out(self, wait_s: float) -> None:
        _waited(wait_s, None)
        if self._inner is not None:
            self._inner.checked_out(wait_s)

    def timed_out(self, wait_s: float) -> None:
        _waited(wait_s, "no connection in time")
        if self._inner is not None:
            self._inner.timed_out(wait_s)

    def discarded(self) -> None:
        if self._inner is not None:
            self._inner.discarded()

    def connect_failed(self) -> None:
        if self._inner is not None:
            self._inner.connect_failed()

    def changed(self, stats: dict[str, int]) -> None:
        if self._inner is not None:
            self._inner.changed(stats)


def _waited(wait_s: float, error: str | None) -> None:
    """A `pool wait` span of `wait_s` seconds, ending now, in the waiting greenlet's trace."""
    now = time.time_ns()
    span = _tracer.start_span("pool wait", start_time=now - int(wait_s * 1e9))
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=now)


def traced_pool_args(events: PoolEvents | None) -> dict:
    """`Pool` arguments that trace its statements and waits, with `events` still told."""
    return {"cursor_factory": TracedCursor, "events": PoolWaits(events)}
