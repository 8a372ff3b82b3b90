"""What a request pays to reach the database, measured one request at a time, no load.

Before: `psycopg2.connect()` (TCP, SCRAM authentication, a new server process), as the
per-request variant does. After: a checkout and return through the service's own get_db(),
`get_db()`, with a warm pool; a block that runs no statement sends nothing to the server.
Both are also timed with the users SELECT inside, which is the whole database part of a
request.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2

from bench.database import SELECT_USER
from config import load_settings
from service import db
from service.app import create_app

CONNECTS = 200
CHECKOUTS = 5000


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p99_ms: float


@dataclass(frozen=True)
class ConnectTimes:
    connect: Timing  # psycopg2.connect + close
    connect_and_select: Timing
    checkout: Timing  # `with get_db(): pass`
    checkout_and_select: Timing


def measure(dsn: str) -> ConnectTimes:
    def connect() -> None:
        psycopg2.connect(dsn).close()

    def connect_and_select() -> None:
        conn = psycopg2.connect(dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(SELECT_USER, (1,))
                cur.fetchone()
        finally:
            conn.close()

    app = create_app(load_settings({"DATABASE_URL": dsn, "WEB_CONCURRENCY": "1"}))
    db.open_pool(app)
    try:
        with app.app_context():

            def checkout() -> None:
                with db.get_db():
                    pass

            def checkout_and_select() -> None:
                with db.get_db() as cur:
                    cur.execute(SELECT_USER, (1,))
                    cur.fetchone()

            return ConnectTimes(
                connect=_time(connect, CONNECTS),
                connect_and_select=_time(connect_and_select, CONNECTS),
                checkout=_time(checkout, CHECKOUTS),
                checkout_and_select=_time(checkout_and_select, CHECKOUTS // 5),
            )
    finally:
        db.close_pool(app)


def _time(action: Callable[[], None], times: int) -> Timing:
    action()  # the first one opens what later ones reuse
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return Timing(median_ms=cuts[49], p99_ms=cuts[98])
