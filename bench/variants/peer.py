"""The Flask peers: what one might pick instead, Flask with psycopg 3 and psycopg_pool.

One app, two gunicorn set-ups: gthread workers (`peer.conf.py`) and gunicorn's stock gevent
worker (`peer_gevent.conf.py`). Honest, not handicapped: a fixed pool of DB_POOL_MAX connections
per worker, opened after fork, waiting up to DB_POOL_TIMEOUT for a connection as the service
does; autocommit, so that every route is one round trip; rows as dicts; the statement timeout
as a startup option; psycopg's automatic server-side prepare of repeated queries left on.

The routes answer as the service's do (service/api/users.py), with the same statements:
GET /users/<id> one SELECT by id, GET /users one SELECT ... LIMIT limit + 1 (newest first, a
`next_cursor` for the first page only), POST /users one INSERT ... RETURNING (201, Location),
PATCH /users/<id> one UPDATE ... RETURNING; a taken email is 409, no such user 404. Input is
checked only as far as the bench's requests need.
"""

from __future__ import annotations

import base64
import os

import psycopg
from flask import Flask, request
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

COLUMNS = "id, name, email, created_at"
SELECT_USER = f"SELECT {COLUMNS} FROM users WHERE id = %s"
LIST_USERS = f"SELECT {COLUMNS} FROM users ORDER BY id DESC LIMIT %s"
INSERT_USER = f"INSERT INTO users (name, email) VALUES (%(name)s, %(email)s) RETURNING {COLUMNS}"
UPDATE_USER = (
    "UPDATE users SET name = COALESCE(%(name)s, name), email = COALESCE(%(email)s, email)"
    f" WHERE id = %(id)s RETURNING {COLUMNS}"
)
DEFAULT_LIMIT, MAX_LIMIT = 50, 500  # as service/api/pagination.py

app = Flask(__name__)
app.json.sort_keys = False
pool: ConnectionPool | None = None


def open_pool() -> None:
    """Open this worker's pool and wait until every connection is up (after fork only)."""
    global pool
    size = int(os.environ["DB_POOL_MAX"])
    pool = ConnectionPool(
        os.environ["DATABASE_URL"],
        min_size=size,
        max_size=size,
        timeout=float(os.environ["DB_POOL_TIMEOUT"]),
        kwargs={
            "autocommit": True,
            "row_factory": dict_row,
            "options": "-c statement_timeout=5000",
        },
        open=True,
    )
    pool.wait()


def close_pool() -> None:
    if pool is not None:
        pool.close()


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.get("/users/<int:user_id>")
def get_user(user_id: int):
    with pool.connection() as conn:
        user = conn.execute(SELECT_USER, (user_id,)).fetchone()
    return _public(user) if user else _not_found()


@app.get("/users")
def list_users():
    limit = min(int(request.args.get("limit", DEFAULT_LIMIT)), MAX_LIMIT)
    with pool.connection() as conn:
        rows = conn.execute(LIST_USERS, (limit + 1,)).fetchall()
    page = rows[:limit]
    next_cursor = _cursor(page[-1]["id"]) if len(rows) > limit else None
    return {"users": [_public(row) for row in page], "next_cursor": next_cursor}


@app.post("/users")
def create_user():
    body = request.get_json()
    with pool.connection() as conn:
        user = conn.execute(INSERT_USER, {"name": body["name"], "email": body["email"]}).fetchone()
    return _public(user), 201, {"Location": f"/users/{user['id']}"}


@app.patch("/users/<int:user_id>")
def update_user(user_id: int):
    body = request.get_json()
    fields = {"name": body.get("name"), "email": body.get("email"), "id": user_id}
    with pool.connection() as conn:
        user = conn.execute(UPDATE_USER, fields).fetchone()
    return _public(user) if user else _not_found()


@app.errorhandler(psycopg.errors.UniqueViolation)
def email_taken(exc: psycopg.errors.UniqueViolation):
    return {"error": {"code": "email_taken", "message": "a user with this email exists"}}, 409


@app.errorhandler(PoolTimeout)
def busy(exc: PoolTimeout):
    return {"error": {"code": "pool_timeout", "message": str(exc)}}, 503


def _public(user: dict) -> dict:
    return {**user, "created_at": user["created_at"].isoformat()}


def _not_found():
    return {"error": {"code": "not_found", "message": "no such user"}}, 404


def _cursor(last_id: int) -> str:
    """The service's cursor for the page after `last_id` (service/api/pagination.py)."""
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")
