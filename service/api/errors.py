"""Every error the API returns, as JSON `{"error": {"code", "message"}}`, mapped in one place.

Handlers raise `ApiError` for bad input. The database layer's exceptions (service/db/errors.py)
become 503 with Retry-After, each with a code of its own; a subclass maps as its parent does.
`ClientGone` becomes 499, for the log: its client is gone.
werkzeug's HTTP errors (404, 405, 413, 415, malformed JSON) keep their status and headers.
Anything else is logged with its traceback and answered with 500 and the request id, which
finds that traceback in the log: no stack trace, no SQL, no DSN ever reaches a client.
"""

from __future__ import annotations

import logging
import re

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from service.db import (
    ClientGone,
    DatabaseUnavailable,
    PoolTimeout,
    StatementTimeout,
    TransactionConflict,
)
from service.observability import logs

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
# nginx's status for a request whose client hung up before it was answered: in the access log
# and the request counts, never seen by the client.
CLIENT_CLOSED_REQUEST = 499

UNAVAILABLE: dict[type[Exception], tuple[str, str]] = {
    PoolTimeout: ("pool_timeout", "the service is busy: no database connection became free"),
    StatementTimeout: ("statement_timeout", "the database did not answer in time"),
    DatabaseUnavailable: ("database_unavailable", "the database cannot be reached"),
    TransactionConflict: (
        "transaction_conflict",
        "the request conflicted with a concurrent one and changed nothing: retry it",
    ),
}


class ApiError(Exception):
    """A client error with its status, a stable machine-readable code, a message, and any
    headers the status calls for (401's WWW-Authenticate)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, **extra: str):
    response = jsonify(error={"code": code, "message": message, **extra})
    response.status_code = status
    return response


def register(app: Flask) -> None:
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(ClientGone, _client_gone)
    app.register_error_handler(HTTPException, _http_error)
    for exc_type in UNAVAILABLE:
        app.register_error_handler(exc_type, _unavailable)
    app.register_error_handler(Exception, _unexpected)


def _api_error(exc: ApiError):
    response = error_response(exc.status, exc.code, exc.message)
    response.headers.update(exc.headers)
    return response


def _client_gone(exc: ClientGone):
    return error_response(CLIENT_CLOSED_REQUEST, "client_closed_request", str(exc))


def _http_error(exc: HTTPException):
    response = error_response(exc.code or 500, _snake(exc.name), exc.description or exc.name)
    for name, value in exc.get_headers():
        if name in ("Allow", "Retry-After"):  # 405 names the methods, 503 the wait
            response.headers[name] = value
    return response


def _unavailable(exc: Exception):
    # Flask found the handler through the class hierarchy; so does the lookup of its code.
    code, message = next(UNAVAILABLE[cls] for cls in type(exc).__mro__ if cls in UNAVAILABLE)
    log.warning("503 %s: %s", code, exc)
    response = error_response(503, code, message)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def _unexpected(exc: Exception):
    log.exception("unhandled error")
    current = logs.current_request()
    extra = {"request_id": current.id} if current is not None else {}
    return error_response(500, "internal_error", "an unexpected error occurred", **extra)


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
