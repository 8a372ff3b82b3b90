"""JSON log lines, one access line per request, request ids, and no password in any of it.

The first tests capture the app's log in-process through `JsonFormatter`; the last ones run the
production command with a password in DATABASE_URL and read everything it writes.
"""

import json
import logging
import re
import sys
from datetime import UTC, datetime, timedelta

import gevent
import psycopg2
import psycopg2.extensions
import pytest
from gunicorn_proc import HOST, Gunicorn, access_lines, free_port, request, wait_until
from pgutil import APP_NAME, seed_users, users_locked, waiting_on_lock

from service import db
from service.app import create_app
from service.observability.logs import redact

FIELDS = {"time", "level", "logger", "message", "request_id", "pid"}
ACCESS_FIELDS = {"method", "route", "path", "status", "duration_ms", "pool_wait_ms", "remote_addr"}
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
USER_ROUTE = "/users/<user_id>"


def parse_time(text: str) -> datetime:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text), text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def test_each_request_writes_one_access_line_with_its_fields(client, admin, log_lines):
    [user] = seed_users(admin, 1)
    response = client.get(f"/users/{user}?x=1", headers={"X-Request-ID": "req-1"})
    client.get("/healthz", headers={"X-Request-ID": "req-2"})

    assert response.status_code == 200
    [line] = access_lines(log_lines(), "req-1")
    assert line.keys() >= FIELDS | ACCESS_FIELDS
    assert abs(parse_time(line["time"]) - datetime.now(UTC)) < timedelta(minutes=1)
    assert line["level"] == "INFO"
    assert line["method"] == "GET"
    assert line["route"] == USER_ROUTE
    assert line["path"] == f"/users/{user}"
    assert line["status"] == 200
    assert line["remote_addr"] == "127.0.0.1"
    assert 0 <= line["pool_wait_ms"] < line["duration_ms"]
    [health] = access_lines(log_lines(), "req-2")
    assert health["route"] == "/healthz"
    assert health["pool_wait_ms"] == 0  # never touches the database


@pytest.mark.parametrize("sent", ["abc", "req.1_A-b", "7" * 128])
def test_a_safe_request_id_is_honoured_and_echoed(client, log_lines, sent):
    response = client.get("/healthz", headers={"X-Request-ID": sent})

    assert response.headers["X-Request-ID"] == sent
    assert len(access_lines(log_lines(), sent)) == 1


@pytest.mark.parametrize(
    "sent", [None, "", "has space", "semi;colon", "a/b", "x" * 129, "caf\u00e9", "line\tbreak"]
)
def test_a_missing_or_unsafe_request_id_is_replaced_by_a_new_one(client, log_lines, sent):
    headers = {} if sent is None else {"X-Request-ID": sent}
    first = client.get("/healthz", headers=headers).headers["X-Request-ID"]
    second = client.get("/healthz", headers=headers).headers["X-Request-ID"]

    assert GENERATED_ID.fullmatch(first) and GENERATED_ID.fullmatch(second)
    assert first != second
    assert [line["request_id"] for line in access_lines(log_lines())] == [first, second]


def test_error_responses_echo_the_request_id_too(client, make_settings, log_lines):
    unreachable = f"postgresql://app:pw@{HOST}:{free_port()}/x"
    down = create_app(make_settings(DATABASE_URL=unreachable))
    db.open_pool(down)
    try:
        responses = {
            "e-404": client.get("/no/such/route", headers={"X-Request-ID": "e-404"}),
            "e-405": client.put("/users", headers={"X-Request-ID": "e-405"}),
            "e-413": client.post(
                "/users",
                data=b"x" * ((1 << 20) + 1),
                content_type="application/json",
                headers={"X-Request-ID": "e-413"},
            ),
            "e-415": client.post("/users", data="Ada", headers={"X-Request-ID": "e-415"}),
            "e-503": down.test_client().get("/users", headers={"X-Request-ID": "e-503"}),
        }
    finally:
        db.close_pool(down)

    lines = log_lines()
    for request_id, response in responses.items():
        assert response.status_code == int(request_id[2:])
        assert response.headers["X-Request-ID"] == request_id
        [line] = access_lines(lines, request_id)
        assert line["status"] == response.status_code
    [warning] = [line for line in lines if line["logger"] == "service.api.errors"]
    assert warning["level"] == "WARNING"
    assert "database_unavailable" in warning["message"]
    assert warning["request_id"] == "e-503"


