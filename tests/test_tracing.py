"""Traces (service/observability/tracing.py), through real gunicorn, to a real OTLP/HTTP
receiver started by the test, which decodes each `ExportTraceServiceRequest` it is sent."""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass

import gevent
import gevent.pool
import psycopg2
import pytest
from gevent.pywsgi import WSGIServer
from gunicorn_proc import (
    HOST,
    Gunicorn,
    access_lines,
    free_port,
    metric,
    request,
    scrape_metrics,
    wait_until,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanPb

from service import db
from service.db.pool import Cursor

SERVER_ENV = {
    "WEB_CONCURRENCY": "1",
    "DB_POOL_MAX": "4",
    "DB_POOL_TIMEOUT": "10",
    "OTEL_SERVICE_NAME": "users-under-test",
    "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms: the test waits for spans, not for the default 5 s
}
USER_ROUTE = "GET /users/<user_id>"
LOOKUP_SQL = "SELECT id, name, email, created_at FROM users WHERE id = ANY(%s)"
# With replicas, a read selects its position too (service.db.with_position).
LOOKUP_ON_REPLICAS = re.compile(
    r"SELECT id, name, email, created_at, \(SELECT \(.*\)::text\) AS read_position"
    r" FROM users WHERE id = ANY\(%s\)"
)


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict
    links: tuple[tuple[str, str], ...]
    error: bool
    service: str


class Receiver:
    """An OTLP/HTTP receiver on 127.0.0.1: every span it was sent, and how many exports."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.exports = 0
        self.server = WSGIServer((HOST, free_port()), self._app, log=None, error_log=None)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.server.server_port}"

    def _app(self, environ, start_response):
        assert environ["PATH_INFO"] == "/v1/traces", environ["PATH_INFO"]
        assert environ["CONTENT_TYPE"] == "application/x-protobuf"
        body = environ["wsgi.input"].read()
        export = ExportTraceServiceRequest.FromString(body)
        self.exports += 1
        for resource_spans in export.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(_decoded(span, resource["service.name"]))
        start_response("200 OK", [("Content-Type", "application/x-protobuf")])
        return [ExportTraceServiceResponse().SerializeToString()]

    def children(self, parent: Span, name: str | None = None) -> list[Span]:
        return [
            span
            for span in self.spans
            if span.parent_id == parent.span_id and name in (None, span.name)
        ]

    def named(self, name: str) -> list[Span]:
        return [span for span in self.spans if span.name == name]

    def by_id(self) -> dict[str, Span]:
        return {span.span_id: span for span in self.spans}


def _decoded(span, service: str) -> Span:
    return Span(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_id=span.parent_span_id.hex(),
        name=span.name,
        kind=span.kind,
        attributes=_attributes(span.attributes),
        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
        error=span.status.code == span.status.STATUS_CODE_ERROR,
        service=service,
    )


def _attributes(pairs) -> dict:
    values = {}
    for pair in pairs:
        which = pair.value.WhichOneof("value")
        values[pair.key] = getattr(pair.value, which) if which else None
    return values


@pytest.fixture
def receiver():
    receiver = Receiver()
    receiver.server.start()
    yield receiver
    receiver.server.stop()


def traceparent() -> tuple[str, str, str]:
    """A new caller's span: its trace id, its span id, and the W3C header naming both."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def create_users(admin, n: int) -> list[int]:
    admin.execute(
        "INSERT INTO users (name, email) SELECT 'user ' || i, 'user' || i || '@example.com'"
        " FROM generate_series(1, %s) AS i RETURNING id",
        (n,),
    )
    return sorted(row[0] for row in admin.fetchall())


def json_lines(gunicorn: Gunicorn) -> list[dict]:
    return [json.loads(line) for line in gunicorn.log.splitlines() if line.startswith("{")]


def request_span(receiver: Receiver, caller_span_id: str) -> Span | None:
    found = [span for span in receiver.spans if span.parent_id == caller_span_id]
    return found[0] if found else None


def test_a_request_is_a_span_of_its_callers_trace_with_its_waits_and_statement(
    database_url, admin, receiver, tmp_path
):
    (uid,) = create_users(admin, 1)
    env = {**SERVER_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    with Gunicorn(database_url, tmp_path / "gunicorn.log", **env) as gunicorn:
        trace_id, caller, header = traceparent()
        reply = request(
            gunicorn.port,
            "GET",
            f"/users/{uid}",
            headers={"traceparent": header, "X-Request-ID": "traced-1"},
        )
        assert reply.status == 200
        served = wait_until(lambda: request_span(receiver, caller), 10, "the request's span")
        wait_until(lambda: receiver.children(served), 10, "its children")
        (line,) = access_lines(json_lines(gunicorn), "traced-1")

    assert served.trace_id == trace_id
    assert served.name == USER_ROUTE
    assert served.kind == SpanPb.SPAN_KIND_SERVER
    assert served.service == "users-under-test"
    assert served.attributes["http.request.method"] == "GET"
    assert served.attributes["http.route"] == "/users/<user_id>"
    assert served.attributes["url.path"] == f"/users/{uid}"
    assert served.attributes["http.response.status_code"] == 200
    assert not served.error
    (waited,) = receiver.children(served, "batch wait")
    assert receiver.children(waited, "pool wait")
    (statement,) = [
        span
        for span in receiver.children(waited)
        if span.attributes.get("db.query.text") == LOOKUP_SQL
    ]
    assert statement.trace_id == trace_id
    assert statement.name == "SELECT"
    assert statement.kind == SpanPb.SPAN_KIND_CLIENT
    assert statement.attributes["db.system.name"] == "postgresql"
    dsn = psycopg2.extensions.parse_dsn(database_url)
    assert statement.attributes["server.address"] == dsn["host"]
    assert statement.attributes["server.port"] == int(dsn["port"])
    assert statement.links == ((trace_id, served.span_id),)
    assert line["trace_id"] == trace_id


def test_statement_spans_carry_the_sql_never_its_values(database_url, receiver, tmp_path):
    env = {**SERVER_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    secret = {"name": "Ada Secretname", "email": "ada.secret@example.com"}
    with Gunicorn(database_url, tmp_path / "gunicorn.log", **env) as gunicorn:
        _, caller, header = traceparent()
        headers = {"traceparent": header}
        assert request(gunicorn.port, "POST", "/users", secret, headers=headers).status == 201
        served = wait_until(lambda: request_span(receiver, caller), 10, "the request's span")
        wait_until(lambda: _inserts(receiver), 10, "the insert's span")

    assert served.name == "POST /users"
    assert served.attributes["http.response.status_code"] == 201
    (insert,) = _inserts(receiver)
    assert insert.attributes["db.query.text"].startswith("INSERT INTO users (name, email)")
    assert insert.links == ((served.trace_id, served.span_id),)
    exported = json.dumps([span.attributes for span in receiver.spans])
    assert secret["name"] not in exported
    assert secret["email"] not in exported


def _inserts(receiver: Receiver) -> list[Span]:
    return [span for span in receiver.spans if span.name == "INSERT"]


def test_a_batched_statement_is_one_span_linked_to_every_request_it_answers(
    database_url, admin, receiver, tmp_path
):
    """The pool's one connection is held by a delete waiting for a row lock; the lookups that
    arrive meanwhile merge into one query, whose span links to each of their requests."""
    locked, *uids = create_users(admin, 9)
    env = {
        **SERVER_ENV,
        "DB_POOL_MAX": "1",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.endpoint}/v1/traces",
    }
    holder = psycopg2.connect(database_url)
    with Gunicorn(database_url, tmp_path / "gunicorn.log", **env) as gunicorn:
        try:
            with holder.cursor() as cur:
                cur.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (locked,))
            delete = gevent.spawn(request, gunicorn.port, "DELETE", f"/users/{locked}")
            wait_until(lambda: _waits_for_lock(admin), 10, "the delete to wait for the lock")
            callers = {uid: traceparent() for uid in uids}
            gets = [
                gevent.spawn(
                    request, gunicorn.port, "GET", f"/users/{uid}", headers={"traceparent": h}
                )
                for uid, (_, _, h) in callers.items()
            ]
            wait_until(lambda: metric(gunicorn.port, "db_pool_waiting") >= 1, 10, "a sender")
            scrape_metrics(gunicorn.port)  # one more turn of the worker: the lookups are in
        finally:
            holder.rollback()
            holder.close()
        assert delete.get(timeout=10).status == 204
        assert [get.get(timeout=10).status for get in gets] == [200] * len(uids)
        queries = metric(gunicorn.port, "db_lookup_queries_total")
        served = {
            uid: wait_until(lambda c=caller: request_span(receiver, c), 10, "a request's span")
            for uid, (_, caller, _) in callers.items()
        }
        wait_until(
            lambda: len(_lookup_statements(receiver)) == queries, 10, "the lookups' statements"
        )

    statements = _lookup_statements(receiver)
    assert len(statements) < len(uids)  # merged
    linked = [link for statement in statements for link in statement.links]
    assert sorted(linked) == sorted((span.trace_id, span.span_id) for span in served.values())
    spans = receiver.by_id()
    for statement in statements:
        sender = spans[spans[statement.parent_id].parent_id]
        assert (sender.trace_id, sender.span_id) in statement.links
    for uid, span in served.items():
        assert span.trace_id == callers[uid][0]
        assert len(receiver.children(span, "batch wait")) == 1


def _waits_for_lock(admin) -> bool:
    admin.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'service' AND wait_event_type = 'Lock'"
    )
    return admin.fetchone()[0] == 1


