"""Liveness and readiness probes.

`/healthz` says the worker's event loop answers, and never touches the database, so that an
orchestrator does not restart healthy workers during a database outage, nor one that is
draining. `/readyz` says this worker can reach the database through its pool right now, and is
not draining.

A worker drains when it is told to stop (SIGTERM, service/server/worker.py): it sets
`app.extensions[DRAINING]`, and from then on `/readyz` answers 503 `draining` at once, without
touching the database, so that a load balancer sends new requests elsewhere while the worker
still serves what reaches it.
"""

from __future__ import annotations

import gevent
from flask import Blueprint, current_app

from service.api.errors import RETRY_AFTER_S, error_response
from service.api.models import Ready, Status
from service.api.operations import Answer, route
from service.db import DatabaseUnavailable, current_pool, current_replicas

bp = Blueprint("health", __name__)

READY_DEADLINE_S = 1.0
# The app.extensions key that says the worker is draining (true): set by the worker, never unset.
DRAINING = "service.api.health.draining"


@route(
    bp,
    "GET",
    "/healthz",
    summary="Liveness: the worker answers (never touches the database)",
    answers={200: Answer("alive", Status)},
)
def healthz():
    return {"status": "ok"}


@route(
    bp,
    "GET",
    "/readyz",
    summary="Readiness: a pooled connection answers SELECT 1 within 1 s",
    answers={200: Answer("ready", Ready)},
    errors={503: "the database cannot be reached in time, or this instance is draining"},
)
def readyz():
    """200 when a pooled connection answers `SELECT 1` within one second, else 503; 503
    `draining` at once, without the query, once the worker is draining.

    The deadline covers the wait for a connection and the query; a query still running at
    the deadline is abandoned and its connection discarded by the pool. With replicas, it
    also reports each replica as this worker last saw it (`state`: up, down, lagging,
    promoted, joining; lag in bytes and seconds); a replica down does not make it 503, since
    reads then go to the primary.
    """
    if current_app.extensions.get(DRAINING):
        response = error_response(
            503, "draining", "this instance is shutting down: send requests to another"
        )
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response
    pool = current_pool()
    late = DatabaseUnavailable(f"no answer within {READY_DEADLINE_S:g} s")
    with (
        gevent.Timeout(READY_DEADLINE_S, late),
        pool.connection(READY_DEADLINE_S, autocommit=True) as db,
    ):
        db.execute("SELECT 1")
    replicas = current_replicas()
    if replicas is None:
        return {"status": "ok", "pool": pool.stats()}
    return {"status": "ok", "pool": pool.stats(), "replicas": replicas.report()}