def test_the_leak_warning_names_the_request_holding_the_connection(
    make_settings, admin, database_url, log_lines
):
    [user] = seed_users(admin, 1)
    app = create_app(make_settings(DB_POOL_LEAK_WARN_S=0.05))
    db.open_pool(app)
    try:
        with users_locked(database_url):
            request = gevent.spawn(
                app.test_client().get, f"/users/{user}", headers={"X-Request-ID": "holder"}
            )
            [warning] = wait_until(
                lambda: [line for line in log_lines() if line["logger"] == "service.db.pool"],
                10,
                "the leak warning",
            )
        assert request.get(timeout=10).status_code == 200
    finally:
        db.close_pool(app)

    assert warning["level"] == "WARNING"
    assert "in get_user" in warning["message"]  # the view that took it, in the holder's stack
    assert warning["request_id"] == "holder"


def test_pool_wait_ms_is_the_time_the_request_waited_for_a_connection(
    make_settings, admin, log_lines
):
    [user] = seed_users(admin, 1)
    app = create_app(make_settings(DB_POOL_MAX=1))
    pool = db.open_pool(app)
    held_s = 0.1
    try:
        with pool.connection():  # the only connection, so the request must wait for it
            request = gevent.spawn(
                app.test_client().get, f"/users/{user}", headers={"X-Request-ID": "waiter"}
            )
            wait_until(lambda: pool.stats()["waiting"] == 1, 5, "the request to wait")
            gevent.sleep(held_s)  # how long the request waits: what the line must report
        assert request.get(timeout=10).status_code == 200
    finally:
        db.close_pool(app)

    [line] = access_lines(log_lines(), "waiter")
    assert held_s * 1000 <= line["pool_wait_ms"] < line["duration_ms"]


def test_the_access_loggers_level_switches_access_lines_off(client, log_lines):
    access = logging.getLogger("service.access")
    access.setLevel(logging.WARNING)
    try:
        response = client.get("/healthz", headers={"X-Request-ID": "quiet"})
    finally:
        access.setLevel(logging.NOTSET)
    client.get("/healthz", headers={"X-Request-ID": "loud"})

    assert response.status_code == 200
    assert access_lines(log_lines(), "quiet") == []
    assert len(access_lines(log_lines(), "loud")) == 1


class BrokenStdout:
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_broken_stdout_loses_the_access_line_not_the_request(
    client, admin, log_lines, monkeypatch
):
    [user] = seed_users(admin, 1)
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", BrokenStdout())
        response = client.get(f"/users/{user}", headers={"X-Request-ID": "lost"})
    client.get("/healthz", headers={"X-Request-ID": "after"})

    assert response.status_code == 200
    assert response.json["id"] == user
    assert access_lines(log_lines(), "lost") == []
    assert len(access_lines(log_lines(), "after")) == 1


def test_lines_outside_a_request_have_no_id_and_carry_their_traceback(log_lines):
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("service.test").exception("it failed: %s", "badly")

    [line] = log_lines()
    assert line["message"] == "it failed: badly"
    assert line["level"] == "ERROR"
    assert line["request_id"] is None
    assert "ValueError: boom" in line["exception"]


def test_every_line_is_ascii_json_whatever_text_it_carries(client, log_lines, capsys):
    """Lines are encoded by orjson, which writes non-ASCII text as UTF-8 and refuses a lone
    surrogate; the standard library's encoder then writes the same line with `\\u` escapes.
    `log_lines` routes the lines to stdout; the raw text is read here, before any parsing."""
    client.get("/caf%C3%A9", headers={"X-Request-ID": "non-ascii"})
    logging.getLogger("service").warning("x\ud800")

    written = capsys.readouterr().out
    assert written.isascii()
    [access, record] = [json.loads(line) for line in written.splitlines()]
    assert (access["request_id"], access["path"], access["status"]) == (
        "non-ascii",
        "/caf\u00e9",
        404,
    )
    assert record["message"] == "x\ud800"


