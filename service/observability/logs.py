"""Logs as JSON lines, and the request id that ties one request's lines together.

Every line is one JSON object, compact and ASCII only (other text as `\\u` escapes): `time`
(ISO 8601, UTC), `level`, `logger`, `message`, `request_id` (null outside a request) and
`pid`, plus `exception` when there is one. gunicorn routes its own log and the app's through
`JsonFormatter` to stdout (`gunicorn.conf.py`). orjson encodes them; the standard library's
encoder writes what orjson refuses or would write as UTF-8 (`_encode`).

One access line per request, written by the app once the response is built, so that it knows
what gunicorn cannot: the route that matched, how long the request waited for a database
connection (`pool_wait_ms`, summed over its checkouts) and, with tracing on, its `trace_id`.
It is the one line every request writes, so it goes straight to stdout in the same format,
past `logging`'s records, hierarchy and handler lock (docs/performance.md); the
`service.access` logger's level still switches it off (above INFO).

The request id comes from the `X-Request-ID` header when it is safe to echo (1-128 of
`A-Z a-z 0-9 . _ -`), else it is 32 random hex digits (16 bytes of `os.urandom`, as a uuid4
has); it is sent back on every response, errors included.

Passwords in connection URLs and `password=...` pairs are masked in every message and traceback,
a last guard behind the code that never logs a DSN with its password.

Our own code rather than structlog's or python-json-logger's: neither masks passwords or knows
the request id, and with both added neither was much shorter, and each was slower per line
(docs/performance.md, bench/logformat.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from contextvars import ContextVar

import orjson
from flask import Flask, Response, request

REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_SECRETS = re.compile(
    r"(?P<url>[a-z][a-z0-9+.-]*://[^\s/:@]*:)[^\s/]*@"
    r"|(?P<pair>password\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s&]+)",
    re.IGNORECASE,
)

access_log = logging.getLogger("service.access")
# json.dumps builds a new encoder whenever it is given an option; this one is built once.
_encode_stdlib = json.JSONEncoder(default=str, separators=(",", ":")).encode


class RequestLog:
    """What the access line will say about the request being served."""

    __slots__ = ("db_server", "id", "pool_wait_s", "started", "status", "trace_id")

    def __init__(self, request_id: str, started: float, pool_wait_s: float = 0.0):
        self.id = request_id
        self.started = started
        self.pool_wait_s = pool_wait_s
        self.status = 500  # until a response is made
        self.db_server: str | None = None  # with replicas: the server of its last read
        self.trace_id: str | None = None  # with tracing: its trace (observability/tracing.py)


_current: ContextVar[RequestLog | None] = ContextVar("service_request", default=None)


def current_request() -> RequestLog | None:
    """The request this greenlet serves, or None outside a request."""
    return _current.get()


def add_pool_wait(wait_s: float) -> None:
    """Count a wait for a database connection against the current request, if any."""
    current = _current.get()
    if current is not None:
        current.pool_wait_s += wait_s


def add_read_server(server: str) -> None:
    """Name, in the current request's access line, the server its read ran on (replicas)."""
    current = _current.get()
    if current is not None:
        current.db_server = server


def register(app: Flask) -> None:
    """Give every request an id, echo it, and write its access line after the response."""
    app.before_request(_begin)
    app.after_request(_respond)
    app.teardown_request(_log_access)


def _begin() -> None:
    sent = request.headers.get(REQUEST_ID_HEADER)
    request_id = sent if sent and _SAFE_REQUEST_ID.fullmatch(sent) else os.urandom(16).hex()
    _current.set(RequestLog(request_id, time.perf_counter()))


def _respond(response: Response) -> Response:
    current = _current.get()
    if current is not None:
        response.headers[REQUEST_ID_HEADER] = current.id
        current.status = response.status_code
    return response


def _log_access(exc: BaseException | None) -> None:
    current = _current.get()
    if current is None:
        return
    try:
        if access_log.isEnabledFor(logging.INFO):
            duration_s = time.perf_counter() - current.started
            served = request._get_current_object()  # one context lookup, not one per field
            rule = served.url_rule
            line = _line(
                time.time(),
                "INFO",
                access_log.name,
                f"{served.method} {served.path} {current.status}",
                current,
                os.getpid(),
            )
            line["method"] = served.method
            line["route"] = rule.rule if rule is not None else None
            line["path"] = served.path
            line["status"] = current.status
            line["duration_ms"] = round(duration_s * 1000, 3)
            line["pool_wait_ms"] = round(current.pool_wait_s * 1000, 3)
            line["remote_addr"] = served.remote_addr
            if current.db_server is not None:
                line["db_server"] = current.db_server
            if current.trace_id is not None:
                line["trace_id"] = current.trace_id
            _write(_encode(line))
    finally:
        _current.set(None)


def _write(text: str) -> None:
    """One line to stdout, in one write: a worker's greenlets share one thread and the write
    does not yield, so lines never interleave, with each other or with `logging`'s (the same
    `sys.stdout` object). A request never fails for its log line: a closed or broken stdout
    loses the line (where `logging` would print a traceback to stderr for each one)."""
    stream = sys.stdout
    try:
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        line = _line(
            record.created,
            record.levelname,
            record.name,
            record.getMessage(),
            _current.get(),
            record.process,
        )
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return _encode(line)


def _encode(line: dict) -> str:
    """`line` as compact JSON, ASCII only (non-ASCII text as `\\u` escapes): by orjson, or,
    for what orjson refuses (a lone surrogate, an int beyond 64 bits) or writes as UTF-8, by
    the standard library's encoder, which writes the same line with escapes."""
    try:
        text = orjson.dumps(line, default=str)
    except orjson.JSONEncodeError:
        return _encode_stdlib(line)
    return text.decode() if text.isascii() else _encode_stdlib(line)


def _line(
    created: float,
    level: str,
    logger: str,
    message: str,
    current: RequestLog | None,
    pid: int | None,
) -> dict:
    """The fields every line starts with, a record's or an access line's."""
    return {
        "time": _utc_iso(created),
        "level": level,
        "logger": logger,
        "message": redact(message),
        "request_id": current.id if current is not None else None,
        "pid": pid,
    }


def redact(text: str) -> str:
    """`text` with the password of any connection URL or `password=` pair replaced by ***."""
    if "://" not in text and "=" not in text:  # most lines, every access line: nothing to mask
        return text
    return _SECRETS.sub(_mask, text)


def _mask(match: re.Match) -> str:
    return f"{match['url']}***@" if match["url"] else f"{match['pair']}***"


_second: list = [None, ""]  # the last second formatted, and its text: lines come many a second


def _utc_iso(created: float) -> str:
    second = int(created)
    if _second[0] != second:
        _second[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{int(created % 1 * 1000):03d}Z"
