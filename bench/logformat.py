"""`python -m bench.logformat`: a micro-benchmark of one log line, ours against the libraries.

Issue 27 asks whether structlog or python-json-logger would make service/observability/logs.py
shorter and no slower. Each variant here does what logs.py does for the same line, each the
way its library's documentation shows: the access line (the fields of `_log_access`, one JSON
object, one write to stdout) and a library record (a warning inside a request, through a
`logging.Formatter`), both with our `redact()` and request id, which neither library has.

- ours: logs.py itself, `_log_access` in a request context and `JsonFormatter.format`;
- structlog: a `WriteLogger` on stdout with `TimeStamper`, `JSONRenderer` and a redacting
  processor for the access line, `ProcessorFormatter` for records; each with the standard
  library's `json.dumps` and with orjson (structlog's documented faster serializer);
- python-json-logger: its `JsonFormatter` (and `OrjsonFormatter`) for records; it formats
  `logging` records only, so its access line goes through `logging` (a handler on stdout).

A micro-benchmark: the time of one line, in one process, stdout sent to /dev/null; no server,
no client, no database. Each variant runs `--number` lines per repeat, the variants taking
turns over `--repeat` repeats, and the least time per line is kept (the one least disturbed
by the rest of the machine). It needs bench/requirements.txt (`make .venv/bin/.bench-installed`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import timeit
from collections.abc import Callable

import orjson
import structlog
from flask import Flask, request
from pythonjsonlogger.json import JsonFormatter as PjlJsonFormatter
from pythonjsonlogger.orjson import OrjsonFormatter

from service.observability import logs

PATH = "/users/42"


def _redact(_logger: object, _name: str, event: dict) -> dict:
    event["message"] = logs.redact(event["message"])
    if "exception" in event:
        event["exception"] = logs.redact(event["exception"])
    return event


def _request_id(_logger: object, _name: str, event: dict) -> dict:
    current = logs.current_request()
    event["request_id"] = current.id if current is not None else None
    event["pid"] = event["_record"].process
    return event


def structlog_access(serializer: Callable) -> Callable[[], None]:
    """The access line through a structlog logger writing straight to stdout."""
    access = structlog.wrap_logger(
        structlog.WriteLogger(sys.stdout),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            structlog.processors.EventRenamer("message"),
            _redact,
            structlog.processors.JSONRenderer(serializer),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    ).bind(logger="service.access")

    def log_access() -> None:
        current = logs.current_request()
        if not logs.access_log.isEnabledFor(logging.INFO):  # the switch logs.py keeps
            return
        duration_s = time.perf_counter() - current.started
        served = request._get_current_object()
        rule = served.url_rule
        with contextlib.suppress(OSError, ValueError):
            access.info(
                f"{served.method} {served.path} {current.status}",
                request_id=current.id,
                pid=os.getpid(),
                method=served.method,
                route=rule.rule if rule is not None else None,
                path=served.path,
                status=current.status,
                duration_ms=round(duration_s * 1000, 3),
                pool_wait_ms=round(current.pool_wait_s * 1000, 3),
                remote_addr=served.remote_addr,
            )

    return log_access


def structlog_formatter(serializer: Callable) -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            _request_id,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.EventRenamer("message"),
            _redact,
            structlog.processors.JSONRenderer(serializer),
        ],
    )


def pjl_formatter(base: type[logging.Formatter]) -> logging.Formatter:
    class Formatter(base):
        def process_log_record(self, log_data: dict) -> dict:
            log_data["message"] = logs.redact(log_data["message"])
            if "exception" in log_data:
                log_data["exception"] = logs.redact(log_data["exception"])
            current = logs.current_request()
            log_data["request_id"] = current.id if current is not None else None
            return log_data

    return Formatter(
        "{levelname}{name}{message}{process}",
        style="{",
        rename_fields={
            "levelname": "level",
            "name": "logger",
            "process": "pid",
            "exc_info": "exception",
            "stack_info": "stack",
        },
        timestamp="time",
    )


def pjl_access(formatter: logging.Formatter) -> Callable[[], None]:
    """The access line as a `logging` record with its fields in `extra`."""
    access = logging.Logger("service.access", logging.INFO)  # a logger of its own, each
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    access.addHandler(handler)

    def log_access() -> None:
        current = logs.current_request()
        duration_s = time.perf_counter() - current.started
        served = request._get_current_object()
        rule = served.url_rule
        access.info(
            "%s %s %s",
            served.method,
            served.path,
            current.status,
            extra={
                "method": served.method,
                "route": rule.rule if rule is not None else None,
                "path": served.path,
                "status": current.status,
                "duration_ms": round(duration_s * 1000, 3),
                "pool_wait_ms": round(current.pool_wait_s * 1000, 3),
                "remote_addr": served.remote_addr,
            },
        )

    return log_access


def _orjson(data: dict, **options: object) -> str:
    return orjson.dumps(data, **options).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=20_000, help="lines per repeat")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--show", action="store_true", help="print one line of each, and stop")
    args = parser.parse_args()
    if not args.show:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the whole run)
    logs.access_log.setLevel(logging.INFO)  # as gunicorn.conf.py's root level INFO makes it

    access = {
        "ours": lambda: logs._log_access(None),
        "structlog": structlog_access(json.dumps),
        "structlog, orjson": structlog_access(_orjson),
        "python-json-logger, through logging": pjl_access(pjl_formatter(PjlJsonFormatter)),
        "python-json-logger (orjson), through logging": pjl_access(pjl_formatter(OrjsonFormatter)),
    }
    formatters = {
        "ours": logs.JsonFormatter(),
        "structlog": structlog_formatter(json.dumps),
        "structlog, orjson": structlog_formatter(_orjson),
        "python-json-logger": pjl_formatter(PjlJsonFormatter),
        "python-json-logger (orjson)": pjl_formatter(OrjsonFormatter),
    }
    record = logging.LogRecord(
        "service.db.pool", logging.WARNING, __file__, 1, "held %.1f s by %s", (31.2, PATH), None
    )
    variants = {f"access line: {name}": fn for name, fn in access.items()}
    variants |= {
        f"record: {name}": (lambda f=formatter: f.format(record))
        for name, formatter in formatters.items()
    }

    app = Flask(__name__)
    app.add_url_rule("/users/<user_id>", "user", lambda user_id: "")
    with app.test_request_context(PATH, environ_base={"REMOTE_ADDR": "127.0.0.1"}):
        if args.show:
            for name, run in variants.items():
                print(f"{name}:")
                _in_a_request(run)()
                if name.startswith("record"):
                    print(run())
            return
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(args.repeat):  # the variants take turns
            for name, run in variants.items():
                seconds = timeit.timeit(_in_a_request(run), number=args.number)
                best[name] = min(best[name], seconds / args.number)
    sys.stdout = sys.__stdout__
    print(f"{'variant':<58} {'µs per line':>11} {'/ ours':>7}")
    for name, seconds in best.items():
        ours = best["access line: ours" if name.startswith("access") else "record: ours"]
        print(f"{name:<58} {seconds * 1e6:>11.2f} {seconds / ours:>7.2f}")


def _in_a_request(run: Callable[[], object]) -> Callable[[], None]:
    """`run` as the request being served would call it: with a RequestLog of its own, which
    `_log_access` ends."""

    def in_a_request() -> None:
        current = logs.RequestLog("req-1", time.perf_counter())
        current.status = 200
        logs._current.set(current)
        run()

    return in_a_request


if __name__ == "__main__":
    main()