def test_passwords_are_masked_in_messages_and_tracebacks(log_lines):
    assert redact("postgresql://app:s3cr@t@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert redact("host=db password=s3cret user=app") == "host=db password=*** user=app"
    assert redact("password='s3 cr\\'et' host=db") == "password=*** host=db"
    assert redact("postgresql://db/x?user=app&password=s3cret&a=b").endswith("password=***&a=b")
    assert (
        redact("https://example.com/users/1 and a@b.c") == "https://example.com/users/1 and a@b.c"
    )

    log = logging.getLogger("service.test")
    try:
        raise RuntimeError("cannot use postgresql://app:s3cret@db/x")
    except RuntimeError:
        log.exception("connect to %s failed", "dbname=x password=s3cret")
    [line] = log_lines()
    assert "s3cret" not in json.dumps(line)
    assert line["message"] == "connect to dbname=x password=*** failed"
    assert "postgresql://app:***@db/x" in line["exception"]


# --- the production command, with a password in DATABASE_URL -------------------------------


@pytest.fixture(scope="module")
def password_url(database_url) -> tuple[str, str]:
    """The test database as a URL with its password, and the password."""
    dsn = psycopg2.extensions.parse_dsn(database_url)
    if not dsn.get("password"):
        pytest.skip("the test database URL has no password to look for")
    url = (
        f"postgresql://{dsn['user']}:{dsn['password']}@{dsn['host']}:{dsn['port']}/{dsn['dbname']}"
    )
    return url, dsn["password"]


@pytest.fixture(scope="module")
def server(password_url, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "gunicorn.log"
    env = {
        "WEB_CONCURRENCY": "1",
        "DB_POOL_MAX": "1",
        "DB_POOL_MIN": "1",
        "DB_POOL_TIMEOUT": "0.3",
        "DB_STATEMENT_TIMEOUT_MS": "1000",
    }
    with Gunicorn(password_url[0], log, **env) as gunicorn:
        yield gunicorn


def log_objects(gunicorn: Gunicorn) -> list[dict]:
    lines = gunicorn.log.splitlines()
    assert lines
    objects = []
    for line in lines:
        try:
            objects.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    return objects


def test_gunicorn_writes_json_lines_only_one_access_line_per_request(server):
    port = server.port
    exchanges = {
        "e2e-ok": request(port, "GET", "/healthz", headers={"X-Request-ID": "e2e-ok"}),
        "e2e-404": request(port, "GET", "/no/such/route", headers={"X-Request-ID": "e2e-404"}),
        "e2e-405": request(port, "DELETE", "/users", headers={"X-Request-ID": "e2e-405"}),
    }
    unsafe = request(port, "GET", "/healthz", headers={"X-Request-ID": "not safe!"}).headers

    lines = log_objects(server)
    assert all(line.keys() >= FIELDS for line in lines)
    gunicorns = [line for line in lines if line["logger"] == "gunicorn.error"]
    assert any(line["message"].startswith("Booting worker") for line in gunicorns)
    assert all(line["request_id"] is None for line in gunicorns)
    for request_id, reply in exchanges.items():
        assert reply.headers["X-Request-ID"] == request_id
        [line] = access_lines(lines, request_id)
        assert line["status"] == reply.status
        assert line["remote_addr"] == HOST
    assert [reply.status for reply in exchanges.values()] == [200, 404, 405]
    assert GENERATED_ID.fullmatch(unsafe["X-Request-ID"])
    assert len(access_lines(lines, unsafe["X-Request-ID"])) == 1


def test_503s_carry_their_request_id_and_the_password_appears_nowhere(
    server, admin, database_url, password_url
):
    [user] = seed_users(admin, 1)
    port, path = server.port, f"/users/{user}"
    with users_locked(database_url):
        held = gevent.spawn(request, port, "GET", path, headers={"X-Request-ID": "held"})
        wait_until(
            lambda: waiting_on_lock(admin, APP_NAME) == 1, 10, "the request to wait on the lock"
        )
        late = request(port, "GET", path, headers={"X-Request-ID": "late"})  # no connection free
        held = held.get(timeout=10)  # the statement timeout cancels it
    exchanges = [held, late] + [
        request(port, "GET", other) for other in ("/readyz", "/metrics", "/openapi.json")
    ]

    assert [held.status, late.status] == [503, 503]
    lines = log_objects(server)
    warnings = {line["request_id"]: line for line in lines if line["level"] == "WARNING"}
    assert "statement_timeout" in warnings["held"]["message"]
    assert "pool_timeout" in warnings["late"]["message"]
    [waited] = access_lines(lines, "late")
    assert waited["status"] == 503
    assert waited["pool_wait_ms"] >= 300 * 0.9

    password = password_url[1]
    assert password not in server.log
    for reply in exchanges:
        assert password not in f"{reply.status} {reply.headers}"
        assert password.encode() not in reply.body


@pytest.mark.parametrize(("proxies", "seen"), [("1", "203.0.113.9"), ("0", HOST)])
def test_behind_a_trusted_proxy_the_access_line_names_the_client(
    database_url, admin, tmp_path, proxies, seen
):
    """With TRUSTED_PROXIES=1 gunicorn serves the app wrapped in werkzeug's ProxyFix: the
    requests still reach their pool, and the access line takes the client's address from the
    proxy's X-Forwarded-For. Without it, a client cannot choose its own address."""
    [user] = seed_users(admin, 1)
    env = {"WEB_CONCURRENCY": "1", "DB_POOL_MAX": "1", "TRUSTED_PROXIES": proxies}
    with Gunicorn(database_url, tmp_path / "gunicorn.log", **env) as gunicorn:
        headers = {"X-Request-ID": "proxied", "X-Forwarded-For": "203.0.113.9"}
        assert request(gunicorn.port, "GET", f"/users/{user}", headers=headers).status == 200
        [line] = access_lines(log_objects(gunicorn), "proxied")
    assert line["remote_addr"] == seen