def _lookup_statements(receiver: Receiver) -> list[Span]:
    return [
        span
        for span in receiver.spans
        if span.attributes.get("db.query.text") == LOOKUP_SQL
        or LOOKUP_ON_REPLICAS.fullmatch(span.attributes.get("db.query.text", ""))
    ]


def test_concurrent_requests_under_gevent_keep_their_own_context(
    database_url, admin, receiver, tmp_path
):
    """Hundreds of requests at once in one gevent worker, each from a caller of its own: each
    request's span, waits and access line are in its caller's trace, and every statement links
    exactly the requests it answered."""
    uids = create_users(admin, 20)
    env = {**SERVER_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    n = 300
    callers = {f"r{i}": traceparent() for i in range(n)}
    with Gunicorn(database_url, tmp_path / "gunicorn.log", **env) as gunicorn:
        group = gevent.pool.Pool(n)
        replies = group.map(
            lambda item: request(
                gunicorn.port,
                "GET",
                f"/users/{uids[int(item[0][1:]) % len(uids)]}",
                headers={"traceparent": item[1][2], "X-Request-ID": item[0]},
            ),
            list(callers.items()),
        )
        assert [reply.status for reply in replies] == [200] * n
        wait_until(
            lambda: all(request_span(receiver, c[1]) for c in callers.values()),
            20,
            "every request's span",
        )
        wait_until(
            lambda: sum(len(s.links) for s in _lookup_statements(receiver)) == n,
            20,
            "every statement's span",
        )
        lines = {line["request_id"]: line for line in access_lines(json_lines(gunicorn))}

    spans = receiver.by_id()
    requests = set()
    for request_id, (trace_id, caller, _) in callers.items():
        served = request_span(receiver, caller)
        requests.add((served.trace_id, served.span_id))
        assert served.trace_id == trace_id
        assert served.attributes["url.path"].endswith(f"/{uids[int(request_id[1:]) % len(uids)]}")
        assert lines[request_id]["trace_id"] == trace_id
        (waited,) = receiver.children(served, "batch wait")
        for child in receiver.children(waited):
            assert child.trace_id == trace_id
    # Each wait and statement is a child of the span that was current in its own greenlet.
    traces = {trace_id for trace_id, _, _ in callers.values()}
    for span in receiver.named("pool wait"):
        if span.trace_id in traces:  # not a probe's (/readyz reads the database)
            assert spans[span.parent_id].name == "batch wait"
    for statement in _lookup_statements(receiver):
        waited = spans[statement.parent_id]
        assert waited.name == "batch wait"
        sender = spans[waited.parent_id]
        assert (sender.trace_id, sender.span_id) in statement.links
    linked = [link for statement in _lookup_statements(receiver) for link in statement.links]
    assert len(linked) == len(set(linked)) == n
    assert set(linked) == requests


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_SDK_DISABLED": "true"},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ""},
    ],
    ids=["sdk-disabled", "exporter-none", "no-endpoint"],
)
def test_tracing_is_off_unless_configured(database_url, admin, receiver, tmp_path, env):
    (uid,) = create_users(admin, 1)
    env = {**SERVER_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **env}
    with Gunicorn(database_url, tmp_path / "gunicorn.log", **env) as gunicorn:
        for i in range(20):
            headers = {"traceparent": traceparent()[2], "X-Request-ID": f"off-{i}"}
            assert request(gunicorn.port, "GET", f"/users/{uid}", headers=headers).status == 200
        lines = access_lines(json_lines(gunicorn))
    # Stopped: a worker that traced would have sent its spans by now, at the latest at exit.
    assert receiver.exports == 0
    assert len([line for line in lines if line["request_id"].startswith("off-")]) == 20
    assert not [line for line in lines if "trace_id" in line]


