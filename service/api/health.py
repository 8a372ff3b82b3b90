"""Liveness and readiness probes.

`/healthz` says the worker's event loop answers, and never touches the database, so that an
orchestrator does not restart healthy workers during a database outage. `/readyz` says this
worker can reach the database through its pool right now.
"""

from __future__ import annotations

import gevent
from flask import Blueprint

from service.db import DatabaseUnavailable, current_pool

bp = Blueprint("health", __name__)

READY_DEADLINE_S = 1.0


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    """200 when a pooled connection answers `SELECT 1` within one second, else 503.

    The deadline covers the wait for a connection and the query; a query still running at
    the deadline is abandoned and its connection discarded by the pool.
    """
    pool = current_pool()
    late = DatabaseUnavailable(f"no answer within {READY_DEADLINE_S:g} s")
    with (
        gevent.Timeout(READY_DEADLINE_S, late),
        pool.connection(READY_DEADLINE_S, autocommit=True) as db,
    ):
        db.execute("SELECT 1")
    return {"status": "ok", "pool": pool.stats()}
