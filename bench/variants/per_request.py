"""The seed's "before": Flask opening a new psycopg2 connection for every request.

Honest, not handicapped: it runs under the same gevent workers with psycogreen as the service
(`per_request.conf.py`), sends one round trip per query (autocommit: no BEGIN, no COMMIT),
sets the statement timeout as a startup option (no extra round trip), and answers the same
JSON as the service. What it cannot avoid is the cost it exists to show: a TCP connection, a
SCRAM authentication and a new server process for every request.
"""

from __future__ import annotations

import os

import psycopg2
from flask import Flask
from psycopg2.extras import RealDictCursor

DSN = os.environ["DATABASE_URL"]
SELECT_USER = "SELECT id, name, email, created_at FROM users WHERE id = %s"

app = Flask(__name__)
app.json.sort_keys = False


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.get("/users/<int:user_id>")
def get_user(user_id: int):
    conn = psycopg2.connect(
        DSN, connect_timeout=5, options="-c statement_timeout=5000", cursor_factory=RealDictCursor
    )
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(SELECT_USER, (user_id,))
            user = cur.fetchone()
    finally:
        conn.close()
    if user is None:
        return {"error": {"code": "not_found", "message": "no such user"}}, 404
    return {**user, "created_at": user["created_at"].isoformat()}


@app.errorhandler(psycopg2.OperationalError)
def unavailable(exc: psycopg2.OperationalError):
    """Connection refused or too many clients: 503, as the service answers an outage."""
    return {"error": {"code": "database_unavailable", "message": str(exc).strip()}}, 503
