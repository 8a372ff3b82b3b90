"""Prometheus metrics, served at `GET /metrics`: the pool's state and events, and every
request's route, status and latency.

gunicorn runs several worker processes. Each writes its values to files of its own under
`PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode, which `gunicorn.conf.py` sets
up before anything imports prometheus_client), and `/metrics`, whichever worker serves it, adds
up the files of all of them. Without that variable (a test's app) it serves this process's
values alone.

Requests are labelled by the route that matched (`/users/<user_id>`, never the raw path, so ids
cannot multiply the series), `unmatched` for a 404 or 405 from routing, and by method, any
method outside HTTP's usual few counted as `other`.
"""

from __future__ import annotations

import os
import time

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from werkzeug.exceptions import NotFound

from service.observability import logs

# prometheus_client chose its mode from this variable when it was imported; so do we.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")

bp = Blueprint("metrics", __name__)

# Each worker sets its own pool's values; `livesum` adds up the workers alive now (a worker's
# values go when it exits: gunicorn.conf.py's child_exit), so `db_pool_max` is the instance's
# whole connection budget and `db_pool_in_use` the connections it holds right now. A gauge per
# worker (`liveall`) would only matter for finding one unbalanced worker, at a series per pid.
POOL_GAUGES = {
    key: Gauge(f"db_pool_{key}", help_text, multiprocess_mode="livesum")
    for key, help_text in (
        ("max", "Connections the pools may open (DB_POOL_MAX per worker)"),
        ("size", "Connections the pools hold open"),
        ("in_use", "Connections lent to requests"),
        ("idle", "Open connections waiting to be lent"),
        ("waiting", "Requests waiting for a connection"),
    )
}
CONNECTIONS_CLOSED = Counter(
    "http_connections_closed",
    "Client connections the server closed: a deadline missed (head, body, write, idle), "
    "shed to free a slot (shed), or idle when a drain ended (drain)",
    ["reason"],
)
CHECKOUTS = Counter("db_pool_checkouts", "Connections lent to requests")
TIMEOUTS = Counter("db_pool_timeouts", "Requests that got no connection in time (503)")
DISCARDED = Counter("db_pool_discarded", "Broken, dead or expired connections closed")
CONNECT_ERRORS = Counter("db_pool_connect_errors", "Failed attempts to open a connection")
POOL_WAIT = Histogram(
    "db_pool_wait_seconds",
    "Time from asking for a connection to holding one",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LOOKUPS = Counter("db_lookups", "Single rows looked up by key (GET /users/<id>)")
LOOKUP_QUERIES = Counter(
    "db_lookup_queries",
    "Queries sent for those lookups: fewer than lookups when lookups shared a query",
)
PAGES = Counter("db_pages", "Requests for pages of users (GET /users) answered by page queries")
PAGE_QUERIES = Counter(
    "db_page_queries", "Queries sent for those pages: fewer than pages when pages shared a query"
)
BATCHED_WRITES = Counter(
    "db_batched_writes", "Creates and updates of users sent in batch statements", ["kind"]
)
BATCH_STATEMENTS = Counter("db_batch_statements", "Batch statements sent for them", ["kind"])
READS = Counter("db_reads", "Read-only blocks, by the server that ran them", ["server"])
READ_FALLBACKS = Counter(
    "db_read_fallbacks",
    "Read-only blocks sent to the primary while replicas are configured",
    ["reason"],
)
READ_RETRIES = Counter(
    "db_read_retries", "Reads whose first statement failed on a replica and ran again elsewhere"
)
CATCH_UP_WAITS = Histogram(
    "db_read_catch_up_wait_seconds",
    "Waits of reads for a replica to replay their position",
    ["caught_up"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
REPLICA_UP = Gauge(
    "db_replica_up", "1 while a replica is in rotation", ["replica"], multiprocess_mode="max"
)
REPLICA_LAG_BYTES = Gauge(
    "db_replica_lag_bytes", "WAL a replica has not replayed", ["replica"], multiprocess_mode="max"
)
REPLICA_LAG_SECONDS = Gauge(
    "db_replica_lag_seconds",
    "How long a replica has been behind",
    ["replica"],
    multiprocess_mode="max",
)
TOKENS_UNREADABLE = Counter(
    "consistency_tokens_unreadable",
    "Consistency tokens the service could not read (read on the primary)",
)
REQUESTS = Counter("http_requests", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram(
    "http_request_duration_seconds",
    "Time from the request's start to its response being ready",
    ["method", "route"],
)

METRICS_PATH = "/metrics"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


class PoolMetrics:
    """The pool's events (`service.db.PoolEvents`) as the metrics above; each wait for a
    connection, lent or timed out, also counts towards the current request's `pool_wait_ms`
    in its access line.

    A gauge is written only when its value changed: a lend or return moves two of the five.
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def checked_out(self, wait_s: float) -> None:
        CHECKOUTS.inc()
        POOL_WAIT.observe(wait_s)
        logs.add_pool_wait(wait_s)

    def timed_out(self, wait_s: float) -> None:
        TIMEOUTS.inc()
        logs.add_pool_wait(wait_s)

    def discarded(self) -> None:
        DISCARDED.inc()

    def connect_failed(self) -> None:
        CONNECT_ERRORS.inc()

    def changed(self, stats: dict[str, int]) -> None:
        for key, value in stats.items():
            if self._last.get(key) != value:
                self._last[key] = value
                POOL_GAUGES[key].set(value)

    # service/db/replicas.py's ReplicaEvents.

    def read_on(self, server: str) -> None:
        counter = _reads.get(server)
        if counter is None:
            counter = _reads[server] = READS.labels(server)
        counter.inc()
        logs.add_read_server(server)

    def fell_back(self, reason: str) -> None:
        READ_FALLBACKS.labels(reason).inc()

    def caught_up(self, waited_s: float, ok: bool) -> None:
        CATCH_UP_WAITS.labels("yes" if ok else "no").observe(waited_s)

    def retried(self, label: str) -> None:
        READ_RETRIES.inc()

    def replica_state(self, label: str, up: bool, lag_bytes: int, lag_s: float) -> None:
        REPLICA_UP.labels(label).set(1 if up else 0)
        REPLICA_LAG_BYTES.labels(label).set(lag_bytes)
        REPLICA_LAG_SECONDS.labels(label).set(lag_s)


def token_unreadable() -> None:
    """A request presented a consistency token the service could not read."""
    TOKENS_UNREADABLE.inc()


def connection_closed(reason: str) -> None:
    """The server closed a client connection, for `reason` (service/server/connections.py)."""
    CONNECTIONS_CLOSED.labels(reason).inc()


def lookups_answered(lookups: int) -> None:
    """One query answered `lookups` lookups (service/db/batch.py)."""
    LOOKUPS.inc(lookups)
    LOOKUP_QUERIES.inc()


def pages_answered(pages: int) -> None:
    """One query answered `pages` requests for pages (service/db/batch.py)."""
    PAGES.inc(pages)
    PAGE_QUERIES.inc()


# Looked up once per kind, in the worker (a child made before fork would write as the master).
_batches: dict[str, tuple[Counter, Counter]] = {}


def batch_sent(kind: str, writes: int) -> None:
    """A batch statement of `kind` (create, update) goes out with `writes` writes in it."""
    counters = _batches.get(kind)
    if counters is None:
        counters = _batches[kind] = BATCHED_WRITES.labels(kind), BATCH_STATEMENTS.labels(kind)
    counters[0].inc(writes)
    counters[1].inc()


def register(app: Flask) -> None:
    """Serve `/metrics` and count every request the app answers. With METRICS_PORT set,
    `/metrics` is served on that listener alone, and nothing else is there."""
    app.register_blueprint(bp)
    app.before_request(_by_listener)
    app.after_request(_observe)


def _by_listener() -> None:
    """404 for /metrics on the public port, and for anything but /metrics on METRICS_PORT.

    The listener is the port the connection came in on: gunicorn sets SERVER_PORT from the
    listening socket for TCP, whatever the Host header says."""
    metrics_port = current_app.config["SETTINGS"].metrics_port
    if not metrics_port:
        return
    on_metrics_port = request.environ.get("SERVER_PORT") == str(metrics_port)
    if on_metrics_port != (request.path == METRICS_PATH):
        raise NotFound()


# The labelled children, looked up once: prometheus_client's labels() checks its arguments and
# takes a lock on every call.
_requests: dict[tuple[str, str, int], Counter] = {}
_reads: dict[str, Counter] = {}
_latency: dict[tuple[str, str], Histogram] = {}


def _observe(response: Response) -> Response:
    current = logs.current_request()
    if current is None:
        return response
    duration_s = time.perf_counter() - current.started
    served = request._get_current_object()  # one context lookup, not one per attribute
    method = served.method if served.method in METHODS else "other"
    rule = served.url_rule
    route = rule.rule if rule is not None else UNMATCHED
    status = response.status_code
    counter = _requests.get((method, route, status))
    if counter is None:
        counter = _requests[method, route, status] = REQUESTS.labels(method, route, str(status))
    histogram = _latency.get((method, route))
    if histogram is None:
        histogram = _latency[method, route] = LATENCY.labels(method, route)
    counter.inc()
    histogram.observe(duration_s)
    return response


@bp.get(METRICS_PATH)  # documented by service/api/openapi.py
def metrics():
    """Every worker's metrics, added up, in Prometheus's text format."""
    registry = REGISTRY
    if MULTIPROCESS_DIR:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=MULTIPROCESS_DIR)
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
