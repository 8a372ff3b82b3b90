"""The HTTP API through Flask's test client, against the real PostgreSQL.

Every status the API promises, with the database checked behind its back (the `admin` cursor):
bad input stores nothing, a refused change changes nothing, and after a 503 the pool is whole.
"""

import base64
import time
from datetime import UTC, datetime

import flask
import gevent
import psycopg2
import pytest
from gunicorn_proc import free_port
from loadgen import join_all
from pgutil import only_connection_held, seed_users

from service import db
from service.app import create_app

TOO_BIG = 2**63


def assert_error(response, status: int, code: str | None = None) -> dict:
    """A JSON error of the documented shape: no HTML, no traceback."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    text = response.get_data(as_text=True)
    assert "<html" not in text.lower()
    assert "Traceback" not in text
    error = response.get_json()["error"]
    # A 500 names the request, whose traceback the log holds; no other error needs to.
    assert set(error) == (
        {"code", "message", "request_id"} if status == 500 else {"code", "message"}
    )
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def assert_retry_later(response, code: str) -> None:
    assert_error(response, 503, code)
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1


def stored_users(admin) -> list[tuple]:
    admin.execute("SELECT id, name, email FROM users ORDER BY id")
    return admin.fetchall()


def create(client, name="Ada Lovelace", email="ada@example.com") -> dict:
    response = client.post("/users", json={"name": name, "email": email})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def pool_stats(app) -> dict:
    with app.app_context():
        return db.current_pool().stats()


@pytest.fixture
def unreachable_app(make_app):
    """An app whose database refuses connections (nothing listens on the port)."""
    return make_app(
        DATABASE_URL=f"postgresql://nobody:secret@127.0.0.1:{free_port()}/nowhere",
        DB_CONNECT_TIMEOUT=1,
    )


# POST /users


def test_create_returns_201_with_location_and_the_stored_user(client, admin):
    response = client.post("/users", json={"name": "  Ada Lovelace ", "email": "ada@example.com"})
    assert response.status_code == 201
    user = response.get_json()
    assert set(user) == {"id", "name", "email", "created_at"}
    assert isinstance(user["id"], int) and user["id"] >= 1
    assert response.headers["Location"] == f"/users/{user['id']}"
    assert user["name"] == "Ada Lovelace"  # surrounding blanks are not part of a name
    assert user["email"] == "ada@example.com"
    assert datetime.fromisoformat(user["created_at"]).tzinfo is not None
    assert stored_users(admin) == [(user["id"], "Ada Lovelace", "ada@example.com")]
    assert client.get(response.headers["Location"]).get_json() == user


def test_create_accepts_values_at_their_limits_and_any_script(client, admin):
    longest_email = "a@" + "b" * 248 + ".com"
    assert len(longest_email) == 254
    for name, email in [
        ("x" * 200, longest_email),
        ("Zoë 李 🎉", "zoe@example.org"),
        ("Q", "q@a.b"),
    ]:
        assert create(client, name, email)["name"] == name
    assert len(stored_users(admin)) == 3


def test_create_accepts_json_with_a_charset(client):
    response = client.post(
        "/users",
        data=b'{"name": "Ada", "email": "ada@example.com"}',
        content_type="application/json; charset=utf-8",
    )
    assert response.status_code == 201


def test_a_duplicate_email_gives_409_and_stores_one_row(client, admin):
    first = create(client, "Ada", "ada@example.com")
    response = client.post("/users", json={"name": "Other Ada", "email": "ada@example.com"})
    assert_error(response, 409, "email_taken")
    assert stored_users(admin) == [(first["id"], "Ada", "ada@example.com")]
    assert create(client, "Bob", "bob@example.com")  # the connection survived the violation


def test_racing_creates_of_one_email_store_one_row(app, admin):
    def post():
        return app.test_client().post("/users", json={"name": "Ada", "email": "ada@example.com"})

    racers = [gevent.spawn(post) for _ in range(10)]
    join_all(racers, 30, "the greenlets")
    statuses = sorted(racer.value.status_code for racer in racers)
    assert statuses == [201] + [409] * 9
    assert len(stored_users(admin)) == 1


INVALID_USERS = [
    ({"email": "ada@example.com"}, "missing_field"),
    ({"name": "Ada"}, "missing_field"),
    ({}, "missing_field"),
    ({"name": "Ada", "email": "ada@example.com", "admin": True}, "unknown_field"),
    ({"name": "", "email": "ada@example.com"}, "invalid_name"),
    ({"name": " \t ", "email": "ada@example.com"}, "invalid_name"),
    ({"name": "x" * 201, "email": "ada@example.com"}, "invalid_name"),
    ({"name": "Ada\nLovelace", "email": "ada@example.com"}, "invalid_name"),
    ({"name": "Ada\x00", "email": "ada@example.com"}, "invalid_name"),
    ({"name": "Ada\x7f", "email": "ada@example.com"}, "invalid_name"),
    ({"name": "Ada\x85", "email": "ada@example.com"}, "invalid_name"),
    ({"name": 42, "email": "ada@example.com"}, "invalid_name"),
    ({"name": None, "email": "ada@example.com"}, "invalid_name"),
    ({"name": ["Ada"], "email": "ada@example.com"}, "invalid_name"),
    ({"name": True, "email": "ada@example.com"}, "invalid_name"),
    ({"name": "Ada", "email": "ada.example.com"}, "invalid_email"),
    ({"name": "Ada", "email": "ada@example"}, "invalid_email"),
    ({"name": "Ada", "email": "@example.com"}, "invalid_email"),
    ({"name": "Ada", "email": "ada@@example.com"}, "invalid_email"),
    ({"name": "Ada", "email": "a da@example.com"}, "invalid_email"),
    ({"name": "Ada", "email": ""}, "invalid_email"),
    ({"name": "Ada", "email": "a@" + "b" * 249 + ".com"}, "invalid_email"),  # 255 chars
    ({"name": "Ada", "email": 7}, "invalid_email"),
    ({"name": "Ada", "email": {"at": "example.com"}}, "invalid_email"),
    ([{"name": "Ada", "email": "ada@example.com"}], "invalid_body"),
    (42, "invalid_body"),
    ("Ada", "invalid_body"),
]


def test_invalid_users_give_422_and_store_nothing(client, admin, subtests):
    for body, code in INVALID_USERS:
        with subtests.test(body=repr(body)[:60]):
            assert_error(client.post("/users", json=body), 422, code)
            assert stored_users(admin) == []


def test_a_json_null_body_gives_422(client, admin):
    response = client.post("/users", data=b"null", content_type="application/json")
    assert_error(response, 422, "invalid_body")
    assert stored_users(admin) == []


def test_a_lone_surrogate_in_a_name_gives_422(client, admin):
    body = b'{"name": "Ada \\ud800", "email": "ada@example.com"}'
    response = client.post("/users", data=body, content_type="application/json")
    assert_error(response, 422, "invalid_name")
    assert stored_users(admin) == []


def test_a_lone_surrogate_in_an_unknown_field_is_quoted_in_its_422(client, admin):
    """orjson refuses such text; the error that quotes it is still written, escaped."""
    body = b'{"name": "Ada", "email": "ada@example.com", "x\\ud800": 1}'
    response = client.post("/users", data=body, content_type="application/json")
    assert_error(response, 422, "unknown_field")
    assert b"x\\ud800" in response.get_data()
    assert response.get_json()["error"]["message"] == "unknown field(s): x\ud800"
    assert stored_users(admin) == []


def test_what_orjson_refuses_goes_out_with_dates_as_orjson_writes_them(client):
    """The standard library's encoder takes over for text with a lone surrogate, and writes a
    date as every other response does (Flask's own encoder would write an HTTP date)."""
    at = datetime(2026, 12, 3, 19, 1, 34, 120000, tzinfo=UTC)
    refused = {"at": at, "day": at.date(), "name": "x\ud800"}
    body = client.application.json.response(refused).get_data(as_text=True)
    dates = '"at":"2026-12-03T19:01:34.120000+00:00","day":"2026-12-03"'
    assert body == "{" + dates + ',"name":"x\\ud800"}\n'


def test_a_user_goes_out_as_compact_utf_8_with_created_at_as_stored(client, admin):
    user = create(client, "Zoë 李", "zoe@example.org")
    admin.execute("SELECT created_at FROM users WHERE id = %s", (user["id"],))
    [(stored,)] = admin.fetchall()
    expected = (
        f'{{"id":{user["id"]},"name":"Zoë 李","email":"zoe@example.org",'
        f'"created_at":"{stored.isoformat()}"}}\n'
    )
    assert client.get(f"/users/{user['id']}").get_data() == expected.encode()


MALFORMED_JSON = [
    b'{"name": "Ada", "email": ',
    b"{'name': 'Ada', 'email': 'ada@example.com'}",
    b'{"name": "Ada", "email": "ada@example.com"} trailing',
    b"",
    b"\xff\xfe not utf-8",
    b"[" * 100_000 + b"]" * 100_000,  # valid JSON, nested deeper than any parser goes
]


def test_malformed_json_gives_400_and_stores_nothing(client, admin, subtests):
    for body in MALFORMED_JSON:
        with subtests.test(body=body[:40]):
            response = client.post("/users", data=body, content_type="application/json")
            assert_error(response, 400)
            assert stored_users(admin) == []


NOT_JSON = [
    {"data": '{"name": "Ada", "email": "ada@example.com"}', "content_type": "text/plain"},
    {"data": {"name": "Ada", "email": "ada@example.com"}},  # a form
    {"data": b'{"name": "Ada", "email": "ada@example.com"}'},  # no content type
]


def test_a_body_that_is_not_json_gives_415_and_stores_nothing(client, admin, subtests):
    for kwargs in NOT_JSON:
        with subtests.test(kwargs=kwargs):
            assert_error(client.post("/users", **kwargs), 415, "unsupported_media_type")
            assert stored_users(admin) == []


def cut_short(body: bytes) -> dict:
    """What gunicorn hands the app when a body ends before its Content-Length: the bytes that
    came, an input it says it terminates (`wsgi.input_terminated`, so werkzeug reads it as it
    is), and the Content-Length the head promised."""
    return {
        "data": body,
        "content_type": "application/json",
        "environ_overrides": {
            "wsgi.input_terminated": True,
            "CONTENT_LENGTH": str(len(body) + 10),
        },
    }


def test_a_body_shorter_than_its_content_length_gives_400_and_stores_nothing(client, admin):
    """A whole JSON object, 10 bytes short of its Content-Length, from a client that is still
    there: the app refuses the body itself (service/app.py), hang-up or not."""
    before = create(client)
    create_ = client.post("/users", **cut_short(b'{"name":"a","email":"a@example.com"}'))
    update = client.patch(f"/users/{before['id']}", **cut_short(b'{"name":"a"}'))

    for response in (create_, update):
        assert_error(response, 400, "bad_request")
    assert stored_users(admin) == [(before["id"], "Ada Lovelace", "ada@example.com")]


def test_a_body_over_one_mib_gives_413_and_stores_nothing(client, admin):
    name = "x" * (1 << 20)
    response = client.post("/users", json={"name": name, "email": "ada@example.com"})
    assert_error(response, 413, "request_entity_too_large")
    assert stored_users(admin) == []


WRONG_METHODS = [
    ("put", "/users/1", {"GET", "PATCH", "DELETE"}),
    ("post", "/users/1", {"GET", "PATCH", "DELETE"}),
    ("delete", "/users", {"GET", "POST"}),
    ("patch", "/users", {"GET", "POST"}),
    ("post", "/healthz", {"GET"}),
    ("delete", "/openapi.json", {"GET"}),
]


def test_a_wrong_method_gives_405_with_allow(client, subtests):
    for method, path, allowed in WRONG_METHODS:
        with subtests.test(method=method, path=path):
            response = getattr(client, method)(path)
            assert_error(response, 405, "method_not_allowed")
            allow = {name.strip() for name in response.headers["Allow"].split(",")}
            assert allowed <= allow
            assert method.upper() not in allow


def test_an_unknown_route_gives_json_404(client, subtests):
    for path in ["/", "/nope", "/users/1/friends", "/users/", "/static/x.js"]:
        with subtests.test(path=path):
            assert_error(client.get(path), 404, "not_found")


def test_an_unexpected_error_gives_json_500_without_details(app, caplog):
    def boom():
        raise psycopg2.ProgrammingError("SELECT secret FROM postgresql://u:hunter2@db/app")

    app.add_url_rule("/boom", view_func=boom)
    response = app.test_client().get("/boom")
    error = assert_error(response, 500, "internal_error")
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert "hunter2" not in response.get_data(as_text=True)
    assert "unhandled error" in caplog.text  # the traceback goes to the log instead


# GET /users/<id>


def test_get_returns_the_user(client):
    user = create(client)
    response = client.get(f"/users/{user['id']}")
    assert response.status_code == 200
    assert response.get_json() == user


NOT_USER_IDS = [
    str(TOO_BIG - 1),  # a valid id that names no user
    "0",
    "-1",
    "abc",
    "1.5",
    "1e3",
    "0x1",
    "+1",
    str(TOO_BIG),  # out of bigint range
    "9" * 40,
    "\u0661\u0662",  # Arabic-Indic digits: int() would take them, a user id does not
    "\uff11",  # fullwidth digit
    "1%0A",
    "%20",
    "%F0%9F",  # not UTF-8
]


def test_ids_that_name_no_user_give_404_never_500(client, admin, subtests):
    create(client)
    before = stored_users(admin)
    for user_id in NOT_USER_IDS:
        with subtests.test(user_id=user_id):
            assert_error(client.get(f"/users/{user_id}"), 404, "not_found")
            assert_error(client.delete(f"/users/{user_id}"), 404, "not_found")
            patch = client.patch(f"/users/{user_id}", json={"name": "Bob"})
            assert_error(patch, 404, "not_found")
    assert stored_users(admin) == before


# PATCH /users/<id>


@pytest.mark.parametrize(
    "change",
    [{"name": "Bob"}, {"email": "bob@example.com"}, {"name": "Bob", "email": "bob@example.com"}],
    ids=["name", "email", "both"],
)
def test_patch_changes_only_the_fields_given(client, admin, change):
    user = create(client, "Ada", "ada@example.com")
    response = client.patch(f"/users/{user['id']}", json=change)
    assert response.status_code == 200
    expected = {**user, **change}
    assert response.get_json() == expected
    assert stored_users(admin) == [(user["id"], expected["name"], expected["email"])]


def test_patch_may_keep_the_users_own_email(client):
    user = create(client, "Ada", "ada@example.com")
    response = client.patch(f"/users/{user['id']}", json={"email": "ada@example.com"})
    assert response.status_code == 200


def test_patch_of_a_missing_user_gives_404(client, admin):
    user = create(client)
    client.delete(f"/users/{user['id']}")
    assert_error(client.patch(f"/users/{user['id']}", json={"name": "Bob"}), 404, "not_found")
    assert stored_users(admin) == []


def test_patch_to_another_users_email_gives_409_and_changes_nothing(client, admin):
    ada = create(client, "Ada", "ada@example.com")
    bob = create(client, "Bob", "bob@example.com")
    before = stored_users(admin)
    response = client.patch(f"/users/{bob['id']}", json={"name": "Rob", "email": "ada@example.com"})
    assert_error(response, 409, "email_taken")
    assert stored_users(admin) == before
    assert client.get(f"/users/{ada['id']}").get_json() == ada


INVALID_CHANGES = [
    ({}, "missing_field"),
    ({"nickname": "B"}, "unknown_field"),
    ({"name": "Bob", "id": 99}, "unknown_field"),
    ({"name": ""}, "invalid_name"),
    ({"name": "   "}, "invalid_name"),
    ({"name": None}, "invalid_name"),  # null does not mean "leave it"
    ({"name": "x" * 201}, "invalid_name"),
    ({"name": "B\tob"}, "invalid_name"),
    ({"email": "bob"}, "invalid_email"),
    ({"email": None}, "invalid_email"),
    ({"email": 5}, "invalid_email"),
    ({"name": "Bob", "email": "bob"}, "invalid_email"),  # one bad field spoils the other
    (["name", "Bob"], "invalid_body"),
]


def test_invalid_changes_give_422_and_change_nothing(client, admin, subtests):
    user = create(client, "Ada", "ada@example.com")
    before = stored_users(admin)
    for body, code in INVALID_CHANGES:
        with subtests.test(body=repr(body)[:60]):
            assert_error(client.patch(f"/users/{user['id']}", json=body), 422, code)
            assert stored_users(admin) == before


def test_patch_with_a_bad_body_gives_400_or_415_and_changes_nothing(client, admin):
    user = create(client, "Ada", "ada@example.com")
    before = stored_users(admin)
    path = f"/users/{user['id']}"
    assert_error(client.patch(path, data=b'{"name": ', content_type="application/json"), 400)
    assert_error(client.patch(path, data="name=Bob", content_type="text/plain"), 415)
    assert stored_users(admin) == before


# DELETE /users/<id>


def test_delete_gives_204_then_404(client, admin):
    user = create(client)
    keep = create(client, "Bob", "bob@example.com")
    response = client.delete(f"/users/{user['id']}")
    assert response.status_code == 204
    assert response.get_data() == b""
    assert "Content-Type" not in response.headers  # no body, so no type
    assert_error(client.get(f"/users/{user['id']}"), 404, "not_found")
    assert_error(client.delete(f"/users/{user['id']}"), 404, "not_found")
    assert stored_users(admin) == [(keep["id"], "Bob", "bob@example.com")]


# GET /users


def test_options_answers_allow_with_no_body_and_no_type(client):
    response = client.options("/users")
    assert response.status_code == 200
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST", "OPTIONS"}
    assert response.get_data() == b""
    assert "Content-Type" not in response.headers


def test_an_empty_list_has_no_next_cursor(client):
    assert client.get("/users").get_json() == {"users": [], "next_cursor": None}


def test_list_is_newest_first_fifty_by_default(client, admin):
    ids = seed_users(admin, 51)
    page = client.get("/users").get_json()
    assert [user["id"] for user in page["users"]] == ids[::-1][:50]
    assert set(page["users"][0]) == {"id", "name", "email", "created_at"}
    rest = client.get("/users", query_string={"cursor": page["next_cursor"]}).get_json()
    assert [user["id"] for user in rest["users"]] == [ids[0]]
    assert rest["next_cursor"] is None


def test_limits_from_1_to_500_are_honoured(client, admin, subtests):
    ids = seed_users(admin, 501)
    for limit in (1, 7, 500):
        with subtests.test(limit=limit):
            page = client.get("/users", query_string={"limit": limit}).get_json()
            assert [user["id"] for user in page["users"]] == ids[::-1][:limit]
            assert page["next_cursor"] is not None


def test_a_full_last_page_has_no_next_cursor(client, admin):
    seed_users(admin, 7)
    page = client.get("/users?limit=7").get_json()
    assert len(page["users"]) == 7
    assert page["next_cursor"] is None


def test_a_bad_limit_gives_400(client, subtests):
    for limit in ["0", "501", "x", "-1", "", "1.0", " 5", "\u0665", "99999999999"]:
        with subtests.test(limit=limit):
            response = client.get("/users", query_string={"limit": limit})
            assert_error(response, 400, "invalid_limit")


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


BAD_CURSORS = [
    "garbage!!",
    "%%%",
    "é",
    "",
    "abc",  # not a whole number of base64 bytes
    "djE6MTA====x",  # "v1:10" with garbage after the padding
    "djE6MTA=",  # "v1:10", padded: not the text the service gives
    "djE6MTB",  # "v1:10" to a lenient decoder
    _b64("v1:010"),
    _b64("hello"),
    _b64("v1:"),
    _b64("v1:-5"),
    _b64("v1:1.5"),
    _b64("v1:\u0663"),
    _b64(f"v1:{TOO_BIG}"),
    _b64("v2:10"),
    _b64("v1:10 "),
]


def test_a_bad_cursor_gives_400(client, subtests):
    for cursor in BAD_CURSORS:
        with subtests.test(cursor=cursor):
            response = client.get("/users", query_string={"cursor": cursor})
            assert_error(response, 400, "invalid_cursor")


def test_a_tampered_cursor_gives_400(client, admin):
    seed_users(admin, 3)
    cursor = client.get("/users?limit=1").get_json()["next_cursor"]
    tampered_ones = ("A" + cursor, cursor + "A", cursor[::-1], cursor[:3] + "~" + cursor[3:])
    for tampered in tampered_ones:
        response = client.get("/users", query_string={"cursor": tampered})
        assert_error(response, 400, "invalid_cursor")


def test_walking_pages_while_users_arrive_shows_each_user_once(client, admin):
    existing = seed_users(admin, 40)
    seen, arrived, sizes = [], [], []
    cursor = None
    while True:
        query = {"limit": 7} if cursor is None else {"limit": 7, "cursor": cursor}
        page = client.get("/users", query_string=query).get_json()
        seen += [user["id"] for user in page["users"]]
        sizes.append(len(page["users"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break
        arrived.append(create(client, "New", f"new{len(arrived)}@example.com")["id"])
    assert seen == existing[::-1]  # each exactly once, newest first, no newcomer in between
    assert sizes == [7, 7, 7, 7, 7, 5]
    assert len(arrived) == 5


def test_a_page_continues_after_its_last_user_is_deleted(client, admin):
    ids = seed_users(admin, 5)
    first = client.get("/users?limit=2").get_json()
    client.delete(f"/users/{first['users'][-1]['id']}")
    rest = client.get("/users", query_string={"cursor": first["next_cursor"]}).get_json()
    assert [user["id"] for user in rest["users"]] == ids[:3][::-1]


# 503: busy, slow or unreachable database


def test_a_pool_timeout_gives_503_with_retry_after(make_app):
    app = make_app(DB_POOL_MAX=1, DB_POOL_MIN=1, DB_POOL_TIMEOUT=0.3)
    client = app.test_client()
    with only_connection_held(app):
        started = time.monotonic()
        response = client.get("/users")
        waited = time.monotonic() - started
        assert_retry_later(response, "pool_timeout")
        assert 0.25 <= waited < 0.3 + 2
        assert pool_stats(app)["waiting"] == 0
    assert pool_stats(app)["in_use"] == 0
    assert client.get("/users").status_code == 200


def test_a_statement_timeout_gives_503_and_changes_nothing(make_app, admin):
    app = make_app(DB_STATEMENT_TIMEOUT_MS=100, DB_POOL_TIMEOUT=1)
    client = app.test_client()
    user = create(client, "Ada", "ada@example.com")
    before = stored_users(admin)
    admin.execute("BEGIN")
    admin.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    try:
        blocked = [
            lambda: client.patch(f"/users/{user['id']}", json={"name": "Bob"}),
            lambda: client.delete(f"/users/{user['id']}"),
            lambda: client.post("/users", json={"name": "Bob", "email": "bob@example.com"}),
            lambda: client.get(f"/users/{user['id']}"),
            lambda: client.get("/users"),
        ]
        for request in blocked:
            started = time.monotonic()
            response = request()
            assert time.monotonic() - started < 1 + 0.1 + 2
            assert_retry_later(response, "statement_timeout")
            assert pool_stats(app)["in_use"] == 0
    finally:
        admin.execute("ROLLBACK")
    assert stored_users(admin) == before
    assert client.patch(f"/users/{user['id']}", json={"name": "Bob"}).status_code == 200


def test_a_row_lock_outlasting_the_statement_timeout_gives_503(make_app, admin):
    app = make_app(DB_STATEMENT_TIMEOUT_MS=200)
    client = app.test_client()
    user = create(client, "Ada", "ada@example.com")
    admin.execute("BEGIN")
    admin.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (user["id"],))
    try:
        patch = client.patch(f"/users/{user['id']}", json={"email": "bob@example.com"})
        assert_retry_later(patch, "statement_timeout")
        assert client.get(f"/users/{user['id']}").get_json() == user  # readers do not wait
    finally:
        admin.execute("ROLLBACK")
    assert pool_stats(app)["in_use"] == 0
    assert client.delete(f"/users/{user['id']}").status_code == 204


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("get", "/users", None),
        ("get", "/users/1", None),
        ("post", "/users", {"name": "Ada", "email": "ada@example.com"}),
        ("patch", "/users/1", {"name": "Ada"}),
        ("delete", "/users/1", None),
    ],
)
def test_an_unreachable_database_gives_503_quickly(unreachable_app, method, path, body):
    client = unreachable_app.test_client()
    started = time.monotonic()
    response = getattr(client, method)(path, json=body)
    assert time.monotonic() - started < 1 + 2
    assert_retry_later(response, "database_unavailable")
    assert "secret" not in response.get_data(as_text=True)
    assert pool_stats(unreachable_app)["in_use"] == 0


def test_bad_input_is_refused_before_an_unreachable_database_is_tried(unreachable_app):
    client = unreachable_app.test_client()
    assert_error(client.post("/users", json={"name": ""}), 422)
    assert_error(client.get("/users/abc"), 404)
    assert_error(client.get("/users?limit=0"), 400)


# Health


def test_healthz_is_ok_even_when_the_database_is_unreachable(client, unreachable_app):
    for app_client in (client, unreachable_app.test_client()):
        response = app_client.get("/healthz")
        assert response.status_code == 200
        assert response.get_json() == {"status": "ok"}


def test_readyz_reports_the_pool(make_app):
    app = make_app(DB_POOL_MAX=3, DB_POOL_MIN=2)
    response = app.test_client().get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["pool"] == {"max": 3, "size": 2, "in_use": 0, "idle": 2, "waiting": 0}


def test_readyz_gives_503_when_the_database_is_unreachable(unreachable_app):
    response = unreachable_app.test_client().get("/readyz")
    assert_retry_later(response, "database_unavailable")
    assert pool_stats(unreachable_app)["in_use"] == 0


def test_readyz_gives_503_within_a_second_when_the_server_never_answers(make_app, silent_port):
    app = make_app(DATABASE_URL=f"postgresql://u:p@127.0.0.1:{silent_port}/x", DB_POOL_MIN=0)
    started = time.monotonic()
    response = app.test_client().get("/readyz")
    assert time.monotonic() - started < 1 + 1
    assert_retry_later(response, "database_unavailable")
    assert pool_stats(app)["in_use"] == 0


def test_a_hook_is_judged_sync_or_async_once_not_on_every_request(make_settings):
    """Flask asks of every view and hook, on every request, whether it is a coroutine
    function; the app asks once per function (service/app.py's ServiceFlask)."""
    looked_up = []

    class Hook:
        def __call__(self) -> None:
            return None

        def __getattr__(self, name: str):  # what inspect reads to judge a callable
            looked_up.append(name)
            raise AttributeError(name)

    app = create_app(make_settings())
    app.before_request(Hook())
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    judged = len(looked_up)
    assert judged > 0
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz").status_code == 200
    assert len(looked_up) == judged


def test_every_request_shares_one_null_session_that_refuses_changes(make_settings):
    """The service keeps no sessions: each request gets the same null session (service/app.py's
    NoSessions) instead of a new one, and a change to it fails as Flask's own null session's
    would; no request sets a cookie."""
    app = create_app(make_settings())
    sessions = []

    @app.get("/session-probe")
    def probe():
        sessions.append(flask.session._get_current_object())
        with pytest.raises(RuntimeError, match="session is unavailable"):
            flask.session["user"] = 1
        return "", 204

    client = app.test_client()
    responses = [client.get("/session-probe") for _ in range(2)]
    assert [response.status_code for response in responses] == [204, 204]
    assert sessions[0] is sessions[1]
    assert all("Set-Cookie" not in response.headers for response in responses)
