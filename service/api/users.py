"""The users resource: `/users` and `/users/<id>`.

Input is checked completely before any SQL runs, so bad input stores nothing. Every handler
runs one statement, so each uses `get_db(autocommit=True)`: one round trip, no BEGIN or COMMIT.
Uniqueness of email is the database's job (a unique index): a race between two creators ends
in one 201 and one 409, never in two rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2.errors
from flask import Blueprint, request

from service.api.errors import ApiError
from service.api.pagination import BIGINT_MAX, decode_cursor, encode_cursor, parse_limit
from service.db import get_db

bp = Blueprint("users", __name__, url_prefix="/users")

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
    with get_db(autocommit=True) as db:
        db.execute(f"SELECT {_COLUMNS} FROM users WHERE id = %s", (uid,))
        user = db.fetchone()
    return _public(_found(user))


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