def test_an_app_built_without_otel_variables_traces_nothing(app):
    assert db.TRACING not in app.extensions
    with app.test_request_context(), db.get_db() as cursor:
        assert type(cursor) is Cursor


@pytest.mark.parametrize(
    ("name", "value"),
    [("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), ("OTEL_BSP_MAX_QUEUE_SIZE", "many")],
)
def test_a_tracing_setting_the_service_cannot_honour_stops_the_start(
    database_url, tmp_path, name, value
):
    env = {**SERVER_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", name: value}
    gunicorn = Gunicorn(database_url, tmp_path / "gunicorn.log", **env)
    gunicorn.refused()
    assert f"configuration error: {name}={value}" in gunicorn.log


@pytest.mark.parametrize("answers", ["never", "refused"])
def test_a_receiver_that_hangs_or_refuses_slows_no_request_and_drops_are_counted(
    database_url, admin, tmp_path, silent_port, answers
):
    port = silent_port if answers == "never" else free_port()
    (uid,) = create_users(admin, 1)
    env = {
        **SERVER_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{HOST}:{port}",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "30",  # each export waits long for an answer
        "OTEL_BSP_MAX_QUEUE_SIZE": "8",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4",
        "OTEL_BSP_SCHEDULE_DELAY": "10",
    }
    with Gunicorn(database_url, tmp_path / "gunicorn.log", **env) as gunicorn:
        slowest = 0.0
        for _ in range(200):
            started = time.perf_counter()
            assert request(gunicorn.port, "GET", f"/users/{uid}", timeout=5).status == 200
            slowest = max(slowest, time.perf_counter() - started)
        dropped = metric(gunicorn.port, "trace_spans_dropped_total")
        started = time.perf_counter()
    stopped_s = time.perf_counter() - started
    assert slowest < 1.0
    assert dropped > 0
    assert stopped_s < 10  # the exiting worker's last export is bounded (FLUSH_AT_EXIT_S)


@pytest.mark.replicas
def test_a_read_on_a_replica_names_the_replica_in_its_statement_span(
    replicated, receiver, tmp_path
):
    env = {
        **SERVER_ENV,
        "DATABASE_REPLICA_URLS": " ".join(replicated.replica_urls),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
    }
    with Gunicorn(replicated.database_url, tmp_path / "gunicorn.log", **env) as gunicorn:
        reply = request(gunicorn.port, "POST", "/users", {"name": "R", "email": "r@example.com"})
        assert reply.status == 201
        uid = reply.json["id"]
        served = {}
        for i in range(20):
            _, caller, header = traceparent()
            headers = {"traceparent": header, "X-Request-ID": f"r{i}"}
            assert request(gunicorn.port, "GET", f"/users/{uid}", headers=headers).status == 200
            served[f"r{i}"] = caller
        wait_until(lambda: len(_lookup_statements(receiver)) >= 20, 10, "the reads' statements")
        lines = {line["request_id"]: line for line in access_lines(json_lines(gunicorn))}

    replicas = {f"127.0.0.1:{replica.port}" for replica in replicated.replicas}
    spans = receiver.by_id()
    on_replicas = 0
    for request_id, caller in served.items():
        span = request_span(receiver, caller)
        (statement,) = [
            s
            for s in _lookup_statements(receiver)
            if (span.trace_id, span.span_id) in s.links and s.trace_id == span.trace_id
        ]
        assert spans[statement.parent_id].parent_id == span.span_id
        address = f"{statement.attributes['server.address']}:{statement.attributes['server.port']}"
        server = lines[request_id]["db_server"]
        assert address == server if server in replicas else address not in replicas
        on_replicas += address in replicas
    assert on_replicas > 0
