"""The asyncio peer: Starlette with an asyncpg pool, under uvicorn (uvloop, httptools).

As lean as its users would write it: each handler calls the pool itself (`pool.fetchrow()`,
`pool.fetch()`), which checks a connection out for that one statement and back in; every
route is one round trip (asyncpg runs outside a transaction unless asked); the statement
timeout as a startup setting; asyncpg's cache of prepared statements left on. Each worker
process runs one event loop with a fixed pool of DB_POOL_MAX connections, opened in the app's
lifespan. uvicorn's own worker processes serve it (`uvicorn --workers`, bench/servers.py),
with uvloop and httptools named rather than left to "auto", which would fall back to asyncio
and h11 in silence when either is missing, and its access log on, as the service writes one.

asyncpg's pool methods take no timeout for the checkout: a request waits for a connection as
long as it takes, where the service waits DB_POOL_TIMEOUT. The bench sets that to wrk's own
timeout (bench/servers.py), so a request that would have had the service's 503 is a wrk
timeout here instead, and is counted as an error either way.

The routes answer as the service's do (service/api/users.py), with the same statements: one
SELECT by id, one SELECT ... LIMIT limit + 1 (newest first, a `next_cursor` for the first page
only), one INSERT ... RETURNING (201, Location), one UPDATE ... RETURNING; a taken email is
409, no such user 404. Input is checked only as far as the bench's requests need.
"""

from __future__ import annotations

import base64
import contextlib
import os

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

COLUMNS = "id, name, email, created_at"
SELECT_USER = f"SELECT {COLUMNS} FROM users WHERE id = $1"
LIST_USERS = f"SELECT {COLUMNS} FROM users ORDER BY id DESC LIMIT $1"
INSERT_USER = f"INSERT INTO users (name, email) VALUES ($1, $2) RETURNING {COLUMNS}"
UPDATE_USER = (
    "UPDATE users SET name = COALESCE($1, name), email = COALESCE($2, email)"
    f" WHERE id = $3 RETURNING {COLUMNS}"
)
DEFAULT_LIMIT, MAX_LIMIT = 50, 500  # as service/api/pagination.py


async def get_user(request: Request) -> JSONResponse:
    user = await request.app.state.pool.fetchrow(SELECT_USER, request.path_params["user_id"])
    return _user(user) if user else _not_found()


async def list_users(request: Request) -> JSONResponse:
    limit = min(int(request.query_params.get("limit", DEFAULT_LIMIT)), MAX_LIMIT)
    rows = await request.app.state.pool.fetch(LIST_USERS, limit + 1)
    page = rows[:limit]
    next_cursor = _cursor(page[-1]["id"]) if len(rows) > limit else None
    return JSONResponse({"users": [_public(row) for row in page], "next_cursor": next_cursor})


async def create_user(request: Request) -> JSONResponse:
    body = await request.json()
    user = await request.app.state.pool.fetchrow(INSERT_USER, body["name"], body["email"])
    return _user(user, 201, {"Location": f"/users/{user['id']}"})


async def update_user(request: Request) -> JSONResponse:
    body = await request.json()
    user_id = request.path_params["user_id"]
    pool: asyncpg.Pool = request.app.state.pool
    user = await pool.fetchrow(UPDATE_USER, body.get("name"), body.get("email"), user_id)
    return _user(user) if user else _not_found()


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    """Open this worker's pool, every connection up, before serving; close it at shutdown."""
    size = int(os.environ["DB_POOL_MAX"])
    app.state.pool = await asyncpg.create_pool(
        os.environ["DATABASE_URL"],
        min_size=size,
        max_size=size,
        server_settings={"statement_timeout": "5000"},
    )
    try:
        yield
    finally:
        await app.state.pool.close()


def _public(user: asyncpg.Record) -> dict:
    return {**user, "created_at": user["created_at"].isoformat()}


def _user(user: asyncpg.Record, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(_public(user), status, headers)


def _not_found() -> JSONResponse:
    return _error(404, "not_found", "no such user")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status)


async def _email_taken(request: Request, exc: Exception) -> JSONResponse:
    return _error(409, "email_taken", "a user with this email exists")


def _cursor(last_id: int) -> str:
    """The service's cursor for the page after `last_id` (service/api/pagination.py)."""
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


app = Starlette(
    routes=[
        Route("/healthz", healthz),
        Route("/users", list_users, methods=["GET"]),
        Route("/users", create_user, methods=["POST"]),
        Route("/users/{user_id:int}", get_user, methods=["GET"]),
        Route("/users/{user_id:int}", update_user, methods=["PATCH"]),
    ],
    exception_handlers={
        asyncpg.UniqueViolationError: _email_taken,
    },
    lifespan=lifespan,
)
