"""The users resource: `/users` and `/users/<id>`.

Input is checked completely before any SQL runs, so bad input stores nothing. Every handler
runs one statement, so each uses `get_db(autocommit=True)`: one round trip, no BEGIN or COMMIT.
`GET /users/<id>` goes through the worker's batch loader, so that concurrent reads of single
users share queries under load (service/db/batch.py).
Uniqueness of email is the database's job (a unique index): a race between two creators ends
in one 201 and one 409, never in two rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import psycopg2.errors
from flask import Blueprint, current_app, request

from service.api.errors import ApiError
from service.api.pagination import BIGINT_MAX, decode_cursor, encode_cursor, parse_limit
from service.db import PoolTimeout, current_pool, get_db
from service.db.batch import BatchLoader
from service.observability import logs, metrics

bp = Blueprint("users", __name__, url_prefix="/users")
LOADER = "service.api.users.loader"

NAME_MAX = 200
EMAIL_MAX = 254
FIELDS = ("name", "email")
_COLUMNS = "id, name, email, created_at"
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s.]+(\.[^@\s.]+)+")
_CONTROL_CHARS = r"\x00-\x1f\x7f-\x9f"  # C0, DEL and C1
_CONTROL = re.compile(f"[{_CONTROL_CHARS}]")
# What _read_fields() accepts as a name, as a regular expression for the OpenAPI document: no
# control character, and something besides white space.
NAME_PATTERN = rf"^[^{_CONTROL_CHARS}]*[^\s{_CONTROL_CHARS}][^{_CONTROL_CHARS}]*$"


@bp.post("")
def create_user():
    fields = _read_fields(required=True)
    with _unique_email(), get_db(autocommit=True) as db:
        db.execute(
            f"INSERT INTO users (name, email) VALUES (%(name)s, %(email)s) RETURNING {_COLUMNS}",
            fields,
        )
        user = db.fetchone()
    return _public(user), 201, {"Location": f"/users/{user['id']}"}


@bp.get("")
def list_users():
    limit = parse_limit(request.args.get("limit"))
    after = decode_cursor(request.args.get("cursor"))
    with get_db(autocommit=True) as db:
        if after is None:
            db.execute(f"SELECT {_COLUMNS} FROM users ORDER BY id DESC LIMIT %s", (limit + 1,))
        else:
            db.execute(
                f"SELECT {_COLUMNS} FROM users WHERE id < %s ORDER BY id DESC LIMIT %s",
                (after, limit + 1),
            )
        rows = db.fetchall()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1]["id"]) if len(rows) > limit else None
    return {"users": [_public(row) for row in page], "next_cursor": next_cursor}


@bp.get("/<user_id>")
def get_user(user_id: str):
    uid = _parse_id(user_id)
    return _public(_found(current_app.extensions[LOADER].get(uid)))


def user_loader() -> BatchLoader:
    """One worker's loader of users by id, whose concurrent lookups share queries
    (service/db/batch.py); `create_app` keeps it in `app.extensions[LOADER]`."""
    return BatchLoader(
        _users_by_id,
        turn_timeout=_turn_timeout,
        answer_timeout=_answer_timeout,
        timed_out=_no_connection_in_time,
        waited=logs.add_pool_wait,
        answered=metrics.lookups_answered,
    )


def _turn_timeout() -> float:
    """How long a lookup may wait for its query to hold a connection; PoolTimeout at once
    when DB_POOL_MAX_WAITING requests already wait for one (lookups in batches included)."""
    pool = current_pool()
    refused = pool.waiting_cap_reached()
    if refused is not None:
        raise pool.turned_away(refused)
    return pool.timeout


def _answer_timeout() -> float:
    """How long a lookup waits for the answer to a query that holds a connection: as long as
    the pool lets its sender wait for it, and a second more for the sender to hand it over."""
    return current_pool().statement_deadline_s + 1.0


def _no_connection_in_time() -> PoolTimeout:
    pool = current_pool()
    return pool.turned_away(f"no database connection became free within {pool.timeout:g} s")


def _users_by_id(
    ids: Sequence[int], waited_s: float, connected: Callable[[], None]
) -> dict[int, dict]:
    # The wait for its turn counts against the wait for a connection.
    with get_db(max(0.0, current_pool().timeout - waited_s), autocommit=True) as db:
        connected()
        db.execute(f"SELECT {_COLUMNS} FROM users WHERE id = ANY(%s)", (list(set(ids)),))
        return {row["id"]: row for row in db.fetchall()}


@bp.patch("/<user_id>")
def update_user(user_id: str):
    uid = _parse_id(user_id)
    fields = _read_fields(required=False)
    with _unique_email(), get_db(autocommit=True) as db:
        db.execute(
            "UPDATE users SET name = COALESCE(%(name)s, name),"
            f" email = COALESCE(%(email)s, email) WHERE id = %(id)s RETURNING {_COLUMNS}",
            {"name": None, "email": None, **fields, "id": uid},
        )
        user = db.fetchone()
    return _public(_found(user))


@bp.delete("/<user_id>")
def delete_user(user_id: str):
    uid = _parse_id(user_id)
    with get_db(autocommit=True) as db:
        db.execute("DELETE FROM users WHERE id = %s", (uid,))
        deleted = db.rowcount
    if not deleted:
        raise _not_found()
    return "", 204


def _parse_id(raw: str) -> int:
    """A user id is 1 to 2**63-1 in plain ASCII digits; anything else names no user (404)."""
    if re.fullmatch(r"[0-9]{1,19}", raw) and 0 < int(raw) <= BIGINT_MAX:
        return int(raw)
    raise _not_found()


def _found(row: dict | None) -> dict:
    if row is None:
        raise _not_found()
    return row


def _not_found() -> ApiError:
    return ApiError(404, "not_found", "no such user")


def _read_fields(required: bool) -> dict[str, str]:
    """The validated fields of the JSON body: all of them to create, at least one to update."""
    try:
        body = request.get_json()  # 415 when not JSON, 400 when malformed, 413 when over 1 MiB
    except RecursionError:  # valid JSON nested deeper than the parser goes: still the client's
        raise ApiError(400, "bad_request", "the JSON body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_body", "the body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown field(s): {', '.join(unknown)}")
    missing = [name for name in FIELDS if name not in body]
    if required and missing:
        raise ApiError(422, "missing_field", f"missing field(s): {', '.join(missing)}")
    if not body:
        raise ApiError(422, "missing_field", "give name, email or both")
    fields = {}
    if "name" in body:
        fields["name"] = _text(body["name"], "name", NAME_MAX).strip()
        if not fields["name"]:
            raise ApiError(422, "invalid_name", "name must not be blank")
    if "email" in body:
        fields["email"] = _text(body["email"], "email", EMAIL_MAX)
        if not _EMAIL.fullmatch(fields["email"]):
            raise ApiError(422, "invalid_email", "email must look like name@example.com")
    return fields


def _text(value, field: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise ApiError(422, f"invalid_{field}", f"{field} must be a string")
    if not 1 <= len(value) <= max_len:
        raise ApiError(422, f"invalid_{field}", f"{field} must be 1 to {max_len} characters")
    if _CONTROL.search(value):
        raise ApiError(422, f"invalid_{field}", f"{field} must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800" cannot be stored
        raise ApiError(422, f"invalid_{field}", f"{field} is not valid Unicode text") from None
    return value


@contextmanager
def _unique_email() -> Iterator[None]:
    """Turn the unique index's verdict into 409."""
    try:
        yield
    except psycopg2.errors.UniqueViolation as exc:
        raise ApiError(409, "email_taken", "a user with this email already exists") from exc


def _public(user: dict) -> dict:
    return {**user, "created_at": user["created_at"].isoformat()}
