"""The Flask app: `create_app()` builds it and opens nothing.

The gunicorn hooks in `gunicorn.conf.py` open each worker's pool after fork and close it at
exit; tests build an app and open its pool themselves (`service.db.open_pool`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from flask.sessions import NullSession, SessionInterface
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge, RequestTimeout

from config import Settings, load_settings
from service import db
from service.api import auth, client, consistency, errors, health, openapi, users
from service.api.errors import ApiError
from service.api.json_provider import OrjsonProvider
from service.db import tracing as db_tracing
from service.observability import logs, metrics, tracing

MAX_BODY_BYTES = 1 << 20
# The content codings a request body may have: none (RFC 9110 8.4.1's `identity`).
ACCEPTED_CODINGS = frozenset({"", "identity"})
# The transfer codings a request body may have: chunked framing (gunicorn reads it), identity.
TRANSFER_CODINGS = frozenset({"chunked", "identity"})


class NoSessions(SessionInterface):
    """The service keeps no sessions: every request gets the same `NullSession`, empty, which
    refuses every change, where Flask's default builds a signing serializer and a null session
    for each request. Nothing is saved, and no cookie is read or set."""

    null = NullSession()

    def open_session(self, app: Flask, req: Any) -> NullSession:
        return self.null

    def save_session(self, app: Flask, session: Any, response: Response) -> None:
        pass


class ServiceFlask(Flask):
    """Flask, asking once per function whether a view or hook must run through
    `async_to_sync`, where Flask asks `inspect.iscoroutinefunction` for each of them on every
    request. The functions are those the app registered, so the answers are as many. No
    sessions (`NoSessions`)."""

    session_interface = NoSessions()

    def __init__(self, import_name: str) -> None:
        super().__init__(import_name)
        self._runnable: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        runnable = self._runnable.get(func)
        if runnable is None:
            runnable = self._runnable[func] = super().ensure_sync(func)
        return runnable


def create_app(settings: Settings | None = None) -> Flask:
    app = ServiceFlask(__name__)
    settings = app.config["SETTINGS"] = settings or load_settings(os.environ)
    replicas = bool(settings.database_replica_urls)
    traced = tracing.configured(os.environ)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    # `/users//1` is no route: werkzeug would answer 308 to an absolute URL built from the
    # request's own Host field.
    app.url_map.merge_slashes = False
    app.json = OrjsonProvider(app)
    app.extensions[db.EVENTS] = metrics.PoolMetrics()
    app.after_request(_no_type_without_a_body)
    logs.register(app)
    if traced:
        tracing.register(app)
        app.extensions[db.TRACING] = True
    metrics.register(app)
    # After logs: a refused request still gets its request id, access line and count. The
    # framing first, then the token: a stranger's body is never read.
    app.before_request(_require_host)
    guarded = app.extensions[openapi.GUARDED] = frozenset({users.bp.name})
    auth.register(app, guarded)
    app.before_request(_read_whole_body)
    if replicas:
        consistency.register(app)
    for module in (health, users, openapi):
        app.register_blueprint(module.bp)
    errors.register(app)
    loaders = users.batch_loaders(replicas, db_tracing.BATCHES if traced else None)
    app.extensions.update(loaders)
    app.extensions[db.WAITING_ELSEWHERE] = lambda: sum(x.waiting for x in loaders.values())
    app.extensions[db.CLIENT_GONE] = client.hung_up
    return app


def _require_host() -> None:
    """Refuse an HTTP/1.1 request without a Host field with 400, as RFC 9112 3.2 requires of a
    server. (gunicorn refuses a request with two itself, before the app; an empty Host is
    valid, and HTTP/1.0 needs none.)"""
    environ = request.environ
    if "HTTP_HOST" not in environ and environ.get("SERVER_PROTOCOL") == "HTTP/1.1":
        raise ApiError(400, "missing_host", "an HTTP/1.1 request must have a Host header field")


def _read_whole_body() -> None:
    """Read the body here, once (cached for `get_json`), and refuse one that is not whole, so
    that a handler never sees a body cut short and the pool never sees a client still sending.

    A body shorter than its Content-Length means the client hung up (400), or missed the body
    deadline (408, service/server/connections.py): gunicorn hands the app what came, without a
    word, so it is checked here, and nothing is stored. A body sent without
    Content-Length (chunked) that runs past the limit gets 413: werkzeug refuses a body only by
    its Content-Length, and reads one without up to the limit and stops there in silence (a
    JSON object followed by 1 MiB of spaces would be stored); so look for one byte more.

    A body with a transfer coding beside chunked (Transfer-Encoding: gzip, chunked; gunicorn
    takes gzip, deflate and compress, and decodes none) gets 400 before it is read, as
    gunicorn's refusal of a coding it does not know (service/server/refusals.py). A body with
    a content coding (Content-Encoding: gzip, br, deflate, ...) gets 415 with
    `Accept-Encoding: identity` (RFC 9110 15.5.16) before it is read: this service decodes
    none, and would otherwise take compressed bytes for the JSON they stand for.
    """
    if request.method in ("GET", "HEAD"):
        return  # the method first: most requests are GETs, and it costs no header parsing
    transfer = request.environ.get("HTTP_TRANSFER_ENCODING")
    if transfer is not None and not _identity(transfer, TRANSFER_CODINGS):
        raise ApiError(
            400,
            "unsupported_transfer_coding",
            "request bodies are accepted with Transfer-Encoding: chunked alone",
        )
    coding = request.environ.get("HTTP_CONTENT_ENCODING")
    if coding is not None and not _identity(coding):
        raise ApiError(
            415,
            "unsupported_content_encoding",
            "request bodies are accepted without a content coding (identity) only",
            headers={"Accept-Encoding": "identity"},
        )
    try:
        body = request.get_data(cache=True)
    except ClientDisconnected:  # a chunked body stopped: by the client, or at its deadline
        if client.body_timed_out():
            raise RequestTimeout(
                "the request body did not arrive within HTTP_BODY_TIMEOUT"
            ) from None
        raise
    if request.content_length is not None:
        if len(body) < request.content_length:
            if client.body_timed_out():
                raise RequestTimeout("the request body did not arrive within HTTP_BODY_TIMEOUT")
            raise ClientDisconnected()
        return
    if len(body) < MAX_BODY_BYTES:
        return
    try:  # past werkzeug's wrapper: the server's own reader
        more = request.environ["wsgi.input"].read(1)
    except OSError:  # gunicorn's NoMoreData: the client hung up before the last chunk
        raise ClientDisconnected() from None
    if more:
        raise RequestEntityTooLarge()


def _identity(coding: str, accepted: frozenset[str] = ACCEPTED_CODINGS) -> bool:
    """Whether a Content-Encoding field value (a list, when sent twice) codes nothing: each of
    its codings is in `accepted` (for Transfer-Encoding, TRANSFER_CODINGS)."""
    return all(part.strip(" \t").lower() in accepted for part in coding.split(","))


def _no_type_without_a_body(response: Response) -> Response:
    """A 204, or the empty answer to OPTIONS, has no body, so it names no type: Flask would
    call it text/html, beside an API whose every body is JSON."""
    if response.status_code == 204 or (
        request.method == "OPTIONS" and not response.is_streamed and not response.get_data()
    ):
        del response.headers["Content-Type"]
    return response
